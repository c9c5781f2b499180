"""Strict loading of a Gemma 4 assistant (MTP drafter) checkpoint directory, and its fit to a target.

The same rules as the target's loader (`checkpoint.py`): `config.json` parsed strictly (an unknown key is an error
naming it), every tensor of `model.safetensors` (or its shards) mapped by name, with its shape checked, no NaN or
inf, nothing missing and nothing left over; `lm_head.weight` is accepted only when it equals `model.embed_tokens`
(the head is tied). `check_fit` says, naming the field, why a drafter cannot serve a given target.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import (
    _IGNORED_COMMON,
    _TEXT_REQUIRED_VALUES,
    FULL,
    SLIDING,
    ConfigError,
    TextConfig,
    _Fields,
    _global_head_dim,
    _rope,
)

if TYPE_CHECKING:
    from .model.drafter import Drafter, DrafterConfig

__all__ = ["DrafterError", "check_fit", "load_drafter", "load_drafter_config", "parse_drafter_config"]

# Text keys of the assistant's `text_config` that do not change its math: token ids and the context length are the
# target's business, and the assistant applies no final soft cap (transformers' forward has none).
_DRAFTER_TEXT_IGNORED = _IGNORED_COMMON | {"pad_token_id", "bos_token_id", "eos_token_id", "max_position_embeddings",
                                          "final_logit_softcapping", "tie_word_embeddings"}
_DRAFTER_TEXT_REQUIRED = {**_TEXT_REQUIRED_VALUES, "hidden_size_per_layer_input": (0,),
                          "vocab_size_per_layer_input": (0, None), "use_double_wide_mlp": (False, None)}


class DrafterError(ValueError):
    """A drafter checkpoint that cannot be loaded, or cannot serve the target; the message names the file/field."""


def parse_drafter_config(d: dict[str, Any], *, source: str = "config.json") -> "DrafterConfig":
    """Parse a `gemma4_assistant` `config.json` dict."""
    from .model.drafter import DrafterConfig

    f = _Fields(d, source, _IGNORED_COMMON)
    if f.get("model_type", None) != "gemma4_assistant":
        raise ConfigError(f"{source}: model_type {d.get('model_type')!r} is not a Gemma 4 assistant "
                          "('gemma4_assistant')")
    if not f.get("tie_word_embeddings", True, kind=bool):
        raise ConfigError(f"{source}.tie_word_embeddings=false: the assistant ties its head to its embedding")
    where = f"{source}:text_config"
    t = _Fields(f.get("text_config", kind=dict), where, _DRAFTER_TEXT_IGNORED)
    if t.get("model_type", "gemma4_text") != "gemma4_text":
        raise ConfigError(f"{where}.model_type={t.d['model_type']!r}: expected 'gemma4_text'")
    t.require(_DRAFTER_TEXT_REQUIRED)
    layers = t.get("num_hidden_layers", kind=int)
    layer_types = t.get("layer_types", kind=list)
    if len(layer_types) != layers or set(layer_types) - {SLIDING, FULL}:
        raise ConfigError(f"{where}.layer_types={layer_types!r}: expected {layers} of {SLIDING!r} / {FULL!r}")
    shared = t.get("num_kv_shared_layers", layers, kind=int)
    if shared not in (0, layers):  # transformers sets 0 to "all": every assistant layer reads the target's K/V
        raise ConfigError(f"{where}.num_kv_shared_layers={shared}: every assistant layer must share ({layers})")
    if t.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ConfigError(f"{where}.hidden_activation: only 'gelu_pytorch_tanh' is supported")
    sliding_rope, full_rope = _rope(t, where)
    cfg = DrafterConfig(
        vocab_size=t.get("vocab_size", kind=int),
        hidden_size=t.get("hidden_size", kind=int),
        intermediate_size=t.get("intermediate_size", kind=int),
        num_hidden_layers=layers,
        num_attention_heads=t.get("num_attention_heads", kind=int),
        num_key_value_heads=t.get("num_key_value_heads", kind=int),
        head_dim=t.get("head_dim", kind=int),
        global_head_dim=_global_head_dim(t, where, layers, layer_types),
        layer_types=tuple(layer_types),
        sliding_window=t.get("sliding_window", kind=int),
        rms_norm_eps=float(t.get("rms_norm_eps", 1e-6, kind=(int, float))),
        rope_theta_sliding=float(sliding_rope.get("rope_theta", 10_000.0)),
        rope_theta_full=float(full_rope.get("rope_theta", 1e6)),
        partial_rotary_factor_full=float(full_rope.get("partial_rotary_factor", 1.0)),
        backbone_hidden_size=f.get("backbone_hidden_size", kind=int),
        use_ordered_embeddings=bool(f.get("use_ordered_embeddings", False, kind=bool)),
        num_centroids=f.get("num_centroids", 2048, kind=int),
        centroid_intermediate_top_k=f.get("centroid_intermediate_top_k", 32, kind=int),
    )
    t.finish()
    f.finish()
    if cfg.use_ordered_embeddings and (cfg.vocab_size % cfg.num_centroids
                                       or not 0 < cfg.centroid_intermediate_top_k <= cfg.num_centroids):
        raise ConfigError(f"{source}: num_centroids={cfg.num_centroids} must divide vocab_size={cfg.vocab_size} "
                          f"and centroid_intermediate_top_k={cfg.centroid_intermediate_top_k} be in 1..num_centroids")
    return cfg


def check_fit(drafter: "DrafterConfig", target: TextConfig, *, source: str = "drafter") -> None:
    """Raise `DrafterError` naming the field unless `drafter` can read `target`'s caches and embeddings."""
    problems = []
    if drafter.backbone_hidden_size != target.hidden_size:
        problems.append(f"backbone_hidden_size {drafter.backbone_hidden_size} != the target's hidden_size "
                        f"{target.hidden_size}")
    if drafter.vocab_size != target.vocab_size:
        problems.append(f"vocab_size {drafter.vocab_size} != the target's {target.vocab_size}")
    if drafter.num_key_value_heads != target.num_key_value_heads:
        problems.append(f"num_key_value_heads {drafter.num_key_value_heads} != the target's "
                        f"{target.num_key_value_heads}")
    for kind, ours, theirs in ((SLIDING, drafter.head_dim, target.head_dim),
                               (FULL, drafter.global_head_dim, target.global_head_dim)):
        if kind in drafter.layer_types and ours != theirs:
            problems.append(f"{kind} head_dim {ours} != the target's {theirs}")
        if kind in drafter.layer_types and kind not in target.layer_types[: target.first_shared_layer]:
            problems.append(f"its {kind} layers need a target {kind} cache, and the target has none")
    if drafter.num_attention_heads % drafter.num_key_value_heads:
        problems.append(f"num_attention_heads {drafter.num_attention_heads} is not a multiple of "
                        f"num_key_value_heads {drafter.num_key_value_heads}")
    if problems:
        raise DrafterError(f"{source}: this drafter does not fit the target: " + "; ".join(problems))


