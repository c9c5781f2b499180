"""Building blocks shared by the Gemma 4 text decoder and the vision/audio encoders.

Every class here mirrors a transformers `Gemma4*` module closely enough that its state-dict keys are identical, so a
Hugging Face checkpoint loads with `load_state_dict(strict=True)` and no renaming inside a tower.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ClippableLinear", "MultimodalEmbedder", "RMSNorm", "activation", "clamp", "gelu_tanh", "rotate_half"]


class RMSNorm(nn.Module):
    """Gemma 4 RMSNorm: `x * (mean(x^2) + eps)^-0.5 * w`, with NO `1 + w` offset (unlike Gemma 2/3).

    Computed in float32 and cast back, and with `torch.pow(ms + eps, -0.5)` rather than `rsqrt`: that is what the
    reference does (to match JAX), so parity is bit-exact on CPU. The square is `h * h`, which equals the
    reference's `h.pow(2)` bit for bit (IEEE multiplication and a correctly rounded pow agree), and lowers to a
    multiply every backend delegates (ExecuTorch ran `pow` on its single-threaded portable kernel). `with_scale=False` is the weightless form used by
    the vision `v_norm` and the multimodal pre-projection norms.
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, with_scale: bool = True):
        super().__init__()
        self.dim, self.eps, self.with_scale = dim, eps, with_scale
        if with_scale:
            self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.pow((h * h).mean(-1, keepdim=True) + self.eps, -0.5)  # h * h: pow(h, 2) exactly
        if self.with_scale:
            h = h * self.weight.float()
        return h.type_as(x)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, with_scale={self.with_scale}"


class ClippableLinear(nn.Module):
    """`clamp(x, input_min, input_max) -> Linear(no bias) -> clamp(., output_min, output_max)`.

    The four scalar bounds are persistent buffers (±inf at init, finite in the on-device vision tower and in every
    audio linear of real checkpoints). They are part of the model (the reference applies them too): skipping them
    changes the output, and they double as calibrated activation ranges for quantisation. With `clipped=False` the
    module has no buffers, matching transformers' `Gemma4ClippableLinear` when `use_clipped_linears` is off.
    """

    def __init__(self, in_features: int, out_features: int, *, clipped: bool = True):
        super().__init__()
        self.clipped = clipped
        self.linear = nn.Linear(in_features, out_features, bias=False)
        if clipped:
            self.register_buffer("input_min", torch.tensor(-float("inf")))
            self.register_buffer("input_max", torch.tensor(float("inf")))
            self.register_buffer("output_min", torch.tensor(-float("inf")))
            self.register_buffer("output_max", torch.tensor(float("inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clipped:
            x = clamp(x, self.input_min, self.input_max)
        x = self.linear(x)
        if self.clipped:
            x = clamp(x, self.output_min, self.output_max)
        return x


def clamp(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """`torch.clamp(x, lo, hi)` for 0-d tensor bounds, written with `where` (same values, NaN passes through).

    Why not `torch.clamp`: torch.onnx's optimizer (onnxscript 0.7) writes an invalid graph ("Node input 'mul_min_1'
    is not a graph input") when two tensor-bounded clamps read the same input, which q/k/v (and gate/up) always do.
    """
    return torch.where(x < lo, lo, torch.where(x > hi, hi, x))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The rotate-half RoPE layout: `[x1, x2] -> [-x2, x1]` over the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """transformers' `gelu_pytorch_tanh` (the Gemma MLP activation): the tanh approximation of GELU."""
    return F.gelu(x, approximate="tanh")


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function named by a Gemma 4 config (`hidden_activation` / `hidden_act`); a plain module-level
    function, so modules holding it stay picklable."""
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return gelu_tanh
    if name in ("silu", "swish"):
        return F.silu
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unsupported activation {name!r}; expected 'gelu_pytorch_tanh' or 'silu'")


class MultimodalEmbedder(nn.Module):
    """Projects tower soft tokens into the text embedding space: weightless RMSNorm, then Linear(no bias).

    Mirrors transformers' `Gemma4MultimodalEmbedder` (`embed_vision`, `embed_audio`); `in_features` is the vision
    hidden size or the audio `output_proj_dims`, `out_features` the text hidden size.
    """

    def __init__(self, in_features: int, out_features: int, eps: float = 1e-6):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(in_features, eps, with_scale=False)
        self.embedding_projection = nn.Linear(in_features, out_features, bias=False)

    def forward(self, soft_tokens: torch.Tensor) -> torch.Tensor:
        # (..., in_features) -> (..., out_features)
        return self.embedding_projection(self.embedding_pre_projection_norm(soft_tokens))
