"""LiteRT exporter: `export_backend(job)` writes `litert/` (plain `.tflite` models and the `.litertlm` bundle).

Files (all under the artifact's `litert/` folder):

* `decoder.tflite`: signatures `prefill_<N>` (N = the artifact's max prefill chunk) and `decode`, LiteRT-LM's Gemma 4
  I/O (`export/litert/graphs.py`): caches only for the cache-owning layers, final softcap included.
* `embedder.tflite` (`embedder`): one token per call, the single signature LiteRT-LM's embedding lookup accepts.
* `model.litertlm`: the decoder, the embedder and the per-layer embedder (`per_layer_embedder`, one token per call)
  + tokenizer + Gemma 4 metadata (`export/litert/bundle.py`), for LiteRT-LM. The per-layer embedder exists only
  in the bundle: our runtime gathers PLE rows from `ple.bin`, so a copy beside it would be the PLE table on disk a
  third time.

Quantized checkpoints (`export/litert/quant.py`): the decoder and the two embedders are converted from a model whose
quantized weights are PLACEHOLDERS (one random tensor per projection kind and shape, shared by the layers; the tied
head and the embedding tables at HEAD_ROWS rows), quantized by ai-edge-quantizer in the recipe's layout (linears int4
blockwise / int8 channelwise, tables and head int8 channelwise, dynamic int8 activations); then every placeholder is
replaced by OUR codes and scales, tensor by tensor from the quantized checkpoint. The integers LiteRT stores are ours
bit for bit; `check_integers` reads them back (manifest `quantization.integer_check`). The vision/audio towers are
converted from their dequantized weights and re-quantized int8 channelwise by ai-edge-quantizer (not our integers).

* `vision.tflite` (`vision_encoder`, our runtime only): the vision tower + projection at a static 280 * k^2 patches
  (the processor pads every image to its budget with position -1, which the encoder masks).

* `audio.tflite` (`audio_encoder`, our runtime only): the audio tower + projection at a static 30 s of frames
  (padding frames masked; the valid outputs do not depend on them).

The .litertlm also carries LiteRT-LM's own split encoder/adapter models for vision and audio (float32, built by
`export/litert/bundle.convert_lm_towers`; I/O contract in `export/litert/graphs.py`).
Memory (quantized export): no float copy of a quantized decoder/table tensor ever exists. The float graph holds one
placeholder per projection kind and shape (E2B: ~0.12 G values) and the real float norms; the logits head is converted
at HEAD_ROWS rows and widened to the vocabulary in the flatbuffer (`_widen_head`); the embedders are converted at
HEAD_ROWS rows and get their full int8 tables straight from the checkpoint (the 2.35 GB E2B PLE table is read once, as
int8). The towers are the only float weights materialised. Float (fp32 recipe) exports build the float model whole:
small models only.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
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


HEAD_ROWS = 997  # rows of the logits head / tables while converting (a prime no other dimension equals)


def _ckpt_name(cfg, path: str) -> str:
    """Our parameter path (`language_model.layers.0.mlp.up_proj.weight`) -> the checkpoint's tensor name."""
    from edge_gemma.checkpoint import LAYOUTS

    for ours, theirs in LAYOUTS[cfg.model_type]:
        if path.startswith(ours):
            return theirs + path[len(ours):]
    raise LitertExportError(f"no checkpoint name for parameter {path!r} (model_type {cfg.model_type})")


def _our_loader(q):
    """name -> OurWeight (codes and scales exactly as the quantized checkpoint stores them)."""
    from edge_gemma.quantize.schemes import Int4Group, Int8PerChannel

    from .quant import OurWeight

    def load(name: str) -> OurWeight:
        scheme = q.schemes.get(name)
        if not isinstance(scheme, (Int4Group, Int8PerChannel)) or type(scheme).__name__ == "Int4GroupAsym":
            raise LitertExportError(f"{q.path}: tensor {name!r} is {getattr(scheme, 'label', 'float')}; LiteRT takes "
                                    "int8 per-channel or symmetric int4 group tensors")
        u = scheme.unpack(q.stored(name), tuple(q.entry(name)["shape"]))
        return OurWeight(name=name, codes=u["q"], scales=u["scales"], bits=scheme.bits,
                         group=getattr(scheme, "group_size", None))

    return load


