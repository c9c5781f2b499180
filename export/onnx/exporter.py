"""ONNX exporter: embedder, decoder (KV caches as inputs), vision and audio graphs, weights as external data.

Entry point for the orchestrator (`export/build.py`): `export_backend(job) -> manifest entry`::

    {"files": {"embedder": "onnx/embedder.onnx", "decoder": ..., "vision": ... | None, "audio": ... | None},
     "context": T, "max_prefill_chunk": C, "hidden_size": H, "vocab_size": V, "ple": {"num_layers": L, "dim": P},
     "decoder": {"inputs": ["inputs_embeds", "ple_rows", "positions", "keep", "past_key_0", "past_value_0", ...],
                 "outputs": ["logits", "hidden", "new_key_0", "new_value_0", ...]},
     "caches": [{"layer": i, "past_key": "past_key_i", "past_value": ..., "new_key": ..., "new_value": ...,
                 "shape": [1, nkv, T, hd], "dtype": "float32"}, ...],
     "quantization": {"matmul": "MatMulNBits", "accuracy_level": 4, "tensors": {hf_name: scheme label or "float"}},
     "opset": 18, "audio": {"frame_multiple": 48, "max_frames": 3024} | None}

The checkpoint is a quantized checkpoint (`quant_manifest.json`, any recipe, `fp32` included) or a plain Hugging Face
float checkpoint (exported in float32); the quantization is read from the checkpoint's manifest, never guessed.

Graphs (all batch 1):
  embedder.onnx  ids [S] int64 -> embeds [S, H] = table[ids] * sqrt(H). Float: Gather. Quantized: ORT's
                 `GatherBlockQuantized` over the checkpoint's integers (int4: qdata as is, block G; int8: `q ^ 0x80`,
                 block `int8_block_size(H)`, row scale repeated), then Mul by sqrt(H) rounded to float32 as eager does.
  decoder.onnx   the one decoder swapped for ONNX (`swaps.py`, `graphs.CachedDecoder`): inputs_embeds [1,S,H],
                 ple_rows [1,S,L,P] (raw PLE rows), positions [S], keep [n] (the chunk positions whose outputs are
                 wanted), the old caches -> logits [1,n,V] and final normed hidden states [1,n,H] of those positions
                 and the new K/V [1,nkv,S,hd]. One graph, S and n dynamic (1..max_prefill_chunk): prefill, decode and
                 speculative verify calls share the prepacked weights. The tied LM head is MatMulNBits over the same integers as the embedder's table.
  drafter.onnx   (with a drafter, `model.drafter.DraftStep`) one draft step: token_embed [1,1,H], hidden [1,1,H],
                 position [1], the K/V of the target's last sliding and full cache layers [1,nkv,T,hd] (T dynamic)
                 -> logits [1,V], projected [1,H]. Float32 weights (the embedded model's drafter is 0.7 M parameters;
                 quantizing a full-size drafter with the recipes is not done yet).
  vision.onnx    pixel_values [Np, 3p^2], position_ids [Np, 2] -> soft tokens [Np/k^2, H], valid [Np/k^2].
  audio.onnx     features [T, 128], mask [T] -> soft tokens [T/4, H], valid [T/4]; T a multiple of 48 frames (the
                 manifest's `audio.frame_multiple`): the runtime pads with masked frames (`audio_frame_layout`).

Quantized linears are `ops.QuantLinear` (MatMulNBits, accuracy_level=4), built straight from the stored codes and
scales by the shared loader (`export/common.load_export_model`): only the quantized buffers and the float tensors the
graphs use are materialised; the PLE table is never read and the float decoder of a full-size model never exists.
The text weights are dropped once decoder.onnx is written, before the towers are traced. fp32 exports keep plain
float32 weights. Fidelity against the eager model over the same integers: `tests/test_onnx.py`.
"""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_gemma.config import ModelConfig
from edge_gemma.quantize.schemes import Int4Group, Int4GroupAsym, Int8PerChannel, Scheme

from ..common import AudioGraph, ExportModel, VisionGraph, load_export_model
from .graphs import CachedDecoder, cache_names
from .ops import ACCURACY_LEVEL, TRANSLATION_TABLE, QuantLinear, int8_block_size

__all__ = ["OPSET", "OnnxExportError", "OnnxLinears", "audio_frame_layout", "export_backend", "export_onnx",
           "load_onnx_model", "write_audio_graph", "write_embedder"]

log = logging.getLogger(__name__)

OPSET = 18
DEFAULT_PREFILL_CHUNK = 512


class OnnxExportError(ValueError):
    """The checkpoint cannot be exported to ONNX as asked; the message names the tensor or setting."""


