"""Numpy reference for every weight quantization scheme: quantize, pack, unpack, dequantize.

This module is the single source of truth for the integer weights that all three backends (ExecuTorch/XNNPACK,
LiteRT, ONNX Runtime) store. The exporters take the codes and scales made here and prove they stored them bit-exactly;
no backend re-quantizes. Every scheme works on a 2-D float weight ``w[N, K]`` in Hugging Face orientation
(``nn.Linear.weight`` is ``[out_features N, in_features K]``; an embedding table is ``[vocab N, hidden K]``, which
is also the tied LM head's ``[out, in]``). Scales are per output row (int8) or per group of ``G`` consecutive
input elements of a row (int4), i.e. groups run along K, the reduction axis of the matmul.

Byte layout (what lands in the quantized safetensors, all little-endian, row-major):

``int8`` (:class:`Int8PerChannel`, symmetric, restricted range)
    ``qdata``  int8  ``[N, K]``   codes ``q`` in ``[-127, 127]`` (never -128: TFLite/XNNPACK int8 weights are symmetric)
    ``scales`` bf16  ``[N]``      ``w ~= q * scales[n]``

``int4`` (:class:`Int4Group`, symmetric, group ``G`` in {16, 32, 64, 128, ...}, ``K % G == 0``)
    ``qdata``  uint8 ``[N, K // 2]``  codes ``q`` in ``[-8, 7]`` stored offset-binary as ``u = q + 8`` in ``[0, 15]``;
               two codes per byte, **low nibble first**: ``byte[n, j] = u[n, 2j] | (u[n, 2j + 1] << 4)``.
    ``scales`` bf16  ``[N, K // G]``  ``w[n, k] ~= q[n, k] * scales[n, k // G]``
    This is exactly ONNX Runtime's ``MatMulNBits`` (bits=4, block_size=G) without zero points: ``B`` is
    ``qdata.reshape(N, K // G, G // 2)``, ``scales`` is ``scales.reshape(-1)``, and the implicit zero point 8 gives
    ``(u - 8) * scale``; ``GatherBlockQuantized`` (uint8 data, quantize_axis=last) reads the same bytes. ExecuTorch and
    LiteRT store signed int4 ``q = u - 8``; :func:`unpack_int4` recovers it and :func:`pack_int4_high_first` gives the
    other nibble order for kernels that want it.

``int4-asym`` (:class:`Int4GroupAsym`, ONNX Runtime only)
    ``qdata``  uint8 ``[N, K // 2]``  unsigned codes ``u`` in ``[0, 15]``, low nibble first (as above)
    ``scales`` bf16  ``[N, K // G]``
    ``zeros``  uint8 ``[N, ceil((K // G) / 2)]``  zero points ``z`` in ``[0, 15]``, packed low nibble first per row
               (MatMulNBits' packed ``zero_points`` input, row by row); ``w ~= (u - z) * scale``.

Scales: every scale is a positive value that is exactly representable in bfloat16 (XNNPACK stores 4-bit block scales
as bf16) and, being at least ``MIN_SCALE = 2**-14`` (float16's smallest normal), also exactly in float16 (below 65504)
and float32, so any backend can hold it without rounding. The scale is the float32 ideal scale rounded **up** to the
next bf16 value, which keeps every ``|w / scale|`` inside the code range, so the per-element error is at most
``scale / 2`` (the rounding error), with no clipping beyond that. A scale is never zero: an all-zero row or group (the
padding row of both embedding tables) gets ``MIN_SCALE`` and all-zero codes, because LiteRT-LM refuses zero scales.

The ideal symmetric int4 scale is ``max|w| / 7.5`` (torchao's ``MappingType.SYMMETRIC`` for the range [-8, 7]): the
most negative value maps to -8 and the most positive to 7 (7.5 rounds to 8 and is clamped, an error of exactly half a
step). Rounding is numpy's ``rint`` (round half to even). int8 uses ``max|w| / 127``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "MIN_SCALE",
    "SchemeError",
    "Scheme",
    "Int8PerChannel",
    "Int4Group",
    "Int4GroupAsym",
    "scheme_from_dict",
    "bf16_round_up",
    "bf16_round_nearest",
    "f32_to_bf16_bits",
    "bf16_bits_to_f32",
    "pack_int4",
    "unpack_int4",
    "pack_uint4",
    "unpack_uint4",
    "pack_int4_high_first",
    "pack_int4_low_first",
    "unpack_int4_low_first",
    "relative_error",
    "matmul_nbits_arrays",
]

MIN_SCALE = float(2.0**-14)  # float16's smallest normal; exact in bf16/fp16/fp32; never zero (LiteRT-LM)
VALID_GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)  # powers of two >= 16 (MatMulNBits, GatherBlockQuantized)


class SchemeError(ValueError):
    """A tensor does not fit a scheme (wrong rank, K not a multiple of the group size, bad stored arrays)."""


# ----------------------------------------------------------------------------------------------------------- bf16
def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Decode raw bfloat16 bit patterns (uint16) to float32, exactly (bf16 is the top half of a float32)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Encode float32 values that are already exactly bf16-representable as uint16 bit patterns.

    Raises if any value would lose bits: scales are made bf16-exact on purpose, so a loss here is a bug.
    """
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    if np.any(bits & 0xFFFF):
        raise SchemeError("value is not exactly representable in bfloat16 (low 16 mantissa bits are not zero)")
    return (bits >> 16).astype(np.uint16)


