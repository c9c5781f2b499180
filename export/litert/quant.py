"""LiteRT weight quantization: OUR integers and scales written into the LiteRT flatbuffer, then checked per tensor.

Why not let ai-edge-quantizer re-quantize our dequantized weights: its symmetric int4 uses
`scale = max|w| / 7` rounded to nearest bf16 and codes in [-7, 7], while ours (edge_gemma.quantize.schemes) is
`scale = max|w| / 7.5` rounded UP to bf16 with codes in [-8, 7]. Re-quantizing `q * s` with its rule gives
`s' = 7.5 s / 7`, so every block whose largest code is not exactly +-7 comes back with other integers (figures:
benchmarks/README.md). The conventions cannot be matched by feeding it other floats.

So ai-edge-quantizer only builds the TEMPLATE: the float model is converted with placeholder weights (one shared
random tensor per shape; the float decoder of E2B is 7.5 GB in float32 and never exists), quantized with the recipe's
scheme (which sets the op options and the quantization layout LiteRT-LM reads: INT4 + BlockwiseQuantization with
float16 scales [N, K/B] / INT8 + per-channel float32 scales), and `write_with_our_weights` then replaces each
placeholder by our codes and scales, tensor by tensor from the quantized checkpoint, named by their Hugging Face name.
Large buffers are written after the flatbuffer (`Buffer.offset/size`, as litert-torch writes models over 2 GB), so the
PLE table (2.35 GB of int8 for E2B) never passes through float32 nor through the flatbuffer builder.

`check_integers` reads the written file back and compares every named tensor with ours (codes and scales).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge_gemma.quantize.schemes import pack_int4_low_first, unpack_int4_low_first

log = logging.getLogger(__name__)

__all__ = ["OurWeight", "WeightUse", "check_integers", "quantize_tflite", "write_with_our_weights"]

ALIGN = 64  # external buffers start on 64-byte boundaries (XNNPACK reads weights with aligned loads)
EXTERNAL_MIN = 1024  # buffers of at least this many bytes are written after the flatbuffer


@dataclass(frozen=True, kw_only=True)
class OurWeight:
    """One of our quantized 2-D tensors: codes [N, K] (int8: [-127, 127], int4: [-8, 7]) and float32 scales
    ([N] per channel, or [N, K/group] per block), exactly as the quantized checkpoint stores them."""

    name: str
    codes: np.ndarray
    scales: np.ndarray
    bits: int
    group: int | None


@dataclass(frozen=True, kw_only=True)
class WeightUse:
    """Input `input` of operator `op` in subgraph `subgraph` is the placeholder standing for our tensor `name`;
    `factor`: a constant the converter folded into that weight (our scales are multiplied by it)."""

    subgraph: int
    op: int
    input: int
    name: str
    factor: float = 1.0


def quantize_tflite(src: Path, dst: Path, *, bits: int, block: int | None, lm_head_rows: int | None = None,
                    head_bits: int = 8) -> None:
    """Quantize every constant FC / embedding weight of `src` to `bits` (channelwise, or blockwise `block`) with
    ai-edge-quantizer (dynamic range: int8 activations at run time, as LiteRT-LM's own Gemma 4 models).

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
    chatter = io.StringIO()  # the quantizer prints its size summary to stdout, which belongs to our CLI
    with contextlib.redirect_stdout(chatter):
        with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bars (not every one honours enable_progress_bar)
            result = quantizer.Quantizer(src.read_bytes(), rm.get_quantization_recipe()).quantize(
                enable_progress_bar=False)
    log.debug("ai-edge-quantizer on %s: %s", src.name, chatter.getvalue().strip())
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_bytes(bytes(result.quantized_model))
    tmp.replace(dst)


def _load(path: Path):
    from ai_edge_litert import schema_py_generated as s

    import mmap

    with open(path, "rb") as f:  # memory-mapped: a model's buffers are read only where they are used
        raw = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    model = s.ModelT.InitFromObj(s.Model.GetRootAsModel(raw, 0))
    model._file_bytes = raw  # buffers may live after the flatbuffer (offset/size) instead of inline
    return s, model


def _buffer(m, index: int) -> np.ndarray | None:
    b = m.buffers[index]
    if b.data is not None and len(b.data):
        return np.asarray(b.data, dtype=np.uint8)
    if b.offset and b.offset > 1 and b.size:
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


def _stored(s, m, sg, t) -> tuple[np.ndarray, np.ndarray] | None:
    """(codes [N, K] int, scales [N] or [N, K/B] float32) of a quantized constant tensor, or None."""
    q = t.quantization
    raw = _buffer(m, t.buffer)
    if q is None or raw is None or t.type not in (s.TensorType.INT8, s.TensorType.INT4):
        return None
    shape = tuple(int(x) for x in t.shape)
    if t.type == s.TensorType.INT8:
        codes = raw.view(np.int8).reshape(shape)  # a view: no copy of a 2 GB table
    else:  # two signed nibbles per byte, low nibble first
        codes = unpack_int4_low_first(raw, int(np.prod(shape))).reshape(shape)
    if q.detailsType == s.QuantizationDetails.BlockwiseQuantization:
        st = sg.tensors[q.details.scales]
        sb = _buffer(m, st.buffer)
        dt = np.float16 if st.type == s.TensorType.FLOAT16 else np.float32
        scales = sb.view(dt).astype(np.float32).reshape(tuple(int(x) for x in st.shape))
    else:
        scales = np.asarray(q.scale, dtype=np.float32)
    return codes, scales


# ---------------------------------------------------------------------------------------------- writing our weights
def _scales_dtype(s, sg, t):
    return np.float16 if sg.tensors[t.quantization.details.scales].type == s.TensorType.FLOAT16 else np.float32


def write_with_our_weights(template: Path, dst: Path, uses: list[WeightUse], load: Callable[[str], OurWeight]) -> None:
    """Write `dst`: the quantized `template` with every placeholder named in `uses` replaced by our tensor.

    A placeholder may stand for several of our tensors (one shared placeholder per shape): the first use keeps the
    placeholder's tensor, the others get copies; each of our tensors gets one data buffer (and one float16 scales
    buffer when blockwise), shared by the subgraphs that use it. `load(name)` is called once per tensor, while the
    file is written, so only one of our tensors is in memory at a time (plus the per-channel scale lists)."""
    s, m = _load(template)
    src_bytes = m._file_bytes
    Blockwise = s.QuantizationDetails.BlockwiseQuantization

    ours: dict[str, dict[str, Any]] = {}  # name -> {"data": buffer index, "scales": buffer index | None, ...}
    claimed: dict[tuple[int, int], bool] = {}  # (subgraph, placeholder tensor) -> first use already taken
    per_tensor: dict[tuple[int, str], int] = {}  # (subgraph, name) -> tensor index
    old_buffers: set[int] = set()

    def new_buffer() -> int:
        m.buffers.append(s.BufferT())
        return len(m.buffers) - 1

    for u in uses:
        sg = m.subgraphs[u.subgraph]
        op = sg.operators[u.op]
        op.inputs = [int(x) for x in op.inputs]  # a read-only view of the mapped file until now
        ti = op.inputs[u.input]
        if (u.subgraph, u.name) in per_tensor:
            op.inputs[u.input] = per_tensor[(u.subgraph, u.name)]
            continue
        ph = sg.tensors[ti]
        q = ph.quantization
        if q is None or ph.type not in (s.TensorType.INT8, s.TensorType.INT4):
            raise ValueError(f"{template}: operator {u.op} input {u.input} of subgraph {u.subgraph} (for {u.name}) "
                             f"is not a quantized constant (type {ph.type})")
        N, K = (int(x) for x in ph.shape)
        blockwise = q.detailsType == Blockwise
        info = ours.get(u.name)
        if info is None:
            info = {"shape": (N, K), "bits": 4 if ph.type == s.TensorType.INT4 else 8,
                    "group": int(q.details.blockSize) if blockwise else None, "factor": u.factor,
                    "data": new_buffer(), "scales": new_buffer() if blockwise else None,
                    "scales_dtype": _scales_dtype(s, sg, ph) if blockwise else None, "channel_scales": None}
            if not blockwise:
                w = load(u.name)
                info["channel_scales"] = (w.scales.astype(np.float64) * u.factor).astype(np.float32)
                info["shape"] = tuple(w.codes.shape)
                del w
            ours[u.name] = info
        # the tensor for (subgraph, name): the placeholder itself for its first use, else a copy of it
        if claimed.get((u.subgraph, ti)):
            t = _copy_tensor(ph)
            sg.tensors.append(t)
            tj = len(sg.tensors) - 1
            if blockwise:  # a scales tensor of its own
                st = copy.copy(sg.tensors[q.details.scales])
                sg.tensors.append(st)
                t.quantization.details.scales = len(sg.tensors) - 1
        else:
            claimed[(u.subgraph, ti)] = True
            t, tj = ph, ti
            old_buffers.add(ph.buffer)
            if blockwise:
                old_buffers.add(sg.tensors[q.details.scales].buffer)
        t.name = u.name.encode()
        t.buffer = info["data"]
        t.shape = [int(x) for x in info["shape"]]
        if blockwise:
            st = sg.tensors[t.quantization.details.scales]
            st.name = (u.name + "/scales").encode()
            st.buffer = info["scales"]
            st.shape = [info["shape"][0], info["shape"][1] // info["group"]]
        else:
            t.quantization = copy.copy(t.quantization)
            t.quantization.scale = info["channel_scales"].tolist()
            t.quantization.zeroPoint = [0] * len(t.quantization.scale)
            t.quantization.quantizedDimension = 0
        per_tensor[(u.subgraph, u.name)] = tj
        op.inputs[u.input] = tj

    used = {t.buffer for sg in m.subgraphs for t in sg.tensors}
    for b in old_buffers - used:  # the placeholders' data: nothing reads it any more
        m.buffers[b] = s.BufferT()

    # which buffers go after the flatbuffer, and where their bytes come from
    sources: list[tuple[int, Any]] = []
    by_buffer = {}
    for name, info in ours.items():
        N, K = info["shape"]
        by_buffer[info["data"]] = ("data", name, (N * K + 1) // 2 if info["bits"] == 4 else N * K)
        if info["scales"] is not None:
            by_buffer[info["scales"]] = ("scales", name, N * (K // info["group"]) * np.dtype(info["scales_dtype"]).itemsize)
    for i, b in enumerate(m.buffers):
        if i in by_buffer:
            kind, name, size = by_buffer[i]
            sources.append((i, (kind, name)))
            b.data, b.offset, b.size = None, 1, size
        elif b.data is not None and len(b.data) >= EXTERNAL_MIN:
            arr = np.asarray(b.data, dtype=np.uint8)
            sources.append((i, arr))
            b.data, b.offset, b.size = None, 1, arr.size
        elif b.offset and b.offset > 1 and b.size:
            sources.append((i, np.frombuffer(src_bytes, np.uint8, count=int(b.size), offset=int(b.offset))))
            b.offset = 1
    del src_bytes

    def pack() -> bytes:
        import flatbuffers

        builder = flatbuffers.Builder(1 << 20)
        builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    head = pack()
    pos = _align(len(head))
    for i, _ in sources:
        m.buffers[i].offset = pos
        pos = _align(pos + int(m.buffers[i].size))
    head2 = pack()
    if len(head2) != len(head):
        raise RuntimeError(f"{dst}: flatbuffer size changed when the buffer offsets were set ({len(head)} -> "
                           f"{len(head2)})")
    tmp = dst.with_name(dst.name + ".tmp")
    cache: tuple[str, dict[str, bytes]] | None = None
    with open(tmp, "wb") as f:
        f.write(head2)
        for i, src in sources:
            b = m.buffers[i]
            f.write(b"\0" * (int(b.offset) - f.tell()))
            if isinstance(src, tuple):
                kind, name = src
                if cache is None or cache[0] != name:
                    cache = (name, _our_bytes(load(name), ours[name]))
                data = cache[1][kind]
            else:
                data = src
            if data.nbytes != int(b.size):
                raise ValueError(f"{dst}: buffer for {src[1] if isinstance(src, tuple) else i} has {data.nbytes} bytes, "
                                 f"expected {int(b.size)}")
            f.write(memoryview(data))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dst)


def _copy_tensor(t):
    c = copy.copy(t)
    c.quantization = copy.copy(t.quantization)
    if c.quantization is not None:
        c.quantization.details = copy.copy(t.quantization.details)
    return c


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _our_bytes(w: OurWeight, info: dict[str, Any]) -> dict[str, np.ndarray]:
    """The data (and blockwise scales) bytes of one of our tensors, checked against the template's layout."""
    if tuple(w.codes.shape) != tuple(info["shape"]):
        raise ValueError(f"{w.name}: our tensor is {list(w.codes.shape)}, the LiteRT graph needs {list(info['shape'])}")
    if w.bits != info["bits"] or (info["group"] is not None and w.group != info["group"]):
        raise ValueError(f"{w.name}: ours is int{w.bits} group {w.group}, the LiteRT template is int{info['bits']} "
                         f"block {info['group']}")
    # int8: a view of the checkpoint's array, no copy (the E2B PLE table is 2.35 GB)
    out = {"data": (pack_int4_low_first(w.codes) if w.bits == 4 else
                    np.ascontiguousarray(w.codes, dtype=np.int8).view(np.uint8).reshape(-1))}
    if info["scales"] is not None:
        sc = (w.scales.astype(np.float64) * info["factor"]).astype(info["scales_dtype"])
        if not np.all(np.isfinite(sc)) or np.any(sc == 0):
            raise ValueError(f"{w.name}: a block scale is zero or not finite in {np.dtype(info['scales_dtype'])}")
        out["scales"] = np.ascontiguousarray(sc).view(np.uint8).reshape(-1)
    return out


# ------------------------------------------------------------------------------------------------------- checking
def check_integers(path: Path, load: Callable[[str], OurWeight], names: list[str],
                   factors: dict[str, float] | None = None) -> dict[str, Any]:
    """Read `path` back and compare every tensor named after one of ours with our codes and scales.

    Returns {"tensors": {name: {"blocks", "equal_blocks", "scales_equal", "max_scale_rel_err", "factor"}},
    "differ": [names whose integers differ], "unchecked": [names not found in the file]}. Scales can differ only
    by the storage rounding (float16 block scales) of a constant the converter folded into the weight (`factor`)."""
    factors = factors or {}
    s, m = _load(path)
    want = set(names)
    report: dict[str, Any] = {}
    for sg in m.subgraphs:
        for t in sg.tensors:
            name = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
            if name not in want or name in report:
                continue
            got = _stored(s, m, sg, t)
            if got is None:
                continue
            codes, scales = got
            w = load(name)
            c = factors.get(name, 1.0)
            if codes.shape != w.codes.shape:
                report[name] = {"error": f"LiteRT stores {list(codes.shape)}, ours is {list(w.codes.shape)}"}
                continue
            G = w.group or codes.shape[1]
            N = codes.shape[0]
            step = max(1, (1 << 26) // codes.shape[1])  # compare in row chunks of ~64 M codes
            equal = np.concatenate([(codes[r:r + step].reshape(-1, codes.shape[1] // G, G)
                                     == w.codes[r:r + step].reshape(-1, codes.shape[1] // G, G)).all(-1)
                                    for r in range(0, N, step)])
            ref = (w.scales.astype(np.float64) * c).reshape(scales.shape)
            rel = np.abs(scales.astype(np.float64) - ref) / np.abs(ref)
            report[name] = {"blocks": int(equal.size), "equal_blocks": int(equal.sum()),
                            "scales_equal": bool(np.all(scales.astype(np.float64) == w.scales.astype(np.float64) * c)),
                            "max_scale_rel_err": float(rel.max()) if rel.size else 0.0, "factor": c}
    differ = sorted(n for n, r in report.items() if "error" in r or r["equal_blocks"] != r["blocks"])
    for n in differ:
        log.warning("litert: stored integers of %s differ from ours: %s", n, report[n])
    return {"tensors": report, "differ": differ, "unchecked": sorted(want - set(report))}


# ------------------------------------------------------------------------------------------ placeholders -> our names
@dataclass(frozen=True, kw_only=True)
class Placeholder:
    """A float tensor converted in place of our quantized tensors `names` (in layer order), all of `shape`."""

    values: np.ndarray  # float32 [rows, K]
    names: tuple[str, ...]


_WEIGHT_OPS = {"FULLY_CONNECTED": 1, "EMBEDDING_LOOKUP": 1}  # builtin -> index of the constant weight input


def assign_uses(float_model: Path, quant_model: Path, placeholders: list[Placeholder]) -> list[WeightUse]:
    """Which operator input of `quant_model` stands for which of our tensors.

    Each constant weight of `float_model` is matched to the placeholder it equals, up to one constant factor (the
    converter folds a following scalar multiply into the weight, e.g. the `* H^-0.5` after the PLE projection).
    The k-th use of a placeholder in a subgraph is its k-th name: layers run in order, and the converter only drops
    the trailing layers of a signature whose results are unused (the prefill signature ends at the last cache
    write), so the used layers of every placeholder are a prefix of its names. ai-edge-quantizer keeps the operator
    order, which is checked."""
    s, fm = _load(float_model)
    _, qm = _load(quant_model)
    codes = {getattr(s.BuiltinOperator, k): v for k, v in _WEIGHT_OPS.items()}
    heads = [(i, p.values.reshape(-1)[:512].astype(np.float64)) for i, p in enumerate(placeholders)]
    uses: list[WeightUse] = []
    for si, (fsg, qsg) in enumerate(zip(fm.subgraphs, qm.subgraphs)):
        fops = [fm.operatorCodes[o.opcodeIndex].builtinCode for o in fsg.operators]
        qops = [qm.operatorCodes[o.opcodeIndex].builtinCode for o in qsg.operators]
        if fops != qops:
            raise ValueError(f"{quant_model}: subgraph {si}: ai-edge-quantizer changed the operators; cannot map the "
                             "placeholders")
        count: dict[int, int] = {}
        for oi, op in enumerate(fsg.operators):
            inp = codes.get(fops[oi])
            if inp is None:
                continue
            t = fsg.tensors[op.inputs[inp]]
            data = _buffer(fm, t.buffer)
            if data is None or t.type != s.TensorType.FLOAT32:
                continue
            w = data.view(np.float32)
            shape = tuple(int(x) for x in t.shape)
            for pi, head in heads:
                p = placeholders[pi]
                if p.values.shape != shape:
                    continue
                c = float(np.dot(w[:512], head) / np.dot(head, head))
                if c == 0 or not np.allclose(w[:512], c * head, rtol=1e-5, atol=0):
                    continue
                if not np.allclose(w, (p.values.reshape(-1) * np.float32(c)), rtol=1e-5, atol=0):
                    continue
                k = count.get(pi, 0)
                if k >= len(p.names):
                    raise ValueError(f"{float_model}: subgraph {si} uses the placeholder for {p.names[0]} more than "
                                     f"{len(p.names)} times")
                count[pi] = k + 1
                uses.append(WeightUse(subgraph=si, op=oi, input=inp, name=p.names[k],
                                      factor=1.0 if abs(c - 1.0) < 1e-6 else c))
                break
    return uses


def widen_rows(path: Path, dst: Path, *, rows: int, full: int, subgraph: str) -> None:
    """In signature `subgraph`, replace every dimension `rows` (the shrunk logits head) by `full` (the vocabulary):
    tensor shapes, and 1-D int32 constants (reshape targets) used only by this subgraph. Refuses when another
    subgraph has a dimension equal to `rows` (the value would not be unique to the head)."""
    import flatbuffers

    s, m = _load(path)
    owner = {i: sg for i, sg in enumerate(m.subgraphs)}
    target = next((i for i, sg in owner.items() if sg.name and sg.name.decode() == subgraph), None)
    if target is None:
        raise ValueError(f"{path}: no subgraph {subgraph!r}")
    other_buffers = set()
    for i, sg in owner.items():
        if i == target:
            continue
        for t in sg.tensors:
            other_buffers.add(t.buffer)
            if t.shape is not None and rows in [int(x) for x in t.shape]:
                raise ValueError(f"{path}: subgraph {sg.name!r} has a dimension {rows}; pick another head size")
    sg = m.subgraphs[target]
    for t in sg.tensors:
        for attr in ("shape", "shapeSignature"):
            dims = getattr(t, attr)
            if dims is not None and rows in [int(x) for x in dims]:
                setattr(t, attr, [full if int(x) == rows else int(x) for x in dims])
        data = _buffer(m, t.buffer)
        if t.type == s.TensorType.INT32 and data is not None and t.shape is not None and len(t.shape) == 1:
            v = data.view(np.int32)
            if rows in v:
                if t.buffer in other_buffers:
                    raise ValueError(f"{path}: a shared constant holds {rows}")
                m.buffers[t.buffer].data = np.where(v == rows, full, v).astype(np.int32).view(np.uint8)
                m.buffers[t.buffer].offset = m.buffers[t.buffer].size = 0
    for op in sg.operators:
        o = op.builtinOptions
        if o is not None and getattr(o, "newShape", None) is not None:
            o.newShape = [full if int(x) == rows else int(x) for x in o.newShape]
    for i, b in enumerate(m.buffers):  # keep converter-external buffers: re-inline them (small models only here)
        if b.offset and b.offset > 1 and b.size:
            b.data = np.frombuffer(m._file_bytes, np.uint8, count=int(b.size), offset=int(b.offset)).copy()
            b.offset = b.size = 0
    builder = flatbuffers.Builder(1 << 20)
    builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_bytes(bytes(builder.Output()))
    os.replace(tmp, dst)
