"""LiteRT weight quantization: ai-edge-quantizer re-quantizes our DEQUANTIZED weights, then we check its integers.

LiteRT cannot take our integers directly (litert-torch does not convert a torchao-quantized model), so the float
model is converted with our dequantized weights `q * s` and ai-edge-quantizer (min/max, symmetric, dynamic range:
int8 activations at run time, as LiteRT-LM's own Gemma 4 models) quantizes every constant FULLY_CONNECTED /
EMBEDDING_LOOKUP weight again. Its round-to-nearest gives back our integers exactly when it picks our scale, i.e.
in every row (int8) or block (int4) where our codes reach the largest level. `check_integers` reads the quantized
flatbuffer back and reports, per tensor, the rows/blocks where the stored integers differ from ours.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["check_integers", "quantize_tflite"]


def quantize_tflite(src: Path, dst: Path, *, bits: int, block: int | None, lm_head_rows: int | None = None,
                    head_bits: int = 8) -> None:
    """Quantize every constant FC / embedding weight of `src` to `bits` (channelwise, or blockwise `block`).

    `lm_head_rows`: a FULLY_CONNECTED weight with this many rows (the tied LM head, [V, H]) gets `head_bits`
    channelwise instead (the recipe keeps the embedding / head at int8)."""
    from ai_edge_quantizer import algorithm_manager, qtyping, quantizer, recipe_manager

    def config(nbits: int, blk: int | None):
        gran = qtyping.QuantGranularity.CHANNELWISE if blk is None else getattr(qtyping.QuantGranularity,
                                                                                  f"BLOCKWISE_{blk}")
        return qtyping.OpQuantizationConfig(
            weight_tensor_config=qtyping.TensorQuantizationConfig(num_bits=nbits, symmetric=True, granularity=gran,
                                                                  dtype=qtyping.TensorDataType.INT),
            compute_precision=qtyping.ComputePrecision.INTEGER, explicit_dequantize=False)

    rm = recipe_manager.RecipeManager()
    rm.add_quantization_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                               op_config=config(bits, block),
                               algorithm_key=algorithm_manager.AlgorithmName.MIN_MAX_UNIFORM_QUANT)
    if lm_head_rows is not None:
        import re

        for name in _fc_outputs_with_rows(src, lm_head_rows):
            rm.add_quantization_config(regex=re.escape(name), operation_name=qtyping.TFLOperationName.FULLY_CONNECTED,
                                       op_config=config(head_bits, None),
                                       algorithm_key=algorithm_manager.AlgorithmName.MIN_MAX_UNIFORM_QUANT)
    import contextlib
    import io

    chatter = io.StringIO()  # the quantizer prints its size summary to stdout, which belongs to our CLI
    with contextlib.redirect_stdout(chatter):
        result = quantizer.Quantizer(src.read_bytes(), rm.get_quantization_recipe()).quantize()
    log.debug("ai-edge-quantizer on %s: %s", src.name, chatter.getvalue().strip())
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_bytes(bytes(result.quantized_model))
    tmp.replace(dst)


def _load(path: Path):
    from ai_edge_litert import schema_py_generated as s

    raw = path.read_bytes()
    model = s.ModelT.InitFromObj(s.Model.GetRootAsModel(raw, 0))
    model._file_bytes = raw  # buffers may live after the flatbuffer (offset/size) instead of inline
    return s, model


def _buffer(m, index: int) -> np.ndarray | None:
    b = m.buffers[index]
    if b.data is not None:
        return np.asarray(b.data, dtype=np.uint8)
    if b.offset and b.size:
        return np.frombuffer(m._file_bytes, dtype=np.uint8, count=int(b.size), offset=int(b.offset))
    return None


def _fc_outputs_with_rows(path: Path, rows: int) -> list[str]:
    s, m = _load(path)
    out = []
    for sg in m.subgraphs:
        for op in sg.operators:
            if m.operatorCodes[op.opcodeIndex].builtinCode != s.BuiltinOperator.FULLY_CONNECTED:
                continue
            w = sg.tensors[op.inputs[1]]
            if _buffer(m, w.buffer) is not None and int(w.shape[0]) == rows:
                out.append(sg.tensors[op.outputs[0]].name.decode())
    return out


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def _stored(s, m, sg, t) -> tuple[np.ndarray, np.ndarray] | None:
    """(codes [N, K] int, scales [N] or [N, K/B]) of a quantized constant tensor, or None."""
    q = t.quantization
    raw = _buffer(m, t.buffer)
    if q is None or raw is None or t.type not in (s.TensorType.INT8, s.TensorType.INT4):
        return None
    shape = tuple(int(x) for x in t.shape)
    if t.type == s.TensorType.INT8:
        codes = raw.view(np.int8).reshape(shape).astype(np.int16)
    else:  # two signed nibbles per byte, low nibble first
        lo, hi = (raw & 0x0F).astype(np.int16), (raw >> 4).astype(np.int16)
        nib = np.stack([lo, hi], -1).reshape(-1)[: int(np.prod(shape))]
        codes = np.where(nib > 7, nib - 16, nib).reshape(shape)
    if q.detailsType == s.QuantizationDetails.BlockwiseQuantization:
        st = sg.tensors[q.details.scales]
        sb = _buffer(m, st.buffer)
        dt = np.float16 if st.type == s.TensorType.FLOAT16 else np.float32
        scales = sb.view(dt).astype(np.float32).reshape(tuple(int(x) for x in st.shape))
    else:
        scales = np.asarray(q.scale, dtype=np.float32)
    return codes, scales


def check_integers(float_model: Path, quant_model: Path, ours: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Compare LiteRT's stored integers with ours.

    `ours`: {hf name: {"dequantized": float32 [N, K] (what the float model holds), "q": int codes [N, K],
    "qmax": largest level (127 / 7), "group": None or G}}. A tensor of the float model is identified by the exact
    bytes of its constant (our dequantized weight). Returns {"tensors": {name: {...}}, "differ": [names]}."""
    by_digest = {_digest(v["dequantized"]): k for k, v in ours.items()}
    s, fm = _load(float_model)
    _, qm = _load(quant_model)
    report: dict[str, Any] = {}
    for si, (fsg, qsg) in enumerate(zip(fm.subgraphs, qm.subgraphs)):
        for ti, ft in enumerate(fsg.tensors):
            data = _buffer(fm, ft.buffer)
            if data is None or ft.type != s.TensorType.FLOAT32 or len(ft.shape) != 2:
                continue
            name = by_digest.get(_digest(data.view(np.float32)))
            if name is None or name in report or ti >= len(qsg.tensors) or qsg.tensors[ti].name != ft.name:
                continue
            got = _stored(s, qm, qsg, qsg.tensors[ti])
            if got is None:
                continue
            codes, _ = got
            mine = ours[name]
            q = np.asarray(mine["q"], dtype=np.int16)
            if codes.shape != q.shape:
                report[name] = {"error": f"LiteRT stores {list(codes.shape)}, ours is {list(q.shape)}"}
                continue
            G = mine.get("group") or q.shape[1]
            qb, cb = q.reshape(q.shape[0], -1, G), codes.reshape(q.shape[0], -1, G)
            full = np.abs(qb).max(-1) >= mine["qmax"]  # blocks whose codes reach the largest level
            equal = (qb == cb).all(-1)
            report[name] = {
                "blocks": int(full.size), "blocks_at_max_level": int(full.sum()),
                "equal_blocks": int(equal.sum()), "differ_at_max_level": int((full & ~equal).sum()),
            }
    differ = sorted(n for n, r in report.items() if r.get("differ_at_max_level") or "error" in r)
    for n in differ:
        log.warning("litert: stored integers of %s differ from ours: %s", n, report[n])
    return {"tensors": report, "differ": differ, "unchecked": sorted(set(ours) - set(report))}
