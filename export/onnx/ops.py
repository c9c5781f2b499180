"""Quantized linears for the ONNX export: OUR integers as `com.microsoft::MatMulNBits`, never re-quantized.

`QuantLinear` replaces an `nn.Linear` whose weight the quantized checkpoint stores as int4/int8 codes. It holds the
MatMulNBits inputs as buffers, made from the checkpoint's stored arrays by a pure byte re-arrangement (no rounding):

* int4 (`Int4Group`, symmetric, group G): `qdata` uint8 `[N, K/2]` is already MatMulNBits' layout (offset-binary
  `u = q + 8`, low nibble first); B is the same bytes viewed as `[N, K/G, G/2]`, `block_size = G`, no zero points (the
  implicit zero point is 8). Scales `[N, K/G]` bf16-exact -> float32 `[N * K/G]`.
* int4-asym (`Int4GroupAsym`): the same, plus `zeros` (uint8, packed low nibble first per row) as MatMulNBits'
  `zero_points` `[N * ceil(K/G / 2)]`.
* int8 per channel (`Int8PerChannel`): MatMulNBits with `bits=8`. Codes `q` in [-127, 127] become `u = q + 128`
  (= `q XOR 0x80` on the byte, bijective), the implicit 8-bit zero point is 128. The block size is the largest power of
  two <= 128 dividing K (>= 16), and the row scale is repeated for every block of the row (exact copies).
  Why MatMulNBits and not DequantizeLinear + MatMul: ORT would constant-fold the dequantization into a float weight
  (4x the memory), and MatMulInteger needs the activations quantized per tensor by the graph. With
  `accuracy_level=4` MatMulNBits quantizes the activations to int8 per block of `block_size` inside its kernel
  (8-bit MatMulNBits has no fast kernel without it).

The torch side is a custom op `edge_gemma::matmul_nbits` whose eager implementation dequantizes and matmuls (optionally
emulating accuracy_level=4's activation quantization, `emulate_activation_quant`, bit-for-bit the same rounding as
ONNX Runtime's kernels up to float summation order), and whose ONNX translation (`TRANSLATION_TABLE`, passed to
`torch.onnx.export(custom_translation_table=...)`) is one MatMulNBits node. `stored_from_matmulnbits` is the inverse
re-arrangement, used by the tests to read the initializers back and compare them byte for byte with the checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edge_gemma.quantize.schemes import Int4Group, Int4GroupAsym, Int8PerChannel, Scheme, matmul_nbits_arrays

__all__ = [
    "ACCURACY_LEVEL", "QuantLinear", "TRANSLATION_TABLE", "emulate_activation_quant", "int8_block_size",
    "matmulnbits_arrays", "rms_norm", "stored_from_matmulnbits",
]

ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits: the fast CPU path (MLAS CompInt8)
INT8_MAX_BLOCK = 32  # see int8_block_size


def int8_block_size(k: int) -> int:
    """Block size for an int8 per-channel weight with input dim `k`: the largest power of two <= 32 dividing it.

    The row scale is the same for every block, so the block size only sets how MatMulNBits(accuracy_level=4)
    quantizes the activations (one int8 scale per block of K). 32, the int4 linears' group, rather than 128: one
    activation code that lands on the other side of a rounding boundary (ORT's and torch's float kernels differ by
    an ulp) moves the logits by its block's step; with blocks of 128 the embedded model's logits exceed issue 5's 0.05
    bound against the emulated eager model, with 32 they stay within it, and 16 is no better than 32. The price: a
    slightly slower int8 tied head per decode step (figures: benchmarks/README.md)."""
    bs = INT8_MAX_BLOCK
    while bs >= 16:
        if k % bs == 0:
            return bs
        bs //= 2
    raise ValueError(f"int8 weight with input dim K={k}: MatMulNBits needs K to be a multiple of 16")


def matmulnbits_arrays(scheme: Scheme, stored: dict[str, np.ndarray], shape: tuple[int, int]) -> dict[str, object]:
    """Stored checkpoint arrays -> MatMulNBits inputs and attributes (`b`, `scales`, `zeros` or None, `bits`,
    `block_size`): `quantize.schemes.matmul_nbits_arrays` (the numpy reference) with this exporter's int8 block."""
    arr = matmul_nbits_arrays(scheme, stored, shape,
                              int8_block_size=int8_block_size(shape[1]) if isinstance(scheme, Int8PerChannel) else None)
    return {"b": arr["B"], "scales": arr["scales"], "zeros": arr.get("zero_points"), "bits": arr["bits"],
            "block_size": arr["block_size"]}