def bf16_round_up(x: np.ndarray) -> np.ndarray:
    """Smallest bf16-representable float32 >= x, for finite x >= 0 (rounds the magnitude up)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    up = (bits & np.uint32(0xFFFF0000)) + np.where(bits & np.uint32(0xFFFF), np.uint32(0x10000), np.uint32(0))
    return up.astype(np.uint32).view(np.float32)


def bf16_round_nearest(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bf16 value (ties to even), as float32. Used to write bf16 float tensors."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    out = rounded.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), np.float32(np.nan), out).astype(np.float32)


def _choose_scale(ideal: np.ndarray) -> np.ndarray:
    """bf16-exact scale >= ideal, never below MIN_SCALE (so never zero)."""
    return np.maximum(bf16_round_up(ideal.astype(np.float32)), np.float32(MIN_SCALE))


# ------------------------------------------------------------------------------------------------------- packing
def pack_uint4(u: np.ndarray) -> np.ndarray:
    """Pack unsigned 4-bit codes ``u[..., 2m]`` (0..15) two per byte, low nibble first -> uint8 ``[..., m]``."""
    u = np.asarray(u)
    if u.shape[-1] % 2:
        raise SchemeError(f"cannot pack an odd number ({u.shape[-1]}) of 4-bit codes per row")
    if u.size and (u.min() < 0 or u.max() > 15):
        raise SchemeError(f"4-bit codes out of range [0, 15]: found [{u.min()}, {u.max()}]")
    u = u.astype(np.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def unpack_uint4(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_uint4`: uint8 ``[..., m]`` -> codes uint8 ``[..., 2m]`` in 0..15."""
    packed = np.asarray(packed, dtype=np.uint8)
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Signed int4 codes (-8..7) -> offset-binary ``q + 8``, packed low nibble first (MatMulNBits layout)."""
    q = np.asarray(q)
    if q.size and (q.min() < -8 or q.max() > 7):
        raise SchemeError(f"int4 codes out of range [-8, 7]: found [{q.min()}, {q.max()}]")
    return pack_uint4(q.astype(np.int16) + 8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_int4`: packed uint8 ``[..., m]`` -> signed int8 codes ``[..., 2m]`` in -8..7."""
    return (unpack_uint4(packed).astype(np.int16) - 8).astype(np.int8)


