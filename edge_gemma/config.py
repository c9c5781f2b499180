"""Gemma 4 architecture configuration: frozen dataclasses, the E2B/E4B presets, strict parsing of `config.json`.

Architecture only: context length, dtype, threads and backend are export/runtime settings and live elsewhere.

Parsing is strict on purpose. A checkpoint whose `config.json` carries a key we do not understand may describe a model
we would silently compute wrongly (the peers' most common failure), so an unknown key is an error naming the key,
unless the explicit ignore lists below hold it (Hugging Face bookkeeping keys that do not change the math).
Both forms of the global-layer head size are accepted: `global_head_dim` (hub style) and the `per_layer_config`
overrides that transformers >= 5.23 serialises (keys are layer indices as strings, zero-padded or not).

This module imports no torch: the runtime reads the config from an artifact's manifest on a device.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "AudioConfig",
    "ConfigError",
    "E2B",
    "E4B",
    "ModelConfig",
    "TextConfig",
    "VisionConfig",
    "load_config",
    "parse_config",
]

SLIDING = "sliding_attention"
FULL = "full_attention"


class ConfigError(ValueError):
    """A config.json that edge-gemma cannot use; the message names the file and the field."""


# --------------------------------------------------------------------------------------------------------------------
# Dataclasses
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    """The text decoder (`Gemma4TextConfig`, model_type `gemma4_text`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # sliding layers
    global_head_dim: int  # full-attention layers (from `global_head_dim` or `per_layer_config`)
    layer_types: tuple[str, ...]
    sliding_window: int
    final_logit_softcapping: float | None
    vocab_size_per_layer_input: int
    hidden_size_per_layer_input: int
    num_kv_shared_layers: int
    use_double_wide_mlp: bool
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131072
    rope_theta_sliding: float = 10_000.0
    rope_theta_full: float = 1_000_000.0
    partial_rotary_factor_full: float = 0.25
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: tuple[int, ...] = (1,)
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"text_config.layer_types has {len(self.layer_types)} entries, num_hidden_layers is {self.num_hidden_layers}"
            )
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ConfigError(f"text_config.layer_types: unknown layer type(s) {bad}; expected {SLIDING!r} or {FULL!r}")
        if not 0 <= self.num_kv_shared_layers < self.num_hidden_layers:
            raise ConfigError(
                f"text_config.num_kv_shared_layers={self.num_kv_shared_layers} must be in [0, {self.num_hidden_layers})"
            )
        producing = set(self.layer_types[: self.first_shared_layer])
        if self.num_kv_shared_layers and producing != set(self.layer_types):
            raise ConfigError(
                "text_config: the layer types that reuse a KV cache "
                f"{sorted(set(self.layer_types[self.first_shared_layer:]))} are not all produced by the first "
                f"{self.first_shared_layer} layers ({sorted(producing)})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"text_config.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    # -- per-layer geometry ------------------------------------------------------------------------------------------

    def is_full(self, layer: int) -> bool:
        return self.layer_types[layer] == FULL

    def head_dim_for(self, layer: int) -> int:
        return self.global_head_dim if self.is_full(layer) else self.head_dim

    def intermediate_size_for(self, layer: int) -> int:
        """E2B doubles the MLP of the KV-shared layers (`use_double_wide_mlp`)."""
        wide = self.use_double_wide_mlp and layer >= self.first_shared_layer
        return self.intermediate_size * (2 if wide else 1)

    # -- KV sharing --------------------------------------------------------------------------------------------------

    @property
    def first_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    @property
    def cache_layers(self) -> tuple[int, ...]:
        """The layers that compute K/V and own a cache: every layer before `first_shared_layer`."""
        return tuple(range(self.first_shared_layer))

    def kv_producer(self, layer: int) -> int:
        """The layer whose K/V `layer` attends over: itself, or for a shared layer the last non-shared layer of the
        same type (E2B: sliding -> 13, full -> 14; E4B: 22 and 23), as `Gemma4TextConfig.kv_sharing_modes` says."""
        if layer < self.first_shared_layer:
            return layer
        kind = self.layer_types[layer]
        return max(i for i in range(self.first_shared_layer) if self.layer_types[i] == kind)

    @property
    def ple_dim(self) -> int:
        """Columns of the PLE table: one `hidden_size_per_layer_input` slice per layer."""
        return self.num_hidden_layers * self.hidden_size_per_layer_input


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """The vision encoder (`Gemma4VisionConfig`): a ViT with 2-D RoPE, learned 2-D position tables and k x k pooling."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    global_head_dim: int | None = None  # present in hub configs, unused by the vision tower
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10240
    rope_theta: float = 100.0
    use_clipped_linears: bool = False
    standardize: bool = False


@dataclass(frozen=True, kw_only=True)
class AudioConfig:
    """The audio encoder (`Gemma4AudioConfig`): a USM-style conformer with a 4x subsampling conv front."""

    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "silu"
    subsampling_conv_channels: tuple[int, int] = (128, 32)
    conv_kernel_size: int = 5
    residual_weight: float = 0.5
    attention_chunk_size: int = 12
    attention_context_left: int = 13
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1.0e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    output_proj_dims: int = 1536


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A whole checkpoint: the text decoder, optional towers, and the multimodal token ids."""

    text: TextConfig
    vision: VisionConfig | None = None
    audio: AudioConfig | None = None
    model_type: str = "gemma4"  # "gemma4" (multimodal layout) or "gemma4_text" (Gemma4ForCausalLM layout)
    image_token_id: int = 258880
    audio_token_id: int = 258881
    video_token_id: int = 258884
    boi_token_id: int = 255999
    eoi_token_id: int = 258882
    boa_token_id: int = 256000
    eoa_token_id: int = 258883
    eos_token_id: tuple[int, ...] = (1,)

    @property
    def multimodal_token_ids(self) -> tuple[int, ...]:
        """Placeholder ids whose PLE token part is the pad row (the reference replaces them by pad before lookup)."""
        return (self.image_token_id, self.video_token_id, self.audio_token_id)

    def text_only(self) -> "ModelConfig":
        return dataclasses.replace(self, vision=None, audio=None)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (for manifests); `ModelConfig.from_dict` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Inverse of `to_dict` (JSON turns tuples into lists; this turns them back)."""
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        t = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.pop("text").items()}
        v, a = d.pop("vision", None), d.pop("audio", None)
        return cls(
            text=TextConfig(**t),
            vision=VisionConfig(**v) if v is not None else None,
            audio=AudioConfig(**{**a, "subsampling_conv_channels": tuple(a["subsampling_conv_channels"])}) if a else None,
            **d,
        )


# --------------------------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------------------------

# Hugging Face bookkeeping keys that do not change the math. Anything else that we do not map is an error.
_IGNORED_COMMON = frozenset(
    {
        "architectures", "transformers_version", "initializer_range", "dtype", "torch_dtype", "_name_or_path",
        "use_cache", "attention_dropout", "output_attentions", "output_hidden_states", "return_dict",
        "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder",
        "tokenizer_class", "prefix", "task_specific_params", "_attn_implementation_autoset", "name_or_path",
        "auto_map", "quantization_config_ignored", "sep_token_id", "decoder_start_token_id",
        "tie_encoder_decoder", "is_decoder", "cross_attention_hidden_size", "add_cross_attention",
        "pruned_heads", "torchscript", "finetuning_task", "tf_legacy_loss", "use_bfloat16",
    }
)
# Keys that must hold exactly these values: anything else is a feature edge-gemma does not implement (MoE, the
# 26B/31B K=V attention, bidirectional vision attention), which would otherwise be computed wrongly in silence.
_TEXT_REQUIRED_VALUES = {
    "attention_bias": (False, None),
    "attention_k_eq_v": (False, None),
    "enable_moe_block": (False, None),
    "num_experts": (None, 0),
    "top_k_experts": (None, 0),
    "moe_intermediate_size": (None, 0),
    "use_bidirectional_attention": (None,),
    "num_global_key_value_heads": (None,),
}
_VISION_REQUIRED_VALUES = {"attention_bias": (False, None)}


class _Fields:
    """Takes fields out of one config dict, remembering which keys were used, so leftovers can be reported."""

    def __init__(self, d: dict[str, Any], where: str, ignored: frozenset[str]):
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a JSON object, found {type(d).__name__}")
        self.d, self.where, self.used = d, where, set(ignored)

    def get(self, key: str, default: Any = ..., *, kind: type | tuple[type, ...] | None = None) -> Any:
        self.used.add(key)
        if key not in self.d:
            if default is ...:
                raise ConfigError(f"{self.where}: missing required field {key!r}")
            return default
        value = self.d[key]
        if kind is not None and value is not None and not isinstance(value, kind):
            raise ConfigError(f"{self.where}.{key}: expected {kind}, found {value!r}")
        if kind in (int, (int,)) and isinstance(value, bool):
            raise ConfigError(f"{self.where}.{key}: expected an integer, found {value!r}")
        return value

    def require(self, rules: dict[str, tuple[Any, ...]]) -> None:
        for key, allowed in rules.items():
            value = self.get(key, allowed[0])
            if value not in allowed:
                raise ConfigError(
                    f"{self.where}.{key}={value!r} is not supported by edge-gemma (E2B/E4B use {allowed[0]!r})"
                )

    def finish(self) -> None:
        unknown = sorted(set(self.d) - self.used)
        if unknown:
            raise ConfigError(
                f"{self.where}: unknown field(s) {unknown}; edge-gemma refuses to guess what they mean "
                "(if one is harmless bookkeeping, add it to the ignore list in edge_gemma/config.py)"
            )


def _eos_tuple(value: Any, where: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise ConfigError(f"{where}.eos_token_id: expected an integer or a list of integers, found {value!r}")


def _global_head_dim(f: _Fields, where: str, layers: int, layer_types: list) -> int:
    """The full-attention head size: `per_layer_config` overrides (transformers >= 5.23) or `global_head_dim`."""
    global_head_dim = f.get("global_head_dim", None, kind=int)
    per_layer = f.get("per_layer_config", None, kind=dict)
    if per_layer is not None:
        found: set[int] = set()
        for key, override in per_layer.items():
            try:
                idx = int(key)
            except ValueError:
                raise ConfigError(f"{where}.per_layer_config: layer key {key!r} is not an integer") from None
            if not 0 <= idx < layers:
                raise ConfigError(f"{where}.per_layer_config: layer {idx} out of range [0, {layers})")
            extra = sorted(set(override) - {"head_dim"})
            if extra:
                raise ConfigError(f"{where}.per_layer_config[{key!r}]: unsupported override(s) {extra}")
            if layer_types[idx] != FULL:
                raise ConfigError(f"{where}.per_layer_config[{key!r}]: overrides a {layer_types[idx]!r} layer")
            found.add(int(override["head_dim"]))
        full_layers = {i for i, t in enumerate(layer_types) if t == FULL}
        if {int(k) for k in per_layer} != full_layers:
            raise ConfigError(
                f"{where}.per_layer_config covers layers {sorted(int(k) for k in per_layer)}, "
                f"but the full-attention layers are {sorted(full_layers)}"
            )
        if len(found) > 1:
            raise ConfigError(f"{where}.per_layer_config: full layers have different head_dim values {sorted(found)}")
        pl_dim = found.pop() if found else None
        if global_head_dim is not None and pl_dim is not None and global_head_dim != pl_dim:
            raise ConfigError(
                f"{where}: global_head_dim={global_head_dim} disagrees with per_layer_config head_dim={pl_dim}"
            )
        global_head_dim = pl_dim if pl_dim is not None else global_head_dim
    if global_head_dim is None:
        global_head_dim = 512  # the transformers default when neither form is given
    return global_head_dim


def _rope(f: _Fields, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """`rope_parameters` -> (sliding, full): default RoPE on sliding layers, proportional on full layers."""
    rope = f.get("rope_parameters", None, kind=dict) or {}
    sliding_rope = rope.get(SLIDING, {"rope_type": "default", "rope_theta": 10_000.0})
    full_rope = rope.get(FULL, {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6})
    extra_rope = sorted(set(rope) - {SLIDING, FULL})
    if extra_rope:
        raise ConfigError(f"{where}.rope_parameters: unknown layer type(s) {extra_rope}")
    if sliding_rope.get("rope_type", "default") != "default" or set(sliding_rope) - {"rope_type", "rope_theta"}:
        raise ConfigError(f"{where}.rope_parameters.{SLIDING}={sliding_rope!r}: expected default RoPE")
    if full_rope.get("rope_type") != "proportional" or set(full_rope) - {
        "rope_type", "rope_theta", "partial_rotary_factor"
    }:
        raise ConfigError(f"{where}.rope_parameters.{FULL}={full_rope!r}: expected proportional RoPE")
    return sliding_rope, full_rope


def _parse_text(d: dict[str, Any], where: str) -> TextConfig:
    f = _Fields(d, where, _IGNORED_COMMON)
    model_type = f.get("model_type", "gemma4_text")
    if model_type != "gemma4_text":
        raise ConfigError(f"{where}.model_type={model_type!r}: expected 'gemma4_text'")
    f.require(_TEXT_REQUIRED_VALUES)
    layers = f.get("num_hidden_layers", kind=int)
    layer_types = f.get("layer_types", kind=list)
    head_dim = f.get("head_dim", kind=int)
    global_head_dim = _global_head_dim(f, where, layers, layer_types)
    sliding_rope, full_rope = _rope(f, where)
    activation = f.get("hidden_activation", "gelu_pytorch_tanh")
    if activation != "gelu_pytorch_tanh":
        raise ConfigError(f"{where}.hidden_activation={activation!r}: only 'gelu_pytorch_tanh' is supported")
    softcap = f.get("final_logit_softcapping", None, kind=(int, float))
    cfg = TextConfig(
        vocab_size=f.get("vocab_size", kind=int),
        hidden_size=f.get("hidden_size", kind=int),
        intermediate_size=f.get("intermediate_size", kind=int),
        num_hidden_layers=layers,
        num_attention_heads=f.get("num_attention_heads", kind=int),
        num_key_value_heads=f.get("num_key_value_heads", kind=int),
        head_dim=head_dim,
        global_head_dim=global_head_dim,
        layer_types=tuple(layer_types),
        sliding_window=f.get("sliding_window", kind=int),
        final_logit_softcapping=float(softcap) if softcap is not None else None,
        vocab_size_per_layer_input=f.get("vocab_size_per_layer_input", kind=int),
        hidden_size_per_layer_input=f.get("hidden_size_per_layer_input", kind=int),
        num_kv_shared_layers=f.get("num_kv_shared_layers", 0, kind=int),
        use_double_wide_mlp=bool(f.get("use_double_wide_mlp", False, kind=bool)),
        rms_norm_eps=float(f.get("rms_norm_eps", 1e-6, kind=(int, float))),
        hidden_activation=activation,
        max_position_embeddings=f.get("max_position_embeddings", 131072, kind=int),
        rope_theta_sliding=float(sliding_rope.get("rope_theta", 10_000.0)),
        rope_theta_full=float(full_rope.get("rope_theta", 1e6)),
        partial_rotary_factor_full=float(full_rope.get("partial_rotary_factor", 1.0)),
        pad_token_id=f.get("pad_token_id", 0, kind=int),
        bos_token_id=f.get("bos_token_id", 2, kind=int),
        eos_token_id=_eos_tuple(f.get("eos_token_id", 1), where),
        tie_word_embeddings=bool(f.get("tie_word_embeddings", True, kind=bool)),
    )
    f.finish()
    if not cfg.tie_word_embeddings:
        raise ConfigError(f"{where}.tie_word_embeddings=false: Gemma 4 ties the LM head to the embedding")
    if not cfg.hidden_size_per_layer_input:
        raise ConfigError(f"{where}.hidden_size_per_layer_input=0: E2B/E4B use Per-Layer Embeddings")
    return cfg


def _parse_vision(d: dict[str, Any], where: str) -> VisionConfig:
    f = _Fields(d, where, _IGNORED_COMMON)
    model_type = f.get("model_type", "gemma4_vision")
    if model_type != "gemma4_vision":
        raise ConfigError(f"{where}.model_type={model_type!r}: expected 'gemma4_vision'")
    f.require(_VISION_REQUIRED_VALUES)
    rope = f.get("rope_parameters", None, kind=dict) or {"rope_type": "axial", "rope_theta": 100.0}
    if rope.get("rope_type", "axial") != "axial" or set(rope) - {"rope_type", "rope_theta"}:
        raise ConfigError(f"{where}.rope_parameters={rope!r}: expected axial 2-D RoPE")
    defaults = VisionConfig()
    kwargs: dict[str, Any] = {}
    for fld in dataclasses.fields(VisionConfig):
        if fld.name == "rope_theta":
            continue
        kwargs[fld.name] = f.get(fld.name, getattr(defaults, fld.name))
    cfg = VisionConfig(rope_theta=float(rope.get("rope_theta", 100.0)), **kwargs)
    f.finish()
    if cfg.hidden_activation != "gelu_pytorch_tanh":
        raise ConfigError(f"{where}.hidden_activation={cfg.hidden_activation!r}: only 'gelu_pytorch_tanh' is supported")
    return cfg


def _parse_audio(d: dict[str, Any], where: str) -> AudioConfig:
    f = _Fields(d, where, _IGNORED_COMMON)
    model_type = f.get("model_type", "gemma4_audio")
    if model_type != "gemma4_audio":
        raise ConfigError(f"{where}.model_type={model_type!r}: expected 'gemma4_audio'")
    defaults = AudioConfig()
    kwargs = {fld.name: f.get(fld.name, getattr(defaults, fld.name)) for fld in dataclasses.fields(AudioConfig)}
    channels = kwargs["subsampling_conv_channels"]
    if not (isinstance(channels, (list, tuple)) and len(channels) == 2):
        raise ConfigError(f"{where}.subsampling_conv_channels={channels!r}: expected two channel counts")
    kwargs["subsampling_conv_channels"] = tuple(int(c) for c in channels)
    cfg = AudioConfig(**kwargs)
    f.finish()
    if cfg.hidden_act != "silu":
        raise ConfigError(f"{where}.hidden_act={cfg.hidden_act!r}: only 'silu' is supported")
    return cfg


def parse_config(d: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    """Parse a Hugging Face Gemma 4 `config.json` dict (multimodal `gemma4` or text-only `gemma4_text`)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    model_type = d.get("model_type")
    if model_type == "gemma4_text":
        text = _parse_text(d, source)
        return ModelConfig(text=text, model_type="gemma4_text", eos_token_id=text.eos_token_id)
    if model_type != "gemma4":
        raise ConfigError(
            f"{source}: unsupported model_type {model_type!r}; edge-gemma exports Gemma 4 checkpoints "
            "(model_type 'gemma4' or 'gemma4_text')"
        )
    f = _Fields(d, source, _IGNORED_COMMON | {"vision_soft_tokens_per_image"})
    f.get("model_type")
    text = _parse_text(f.get("text_config", kind=dict), f"{source}:text_config")
    vision_d = f.get("vision_config", None, kind=dict)
    audio_d = f.get("audio_config", None, kind=dict)
    # Hub configs spell the end-of-audio id `eoa_token_index` (transformers' name) and sometimes `eoa_token_id` too.
    eoa_index = f.get("eoa_token_index", None, kind=int)
    eoa_id = f.get("eoa_token_id", None, kind=int)
    if eoa_index is not None and eoa_id is not None and eoa_index != eoa_id:
        raise ConfigError(f"{source}: eoa_token_index={eoa_index} disagrees with eoa_token_id={eoa_id}")
    defaults = ModelConfig(text=text)
    tie = f.get("tie_word_embeddings", True, kind=bool)
    if not tie:
        raise ConfigError(f"{source}.tie_word_embeddings=false: Gemma 4 ties the LM head to the embedding")
    cfg = ModelConfig(
        text=text,
        vision=_parse_vision(vision_d, f"{source}:vision_config") if vision_d is not None else None,
        audio=_parse_audio(audio_d, f"{source}:audio_config") if audio_d is not None else None,
        model_type="gemma4",
        image_token_id=f.get("image_token_id", defaults.image_token_id, kind=int),
        audio_token_id=f.get("audio_token_id", defaults.audio_token_id, kind=int),
        video_token_id=f.get("video_token_id", defaults.video_token_id, kind=int),
        boi_token_id=f.get("boi_token_id", defaults.boi_token_id, kind=int),
        eoi_token_id=f.get("eoi_token_id", defaults.eoi_token_id, kind=int),
        boa_token_id=f.get("boa_token_id", defaults.boa_token_id, kind=int),
        eoa_token_id=eoa_index if eoa_index is not None else (eoa_id if eoa_id is not None else defaults.eoa_token_id),
        eos_token_id=_eos_tuple(f.get("eos_token_id", list(text.eos_token_id)), source) or text.eos_token_id,
    )
    for key in ("pad_token_id", "bos_token_id"):
        top = f.get(key, None, kind=int)
        if top is not None and top != getattr(text, key):
            raise ConfigError(f"{source}.{key}={top} disagrees with text_config.{key}={getattr(text, key)}")
    f.finish()
    return cfg


def load_config(path: str | Path) -> ModelConfig:
    """Read `config.json` from a checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{file}: missing config.json (a Hugging Face checkpoint directory has one)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: not valid JSON ({exc})") from None
    return parse_config(data, source=str(file))


# --------------------------------------------------------------------------------------------------------------------
# Presets. Source: transformers `models/gemma4/convert_gemma4_weights.py` `_VARIANTS` (the official conversion
# script), and the published `google/gemma-4-E2B-it` / `google/gemma-4-E4B-it` config.json files
# (edge_gemma/data/configs/). tests/test_config.py checks that parsing those files gives exactly these presets.
# --------------------------------------------------------------------------------------------------------------------

_VISION_ON_DEVICE = VisionConfig(global_head_dim=64, use_clipped_linears=True)  # `_ON_DEVICE_VISION_CONFIG`
_AUDIO = AudioConfig()  # `_DEFAULT_AUDIO_CONFIG`: identical for E2B and E4B


def _layer_types(sliding_per_full: int, layers: int) -> tuple[str, ...]:
    return tuple(FULL if (i + 1) % (sliding_per_full + 1) == 0 else SLIDING for i in range(layers))


E2B = ModelConfig(
    text=TextConfig(
        vocab_size=262144,
        hidden_size=1536,
        intermediate_size=6144,
        num_hidden_layers=35,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
        global_head_dim=512,
        layer_types=_layer_types(4, 35),
        sliding_window=512,
        final_logit_softcapping=30.0,
        vocab_size_per_layer_input=262144,
        hidden_size_per_layer_input=256,
        num_kv_shared_layers=20,
        use_double_wide_mlp=True,
    ),
    vision=_VISION_ON_DEVICE,
    audio=_AUDIO,
    eos_token_id=(1, 106),
)

E4B = dataclasses.replace(
    E2B,
    text=dataclasses.replace(
        E2B.text,
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=42,
        num_key_value_heads=2,
        layer_types=_layer_types(5, 42),
        num_kv_shared_layers=18,
        use_double_wide_mlp=False,
    ),
)

PRESETS = {"e2b": E2B, "e4b": E4B}