def stored_from_matmulnbits(scheme: Scheme, b: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None,
                            shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Inverse of `matmulnbits_arrays`: MatMulNBits initializers -> the checkpoint's stored arrays. Raises if the
    repeated int8 scales are not all equal (they would not be one row scale)."""
    n, k = shape
    if isinstance(scheme, Int4Group):
        out = {"qdata": np.asarray(b, dtype=np.uint8).reshape(n, k // 2),
               "scales": np.asarray(scales, dtype=np.float32).reshape(n, k // scheme.group_size)}
        if isinstance(scheme, Int4GroupAsym):
            out["zeros"] = np.asarray(zeros, dtype=np.uint8).reshape(n, -1)
        return out
    if isinstance(scheme, Int8PerChannel):
        bs = int8_block_size(k)
        sc = np.asarray(scales, dtype=np.float32).reshape(n, k // bs)
        if not np.all(sc == sc[:, :1]):
            raise ValueError("int8 MatMulNBits scales differ within a row")
        return {"qdata": (np.asarray(b, dtype=np.uint8).reshape(n, k) ^ np.uint8(0x80)).view(np.int8),
                "scales": sc[:, 0].copy()}
    raise ValueError(f"scheme {scheme.label} has no MatMulNBits form")


# ------------------------------------------------------------------------------------------------ torch custom op
def emulate_activation_quant(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """What MatMulNBits(accuracy_level=4) does to its input, bit for bit: per row, per block of `block_size` along K,
    symmetric int8 with `scale = amax / 127` and codes `round_half_even(x * (127 / amax))`; returns `q * scale`.

    This is MLAS's `QuantizeARow_CompInt8` (x86 AVX2/AVX-512: `inverse_scale = 127.f / maxScalar` in ONE float
    division, then `_mm512_roundscale_ps(v * inverse_scale, _MM_ROUND_NEAREST)`). `1 / (amax / 127)` (two roundings)
    differs from `127 / amax` by an ulp for some blocks, which flips codes that sit on a .5 boundary; so does torch's
    `127.0 / tensor`, which is `reciprocal(tensor) * 127`. Each float32 operation is therefore done in float64 and
    rounded once to float32, which is the correctly rounded float32 result (53 >= 2 * 24 + 2)."""
    k = x.shape[-1]
    xb = x.float().reshape(*x.shape[:-1], k // block_size, block_size)
    amax = xb.abs().amax(-1, keepdim=True).double()  # exact
    scale = (amax / 127.0).float()
    inv = torch.where(amax > 0, 127.0 / torch.where(amax > 0, amax, 1.0), 0.0).float()  # float64 division: one rounding
    v = (xb.double() * inv.double()).float()  # the kernel's float32 product
    q = torch.round(v).clamp(-127, 127)  # round half to even, like _MM_ROUND_NEAREST; |v| <= 127 anyway
    return (q.double() * scale.double()).reshape(x.shape)  # exact in float64 (8-bit code x 24-bit scale)


def _dequantize(b: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, n: int, k: int, bits: int,
                block_size: int) -> torch.Tensor:
    nb = k // block_size
    if bits == 4:
        u = torch.stack([(b & 0x0F), (b >> 4)], dim=-1).reshape(n, nb, block_size).to(torch.int16)
    else:
        u = b.reshape(n, nb, block_size).to(torch.int16)
    if zeros is None:
        z = torch.tensor(1 << (bits - 1), dtype=torch.int16)
    else:  # packed 4-bit zero points, row by row
        zz = zeros.reshape(n, -1)
        z = torch.stack([(zz & 0x0F), (zz >> 4)], dim=-1).reshape(n, -1)[:, :nb].to(torch.int16).unsqueeze(-1)
    return ((u - z).float() * scales.reshape(n, nb, 1).float()).reshape(n, k)  # exact: 8-bit code x bf16 scale


@torch.library.custom_op("edge_gemma::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, n: int, k: int,
                 bits: int, block_size: int, emulate: bool) -> torch.Tensor:
    """x `[..., K]` @ dequant(B)^T -> `[..., N]` (the MatMulNBits reference; `emulate` adds its activation rounding)."""
    w = _dequantize(b, scales, zeros, n, k, bits, block_size)
    if emulate:  # float64: the int32 block dot products times both scales, as near exact as float allows
        xq = emulate_activation_quant(x, block_size)
        return (xq @ w.double().t()).to(x.dtype)
    return x @ w.t().to(x.dtype)


@matmul_nbits.register_fake
def _(x, b, scales, zeros, n, k, bits, block_size, emulate):
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("edge_gemma::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma 4 RMSNorm in float32, `x * (mean(x^2) + eps)^-0.5 * weight` (the eager `RMSNorm`'s exact math); exported
    as ONE `SimplifiedLayerNormalization` node. Why: eager's `pow(ms + eps, -0.5)` becomes Pow/ReduceMean/Add/Pow/Mul
    in ONNX, which ONNX Runtime's SimplifiedLayerNorm fusion does not match (it wants Sqrt + Div), so every norm
    would run as five unfused kernels, several norms per layer and call."""
    h = x.float()
    return (h * torch.pow(h.pow(2).mean(-1, keepdim=True) + eps, -0.5) * weight.float()).to(x.dtype)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


def _matmulnbits_schema():
    from onnx.defs import OpSchema

    fp, attr, at = OpSchema.FormalParameter, OpSchema.Attribute, OpSchema.AttrType
    return OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[fp("A", "T1"), fp("B", "T2"), fp("scales", "T1"),
                fp("zero_points", "T3", param_option=OpSchema.FormalParameterOption.Optional)],
        outputs=[fp("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)"], ""), ("T2", ["tensor(uint8)"], ""), ("T3", ["tensor(uint8)"], "")],
        attributes=[attr(name, at.INT, "") for name in ("K", "N", "bits", "block_size", "accuracy_level")],
    )