class LitertPlaceholders:
    """How the LiteRT converter sees a quantized checkpoint's text weights: every quantized linear of one projection
    kind and shape shares ONE random placeholder (the converter quantizes it; `quant.write_with_our_weights` then
    overwrites it with our codes and scales), and the tied head is a placeholder of `HEAD_ROWS` rows (widened to the
    vocabulary in the flatbuffer). A placeholder per KIND, not only per shape, keeps the converter from merging two
    projections of the same input (k/v, gate/up) as one common subexpression. Values are drawn away from zero, so a
    folded constant factor is recoverable; the head's first, then the linears' in module order."""

    def __init__(self, hidden_size: int):
        self.rng = np.random.default_rng(0)
        self.groups: dict[tuple, dict] = {}
        self.head_shape = (HEAD_ROWS, hidden_size)
        self._placeholder("head", self.head_shape, None)

    def _placeholder(self, kind: str, shape: tuple[int, ...], name: str | None) -> torch.Tensor:
        g = self.groups.setdefault((kind, shape), {"names": []})
        if "tensor" not in g:
            v = self.rng.uniform(1.0, 2.0, size=shape).astype(np.float32) * self.rng.choice([-1.0, 1.0], size=shape)
            g["tensor"] = torch.from_numpy(v.astype(np.float32))
        if name is not None:
            g["names"].append(name)
        return g["tensor"]

    @staticmethod
    def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.nn.Linear:
        lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        lin.weight = torch.nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            lin.bias = torch.nn.Parameter(bias, requires_grad=False)
        return lin

    def linear(self, scheme, stored, shape, bias, name):
        return self._linear(self._placeholder(name.split(".")[-2], tuple(shape), name), bias)

    def head(self, scheme, stored, shape, name):
        return self._linear(self._placeholder("head", self.head_shape, name))

    def placeholders(self):
        from .quant import Placeholder

        return [Placeholder(values=g["tensor"].numpy(), names=tuple(g["names"])) for g in self.groups.values()
                if g["names"]]


class Dequantized:
    """The towers' linears as float32 weights dequantized from our integers (ai-edge-quantizer re-quantizes them)."""

    def linear(self, scheme, stored, shape, bias, name):
        weight = torch.from_numpy(np.ascontiguousarray(scheme.decode(stored, tuple(shape)), dtype=np.float32))
        return LitertPlaceholders._linear(weight, bias)

    def head(self, scheme, stored, shape, name):
        raise LitertExportError("the towers' conversion builds no head")


def _text_model(job):
    """The text decoder with placeholder linears (`LitertPlaceholders`) and a placeholder table under its tied head;
    and the placeholders."""
    from ..common import load_export_model

    linears = LitertPlaceholders(job.config.text.hidden_size)
    em = load_export_model(job.checkpoint, linears, text_only=True)
    em.model.language_model.embed_tokens = torch.nn.Embedding.from_pretrained(em.head.weight, freeze=True)
    return em.model, linears.placeholders()


def _tower_model(job):
    """The model with only its towers loaded (dequantized); the text stays on the meta device."""
    from ..common import load_export_model

    return load_export_model(job.checkpoint, Dequantized(),
                             include=lambda name: not name.startswith("language_model.")).model


def _table_template(job, q, work: Path, role: str, path: str, build) -> tuple[Path, Path, Any]:
    """Convert + quantize an embedder over a HEAD_ROWS-row placeholder table standing for our `path` table."""
    from .quant import Placeholder, quantize_tflite

    name = _ckpt_name(job.config, path)
    cols = int(q.entry(name)["shape"][1])
    rng = np.random.default_rng(1)
    vals = (rng.uniform(1.0, 2.0, size=(HEAD_ROWS, cols)) * rng.choice([-1.0, 1.0], size=(HEAD_ROWS, cols)))
    vals = vals.astype(np.float32)
    table = torch.nn.Embedding.from_pretrained(torch.from_numpy(vals), freeze=True)
    fl, tq = work / f"{role}_float.tflite", work / f"{role}_template.tflite"
    _convert([(role, build(table), {"token_ids": torch.zeros(1, 1, dtype=torch.int32)})], fl)
    quantize_tflite(fl, tq, bits=8, block=None)
    return fl, tq, Placeholder(values=vals, names=(name,))


