"""ExecuTorch exporter: one `.pte` (embed, prefill, decode, reset, load_caches, vision, audio and, with a drafter,
draft methods) lowered to XNNPACK, weights in an external `.ptd`, the PLE table left out (the engine feeds its rows
from the artifact's `ple.bin`), the KV caches planned memory shared by prefill/decode/reset/load_caches/draft
(nothing serialized for them; the runtime calls `reset` after loading; `load_caches` lets tests and applications put
them in a known state).

Entry point for `export/build.py`: `export_backend(job) -> manifest entry`::

    {"files": {"program": "executorch/model.pte", "data": "executorch/model.ptd"},
     "methods": {"embed": ..., "prefill": ..., "decode": ..., "reset": ..., "load_caches": ...,
                 "vision": ... | None, "audio": ... | None, "draft": ... (with a drafter)},
     "context": T, "max_prefill_chunk": C, "hidden_size": H, "vocab_size": V, "ple": {"num_layers": L, "dim": P},
     "caches": "mutable buffers layers.<i>.self_attn.kv_cache.{k,v}_cache, shared by prefill and decode",
     "quantization": {"linear": "8da4w/8da8w (XNNPACK dynamic quant)" | "float", "embedding": label,
                      "tensors": {hf_name: label}},
     "lowering": {"export_seconds": .., "lower_seconds": ..},
     "drafter": {"method": "draft", "caches": [{"layer": i, "sliding": bool}], ...} | None}

How the weights become torchao tensors without re-quantization: `model.py`; what the one decoder swaps for
ExecuTorch: `swaps.py`; how the program is lowered (partitioners, shared mutable caches, external weights):
`lower.py`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..common import AudioGraph, VisionGraph
from .lower import lower_program
from .model import (
    CacheLoad,
    CacheReset,
    DecoderMethod,
    DraftMethod,
    EmbedMethod,
    ExecutorchExportError,
    Scoped,
    cache_buffers,
    load_et_model,
)

__all__ = ["ExecutorchExportError", "export_backend", "export_executorch"]

log = logging.getLogger(__name__)

FOLDER = "executorch"
MAX_IMAGE_CELLS = 280  # soft tokens per image the vision method accepts
MAX_AUDIO_FRAMES = 3000  # log-mel frames (10 ms) the audio method accepts


def export_executorch(checkpoint: str | Path, out_dir: Path, *, context: int, max_prefill_chunk: int,
                      text_only: bool = False, rel_prefix: str = FOLDER, precise: bool = True,
                      drafter: str | Path | None = None) -> dict[str, Any]:
    """Write `out_dir/model.pte` + `out_dir/model.ptd` and return the backend's manifest entry (paths relative to the
    artifact root, i.e. prefixed by `rel_prefix`).

    `precise` (the default) leaves XNNPACK's approximate transcendental kernels (gelu, exp, softmax, rsqrt, ...; tanh,
    within a few ulp, is delegated, GELU written out around it) to ExecuTorch's portable kernels, fp32 and quantized
    alike: delegated, they move the logits by a few hundredths against the XNNPACK-emulated eager model at every
    position, while the precise program reproduces the int8 activation rounding exactly (figures in
    benchmarks/README.md). Every excluded op splits the XNNPACK delegate, so there are many partitions (`lower.py`
    keeps that affordable). `precise=False` (`edge-gemma export
    --executorch-delegate-all`) delegates everything: fewer partitions, logits a few hundredths off.

    `drafter` (a Gemma 4 assistant checkpoint directory): adds the `draft` method (`DraftMethod`, float32 weights)
    reading the target's caches in place; verifying drafts is a `prefill` call with every position in `keep`."""
    if context < 2:
        raise ExecutorchExportError(f"context must be at least 2 positions, got {context}")
    chunk = max(2, min(int(max_prefill_chunk), context))
    em = load_et_model(checkpoint, context=context, text_only=text_only)
    cfg, text = em.cfg, em.cfg.text
    H, L, P = text.hidden_size, text.num_hidden_layers, text.hidden_size_per_layer_input
    quantized = bool(em.schemes) and any(v != "float" for v in em.schemes.values())
    seq = torch.export.Dim("seq", min=1, max=chunk)
    kept = torch.export.Dim("kept", min=1, max=chunk)
    S0 = min(3, chunk)
    decoder = DecoderMethod(em.model.language_model, em.head).eval()
    caches = cache_buffers(em.model.language_model)
    methods: dict[str, tuple] = {
        "embed": (EmbedMethod(em.table, H).eval(), (torch.arange(S0),), ({0: seq},)),
        "prefill": (decoder, (torch.zeros(1, S0, H), torch.zeros(1, S0, L, P), torch.arange(S0), torch.arange(S0)),
                    ({1: seq}, {1: seq}, {0: seq}, {0: kept})),
        "decode": (decoder, (torch.zeros(1, 1, H), torch.zeros(1, 1, L, P), torch.arange(1),
                             torch.zeros(1, dtype=torch.long)), None),
        "reset": (CacheReset(em.model.language_model).eval(), (), None),
        "load_caches": (CacheLoad(em.model.language_model).eval(),
                        tuple(torch.zeros_like(b) for _, b in caches), None),
    }
    info: dict[str, Any] = {"vision": None, "audio": None}
    drafter_entry = None
    if drafter is not None:
        from edge_gemma.drafter import load_drafter
        from edge_gemma.model.drafter import DraftStep, drafter_cache_layers

        step = DraftStep(load_drafter(Path(drafter), text)).eval()
        layers = drafter_cache_layers(text, step.kinds)
        methods["draft"] = (DraftMethod(em.model.language_model, step, layers).eval(),
                            (torch.zeros(1, 1, H), torch.zeros(1, 1, H), torch.tensor([min(5, context - 1)])), None)
        info["draft"] = {"inputs": ["token_embed", "hidden", "position"], "outputs": ["logits", "projected"]}
        drafter_entry = {"method": "draft", "caches": [{"layer": layers[k], "sliding": k} for k in step.kinds],
                         "source": str(drafter), "parameters": sum(p.numel() for p in step.parameters()),
                         "weights": "float32"}
    if cfg.vision is not None and em.model.vision_tower is not None:
        v = cfg.vision
        k = v.pooling_kernel_size
        side = 2 * k
        xs, ys = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy")
        pos = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)
        # Upper bounds matter here: ExecuTorch plans activation memory for the largest shape a method allows, and
        # a tower sized for 4096 cells / 30000 frames plans more than a device has. 280 cells = Gemma 4's default image
        # budget (280 soft tokens); 3000 frames = 30 s of audio.
        cells = torch.export.Dim("cells", min=1, max=MAX_IMAGE_CELLS)
        methods["vision"] = (Scoped("vision", VisionGraph(em.model.vision_tower, em.model.embed_vision)).eval(),
                             (torch.rand(side * side, 3 * v.patch_size**2), pos), ({0: cells * k * k}, {0: cells * k * k}))
        info["vision"] = {"inputs": ["pixel_values", "position_ids"], "outputs": ["soft_tokens", "valid"],
                          "patches_multiple_of": k * k, "max_patches": MAX_IMAGE_CELLS * k * k}
    if cfg.audio is not None and em.model.audio_tower is not None:
        # torch.export specializes the subsampling and chunking arithmetic unless T = m*n - (m - 3), m = 4 * chunk
        # (T = 3 mod m): the runtime pads the features (mask False) up to the next such length.
        m = 4 * cfg.audio.attention_chunk_size
        n = torch.export.Dim("audio_blocks", min=2, max=max(3, MAX_AUDIO_FRAMES // m))
        frames = m * n - (m - 3)
        T0 = 2 * m + 3
        methods["audio"] = (Scoped("audio", AudioGraph(em.model.audio_tower, em.model.embed_audio)).eval(),
                            (torch.randn(T0, 128), torch.ones(T0, dtype=torch.bool)), ({0: frames}, {0: frames}))
        info["audio"] = {"inputs": ["features", "mask"], "outputs": ["soft_tokens", "valid"],
                         "frames_modulus": m, "frames_remainder": 3, "min_frames": m + 3,
                         "max_frames": m * max(3, MAX_AUDIO_FRAMES // m) - (m - 3)}
    timings = lower_program(methods, out_dir, precise=precise)
    emb_label = next((v for n, v in em.schemes.items() if n.endswith("embed_tokens.weight")), "float")
    return {
        "files": {"program": f"{rel_prefix}/{timings['pte']}", "data": f"{rel_prefix}/{timings['ptd']}"},
        "methods": {"embed": {"inputs": ["ids"], "outputs": ["embeds"]},
                    "prefill": {"inputs": ["inputs_embeds", "ple_rows", "positions", "keep"],
                                "outputs": ["logits", "hidden"]},
                    "decode": {"inputs": ["inputs_embeds", "ple_rows", "positions", "keep"],
                               "outputs": ["logits", "hidden"]},
                    "reset": {"inputs": [], "outputs": ["zeros"], "call": "once after load: zeros the KV caches"},
                    "load_caches": {"inputs": [n for n, _ in caches],
                                    "outputs": ["zeros"], "call": "optional: overwrites the KV caches"},
                    **info},
        "context": context,
        "max_prefill_chunk": chunk,
        "hidden_size": H,
        "vocab_size": text.vocab_size,
        "ple": {"num_layers": L, "dim": P},
        "caches": {"kind": "mutable buffers shared by prefill and decode",
                   "layers": [f"layers.{i}.self_attn.kv_cache" for i in text.cache_layers]},
        "quantization": {"linear": "XNNPACK dynamic int8 activations (8da4w / 8da8w)" if quantized else "float",
                         "embedding": emb_label, "tensors": em.schemes},
        "lowering": {**{k: timings[k] for k in ("export_seconds", "lower_seconds")}, "precise": bool(precise)},
        "drafter": drafter_entry,
    }


def export_backend(job) -> dict[str, Any]:
    """`export/build.py`'s hook: write `<artifact>/executorch/` from `job.checkpoint`."""
    return export_executorch(job.checkpoint, job.out_dir, context=job.context,
                             max_prefill_chunk=job.max_prefill_chunk, rel_prefix=job.folder,
                             text_only=job.text_only, precise=job.executorch_precise, drafter=job.drafter)