def _translation_table() -> dict:
    """`{torch op: onnxscript function}` for `torch.onnx.export(custom_translation_table=...)`. ORT's contrib ops
    have no schema in `onnx.defs`, so the op is declared here with the inputs and attributes we use."""
    from onnx.defs import OpSchema
    from onnxscript._internal.values import Op, Opset

    mnb = Op(Opset("com.microsoft", 1), "MatMulNBits", _matmulnbits_schema())

    def matmul_nbits_onnx(x, b, scales, zeros, n: int, k: int, bits: int, block_size: int, emulate: bool):
        inputs = (x, b, scales) if zeros is None else (x, b, scales, zeros)
        return mnb(*inputs, K=k, N=n, bits=bits, block_size=block_size, accuracy_level=ACCURACY_LEVEL)

    sln_schema = OpSchema(
        "SimplifiedLayerNormalization", "", 1,
        inputs=[OpSchema.FormalParameter("X", "T"), OpSchema.FormalParameter("scale", "T")],
        outputs=[OpSchema.FormalParameter("Y", "T")],
        type_constraints=[("T", ["tensor(float)"], "")],
        attributes=[OpSchema.Attribute("axis", OpSchema.AttrType.INT, ""),
                    OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, ""),
                    OpSchema.Attribute("stash_type", OpSchema.AttrType.INT, "")],
    )
    sln = Op(Opset("", 1), "SimplifiedLayerNormalization", sln_schema)  # ORT's contrib op in the ONNX domain

    def rms_norm_onnx(x, weight, eps: float):
        return sln(x, weight, axis=-1, epsilon=eps, stash_type=1)

    return {torch.ops.edge_gemma.matmul_nbits.default: matmul_nbits_onnx,
            torch.ops.edge_gemma.rms_norm.default: rms_norm_onnx}


class _LazyTable(dict):
    def __init__(self):
        super().__init__()
        self._filled = False

    def fill(self) -> "_LazyTable":
        if not self._filled:
            self.update(_translation_table())
            self._filled = True
        return self


TRANSLATION_TABLE = _LazyTable()  # call .fill() before passing it (imports onnxscript only when exporting)


class QuantLinear(nn.Module):
    """`nn.Linear` replacement over quantized integers (MatMulNBits buffers); `bias` optional and float.

    `emulate=True` makes the eager forward round activations as ORT's accuracy_level=4 kernel does, for references.
    `weight` is a zero-size tensor of the compute dtype: callers that read `linear.weight.dtype` keep working."""

    def __init__(self, scheme: Scheme, stored: dict[str, np.ndarray], shape: tuple[int, int],
                 bias: torch.Tensor | None = None, *, emulate: bool = False):
        super().__init__()
        arr = matmulnbits_arrays(scheme, stored, shape)
        self.scheme = scheme
        self.out_features, self.in_features = shape
        self.bits, self.block_size, self.emulate = int(arr["bits"]), int(arr["block_size"]), emulate
        self.register_buffer("b", torch.from_numpy(np.ascontiguousarray(arr["b"])))
        self.register_buffer("scales", torch.from_numpy(np.ascontiguousarray(arr["scales"])))
        self.register_buffer("zeros", None if arr["zeros"] is None else torch.from_numpy(arr["zeros"]))
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return torch.empty(0, dtype=self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.edge_gemma.matmul_nbits(x.float(), self.b, self.scales, self.zeros, self.out_features,
                                              self.in_features, self.bits, self.block_size, self.emulate)
        return y if self.bias is None else y + self.bias

    def rows(self, start: int, stop: int) -> "QuantLinear":
        """The linear over output rows `[start, stop)`: the same integers, scales and zero points, so its outputs are
        those rows' outputs of this linear bit for bit (each output is one row's dot product)."""
        if not 0 <= start < stop <= self.out_features:
            raise ValueError(f"rows [{start}, {stop}) outside the {self.out_features} output rows")
        part = QuantLinear.__new__(QuantLinear)
        nn.Module.__init__(part)
        part.scheme, part.in_features, part.out_features = self.scheme, self.in_features, stop - start
        part.bits, part.block_size, part.emulate = self.bits, self.block_size, self.emulate

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:  # b [N, ...]; scales, zeros flat [N * per_row]
            return None if t is None else t.reshape(self.out_features, -1)[start:stop].reshape(
                (stop - start, *t.shape[1:]) if t.dim() > 1 else (-1,)).clone()

        part.register_buffer("b", cut(self.b))
        part.register_buffer("scales", cut(self.scales))
        part.register_buffer("zeros", cut(self.zeros))
        part.bias = None if self.bias is None else nn.Parameter(self.bias[start:stop].clone(), requires_grad=False)
        return part

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.scheme.label}, MatMulNBits bits={self.bits} " \
               f"block={self.block_size}"
