"""The eager reference for a quantized `.pte`: the same integers, with XNNPACK's dynamic activation quantization.

A quantized linear of the ExecuTorch program is XNNPACK's `qd8-f32-qb4w` / `qd8-f32-qc8w` GEMM: each row (token) of
the activations is quantized to asymmetric int8 at run time, multiplied by the int4/int8 weight codes in integers,
and scaled back. torchao's eager `int8_asym_per_token` does the same thing with a different rounding recipe (zero point
`qmin - round(min / scale)`, codes `round(x / scale)`), so an eager torchao model differs from the lowered program by
one quantization step in some activations -- enough to move the tiny model's logits by several hundredths.
`XnnpackDynamicQuantLinear` follows XNNPACK's recipe to the float32 operation (`xnn_f32_qd8_asymmetric_quantization_params`
and `xnn_compute_f32_qd8_convert`, XNNPACK `src/xnnpack/quantization.h`, `src/operator-run.c`):

    rmin = min(0, min(x)), rmax = max(0, max(x))
    m = 255 / (rmax - rmin)                       (1 when rmin == rmax)
    zp = -128 - rmin*m  if (-128 + rmin*m) + (127 + rmax*m) > 0  else  127 - rmax*m;  clamp [-128, 127]; rint
    a_scale = 1 / m;  codes = clamp(rint(x * mult) + zp, -128, 127)
    y = a_scale * sum_blocks(w_scale_b * sum_k (codes - zp) * w_codes)

XNNPACK has two multipliers. Its convert operator (ExecuTorch emits one before every dynamically quantized linear)
quantizes with `mult = 1 / a_scale`, i.e. 1 / (1 / m), which is m or one float32 step away from it. When XNNPACK
instead fuses the conversion into the GEMM ("inline LHS packing", its packing kernel gets the parameters' own scale)
it quantizes with `mult = m`. Compared row by row on the embedded model (int4 and int8, held-out text, the program
and this reference fed the same caches): the linear that reads a method's input directly, `per_layer_model_projection`
(input `inputs_embeds`), is quantized with m -- every row where the two multipliers give different codes matches m --
and every other linear with 1 / (1 / m) (their inputs are produced by XNNPACK ops inside the same delegate).
`INLINE_LHS_PACKED` names the former; with it, the rows whose codes differ between the multipliers are no longer
among the worst positions and the largest logit difference drops (figures: benchmarks/README.md).

The integer sums are exact (float64 here); only the float32 accumulation order over blocks can differ (~1e-7).
`emulate_xnnpack(module)` swaps every torchao dynamically quantized linear of a module for this one, in place.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["INLINE_LHS_PACKED", "XnnpackDynamicQuantLinear", "emulate_xnnpack", "xnnpack_quantize_rows"]

INLINE_LHS_PACKED = ("per_layer_model_projection",)  # linears XNNPACK quantizes with m (module name suffixes)


def xnnpack_quantize_rows(x: torch.Tensor, *, inline_lhs_packing: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`x [M, K]` float32 -> (codes [M, K] float32 integers in [-128, 127], zero points [M, 1], scales [M, 1]).

    `inline_lhs_packing`: quantize with m (XNNPACK's GEMM packing its own input) instead of 1 / (1 / m) (its convert
    operator); see the module docstring."""
    x = x.float()
    rmin = torch.clamp(x.amin(-1, keepdim=True), max=0.0)
    rmax = torch.clamp(x.amax(-1, keepdim=True), min=0.0)
    span = rmax - rmin
    m = torch.where(span == 0, torch.ones_like(span), torch.tensor(255.0) / torch.where(span == 0, 1.0, span))
    rmin_m, rmax_m = rmin * m, rmax * m
    from_min, from_max = -128.0 + rmin_m, 127.0 + rmax_m
    zp = torch.where(from_min + from_max > 0, -128.0 - rmin_m, 127.0 - rmax_m).clamp(-128.0, 127.0)
    zp = torch.round(zp)  # rintf: round half to even, as torch.round
    a_scale = 1.0 / m  # params.inv_scale
    mult = m if inline_lhs_packing else 1.0 / a_scale  # the packing kernel's / the convert operator's multiplier
    codes = torch.clamp(torch.round(x * mult) + zp, -128.0, 127.0)
    return codes, zp, a_scale


class XnnpackDynamicQuantLinear(nn.Module):
    """`y = x W^T (+ b)` with XNNPACK's per-token int8 activations and the weight's int4 groups / int8 channels."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, block: int, bias: torch.Tensor | None, *,
                 inline_lhs_packing: bool = False):
        super().__init__()
        self.inline_lhs_packing = bool(inline_lhs_packing)
        n, k = codes.shape
        if k % block:
            raise ValueError(f"weight codes {list(codes.shape)}: K={k} is not a multiple of the block {block}")
        self.register_buffer("codes", codes.to(torch.float64).reshape(n, k // block, block), persistent=False)
        self.register_buffer("scale", scale.float().reshape(n, k // block), persistent=False)  # [N, G]
        self.bias = bias
        self.out_features, self.in_features = n, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        codes, zp, a_scale = xnnpack_quantize_rows(x.reshape(-1, self.in_features),
                                                   inline_lhs_packing=self.inline_lhs_packing)
        a = (codes - zp).to(torch.float64).reshape(codes.shape[0], *self.codes.shape[1:])  # [M, G, B]
        blocks = torch.einsum("mgb,ngb->mng", a, self.codes).float()  # exact integer sums, [M, N, G]
        y = (blocks * self.scale).sum(-1) * a_scale  # [M, N]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


def emulate_xnnpack(module: nn.Module, inline_lhs_packed: tuple[str, ...] = INLINE_LHS_PACKED) -> nn.Module:
    """Swap each `nn.Linear` whose weight is a torchao `IntxUnpackedToInt8Tensor` with dynamic int8 activations for
    `XnnpackDynamicQuantLinear` over the same integers (in place; returns `module`); the linears whose names end with
    one of `inline_lhs_packed` quantize with XNNPACK's inline-packing multiplier (module docstring)."""
    swaps = []
    for name, mod in module.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, nn.Linear) and type(w).__name__ == "IntxUnpackedToInt8Tensor" \
                and w.activation_quantization is not None:
            if torch.any(w.zero_point != 0):
                raise ValueError(f"linear {name!r}: weight zero points must be 0 (symmetric codes)")
            swaps.append((name, XnnpackDynamicQuantLinear(
                w.qdata, w.scale, w.block_size[1], mod.bias,
                inline_lhs_packing=any(name == s or name.endswith("." + s) for s in inline_lhs_packed))))
    for name, new in swaps:
        parent, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, leaf, new)
    return module

