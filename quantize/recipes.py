"""Quantization recipes: which tensor gets which scheme, as data (mlx-lm's ``quant_predicate``, made serializable).

Two layers decide a tensor's fate:

1. :func:`classify` puts every Hugging Face tensor name in a role, from one explicit table of patterns:
   ``linear`` (2-D matmul weights), ``embedding`` (the main table, which is also the tied LM head, and the PLE table),
   or ``float`` (norms, ``layer_scalar``, clip bounds, conv kernels, position tables, ``per_dim_scale``, biases, ...).
   ``float`` tensors are never quantized, whatever a recipe says.
2. A :class:`Recipe` gives quantizable tensors a scheme: ``default``, unless an :class:`Override` (a regex over the
   name, first match wins) says otherwise; ``scheme=None`` keeps a tensor float. If the chosen scheme cannot hold the
   shape (int4 needs ``K % group_size == 0``), the recipe's ``fallback`` (int8 per channel) is used and the manifest
   says so.

Recipes are frozen and named; ``quant_manifest.json`` stores the whole recipe (:meth:`Recipe.to_manifest`) and the
decision for every tensor, so an exporter never guesses a quantization from a file name.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from .schemes import Int4Group, Int4GroupAsym, Int8PerChannel, Scheme, SchemeError, scheme_from_dict

__all__ = ["RecipeError", "Override", "Recipe", "TensorPlan", "RECIPES", "get_recipe", "classify",
           "LINEAR_PATTERNS", "EMBEDDING_PATTERNS", "FLOAT_PATTERNS"]

logger = logging.getLogger(__name__)


class RecipeError(ValueError):
    """Unknown recipe, malformed recipe in a manifest, or a tensor the role table cannot place."""


# The role table. Names are Hugging Face names (the state dict of transformers' `Gemma4ForConditionalGeneration`).
# The text decoder is `model.language_model.` in Gemma4ForConditionalGeneration checkpoints and `model.` in
# Gemma4ForCausalLM ones.
_TEXT = r"^model\.(language_model\.)?"
LINEAR_PATTERNS: tuple[str, ...] = (
    _TEXT + r"layers\.\d+\.self_attn\.(q|k|v|o)_proj\.weight$",
    _TEXT + r"layers\.\d+\.mlp\.(gate|up|down)_proj\.weight$",
    _TEXT + r"layers\.\d+\.(per_layer_input_gate|per_layer_projection)\.weight$",
    _TEXT + r"per_layer_model_projection\.weight$",
    r"\.linear\.weight$",  # vision/audio clipped linears: q/k/v/o/post, mlp, ffw_layer_{1,2}, linear_{start,end}
    r"^model\.audio_tower\.layers\.\d+\.self_attn\.relative_k_proj\.weight$",
    r"^model\.audio_tower\.subsample_conv_projection\.input_proj_linear\.weight$",
    r"^model\.audio_tower\.output_proj\.weight$",
    r"^model\.embed_(audio|vision)\.embedding_projection\.weight$",
    r"^model\.vision_tower\.patch_embedder\.input_proj\.weight$",
    r"^lm_head\.weight$",  # only in an untied checkpoint; Gemma 4 ties it to embed_tokens
)
EMBEDDING_PATTERNS: tuple[str, ...] = (
    _TEXT + r"embed_tokens\.weight$",
    _TEXT + r"embed_tokens_per_layer\.weight$",
)
FLOAT_PATTERNS: tuple[str, ...] = (
    r"norm[a-z_]*\.weight$",  # every RMSNorm: *_layernorm, *_norm, norm_pre_attn, norm_out, conv_norm, ...
    r"\.layer_scalar$",
    r"\.(input|output)_(min|max)$",  # clip bounds of clipped linears
    r"\.conv\.weight$",  # audio subsampling Conv2d kernels [c_out, c_in, 3, 3]
    r"\.depthwise_conv1d\.weight$",  # [Ha, 1, 5]
    r"\.position_embedding_table$",  # vision [2, pos, Hv]
    r"\.per_dim_scale$",
    r"\.bias$",
    r"\.std_(bias|scale)$",
)
_LINEAR = tuple(re.compile(p) for p in LINEAR_PATTERNS)
_EMBEDDING = tuple(re.compile(p) for p in EMBEDDING_PATTERNS)
_FLOAT = tuple(re.compile(p) for p in FLOAT_PATTERNS)


def classify(name: str, shape: tuple[int, ...]) -> str:
    """Role of a tensor: ``"linear"``, ``"embedding"``, ``"float"``, or ``"unknown"`` (kept float, reported).

    A name that matches a linear/embedding pattern but is not 2-D is an error: that checkpoint is not what the table
    was written for, and quietly keeping it float would hide it.
    """
    for role, patterns in (("embedding", _EMBEDDING), ("linear", _LINEAR)):
        if any(p.search(name) for p in patterns):
            if len(shape) != 2:
                raise RecipeError(f"tensor {name!r} looks like a {role} weight but has shape {list(shape)}, not 2-D")
            return role
    if any(p.search(name) for p in _FLOAT):
        return "float"
    return "unknown"


@dataclass(frozen=True, kw_only=True)
class Override:
    """``pattern`` (regex, ``re.search`` over the HF name) -> ``scheme`` (None keeps the tensor float)."""

    pattern: str
    scheme: Scheme | None
    note: str = ""

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise RecipeError(f"override pattern {self.pattern!r} is not a valid regex: {e}") from e

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "scheme": None if self.scheme is None else self.scheme.to_dict(),
                "note": self.note}


@dataclass(frozen=True, kw_only=True)
class TensorPlan:
    """The decision for one tensor: its role, its scheme (None = float), and why."""

    name: str
    role: str
    scheme: Scheme | None
    rule: str  # "default", "override:<pattern>", "role:float", "role:unknown", plus " -> fallback" if it fell back
    fallback_from: Scheme | None = None


_FLOAT_DTYPES = ("source", "F32")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A named quantization recipe. ``float_dtype`` is how kept-float tensors are written: ``"source"`` copies their
    bytes unchanged (bit-exact), ``"F32"`` widens them to float32 (the parity-test recipe)."""

    name: str
    default: Scheme | None
    overrides: tuple[Override, ...] = ()
    fallback: Scheme | None = field(default_factory=Int8PerChannel)
    float_dtype: str = "source"
    description: str = ""

    def __post_init__(self):
        if self.float_dtype not in _FLOAT_DTYPES:
            raise RecipeError(f"recipe {self.name!r}: float_dtype must be one of {_FLOAT_DTYPES}, "
                              f"got {self.float_dtype!r}")
        object.__setattr__(self, "overrides", tuple(self.overrides))

    @property
    def onnx_only(self) -> bool:
        """True if any scheme this recipe can pick is ONNX Runtime only."""
        schemes = [self.default, self.fallback] + [o.scheme for o in self.overrides]
        return any(s is not None and s.onnx_only for s in schemes)

    def plan(self, name: str, shape: tuple[int, ...]) -> TensorPlan:
        """Decide the scheme of one tensor (see the module docstring)."""
        shape = tuple(shape)
        role = classify(name, shape)
        if role in ("float", "unknown"):
            return TensorPlan(name=name, role=role, scheme=None, rule=f"role:{role}")
        scheme, rule = self.default, "default"
        for o in self.overrides:
            if o.matches(name):
                scheme, rule = o.scheme, f"override:{o.pattern}"
                break
        if scheme is not None and not scheme.supports(shape):
            fallback = self.fallback if self.fallback is not None and self.fallback.supports(shape) else None
            return TensorPlan(name=name, role=role, scheme=fallback, rule=f"{rule} -> fallback", fallback_from=scheme)
        return TensorPlan(name=name, role=role, scheme=scheme, rule=rule)

    def scheme_for(self, name: str, shape: tuple[int, ...]) -> Scheme | None:
        """The scheme a tensor gets (None: stays float)."""
        return self.plan(name, shape).scheme

    def to_manifest(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "default": None if self.default is None else self.default.to_dict(),
            "overrides": [o.to_dict() for o in self.overrides],
            "fallback": None if self.fallback is None else self.fallback.to_dict(),
            "float_dtype": self.float_dtype,
            "onnx_only": self.onnx_only,
        }

    @classmethod
    def from_manifest(cls, d: dict[str, Any]) -> "Recipe":
        """Rebuild a recipe from :meth:`to_manifest` output; errors name the offending field."""
        if not isinstance(d, dict):
            raise RecipeError(f"recipe entry must be an object, got {type(d).__name__}")
        known = {"name", "description", "default", "overrides", "fallback", "float_dtype", "onnx_only"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RecipeError(f"recipe has unknown fields {unknown}")
        try:
            def scheme(x):
                return None if x is None else scheme_from_dict(x)

            recipe = cls(
                name=str(d["name"]),
                description=str(d.get("description", "")),
                default=scheme(d["default"]),
                overrides=tuple(Override(pattern=o["pattern"], scheme=scheme(o["scheme"]), note=o.get("note", ""))
                                for o in d.get("overrides", [])),
                fallback=scheme(d.get("fallback")),
                float_dtype=d.get("float_dtype", "source"),
            )
        except KeyError as e:
            raise RecipeError(f"recipe is missing field {e.args[0]!r}") from e
        except SchemeError as e:
            raise RecipeError(f"recipe {d.get('name')!r}: {e}") from e
        if "onnx_only" in d and bool(d["onnx_only"]) != recipe.onnx_only:
            raise RecipeError(f"recipe {recipe.name!r}: onnx_only is {d['onnx_only']!r} but its schemes say "
                              f"{recipe.onnx_only!r}")
        return recipe


# ----------------------------------------------------------------------------------------------- named recipes
_EMBEDDINGS = r"^(model\.(language_model\.)?embed_tokens(_per_layer)?\.weight|lm_head\.weight)$"
_TOWERS = r"^model\.(audio_tower|vision_tower|embed_audio|embed_vision)\."
_PER_LAYER_INPUT = _TEXT + r"(layers\.\d+\.(per_layer_input_gate|per_layer_projection)|per_layer_model_projection)\.weight$"


def _int4_overrides(embedding_scheme: Scheme | None) -> tuple[Override, ...]:
    return (
        Override(pattern=_EMBEDDINGS, scheme=embedding_scheme,
                 note="main embedding (also the tied LM head; an untied lm_head follows it) and PLE table"),
        Override(pattern=_TOWERS, scheme=Int8PerChannel(),
                 note="audio and vision towers and their projections stay int8: "
                      "peers see audio quality collapse at int4"),
    )


def _gemma4_mixed48() -> Recipe:
    """LiteRT-LM's `gemma4_mixed48` (ai-edge-quantizer) gives the linears, both embedding tables and the head int4
    with one scale per output channel, and the per-layer-input linears int8 per channel. This recipe gives each of
    those tensors at least that precision: int4 in groups of 128 (a group's scale is at most its channel's, so no
    weight is rounded more coarsely) and int8 per channel where it has int8 (whose scale, stored in bf16 and rounded
    up, is at most 2^-7 coarser than ai-edge-quantizer's float32 one)."""
    g128 = Int4Group(group_size=128)
    return Recipe(name="gemma4-mixed48", default=g128, overrides=(
        Override(pattern=_PER_LAYER_INPUT, scheme=Int8PerChannel(),
                 note="per-layer-input linears int8, as gemma4_mixed48 keeps them"),
        Override(pattern=_EMBEDDINGS, scheme=g128,
                 note="main embedding (also the tied LM head) and PLE table int4 group 128 "
                      "(gemma4_mixed48: int4 per channel)"),
        *_int4_overrides(None)[1:]),
        description="at least the precision of LiteRT-LM's gemma4_mixed48 for every tensor: int4 group 128 linears, "
                    "embeddings and head; per-layer-input linears int8; audio/vision towers int8")


def _int4(name: str, group_size: int, description: str, embedding_scheme: Scheme | None = None) -> Recipe:
    return Recipe(name=name, default=Int4Group(group_size=group_size),
                  overrides=_int4_overrides(embedding_scheme or Int8PerChannel()), description=description)


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe(name="fp32", default=None, fallback=None, float_dtype="F32",
           description="no quantization; every tensor widened to float32 (parity tests)"),
    Recipe(name="int8", default=Int8PerChannel(),
           description="int8 per-output-channel symmetric for every linear and both embedding tables"),
    _int4("int4", 32, "int4 symmetric group 32 linears; embeddings and audio/vision towers int8"),
    _int4("int4-g64", 64, "int4 symmetric group 64 linears; embeddings and audio/vision towers int8"),
    _int4("int4-g128", 128, "int4 symmetric group 128 linears; embeddings and audio/vision towers int8"),
    _int4("int4-emb4", 32, "int4 group 32 linears and embedding tables; audio/vision towers int8",
          embedding_scheme=Int4Group(group_size=32)),
    _gemma4_mixed48(),
    Recipe(name="int4-asym-onnx", default=Int4GroupAsym(group_size=32), overrides=_int4_overrides(Int8PerChannel()),
           description="ONNX Runtime only: int4 asymmetric group 32 linears (MatMulNBits zero points); "
                       "embeddings and audio/vision towers int8"),
)}


def get_recipe(name: str) -> Recipe:
    """A named recipe (``QUANT=int4`` / ``QUANT=int8`` in the Makefile name these)."""
    try:
        return RECIPES[name]
    except KeyError:
        raise RecipeError(f"unknown quantization recipe {name!r}; known: {', '.join(RECIPES)}") from None