def load_drafter_config(path: str | Path, target: TextConfig | None = None) -> "DrafterConfig":
    """The drafter's `config.json`, parsed strictly and checked against `target` (no tensor is read)."""
    directory = Path(path)
    file = directory / "config.json"
    if not file.is_file():
        raise DrafterError(f"{directory}: no config.json (a Gemma 4 assistant checkpoint directory has one)")
    try:
        cfg = parse_drafter_config(json.loads(file.read_text(encoding="utf-8")), source=str(file))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DrafterError(f"{file}: not valid JSON ({exc})") from None
    except ConfigError as exc:
        raise DrafterError(str(exc)) from None
    if target is not None:
        check_fit(cfg, target, source=str(directory))
    return cfg


def load_drafter(path: str | Path, target: TextConfig | None = None) -> "Drafter":
    """Load an assistant checkpoint directory into an eval-mode float32 `Drafter` (checked against `target`)."""
    import torch

    from .checkpoint import CheckpointError, _Reader, checkpoint_tensors, params_on_meta
    from .model.drafter import Drafter
    from .quantize.safetensors_io import bad_values

    directory = Path(path)
    cfg = load_drafter_config(directory, target)
    try:
        tensors = checkpoint_tensors(directory)
    except CheckpointError as exc:
        raise DrafterError(str(exc)) from None
    with params_on_meta():
        model = Drafter(cfg)
    expected = model.state_dict()
    state = {}
    with _Reader() as reader:
        for name, want in expected.items():
            info = tensors.get(name)
            if info is None:
                raise DrafterError(f"{directory}: missing tensor {name!r} (expected shape {tuple(want.shape)})")
            if info.shape != tuple(want.shape):
                raise DrafterError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, "
                                   f"expected {list(want.shape)}")
            t = reader.get(name, info)
            if t.is_floating_point():
                bad = bad_values(name, t.float().numpy()) if not bool(torch.isfinite(t).all()) else 0
                if bad:
                    raise DrafterError(f"{info.file}: tensor {name!r} has {bad} NaN or inf value(s)")
                t = t.float()
            state[name] = t
        head = tensors.get("lm_head.weight")
        if head is not None and not torch.equal(reader.get("lm_head.weight", head).float(),
                                                state["model.embed_tokens.weight"]):
            raise DrafterError(f"{head.file}: lm_head.weight differs from model.embed_tokens.weight; the assistant's "
                               "head is tied to its embedding")
    ordering = state.get("masked_embedding.token_ordering")
    if ordering is not None and not torch.equal(torch.sort(ordering.long()).values, torch.arange(cfg.vocab_size)):
        raise DrafterError(f"{directory}: masked_embedding.token_ordering is not a permutation of the "
                           f"{cfg.vocab_size} token ids")
    unexpected = sorted(set(tensors) - set(expected) - {"lm_head.weight"})
    if unexpected:
        raise DrafterError(f"{tensors[unexpected[0]].file}: unexpected tensor(s) {unexpected[:5]} "
                           f"({len(unexpected)} in all) for a Gemma 4 assistant")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