class OnnxLinears:
    """How the ONNX graphs hold the checkpoint's weights: `QuantLinear` (MatMulNBits) over the stored integers;
    `emulate=True` makes them round activations as ORT's accuracy_level=4 kernel does (an eager reference)."""

    def __init__(self, *, emulate: bool = False):
        self.emulate = emulate

    def linear(self, scheme, stored, shape, bias, name):
        return QuantLinear(scheme, stored, shape, bias, emulate=self.emulate)

    def head(self, scheme, stored, shape, name):
        if scheme is None:
            head = nn.Linear(shape[1], shape[0], bias=False, device="meta")  # weight set below
            head.weight = nn.Parameter(torch.from_numpy(stored["tensor"]), requires_grad=False)
            return head
        if isinstance(scheme, Int4GroupAsym) or not isinstance(scheme, (Int4Group, Int8PerChannel)):
            raise OnnxExportError(f"embedding {name!r} uses {scheme.label}; the ONNX embedder supports int4 "
                                  "(symmetric) and int8 tables")
        return QuantLinear(scheme, stored, shape, emulate=self.emulate)


def load_onnx_model(checkpoint: str | Path, *, text_only: bool = False, emulate: bool = False) -> ExportModel:
    """The export model with ONNX's linears (see `OnnxLinears`)."""
    return load_export_model(checkpoint, OnnxLinears(emulate=emulate), text_only=text_only)


# --------------------------------------------------------------------------------------------------------------------
# Graphs
# --------------------------------------------------------------------------------------------------------------------