def pack_int4_high_first(q: np.ndarray) -> np.ndarray:
    """Signed int4 codes -> two's-complement nibbles, **high** nibble first: ``(q[2j] << 4) | (q[2j+1] & 0xF)``.

    A conversion helper for kernels that use that order (a byte per pair of codes, first code in the high nibble);
    the canonical on-disk layout is :func:`pack_int4`.
    """
    q = np.asarray(q).astype(np.int16)
    if q.shape[-1] % 2:
        raise SchemeError(f"cannot pack an odd number ({q.shape[-1]}) of 4-bit codes per row")
    nib = (q & 0x0F).astype(np.uint8)
    return ((nib[..., 0::2] << 4) | nib[..., 1::2]).astype(np.uint8)


def pack_int4_low_first(codes: np.ndarray) -> np.ndarray:
    """Signed int4 codes -> two's-complement nibbles, element 2i in the LOW nibble, flattened (TFLite's INT4 buffer
    layout; an odd count is padded with a zero code)."""
    flat = np.asarray(codes, dtype=np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    nib = (flat.astype(np.uint8) & 0x0F).reshape(-1, 2)
    return (nib[:, 0] | (nib[:, 1] << 4)).astype(np.uint8)


def unpack_int4_low_first(raw: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`pack_int4_low_first`: bytes -> the first `count` signed int4 codes (int8, flat)."""
    raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
    lo, hi = (raw & 0x0F).astype(np.int8), (raw >> 4).astype(np.int8)
    nib = np.stack([lo, hi], -1).reshape(-1)[:count]
    return np.where(nib > 7, nib - 16, nib).astype(np.int8)


def relative_error(w: np.ndarray, w_hat: np.ndarray) -> float:
    """``||w - w_hat||_F / ||w||_F`` in float64 (0 when both are zero, inf when only w is zero)."""
    w = np.asarray(w, dtype=np.float64)
    diff = float(np.sum((w - np.asarray(w_hat, dtype=np.float64)) ** 2))
    ref = float(np.sum(w * w))
    if ref == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return float(np.sqrt(diff / ref))


# ------------------------------------------------------------------------------------------------------- schemes
@dataclass(frozen=True, kw_only=True)
class Scheme:
    """A weight quantization scheme. Subclasses are frozen value objects; ``to_dict`` is what manifests store."""

    kind: ClassVar[str] = ""
    bits: ClassVar[int] = 0
    symmetric: ClassVar[bool] = True
    onnx_only: ClassVar[bool] = False

    # -- description -------------------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        """Short human name used in tables (``int8``, ``int4-g32``, ``int4-asym-g32``)."""
        return self.kind

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "bits": self.bits, "symmetric": self.symmetric,
                             "onnx_only": self.onnx_only, "scale_dtype": "bfloat16"}
        d.update(dataclasses.asdict(self))
        return d

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise :class:`SchemeError` unless a weight of this shape can use the scheme."""
        if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
            raise SchemeError(f"{self.label} needs a non-empty 2-D weight [N, K], got shape {tuple(shape)}")

    def supports(self, shape: tuple[int, ...]) -> bool:
        try:
            self.check_shape(tuple(shape))
        except SchemeError:
            return False
        return True

    def stored_layout(self, shape: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Stored arrays for a weight of ``shape``: suffix -> (safetensors dtype, shape). See the module docstring."""
        raise NotImplementedError

    # -- numerics ----------------------------------------------------------------------------------------------
    def quantize(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """float ``w[N, K]`` -> unpacked codes and parameters: ``q`` (int8/uint8 codes ``[N, K]``), ``scales``
        (float32, bf16-exact), and ``zeros`` for asymmetric schemes."""
        raise NotImplementedError

    def pack(self, quantized: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Unpacked codes -> the stored arrays (``qdata``, ``scales`` as float32 bf16-exact values, ``zeros``)."""
        raise NotImplementedError

    def unpack(self, stored: dict[str, np.ndarray], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        """Inverse of :meth:`pack`."""
        raise NotImplementedError

    def dequantize(self, quantized: dict[str, np.ndarray]) -> np.ndarray:
        """Unpacked codes -> float32 ``[N, K]``."""
        raise NotImplementedError

    def encode(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """quantize + pack: float weight -> stored arrays."""
        return self.pack(self.quantize(w))

    def decode(self, stored: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        """unpack + dequantize: stored arrays -> float32 weight."""
        return self.dequantize(self.unpack(stored, shape))

    def _as_2d(self, w: np.ndarray) -> np.ndarray:
        w = np.asarray(w)
        self.check_shape(w.shape)
        if not np.all(np.isfinite(w)):
            raise SchemeError(f"{self.label}: weight contains NaN or inf")
        return w.astype(np.float32, copy=False)


@dataclass(frozen=True, kw_only=True)
class Int8PerChannel(Scheme):
    """Symmetric int8, one scale per output row; codes in [-127, 127]. Also the embedding-table int8 scheme
    (one scale per token row, as ExecuTorch ``embedding_byte`` and a per-channel LM head use it)."""

    kind: ClassVar[str] = "int8_per_channel"
    bits: ClassVar[int] = 8
    QMAX: ClassVar[int] = 127

    @property
    def label(self) -> str:
        return "int8"

    def stored_layout(self, shape):
        self.check_shape(shape)
        n, k = shape
        return {"qdata": ("I8", (n, k)), "scales": ("BF16", (n,))}

    def quantize(self, w):
        w = self._as_2d(w)
        amax = np.max(np.abs(w), axis=1)  # [N]
        scales = _choose_scale(amax / np.float32(self.QMAX))  # [N]
        q = np.clip(np.rint(w / scales[:, None]), -self.QMAX, self.QMAX).astype(np.int8)
        return {"q": q, "scales": scales}

    def pack(self, quantized):
        return {"qdata": np.ascontiguousarray(quantized["q"], dtype=np.int8),
                "scales": np.asarray(quantized["scales"], dtype=np.float32)}

    def unpack(self, stored, shape):
        layout = self.stored_layout(tuple(shape))
        _check_stored(self, stored, layout, {"qdata": np.int8})
        return {"q": stored["qdata"], "scales": np.asarray(stored["scales"], dtype=np.float32)}

    def dequantize(self, quantized):
        return quantized["q"].astype(np.float32) * quantized["scales"][:, None].astype(np.float32)


@dataclass(frozen=True, kw_only=True)
class Int4Group(Scheme):
    """Symmetric int4 with one scale per group of ``group_size`` input elements; codes in [-8, 7]."""

    group_size: int = 32
    kind: ClassVar[str] = "int4_group"
    bits: ClassVar[int] = 4
    QMIN: ClassVar[int] = -8
    QMAX: ClassVar[int] = 7

    def __post_init__(self):
        g = self.group_size
        if not isinstance(g, int) or g < 16 or g & (g - 1):
            raise SchemeError(f"group_size must be a power of two >= 16 (MatMulNBits/GatherBlockQuantized), got {g!r}")

    @property
    def label(self) -> str:
        return f"int4-g{self.group_size}"

    def check_shape(self, shape):
        super().check_shape(shape)
        if shape[1] % self.group_size:
            raise SchemeError(f"{self.label} needs the input dim K={shape[1]} to be a multiple of {self.group_size} "
                              f"(shape {tuple(shape)})")

    def stored_layout(self, shape):
        self.check_shape(shape)
        n, k = shape
        return {"qdata": ("U8", (n, k // 2)), "scales": ("BF16", (n, k // self.group_size))}

    def _groups(self, w):
        n, k = w.shape
        return w.reshape(n, k // self.group_size, self.group_size)  # [N, K/G, G]

    def quantize(self, w):
        w = self._as_2d(w)
        wg = self._groups(w)
        amax = np.max(np.abs(wg), axis=2)  # [N, K/G]
        scales = _choose_scale(amax / np.float32((self.QMAX - self.QMIN) / 2))  # max|w| / 7.5
        q = np.clip(np.rint(wg / scales[:, :, None]), self.QMIN, self.QMAX).astype(np.int8)
        return {"q": q.reshape(w.shape), "scales": scales}

    def pack(self, quantized):
        return {"qdata": pack_int4(quantized["q"]), "scales": np.asarray(quantized["scales"], dtype=np.float32)}

    def unpack(self, stored, shape):
        layout = self.stored_layout(tuple(shape))
        _check_stored(self, stored, layout, {"qdata": np.uint8})
        return {"q": unpack_int4(stored["qdata"]), "scales": np.asarray(stored["scales"], dtype=np.float32)}

    def dequantize(self, quantized):
        q = quantized["q"]
        n, k = q.shape
        qg = q.reshape(n, k // self.group_size, self.group_size).astype(np.float32)
        return (qg * quantized["scales"][:, :, None].astype(np.float32)).reshape(n, k)


@dataclass(frozen=True, kw_only=True)
class Int4GroupAsym(Int4Group):
    """Asymmetric int4 (unsigned codes 0..15 and a 4-bit zero point per group). ONNX Runtime only: ExecuTorch's
    XNNPACK int4 path and LiteRT store symmetric int4, so the manifest marks tensors using it ``onnx_only``.

    Like ONNX Runtime's own blockwise quantizer, the range always includes zero (``min <= 0 <= max``), so a zero
    weight is exact; ``scale = bf16_up((max - min) / 15)``, ``z = clip(rint(-min / scale), 0, 15)``.
    """

    kind: ClassVar[str] = "int4_group_asym"
    symmetric: ClassVar[bool] = False
    onnx_only: ClassVar[bool] = True
    UMAX: ClassVar[int] = 15

    @property
    def label(self) -> str:
        return f"int4-asym-g{self.group_size}"

    def stored_layout(self, shape):
        self.check_shape(shape)
        n, k = shape
        ng = k // self.group_size
        return {"qdata": ("U8", (n, k // 2)), "scales": ("BF16", (n, ng)), "zeros": ("U8", (n, (ng + 1) // 2))}

    def quantize(self, w):
        w = self._as_2d(w)
        wg = self._groups(w)
        lo = np.minimum(np.min(wg, axis=2), 0.0).astype(np.float32)  # [N, K/G]
        hi = np.maximum(np.max(wg, axis=2), 0.0).astype(np.float32)
        scales = _choose_scale((hi - lo) / np.float32(self.UMAX))
        zeros = np.clip(np.rint(-lo / scales), 0, self.UMAX).astype(np.uint8)
        u = np.clip(np.rint(wg / scales[:, :, None]) + zeros[:, :, None], 0, self.UMAX).astype(np.uint8)
        return {"q": u.reshape(w.shape), "scales": scales, "zeros": zeros}

    def pack(self, quantized):
        zeros = np.asarray(quantized["zeros"], dtype=np.uint8)
        if zeros.shape[-1] % 2:  # pad each row to an even count with the default zero point 8 (never read)
            zeros = np.concatenate([zeros, np.full(zeros.shape[:-1] + (1,), 8, np.uint8)], axis=-1)
        return {"qdata": pack_uint4(quantized["q"]), "scales": np.asarray(quantized["scales"], dtype=np.float32),
                "zeros": pack_uint4(zeros)}

    def unpack(self, stored, shape):
        layout = self.stored_layout(tuple(shape))
        _check_stored(self, stored, layout, {"qdata": np.uint8, "zeros": np.uint8})
        ng = layout["scales"][1][1]
        return {"q": unpack_uint4(stored["qdata"]), "scales": np.asarray(stored["scales"], dtype=np.float32),
                "zeros": unpack_uint4(stored["zeros"])[:, :ng]}

    def dequantize(self, quantized):
        u = quantized["q"]
        n, k = u.shape
        ug = u.reshape(n, k // self.group_size, self.group_size).astype(np.float32)
        zg = quantized["zeros"].astype(np.float32)[:, :, None]
        return ((ug - zg) * quantized["scales"][:, :, None].astype(np.float32)).reshape(n, k)


def matmul_nbits_arrays(scheme: Scheme, stored: dict[str, np.ndarray], shape: tuple[int, ...], *,
                        int8_block_size: int | None = None) -> dict[str, Any]:
    """Our arrays as ONNX Runtime ``MatMulNBits`` inputs and attributes, by pure re-arrangement (no byte of a code or
    a scale changes): ``B`` uint8 ``[N, K/block, block/2]`` (int4) or ``[N, K/block, block]`` (int8), ``scales`` float32
    ``[N * K/block]``, ``zero_points`` for the asymmetric scheme (``[N * ceil((K/G) / 2)]`` packed nibbles; absent: the
    implicit zero point 8 or 128), ``bits`` and ``block_size``.

    int4 groups are MatMulNBits' own layout (offset-binary, low nibble first). int8 per channel becomes bits=8 with
    the codes offset to ``q + 128`` (``q XOR 0x80`` on the byte) and the row scale repeated for every block of
    ``int8_block_size`` along K (which only sets how the kernel blocks its int8 activations)."""
    scheme.unpack(stored, tuple(shape))  # validates shapes and dtypes
    n, k = shape
    if isinstance(scheme, Int4Group):  # includes Int4GroupAsym
        g = scheme.group_size
        out = {"B": np.ascontiguousarray(stored["qdata"], dtype=np.uint8).reshape(n, k // g, g // 2),
               "scales": np.ascontiguousarray(stored["scales"], dtype=np.float32).reshape(-1), "bits": 4,
               "block_size": g}
        if "zeros" in stored:
            out["zero_points"] = np.ascontiguousarray(stored["zeros"], dtype=np.uint8).reshape(-1)
        return out
    if isinstance(scheme, Int8PerChannel):
        bs = int8_block_size
        if bs is None or k % bs:
            raise SchemeError(f"int8 MatMulNBits needs a block size dividing K={k}, got {bs}")
        b = (np.asarray(stored["qdata"]).view(np.uint8) ^ np.uint8(0x80)).reshape(n, k // bs, bs)
        scales = np.repeat(np.asarray(stored["scales"], dtype=np.float32).reshape(n, 1), k // bs, axis=1).reshape(-1)
        return {"B": b, "scales": scales, "bits": 8, "block_size": bs}
    raise SchemeError(f"scheme {scheme.label} has no MatMulNBits form")


_SCHEMES: dict[str, type[Scheme]] = {cls.kind: cls for cls in (Int8PerChannel, Int4Group, Int4GroupAsym)}


def scheme_from_dict(d: dict[str, Any]) -> Scheme:
    """Rebuild a scheme from :meth:`Scheme.to_dict` output (as found in a manifest); strict about unknown kinds."""
    if not isinstance(d, dict) or "kind" not in d:
        raise SchemeError(f"scheme entry must be an object with a 'kind', got {d!r}")
    cls = _SCHEMES.get(d["kind"])
    if cls is None:
        raise SchemeError(f"unknown scheme kind {d['kind']!r}; known: {sorted(_SCHEMES)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    scheme = cls(**{k: v for k, v in d.items() if k in fields})
    for key in ("bits", "symmetric", "onnx_only"):
        if key in d and d[key] != getattr(scheme, key):
            raise SchemeError(f"scheme {d['kind']!r}: field {key!r} is {d[key]!r}, expected {getattr(scheme, key)!r}")
    return scheme


def _check_stored(scheme: Scheme, stored: dict[str, np.ndarray], layout: dict, int_dtypes: dict[str, type]) -> None:
    for suffix, (_, shape) in layout.items():
        if suffix not in stored:
            raise SchemeError(f"{scheme.label}: missing stored array {suffix!r}")
        arr = stored[suffix]
        if tuple(arr.shape) != tuple(shape):
            raise SchemeError(f"{scheme.label}: {suffix} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
        if suffix in int_dtypes and arr.dtype != int_dtypes[suffix]:
            raise SchemeError(
                f"{scheme.label}: {suffix} has dtype {arr.dtype}, expected {np.dtype(int_dtypes[suffix])}")
