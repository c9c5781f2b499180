"""Numpy reference schemes: hand-computed quantizations, pack/unpack round trips, error bounds, scale properties, and
the byte layout read back by an independent decoder written from ONNX Runtime's MatMulNBits specification."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_gemma.quantize.schemes import (
    MIN_SCALE,
    Int4Group,
    Int4GroupAsym,
    Int8PerChannel,
    SchemeError,
    bf16_bits_to_f32,
    bf16_round_nearest,
    bf16_round_up,
    f32_to_bf16_bits,
    matmul_nbits_arrays,
    pack_int4,
    pack_int4_high_first,
    pack_uint4,
    relative_error,
    scheme_from_dict,
    unpack_int4,
    unpack_uint4,
)

ALL_SCHEMES = [Int8PerChannel(), Int4Group(group_size=16), Int4Group(group_size=32), Int4Group(group_size=64),
               Int4Group(group_size=128), Int4GroupAsym(group_size=32)]


def _weights(seed=0, n=48, k=256, heavy=False):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.02
    if heavy:  # outliers, as in real LLM weights
        w[rng.random((n, k)) < 0.01] *= 40
    return w


# ------------------------------------------------------------------------------------------------ by hand
def test_int4_by_hand_codes_bytes_and_values():
    # one group of 16 with max|w| = 7.5 -> scale exactly 1.0
    w = np.array([[7.5, -7.5, 0.5, -0.5, 1.5, 2.5, -2.4, 3.0, 0, 0, 0, 0, 0, 0, 0, 0.25]], np.float32)
    s = Int4Group(group_size=16)
    q = s.quantize(w)
    assert q["scales"].tolist() == [[1.0]]
    # 7.5 -> 8 clamped to 7; -7.5 -> -8; ties to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    assert q["q"].tolist() == [[7, -8, 0, 0, 2, 2, -2, 3, 0, 0, 0, 0, 0, 0, 0, 0]]
    stored = s.pack(q)
    # u = q + 8, low nibble first: (15, 0) -> 0x0F, (8, 8) -> 0x88, (10, 10) -> 0xAA, (6, 11) -> 0xB6
    assert stored["qdata"].tolist() == [[0x0F, 0x88, 0xAA, 0xB6, 0x88, 0x88, 0x88, 0x88]]
    assert s.decode(stored, w.shape).tolist() == [[7, -8, 0, 0, 2, 2, -2, 3, 0, 0, 0, 0, 0, 0, 0, 0]]


def test_int4_scale_is_rounded_up_to_bf16():
    # max|w| = 1.5 -> ideal 0.2 = 1.6 * 2^-3; bf16 keeps 7 mantissa bits: ceil(1.6 * 128) = 205 -> 205/128 * 2^-3
    w = np.zeros((1, 32), np.float32)
    w[0, 3] = 1.5
    w[0, 20] = -0.3
    q = Int4Group(group_size=32).quantize(w)
    assert q["scales"][0, 0] == np.float32(205 / 128 / 8) == np.float32(0.2001953125)
    assert q["q"][0, 3] == 7 and q["q"][0, 20] == -1  # 1.5/0.2002 = 7.49 -> 7; -0.3/0.2002 = -1.499 -> -1


def test_int8_by_hand():
    w = np.array([[1.27, -0.635, 0.0, 0.001]], np.float32)
    q = Int8PerChannel().quantize(w)
    # 1.27/127 = 0.01 = 1.28 * 2^-7 -> ceil(1.28 * 128) = 164 -> 164/128 * 2^-7
    assert q["scales"].tolist() == [164 / 128 / 128]
    assert q["q"].tolist() == [[127, -63, 0, 0]]  # 126.88 -> 127; -63.44 -> -63; 0.0999 -> 0


def test_int4_asym_by_hand():
    w = np.zeros((1, 16), np.float32)
    w[0, :3] = [2.0, -1.0, 0.5]
    q = Int4GroupAsym(group_size=16).quantize(w)
    # range [-1, 2] -> 3/15 = 0.2 -> bf16 up 0.2001953125; zero point rint(1/0.2002) = rint(4.995) = 5
    assert q["scales"].tolist() == [[0.2001953125]]
    assert q["zeros"].tolist() == [[5]]
    assert q["q"][0, :4].tolist() == [15, 0, 7, 5]  # 9.99 -> 10 + 5; -4.995 -> -5 + 5; 2.497 -> 2 + 5; 0 -> 5
    stored = Int4GroupAsym(group_size=16).pack(q)
    assert stored["zeros"].tolist() == [[0x85]]  # zero point 5 in the low nibble, padding 8 in the high one
    assert stored["qdata"][0, :2].tolist() == [0x0F, 0x57]


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=lambda s: s.label)
def test_all_zero_rows_get_a_nonzero_scale(scheme):
    w = _weights(1, n=4, k=128)
    w[2] = 0.0  # the padding row of both embedding tables
    q = scheme.quantize(w)
    assert np.all(q["scales"] > 0)
    assert np.all(q["scales"][2] == MIN_SCALE)
    assert np.all(scheme.decode(scheme.pack(q), w.shape)[2] == 0.0)


# --------------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=lambda s: s.label)
@pytest.mark.parametrize("heavy", [False, True])
def test_error_is_at_most_half_a_step(scheme, heavy):
    w = _weights(2, heavy=heavy)
    q = scheme.quantize(w)
    w_hat = scheme.dequantize(q)
    scales = q["scales"].reshape(w.shape[0], -1)
    step = np.repeat(scales, w.shape[1] // scales.shape[1], axis=1)
    assert np.all(np.abs(w - w_hat) <= step * (0.5 + 1e-5))
    if not heavy:  # Gaussian weights: int8 ~0.7 %, int4 ~10 % relative error
        assert relative_error(w, w_hat) < (0.01 if scheme.bits == 8 else 0.13)


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=lambda s: s.label)
def test_scales_exact_in_bf16_fp16_fp32(scheme):
    w = _weights(3, heavy=True)
    w[0] *= 1e-6  # tiny row: floors at MIN_SCALE
    scales = scheme.quantize(w)["scales"]
    f32_to_bf16_bits(scales)  # raises if any scale needs more than bf16's bits
    assert np.array_equal(scales.astype(np.float16).astype(np.float32), scales)
    assert np.all(scales >= MIN_SCALE)


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=lambda s: s.label)
def test_pack_unpack_round_trip(scheme):
    w = _weights(4)
    q = scheme.quantize(w)
    stored = scheme.pack(q)
    back = scheme.unpack(stored, w.shape)
    for key in q:
        assert np.array_equal(back[key], q[key]), key
    assert np.array_equal(scheme.decode(stored, w.shape), scheme.dequantize(q))
    layout = scheme.stored_layout(w.shape)
    assert set(layout) == set(stored)
    for suffix, (_, shape) in layout.items():
        assert stored[suffix].shape == shape


def test_codes_stay_in_range():
    w = _weights(5, heavy=True)
    assert Int8PerChannel().quantize(w)["q"].min() >= -127
    q4 = Int4Group(group_size=32).quantize(w)["q"]
    assert q4.min() >= -8 and q4.max() == 7  # -8 only when max|w| / 7.5 is exactly a bf16 value (hand test above)
    u = Int4GroupAsym(group_size=32).quantize(w)["q"]
    assert u.min() >= 0 and u.max() <= 15


def test_nibble_helpers_round_trip_and_reject_bad_input():
    rng = np.random.default_rng(6)
    q = rng.integers(-8, 8, size=(5, 64)).astype(np.int8)
    assert np.array_equal(unpack_int4(pack_int4(q)), q)
    u = rng.integers(0, 16, size=(3, 10)).astype(np.uint8)
    assert np.array_equal(unpack_uint4(pack_uint4(u)), u)
    hf = pack_int4_high_first(np.array([[1, -2]], np.int8))
    assert hf.tolist() == [[0x1E]]  # 1 in the high nibble, -2 = 0b1110 in the low one
    with pytest.raises(SchemeError, match="odd"):
        pack_uint4(np.zeros((1, 3), np.uint8))
    with pytest.raises(SchemeError, match="out of range"):
        pack_int4(np.array([[8, 0]]))
    with pytest.raises(SchemeError, match="out of range"):
        pack_uint4(np.array([[16, 0]]))


def test_matches_an_independent_matmulnbits_decoder():
    """Decode our bytes the way ONNX Runtime's MatMulNBits spec describes B, scales and zero points: B is uint8
    [N, K/block, block/2], codes packed low-first along K; zero points packed two per byte, default 8."""
    n, k, g = 6, 128, 32
    w = _weights(7, n=n, k=k)
    for scheme in (Int4Group(group_size=g), Int4GroupAsym(group_size=g)):
        stored = scheme.encode(w)
        inputs = matmul_nbits_arrays(scheme, stored, w.shape)
        b, scales = inputs["B"], inputs["scales"]
        assert b.shape == (n, k // g, g // 2) and scales.shape == (n * k // g,)
        nb = k // g
        if "zeros" in stored:
            zp_bytes = inputs["zero_points"].reshape(n, (nb + 1) // 2)  # packed, row by row
        out = np.zeros((n, k), np.float32)
        for row in range(n):
            for blk in range(nb):
                if "zeros" in stored:
                    byte = int(zp_bytes[row, blk // 2])
                    zp = (byte >> 4) if blk % 2 else (byte & 0xF)
                else:
                    zp = 8
                for j in range(g // 2):
                    byte = int(b[row, blk, j])
                    for half, code in enumerate((byte & 0xF, byte >> 4)):
                        out[row, blk * g + 2 * j + half] = (code - zp) * scales[row * nb + blk]
        assert np.array_equal(out, scheme.decode(stored, w.shape)), scheme.label


# ------------------------------------------------------------------------------------------- bf16 helpers
def test_bf16_helpers_agree_with_torch():
    rng = np.random.default_rng(8)
    x = (rng.standard_normal(10000) * 10.0 ** rng.integers(-12, 6, 10000)).astype(np.float32)
    ref_bits = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(f32_to_bf16_bits(bf16_round_nearest(x)), ref_bits)
    assert np.array_equal(bf16_bits_to_f32(ref_bits), torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    a = np.abs(x)
    up = bf16_round_up(a)
    f32_to_bf16_bits(up)
    assert np.all(up >= a)
    below = (up.view(np.uint32) - 0x10000).view(np.float32)
    assert np.all((below < a) | (up == a))
    with pytest.raises(SchemeError, match="bfloat16"):
        f32_to_bf16_bits(np.array([0.1], np.float32))


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("g", [0, 8, 24, 48, 100])
def test_group_size_must_be_a_power_of_two_at_least_16(g):
    with pytest.raises(SchemeError, match="power of two"):
        Int4Group(group_size=g)


def test_shape_checks():
    s = Int4Group(group_size=32)
    assert s.supports((8, 64)) and not s.supports((8, 48)) and not s.supports((8,)) and not s.supports((2, 2, 32))
    with pytest.raises(SchemeError, match="multiple of 32"):
        s.quantize(np.zeros((2, 48), np.float32))
    with pytest.raises(SchemeError, match="NaN or inf"):
        Int8PerChannel().quantize(np.array([[1.0, np.nan]], np.float32))
    stored = s.encode(_weights(9, n=2, k=64))
    with pytest.raises(SchemeError, match="missing stored array 'scales'"):
        s.unpack({"qdata": stored["qdata"]}, (2, 64))
    with pytest.raises(SchemeError, match="dtype int8, expected uint8"):
        s.unpack({**stored, "qdata": stored["qdata"].astype(np.int8)}, (2, 64))
    with pytest.raises(SchemeError, match="shape"):
        s.unpack(stored, (2, 128))


def test_scheme_dict_round_trip_and_strictness():
    for s in ALL_SCHEMES:
        assert scheme_from_dict(s.to_dict()) == s
    assert Int4GroupAsym(group_size=32).to_dict()["onnx_only"] is True
    assert Int4Group(group_size=32).to_dict()["onnx_only"] is False
    with pytest.raises(SchemeError, match="unknown scheme kind"):
        scheme_from_dict({"kind": "int3"})
    with pytest.raises(SchemeError, match="onnx_only"):
        scheme_from_dict({**Int4GroupAsym(group_size=32).to_dict(), "onnx_only": False})
