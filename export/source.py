"""Which checkpoint `make export` / `edge-gemma export` exports: CHECKPOINT, VARIANT, or the embedded model.

* CHECKPOINT only: that directory (float, or quantized by `edge-gemma quantize`); `default` is the embedded model.
* VARIANT only (`e2b`, `e4b`): the Hugging Face repo of that variant is downloaded (`huggingface_hub.snapshot_download`,
  which honours `HF_ENDPOINT` and the usual cache). Without network the error says how to pass CHECKPOINT instead.
* both: the checkpoint's `config.json` must describe the variant (compared with the preset, field by field); a
  disagreement is an error naming the first differing fields. The model config always comes from the checkpoint.
* neither: the embedded default model.

The artifact's default name is the variant, the checkpoint folder's name, or `default`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_gemma.config import PRESETS, ModelConfig, load_config
from edge_gemma.paths import DEFAULT_CHECKPOINT, resolve_checkpoint

log = logging.getLogger(__name__)

__all__ = ["HF_REPOS", "Source", "SourceError", "config_differences", "default_out", "resolve_source", "variant_of"]

HF_REPOS = {"e2b": "google/gemma-4-E2B-it", "e4b": "google/gemma-4-E4B-it"}
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]


class SourceError(ValueError):
    """The checkpoint/variant pair cannot be resolved; the message says what to pass instead."""


@dataclass(frozen=True, kw_only=True)
class Source:
    path: Path  # checkpoint directory
    name: str  # artifact name stem: variant, folder name, or "default"
    variant: str | None  # e2b / e4b when asked for (or recognised from the config)
    downloaded: bool = False


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if dataclasses.is_dataclass(obj):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            out.update(_flatten(getattr(obj, f.name), f"{prefix}{f.name}."))
        return out
    if obj is None and prefix.count(".") == 1:  # a missing tower
        return {prefix[:-1]: None}
    return {prefix[:-1]: obj}


def config_differences(config: ModelConfig, preset: ModelConfig) -> list[tuple[str, Any, Any]]:
    """(field, checkpoint value, preset value) for every architecture field that differs."""
    a, b = _flatten(config), _flatten(preset)
    diffs = []
    order = {"text": 0, "vision": 1, "audio": 2}
    for key in sorted(set(a) | set(b), key=lambda k: (order.get(k.split(".")[0], 3), k)):
        if key in ("model_type",):
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va != vb:
            diffs.append((key, va, vb))
    return diffs


def variant_of(config: ModelConfig) -> str | None:
    """The preset whose text decoder this config has (e2b/e4b), or None (the embedded model, a custom model)."""
    for name, preset in PRESETS.items():
        if config.text == preset.text:
            return name
    return None


def _download(variant: str) -> Path:
    repo = HF_REPOS[variant]
    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - depends on the environment
        raise SourceError(
            f"VARIANT={variant} needs huggingface_hub to download {repo} (pip install huggingface_hub), or pass a "
            f"local checkpoint: make export CHECKPOINT=/path/to/gemma-4-{variant.upper()}-it"
        ) from None
    log.info("downloading %s from %s", repo, endpoint or "huggingface.co")
    try:
        return Path(snapshot_download(repo_id=repo, allow_patterns=DOWNLOAD_PATTERNS, endpoint=endpoint))
    except Exception as exc:  # noqa: BLE001 - network, auth, HTTP errors: all end the same way
        where = endpoint or "https://huggingface.co"
        raise SourceError(
            f"could not download {repo} from {where} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            f"Without network access, download the checkpoint elsewhere (huggingface-cli download {repo} "
            f"--local-dir DIR) and pass it: make export CHECKPOINT=DIR (or: edge-gemma export DIR)"
        ) from None


def resolve_source(variant: str | None, checkpoint: str | os.PathLike | None) -> Source:
    variant = (variant or "").strip().lower() or None
    checkpoint = str(checkpoint).strip() if checkpoint not in (None, "") else None
    if variant is not None and variant not in HF_REPOS:
        raise SourceError(f"VARIANT={variant!r} is not known; expected one of {sorted(HF_REPOS)}")
    if checkpoint is None and variant is None:
        return Source(path=DEFAULT_CHECKPOINT, name="default", variant=None)
    if checkpoint is None:
        path = _download(variant)
        return Source(path=path, name=variant, variant=variant, downloaded=True)
    path = resolve_checkpoint(checkpoint)
    name = "default" if path == DEFAULT_CHECKPOINT else path.resolve().name
    config = load_config(path)
    if variant is not None:
        diffs = config_differences(config, PRESETS[variant])
        if diffs:
            shown = "; ".join(f"{k} is {va!r} in the checkpoint, {vb!r} for {variant}" for k, va, vb in diffs[:3])
            more = f" (and {len(diffs) - 3} more fields)" if len(diffs) > 3 else ""
            raise SourceError(
                f"CHECKPOINT {path} does not match VARIANT={variant} ({HF_REPOS[variant]}): {shown}{more}; "
                f"drop VARIANT to export the checkpoint as it is"
            )
        return Source(path=path, name=variant, variant=variant)
    return Source(path=path, name=name, variant=variant_of(config))


def default_out(source: Source, quant: str | None, root: str | os.PathLike = "artifacts") -> Path:
    """`artifacts/<name>-<quant>/`."""
    return Path(root) / f"{source.name}-{quant or 'fp32'}"
