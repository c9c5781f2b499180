"""LiteRT exporter: `export_backend(job)` writes `litert/` (plain `.tflite` models and the `.litertlm` bundle).

Files (all under the artifact's `litert/` folder):

* `decoder.tflite`: signatures `prefill_<N>` (N = the artifact's max prefill chunk) and `decode`, LiteRT-LM's Gemma 4
  I/O (`export/litert_graphs.py`): caches only for the cache-owning layers, final softcap included.
* `embedder.tflite` (`embedder`) and `per_layer_embedder.tflite` (`per_layer_embedder`): one token per call, the
  single signature LiteRT-LM's embedding lookup accepts. Our runtime gathers PLE rows from `ple.bin` instead.
* `model.litertlm`: the three models + tokenizer + Gemma 4 metadata (`export/litert_bundle.py`), for LiteRT-LM.

Quantized checkpoints: the models are converted with our dequantized weights and re-quantized by ai-edge-quantizer
(dynamic range; linears as the recipe's default scheme, the embedding tables and the tied head int8 channelwise), and
`export/litert_quant.check_integers` compares the stored integers with ours (reported in the manifest entry).

* `vision.tflite` (`vision_encoder`, our runtime only): the vision tower + projection at a static 280 * k^2 patches
  (the processor pads every image to its budget with position -1, which the encoder masks).

* `audio.tflite` (`audio_encoder`, our runtime only): the audio tower + projection at a static 30 s of frames
  (padding frames masked; the valid outputs do not depend on them).

Not yet exported: the vision/audio sections of the .litertlm (LiteRT-LM's own encoder I/O differs from ours).
Memory: the float decoder is built whole (dequantized), as litert-torch needs a float module; a full-size E2B needs
the float decoder (~1.8 GB without tables) plus the float embedding table and PLE table for the two embedders
(PLE: 9.4 GB float32) -- not yet piecewise, not measured at full size.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["LitertExportError", "export_backend"]


VISION_SOFT_TOKENS = 280  # the processor's default image budget; smaller budgets pad up to it


def _grid_positions(patches: int, k: int) -> torch.Tensor:
    """(x, y) of a square-ish grid of `patches` patches (the sample input; any valid layout traces the same graph)."""
    side = k
    while (side + k) * (side + k) <= patches:
        side += k
    xs, ys = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy")
    pos = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)
    pad = torch.full((patches - pos.shape[0], 2), -1)
    return torch.cat([pos, pad]).to(torch.int32)


class LitertExportError(ValueError):
    """The LiteRT export cannot proceed; the message names the tensor, scheme or file."""


def _convert(signatures: list[tuple[str, torch.nn.Module, dict]], path: Path) -> None:
    import litert_torch
    from litert_torch import _config

    _config.config.show_progress = False  # its rich progress lines would go to our stdout

    conv = None
    with torch.no_grad():
        for name, module, sample in signatures:
            conv = (litert_torch if conv is None else conv).signature(name, module.eval(), sample_kwargs=sample)
        model = conv.convert()
    tmp = path.with_name(path.name + ".tmp")
    model.export(str(tmp))
    tmp.replace(path)


def _float_embedding(table: torch.nn.Embedding) -> torch.nn.Embedding:
    """A float32 copy (float checkpoints keep their bf16 tables memory-mapped; the converter needs float32)."""
    return torch.nn.Embedding.from_pretrained(table.weight.detach().to(torch.float32), freeze=True)


def _our_integers(job) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """{hf name: dequantized / codes / largest level / group} of every quantized 2-D tensor, and {name: label}."""
    from edge_gemma.quantize.schemes import Int4Group, Int8PerChannel

    ours, labels = {}, {}
    with job.quantized_checkpoint() as q:
        for name, scheme in q.schemes.items():
            if scheme is None or not isinstance(scheme, (Int4Group, Int8PerChannel)) or "_tower" in name \
                    or "embed_vision" in name or "embed_audio" in name:
                continue
            shape = tuple(q.entry(name)["shape"])
            codes = scheme.unpack(q.stored(name), shape)["q"]
            ours[name] = {"dequantized": q.dequantized(name), "q": codes, "qmax": 127 if scheme.bits == 8 else 7,
                          "group": getattr(scheme, "group_size", None)}
            labels[name] = scheme.label
    return ours, labels


def _linear_scheme(job):
    from edge_gemma.quantize.schemes import Int4Group, Int8PerChannel

    with job.quantized_checkpoint() as q:
        schemes = {n: s for n, s in q.schemes.items()
                   if s is not None and ".layers." in n and "_tower" not in n}  # norms stay float
    kinds = {type(s) for s in schemes.values() if s is not None}
    if not schemes or kinds - {Int4Group, Int8PerChannel}:
        raise LitertExportError(f"{job.checkpoint}: LiteRT exports int8 per-channel or int4 group linears; this "
                                f"checkpoint has {sorted(k.__name__ for k in kinds) or 'no quantized linears'}")
    groups = {getattr(s, "group_size", None) for s in schemes.values() if s is not None}
    if len(kinds) != 1 or len(groups) != 1:
        raise LitertExportError(f"{job.checkpoint}: mixed linear schemes {sorted({s.label for s in schemes.values()})}"
                                "; the LiteRT exporter needs one scheme for every decoder linear")
    only = next(iter(schemes.values()))
    return (8, None) if isinstance(only, Int8PerChannel) else (4, only.group_size)


def export_backend(job) -> dict[str, Any]:
    from .litert_bundle import build_litertlm
    from .litert_graphs import LitertDecoder, LitertEmbedder, LitertPerLayerEmbedder, cache_input_names

    cfg, t = job.config, job.config.text
    T = job.context
    N = max(1, min(job.max_prefill_chunk, T))
    out = job.out_dir
    work = Path(tempfile.mkdtemp(prefix="_litert_", dir=job.artifact_root))
    try:
        model = job.load_model()
        dec = model.language_model
        dec.embed_tokens = _float_embedding(dec.embed_tokens)
        dec.embed_tokens_per_layer = _float_embedding(dec.embed_tokens_per_layer)
        H, L, P, V = t.hidden_size, t.num_hidden_layers, t.hidden_size_per_layer_input, t.vocab_size
        if t.vocab_size_per_layer_input != V:
            raise LitertExportError(f"vocab_size_per_layer_input {t.vocab_size_per_layer_input} != vocab_size {V}: "
                                    "LiteRT-LM looks both tables up with the same token id")

        n_cache = t.first_shared_layer
        cache_shapes = {}
        for i in range(n_cache):
            hd = t.head_dim_for(i)
            cache_shapes[f"kv_cache_k_{i}"] = [1, t.num_key_value_heads, T, hd]
            cache_shapes[f"kv_cache_v_{i}"] = [1, t.num_key_value_heads, hd, T]

        def sample(S: int) -> dict[str, torch.Tensor]:
            return {"embeddings": torch.zeros(1, S, H), "per_layer_embeddings": torch.zeros(1, S, L, P),
                    "input_pos": torch.arange(S, dtype=torch.int32), "mask": torch.zeros(1, 1, S, T),
                    **{n: torch.zeros(s) for n, s in cache_shapes.items()}}

        stage = work if job.quantized else out
        log.info("litert: decoder (prefill_%d, decode; context %d)", N, T)
        _convert([(f"prefill_{N}", LitertDecoder(dec, T, logits=False), sample(N)),
                  ("decode", LitertDecoder(dec, T, logits=True), sample(1))], stage / "decoder.tflite")
        one = {"token_ids": torch.zeros(1, 1, dtype=torch.int32)}
        log.info("litert: embedders")
        _convert([("embedder", LitertEmbedder(dec.embed_tokens, H), one)], stage / "embedder.tflite")
        _convert([("per_layer_embedder", LitertPerLayerEmbedder(dec.embed_tokens_per_layer, L, P), one)],
                 stage / "per_layer_embedder.tflite")
        vision_patches = None
        if cfg.vision is not None:
            from .litert_graphs import LitertVision

            k = cfg.vision.pooling_kernel_size
            vision_patches = VISION_SOFT_TOKENS * k * k
            log.info("litert: vision encoder (%d patches)", vision_patches)
            sample_v = {"pixel_values": torch.rand(vision_patches, 3 * cfg.vision.patch_size**2),
                        "position_ids": _grid_positions(vision_patches, k)}
            _convert([("vision_encoder", LitertVision(model.vision_tower, model.embed_vision), sample_v)],
                     stage / "vision.tflite")
        audio_frames = None
        if cfg.audio is not None:
            from edge_gemma.audio import MAX_SAMPLES, num_mel_frames

            from .litert_graphs import LitertAudio

            audio_frames = num_mel_frames(MAX_SAMPLES)
            log.info("litert: audio encoder (%d frames)", audio_frames)
            sample_a = {"features": torch.randn(audio_frames, 128), "mask": torch.ones(audio_frames, dtype=torch.int32)}
            _convert([("audio_encoder", LitertAudio(model.audio_tower, model.embed_audio), sample_a)],
                     stage / "audio.tflite")
        del model, dec

        quant: dict[str, Any] = {"weights": "float32", "activations": "float32"}
        if job.quantized:
            from .litert_quant import check_integers, quantize_tflite

            bits, block = _linear_scheme(job)
            log.info("litert: quantizing (linears int%d %s, tables and head int8 channelwise)", bits,
                     f"block {block}" if block else "channelwise")
            quantize_tflite(work / "decoder.tflite", out / "decoder.tflite", bits=bits, block=block, lm_head_rows=V)
            for name in ("embedder", "per_layer_embedder") + (("vision",) if vision_patches else ()) \
                    + (("audio",) if audio_frames else ()):
                quantize_tflite(work / f"{name}.tflite", out / f"{name}.tflite", bits=8, block=None)
            ours, labels = _our_integers(job)
            report = {"tensors": {}, "differ": [], "unchecked": []}
            for name in ("decoder", "embedder", "per_layer_embedder"):
                r = check_integers(work / f"{name}.tflite", out / f"{name}.tflite", ours)
                report["tensors"].update(r["tensors"])
                report["differ"] += r["differ"]
            report["unchecked"] = sorted(set(ours) - set(report["tensors"]))
            quant = {"weights": f"int{bits}" + (f" block {block}" if block else " channelwise") +
                     "; embedding tables and tied head int8 channelwise",
                     "activations": "dynamic int8 (ai-edge-quantizer dynamic range)", "tensors": labels,
                     "integer_check": report}

        files = {"decoder": "litert/decoder.tflite", "embedder": "litert/embedder.tflite",
                 "per_layer_embedder": "litert/per_layer_embedder.tflite", "litertlm": "litert/model.litertlm",
                 "vision": "litert/vision.tflite" if vision_patches else None,
                 "audio": "litert/audio.tflite" if audio_frames else None}
        tok_dir = job.artifact_root / "tokenizer"
        stop = sorted({*cfg.eos_token_id, *t.eos_token_id})
        from edge_gemma.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(tok_dir)
        if tok.vocab_size != V:
            raise LitertExportError(f"{tok_dir}: tokenizer vocabulary {tok.vocab_size} != model vocab_size {V}; "
                                    "LiteRT-LM needs them equal")
        stop_str = [s for s in (tok.id_to_token(i) for i in stop) if s]
        bundle = build_litertlm(job.artifact_root / files["litertlm"], config=cfg, tokenizer_dir=tok_dir, context=T,
                                models={"prefill_decode": out / "decoder.tflite", "embedder": out / "embedder.tflite",
                                        "per_layer_embedder": out / "per_layer_embedder.tflite"},
                                stop_tokens=stop_str, bos_token=tok.bos_token, work_dir=work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "files": files,
        "context": T,
        "max_prefill_chunk": N,
        "prefill_signatures": [f"prefill_{N}"],
        "hidden_size": H,
        "vocab_size": V,
        "ple": {"num_layers": L, "dim": P, "scaled_input": True},
        "vision_patches": vision_patches,
        "audio_frames": audio_frames,
        "caches": [{"name": n, "shape": s, "dtype": "float32"} for n, s in cache_shapes.items()],
        "cache_inputs": cache_input_names(n_cache),
        "quantization": quant,
        "litertlm": bundle,
    }