def _export_quantized_text(job, work: Path, out: Path, *, N: int, sample) -> dict[str, Any]:
    """decoder.tflite and embedder.tflite into `out`, per_layer_embedder.tflite into `work` (for the bundle only), with
    our integers (see the module docstring)."""
    from edge_gemma.quantize.schemes import Int8PerChannel

    from .graphs import LitertDecoder, LitertEmbedder, LitertPerLayerEmbedder
    from .quant import assign_uses, check_integers, quantize_tflite, widen_rows, write_with_our_weights

    cfg, t = job.config, job.config.text
    T, V, H, L, P = job.context, t.vocab_size, t.hidden_size, t.num_hidden_layers, t.hidden_size_per_layer_input
    bits, block = _linear_scheme(job)
    with job.quantized_checkpoint() as q:
        load = _our_loader(q)
        for path in ("language_model.embed_tokens.weight", "language_model.embed_tokens_per_layer.weight"):
            sch = q.schemes.get(_ckpt_name(cfg, path))
            if not isinstance(sch, Int8PerChannel):
                raise LitertExportError(f"{job.checkpoint}: {_ckpt_name(cfg, path)} is "
                                        f"{getattr(sch, 'label', 'float')}; the LiteRT exporter needs the embedding "
                                        "tables int8 per channel (LiteRT's EMBEDDING_LOOKUP has no int4 blocks)")
        model, placeholders = _text_model(job)
        dec = model.language_model
        log.info("litert: decoder graph (prefill_%d, decode; context %d; placeholder weights)", N, T)
        _convert([(f"prefill_{N}", LitertDecoder(dec, T, logits=False), sample(N)),
                  ("decode", LitertDecoder(dec, T, logits=True), sample(1))], work / "decoder_float.tflite")
        del model, dec
        log.info("litert: decoder template (linears int%d %s, head int8 channelwise)", bits,
                 f"block {block}" if block else "channelwise")
        quantize_tflite(work / "decoder_float.tflite", work / "decoder_q.tflite", bits=bits, block=block,
                        lm_head_rows=HEAD_ROWS)
        uses = assign_uses(work / "decoder_float.tflite", work / "decoder_q.tflite", placeholders)
        del placeholders
        widen_rows(work / "decoder_q.tflite", work / "decoder_template.tflite", rows=HEAD_ROWS, full=V,
                   subgraph="decode")
        log.info("litert: writing our integers into decoder.tflite (%d tensors)", len({u.name for u in uses}))
        write_with_our_weights(work / "decoder_template.tflite", out / "decoder.tflite", uses, load)
        all_uses = {"decoder": uses}
        for role, path, build in (
                ("embedder", "language_model.embed_tokens.weight", lambda tb: LitertEmbedder(tb, H)),
                ("per_layer_embedder", "language_model.embed_tokens_per_layer.weight",
                 lambda tb: LitertPerLayerEmbedder(tb, L, P))):
            log.info("litert: %s (int8 table from the checkpoint)", role)
            fl, tq, ph = _table_template(job, q, work, role, path, build)
            u = assign_uses(fl, tq, [ph])
            if len(u) != 1:
                raise LitertExportError(f"{role}: expected one table lookup in the converted graph, found {len(u)}")
            write_with_our_weights(tq, _model_dir(role, work, out) / f"{role}.tflite", u, load)
            all_uses[role] = u
        report = {"tensors": {}, "differ": [], "unchecked": []}
        expected = set()
        for role, u in all_uses.items():
            names = sorted({x.name for x in u})
            expected |= set(names)
            r = check_integers(_model_dir(role, work, out) / f"{role}.tflite", load, names,
                               {x.name: x.factor for x in u})
            report["tensors"].update(r["tensors"])
            report["differ"] += r["differ"]
            report["unchecked"] += r["unchecked"]
        text_quantized = {n for n, sch in q.schemes.items() if sch is not None and not any(
            k in n for k in ("_tower.", "embed_vision.", "embed_audio."))}
        report["not_in_graph"] = sorted(text_quantized - expected)
        labels = {n: q.schemes[n].label for n in expected}
    return {"weights": f"int{bits}" + (f" block {block}" if block else " channelwise") +
            "; embedding tables and tied head int8 channelwise (our integers and scales)",
            "activations": "dynamic int8 (LiteRT dynamic range)", "tensors": labels, "integer_check": report}


def _model_dir(role: str, work: Path, out: Path) -> Path:
    """Where a text model is written: the per-layer embedder only into the bundle (via the work folder)."""
    return work if role == "per_layer_embedder" else out


