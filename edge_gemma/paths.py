"""Where things are: the embedded default checkpoint, its drafter and the published configs (package data)."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
DEFAULT_CHECKPOINT = DATA / "default"
DEFAULT_DRAFTER = DATA / "default_drafter"  # its MTP drafter (scripts/train_default_drafter.py)
CONFIGS = DATA / "configs"
TEXT = DATA / "text"  # built-in calibration and held-out texts for quantization


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """`default` (or an empty value) means the embedded tiny model; anything else is a checkpoint directory."""
    if str(name_or_path) in ("", "default"):
        return DEFAULT_CHECKPOINT
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    return path