def write_embedder(path: Path, *, hidden_size: int, scheme: Scheme | None, stored: dict[str, np.ndarray]) -> None:
    """ids [S] -> table[ids] * sqrt(H), written with onnx.helper (no torch tracing needed). `stored`: the
    embedding's stored arrays (`{"tensor": float}` when `scheme` is None)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    H = hidden_size
    scale = numpy_helper.from_array(np.array(np.float32(H**0.5), dtype=np.float32), "embed_scale")
    nodes, inits = [], [scale]
    if scheme is None:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(stored["tensor"], dtype=np.float32), "embed_table"))
        nodes.append(helper.make_node("Gather", ["embed_table", "ids"], ["rows"], axis=0))
    else:
        if isinstance(scheme, Int4Group):
            data, block, bits = np.ascontiguousarray(stored["qdata"], np.uint8), scheme.group_size, 4
            scales = np.ascontiguousarray(stored["scales"], np.float32)
        else:
            block, bits = int8_block_size(H), 8
            data = np.asarray(stored["qdata"]).view(np.uint8) ^ np.uint8(0x80)
            scales = np.repeat(np.asarray(stored["scales"], np.float32)[:, None], H // block, axis=1)
        inits += [numpy_helper.from_array(data, "embed_qdata"), numpy_helper.from_array(scales, "embed_scales")]
        nodes.append(helper.make_node("GatherBlockQuantized", ["embed_qdata", "ids", "embed_scales"], ["rows"],
                                      domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=block,
                                      bits=bits))
    nodes.append(helper.make_node("Mul", ["rows", "embed_scale"], ["embeds"]))
    graph = helper.make_graph(nodes, "embedder", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["S"])],
                              [helper.make_tensor_value_info("embeds", TensorProto.FLOAT, ["S", H])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)
    os.chmod(path.with_name(path.name + ".data"), 0o644)  # onnx creates it private; artifacts are world-readable


# onnxscript 0.7's optimizer drops the constant bounds of the towers' Clip nodes (ClippableLinear): the towers are
# exported unoptimized (ONNX Runtime folds constants when it loads them anyway).
def _torch_export(module: nn.Module, args: tuple, dynamic_shapes: tuple, input_names: list[str],
                  output_names: list[str], path: Path, *, optimize: bool = True, pre_export: bool = False) -> None:
    """`torch.onnx.export` (dynamo) of `module` to `path` with external data.

    `pre_export=True` captures the graph with a plain `torch.export.export` first and hands the ExportedProgram to
    the ONNX exporter. Why: the ONNX exporter's own capture runs with `backed_size_oblivious` and deferred runtime
    asserts, and on the full-size audio tower (12 conformer layers) its symbolic-shape reasoning (sympy's value-range
    analysis) grows with every layer and does not finish; the plain capture of the same module is quick (figures:
    benchmarks/README.md)."""
    import time
    import warnings

    start = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if pre_export:
            module = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
            dynamic_shapes = None  # carried by the ExportedProgram
        program = torch.onnx.export(
            module, args, dynamo=True, external_data=True, dynamic_shapes=dynamic_shapes, input_names=input_names,
            output_names=output_names, custom_translation_table=TRANSLATION_TABLE.fill(), opset_version=OPSET,
            optimize=optimize, verbose=False,
        )
    program.save(str(path), external_data=True)
    log.info("onnx: wrote %s in %.1f s", path.name, time.perf_counter() - start)


def audio_frame_layout(cfg: ModelConfig) -> dict[str, int]:
    """The audio graph's frame count contract: `features [T, 128]` with T a multiple of `frame_multiple` (4 x the
    attention chunk: 48 frames, 0.48 s), at most `max_frames` (30 s of 10 ms frames rounded up to the multiple).

    Why a multiple: torch.export cannot keep an arbitrary T dynamic (the SSCP's two ceil-halvings and the attention's
    block padding specialise the graph on T mod 48), while with T = 48 n every length is a plain multiple of n. The
    runtime pads the features with masked frames (mask False) up to the multiple; the encoder is causal and the SSCP
    zeroes masked frames, so the valid soft tokens equal the unpadded eager model's, and `valid` drops the rest."""
    from edge_gemma.audio import MAX_SAMPLES, num_mel_frames

    unit = 4 * cfg.audio.attention_chunk_size
    return {"frame_multiple": unit, "max_frames": -(-num_mel_frames(MAX_SAMPLES) // unit) * unit}


def write_audio_graph(em: ExportModel, path: Path) -> dict[str, int]:
    """audio.onnx: `features [48 n, 128], mask [48 n]` -> `soft_tokens [12 n, H], valid [12 n]`, n dynamic (see
    `audio_frame_layout`, which it returns: the manifest's `audio` entry)."""
    layout = audio_frame_layout(em.cfg)
    unit = layout["frame_multiple"]
    log.info("onnx: audio graph (frames a multiple of %d, up to %d)", unit, layout["max_frames"])
    blocks = torch.export.Dim("audio_blocks", min=1, max=layout["max_frames"] // unit)
    graph = AudioGraph(em.model.audio_tower, em.model.embed_audio).eval()
    T0 = 4 * unit  # example input: 4 blocks
    _torch_export(graph, (torch.randn(T0, 128), torch.ones(T0, dtype=torch.bool)),
                  ({0: unit * blocks}, {0: unit * blocks}), ["features", "mask"], ["soft_tokens", "valid"], path,
                  optimize=False, pre_export=True)
    return layout


def export_backend(job) -> dict[str, Any]:
    """`export/build.py`'s hook: write `<artifact>/onnx/` from `job.checkpoint`."""
    return export_onnx(job.checkpoint, job.out_dir, context=job.context, max_prefill_chunk=job.max_prefill_chunk,
                       text_only=job.text_only, rel_prefix=job.folder, drafter=job.drafter)


def export_onnx(checkpoint: str | Path, out_dir: str | Path, *, context: int,
                max_prefill_chunk: int = DEFAULT_PREFILL_CHUNK, text_only: bool = False,
                rel_prefix: str = "onnx", drafter: str | Path | None = None) -> dict[str, Any]:
    """Write `out_dir/*.onnx` and return the "onnx" backend's manifest entry (see the module docstring); its paths are
    relative to the artifact root, i.e. prefixed by `rel_prefix`."""
    if context < 2:
        raise OnnxExportError(f"context must be at least 2 positions, got {context}")
    chunk = max(2, min(int(max_prefill_chunk), context))
    em = load_onnx_model(checkpoint, text_only=text_only)
    cfg, text = em.cfg, em.cfg.text
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str | None] = {"embedder": f"{rel_prefix}/embedder.onnx", "decoder": f"{rel_prefix}/decoder.onnx",
                                    "vision": None, "audio": None}

    def path(name: str) -> Path:
        return out_dir / Path(files[name]).name

    log.info("onnx: embedder graph")
    write_embedder(path("embedder"), hidden_size=text.hidden_size, scheme=em.embed_scheme,
                   stored=em.embed_stored)

    log.info("onnx: decoder graph (context %d, prefill chunks up to %d)", context, chunk)
    lm = em.model.language_model
    decoder = CachedDecoder(lm, em.head).eval()
    L, P, H = text.num_hidden_layers, text.hidden_size_per_layer_input, text.hidden_size
    past_names, new_names = cache_names(text.cache_layers)
    S0 = min(3, chunk)
    caches, cache_entries = [], []
    for i in text.cache_layers:
        shape = (1, text.num_key_value_heads, context, text.head_dim_for(i))
        caches += [torch.zeros(shape), torch.zeros(shape)]
        cache_entries.append({"layer": i, "past_key": f"past_key_{i}", "past_value": f"past_value_{i}",
                              "new_key": f"new_key_{i}", "new_value": f"new_value_{i}", "shape": list(shape),
                              "dtype": "float32"})
    seq = torch.export.Dim("seq", min=1, max=chunk)
    kept = torch.export.Dim("kept", min=1, max=chunk)
    args = (torch.zeros(1, S0, H), torch.zeros(1, S0, L, P), torch.arange(S0), torch.arange(S0 - 1), list(caches))
    # the old caches' slot count is dynamic too: the runtime passes only the slots in use (rounded up to a bucket)
    past_len = torch.export.Dim("past_len", min=1, max=context)
    dyn = ({1: seq}, {1: seq}, {0: seq}, {0: kept}, [{2: past_len}] * len(caches))  # *past is one pytree node
    in_names = ["inputs_embeds", "ple_rows", "positions", "keep", *past_names]
    out_names = ["logits", "hidden", *new_names]
    _torch_export(decoder, args, dyn, in_names, out_names, path("decoder"))
    drafter_entry = write_drafter_graph(Path(drafter), text, out_dir, rel_prefix, context) if drafter else None
    if drafter_entry:
        files["drafter"] = drafter_entry["file"]
    # The text weights are written: drop them before the towers are traced, so that the text model's quantized
    # buffers and the towers' float weights are never resident together (this lowers the export's peak).
    del caches, args, decoder, lm
    em.model.language_model, em.head, em.embed_stored = None, None, {}
    gc.collect()

    if cfg.vision is not None:
        log.info("onnx: vision graph")
        v = cfg.vision
        k = v.pooling_kernel_size
        side = 2 * k  # example image: 2k x 2k patches
        xs, ys = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy")
        pos = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)
        cells = torch.export.Dim("cells", min=1, max=4096)
        graph = VisionGraph(em.model.vision_tower, em.model.embed_vision).eval()
        files["vision"] = f"{rel_prefix}/vision.onnx"
        _torch_export(graph, (torch.rand(side * side, 3 * v.patch_size**2), pos),
                      ({0: cells * k * k}, {0: cells * k * k}), ["pixel_values", "position_ids"],
                      ["soft_tokens", "valid"], path("vision"), optimize=False)
    audio = None
    if cfg.audio is not None:
        files["audio"] = f"{rel_prefix}/audio.onnx"
        audio = write_audio_graph(em, path("audio"))

    return {
        "files": files,
        "context": context,
        "max_prefill_chunk": chunk,
        "hidden_size": H,
        "vocab_size": text.vocab_size,
        "ple": {"num_layers": L, "dim": P},
        "decoder": {"inputs": in_names, "outputs": out_names},
        "caches": cache_entries,
        "quantization": {"matmul": "MatMulNBits", "accuracy_level": ACCURACY_LEVEL,
                         "embedding": "float" if em.embed_scheme is None else em.embed_scheme.label,
                         "tensors": em.schemes},
        "opset": OPSET,
        "audio": audio,
        "drafter": drafter_entry,
    }


def write_drafter_graph(drafter_dir: Path, text, out_dir: Path, rel_prefix: str, context: int) -> dict[str, Any]:
    """`drafter.onnx` (`edge_gemma.model.drafter.DraftStep`) from a Gemma 4 assistant checkpoint; -> the manifest's
    `drafter` entry: the file, its cache inputs (which target cache layer feeds each) and the drafter's size."""
    from edge_gemma.drafter import load_drafter
    from edge_gemma.model.drafter import DraftStep, drafter_cache_layers

    log.info("onnx: drafter graph (%s)", drafter_dir)
    graph = DraftStep(load_drafter(drafter_dir, text)).eval()
    H, caches, names = text.hidden_size, [], []
    layers = drafter_cache_layers(text, graph.kinds)
    slots = torch.export.Dim("slots", min=1, max=context)
    for kind in graph.kinds:
        i = layers[kind]
        shape = (1, text.num_key_value_heads, 8, text.head_dim_for(i))
        caches += [torch.zeros(shape), torch.zeros(shape)]
        names += [{"layer": i, "key": f"key_{i}", "value": f"value_{i}"}]
    in_names = ["token_embed", "hidden", "position", *(n for c in names for n in (c["key"], c["value"]))]
    path = out_dir / "drafter.onnx"
    _torch_export(graph, (torch.zeros(1, 1, H), torch.zeros(1, 1, H), torch.tensor([5]), caches),
                  (None, None, None, [{2: slots}] * len(caches)), in_names, ["logits", "projected"], path)
    return {"file": f"{rel_prefix}/drafter.onnx", "caches": names, "inputs": in_names,
            "source": str(drafter_dir), "parameters": sum(p.numel() for p in graph.parameters()),
            "weights": "float32"}