def _tower_names(job) -> list[str]:
    with job.quantized_checkpoint() as q:
        return [n for n in q.names() if any(k in n for k in ("_tower.", "embed_vision.", "embed_audio."))]


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
    from .bundle import build_litertlm
    from .graphs import LitertDecoder, LitertEmbedder, LitertPerLayerEmbedder, cache_input_names

    cfg, t = job.config, job.config.text
    T = job.context
    N = max(1, min(job.max_prefill_chunk, T))
    out = job.out_dir
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

    work = Path(tempfile.mkdtemp(prefix="_litert_", dir=job.artifact_root))
    try:
        quant: dict[str, Any] = {"weights": "float32", "activations": "float32"}
        if job.quantized:
            quant = _export_quantized_text(job, work, out, N=N, sample=sample)
            towers = set() if job.text_only else set(_tower_names(job))
            model = _tower_model(job) if towers else None  # the towers only; the text stays unmaterialised
        else:
            model = job.load_model()
            dec = model.language_model
            dec.embed_tokens = _float_embedding(dec.embed_tokens)
            dec.embed_tokens_per_layer = _float_embedding(dec.embed_tokens_per_layer)
            ple_table, dec.embed_tokens_per_layer = dec.embed_tokens_per_layer, torch.nn.Embedding(1, 1)
            log.info("litert: decoder (prefill_%d, decode; context %d)", N, T)
            _convert([(f"prefill_{N}", LitertDecoder(dec, T, logits=False), sample(N)),
                      ("decode", LitertDecoder(dec, T, logits=True), sample(1))], out / "decoder.tflite")
            one = {"token_ids": torch.zeros(1, 1, dtype=torch.int32)}
            log.info("litert: embedders")
            _convert([("embedder", LitertEmbedder(dec.embed_tokens, H), one)], out / "embedder.tflite")
            _convert([("per_layer_embedder", LitertPerLayerEmbedder(ple_table, L, P), one)],
                     work / "per_layer_embedder.tflite")
            del dec, ple_table
        stage = work if job.quantized else out
        vision_patches = None
        if cfg.vision is not None and not job.text_only:
            from .graphs import LitertVision

            k = cfg.vision.pooling_kernel_size
            vision_patches = VISION_SOFT_TOKENS * k * k
            log.info("litert: vision encoder (%d patches)", vision_patches)
            sample_v = {"pixel_values": torch.rand(vision_patches, 3 * cfg.vision.patch_size**2),
                        "position_ids": _grid_positions(vision_patches, k)}
            _convert([("vision_encoder", LitertVision(model.vision_tower, model.embed_vision), sample_v)],
                     stage / "vision.tflite")
        audio_frames = None
        if cfg.audio is not None and not job.text_only:
            from edge_gemma.audio import MAX_SAMPLES, num_mel_frames

            from .graphs import LitertAudio

            audio_frames = num_mel_frames(MAX_SAMPLES)
            log.info("litert: audio encoder (%d frames)", audio_frames)
            sample_a = {"features": torch.randn(audio_frames, 128), "mask": torch.ones(audio_frames, dtype=torch.int32)}
            _convert([("audio_encoder", LitertAudio(model.audio_tower, model.embed_audio), sample_a)],
                     stage / "audio.tflite")
        from .bundle import convert_lm_towers  # LiteRT-LM's encoder/adapter sections (float32, bundle only)

        lm_towers = convert_lm_towers(model, cfg, work, _convert, vision_patches=vision_patches,
                                      audio_frames=audio_frames) if model is not None else {}
        del model
        if job.quantized:
            from .quant import quantize_tflite

            for name in (("vision",) if vision_patches else ()) + (("audio",) if audio_frames else ()):
                log.info("litert: quantizing %s int8 channelwise (ai-edge-quantizer)", name)
                quantize_tflite(work / f"{name}.tflite", out / f"{name}.tflite", bits=8, block=None)

        files = {"decoder": "litert/decoder.tflite", "embedder": "litert/embedder.tflite",
                 "litertlm": "litert/model.litertlm",
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
                                        "per_layer_embedder": work / "per_layer_embedder.tflite", **lm_towers},
                                stop_tokens=stop_str, bos_token=tok.bos_token, work_dir=work,
                                vision_patches=vision_patches)
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
