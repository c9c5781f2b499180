"""Shared fixtures: tiny Gemma 4 checkpoints written once per test session by the reference implementation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """{"a", "b", "perturbed", "text_only"} -> checkpoint directory (float32, multimodal unless text_only)."""
    import tiny

    root = tmp_path_factory.mktemp("tiny_ckpts")
    return {
        "a": tiny.write_checkpoint(root / "a", "a", seed=0),
        "b": tiny.write_checkpoint(root / "b", "b", seed=1),
        "perturbed": tiny.write_checkpoint(root / "perturbed", "a", seed=2, perturbed=True),
        "text_only": tiny.write_checkpoint(root / "text_only", "b", seed=3, text_only=True),
    }
