"""`edge-gemma export`: checkpoint -> (quantize once) -> one artifact with a folder per backend, checked, atomic.

Steps, all inside one `ArtifactWriter` (a temporary sibling of OUT renamed into place at the very end, so a killed
export leaves no OUT and an existing OUT is replaced only with `force`):

1. The source: a float checkpoint is quantized with the recipe `quant` (`edge_gemma.quantize`) into the temporary
   directory; a quantized checkpoint (`quant_manifest.json`, from `edge-gemma quantize`) is used as it is, so
   quantization happens once; `fp32` exports the float weights. The model config always comes from `config.json`.
2. `tokenizer/`: tokenizer.json (or .model), tokenizer_config.json, chat_template.jinja, copied.
3. `ple.bin`: the PLE table, stored bytes of the checkpoint, page-aligned (`edge_gemma.ple.write_ple`).
4. One folder per backend, written by `edge_gemma.export.<backend>` (see `ExportJob` for what an exporter gets and
   returns).
5. Fidelity (unless `check=False`): every backend, opened through the runtime registry exactly as `edge-gemma run`
   would, runs the held-out text teacher-forced against the eager model on the float checkpoint
   (`export/fidelity.py`); the figures go into the manifest and the report.
6. The manifest (schema in `edge_gemma/artifact.py`), checksums, rename.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib
import importlib.util
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from edge_gemma.artifact import Artifact, ArtifactError, ArtifactWriter
from edge_gemma.checkpoint import LAYOUTS
from edge_gemma.config import ModelConfig, load_config
from edge_gemma.paths import resolve_checkpoint

from .fidelity import Fidelity, compare_logits, dequantized_fits, heldout_text, reference_backend, teacher_forced_logits
from .source import variant_of

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "BuildReport", "ExportError", "ExportJob", "build_artifact", "implemented_backends"]

BACKENDS = ("onnx", "executorch", "litert")  # what the artifact format knows
QUANT_MANIFEST = "quant_manifest.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.json.xz", "tokenizer.model", "tokenizer_config.json",
                   "chat_template.jinja", "special_tokens_map.json")
DEFAULT_PREFILL_CHUNK = 128
FIDELITY_TOKENS = 64
_QUANT_TMP = "_quantized"  # inside the writer's temporary root, removed before commit


class ExportError(ValueError):
    """The export cannot proceed as asked; the message names the file, field or backend."""


@dataclass(frozen=True, kw_only=True)
class ExportJob:
    """What a backend exporter (`edge_gemma.export.<backend>.export_backend(job) -> dict`) gets.

    It writes its files under `out_dir` (= `artifact_root / folder`) and returns its manifest entry: at least
    `files` (paths relative to the artifact root), plus whatever its runtime needs (signatures, input/output
    names, cache layout if it differs from the manifest's `caches`, prefill chunk sizes it supports).
    """

    config: ModelConfig
    checkpoint: Path  # the weights to export: float, or quantized (quant_manifest.json)
    quantized: bool
    recipe: str  # recipe name ("fp32", "int8", "int4", ...)
    context: int
    max_prefill_chunk: int
    artifact_root: Path
    folder: str  # the backend's folder name inside the artifact
    caches: dict[str, Any]  # the manifest's default cache description (see `cache_layout`)
    progress: bool = True
    text_only: bool = False  # embedder + decoder only: no vision/audio graphs (the artifact refuses images/audio)
    executorch_precise: bool = True  # ExecuTorch: XNNPACK's approximate transcendentals left to portable kernels
    drafter: Path | None = None  # a Gemma 4 assistant checkpoint (checked to fit) for speculative decoding

    @property
    def out_dir(self) -> Path:
        d = self.artifact_root / self.folder
        d.mkdir(parents=True, exist_ok=True)
        return d

    def load_model(self):
        """The eager float32 model (dequantized weights when quantized) with caches of `context` positions."""
        from edge_gemma.eager_backend import load_eager_model

        return load_eager_model(self.checkpoint, context=self.context)

    def quantized_checkpoint(self):
        """`QuantizedCheckpoint` (stored arrays for bit-exact packing), or None for a float export."""
        from edge_gemma.quantize.load import QuantizedCheckpoint

        return QuantizedCheckpoint(self.checkpoint) if self.quantized else None


@dataclass(frozen=True, kw_only=True)
class BuildReport:
    out: Path
    backends: tuple[str, ...]
    recipe: str
    context: int
    files: int
    total_bytes: int
    fidelity: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def format(self) -> str:
        lines = [
            f"wrote {self.out}: backends {', '.join(self.backends)}, quant {self.recipe}, context {self.context}, "
            f"{self.files} files, {self.total_bytes / 2**20:.1f} MiB, {self.seconds:.1f} s",
        ]
        if self.fidelity:
            ref = self.fidelity.get("reference", "float checkpoint")
            lines.append(f"fidelity on held-out text, teacher-forced against the eager model on the {ref}:")
            for name, fig in self.fidelity.get("backends", {}).items():
                lines.append(f"  {name:18s} {Fidelity(**fig).format()}")
            lines += [f"  note: {n}" for n in self.fidelity.get("notes", [])]
        else:
            lines.append("fidelity: not checked (--no-check)")
        return "\n".join(lines)


def implemented_backends() -> list[str]:
    """Backends whose exporter module exists in this installation."""
    return [b for b in BACKENDS if importlib.util.find_spec(f"edge_gemma.export.{b}") is not None]


def _check_backends(backends: list[str]) -> list[str]:
    if not backends:
        raise ExportError("no backend asked for; pass --backends onnx (implemented: "
                          f"{', '.join(implemented_backends()) or 'none'})")
    implemented = implemented_backends()
    for b in backends:
        if b not in BACKENDS:
            raise ExportError(f"unknown backend {b!r}; known backends: {', '.join(BACKENDS)}")
        if b not in implemented:
            raise ExportError(f"the {b} exporter is not implemented yet; implemented: "
                              f"{', '.join(implemented) or 'none'}")
    if len(set(backends)) != len(backends):
        raise ExportError(f"backend listed twice in {backends}")
    return backends


def cache_layout(config: ModelConfig, context: int) -> dict[str, Any]:
    """Which layers own a KV cache, the shape of each, how it is indexed, and which layers reuse which cache."""
    t = config.text
    layers = []
    for i in t.cache_layers:
        layers.append({
            "layer": i, "type": t.layer_types[i],
            "k_shape": [1, t.num_key_value_heads, context, t.head_dim_for(i)],
            "v_shape": [1, t.num_key_value_heads, context, t.head_dim_for(i)],
            "dtype": "float32",
        })
    return {
        "indexing": "slot j holds absolute position j; attention masks are built from positions (sliding: "
                    f"j > i - {t.sliding_window}), so unwritten or stale slots are never visible",
        "layers": layers,
        "shared": {str(i): t.kv_producer(i) for i in range(t.first_shared_layer, t.num_hidden_layers)},
    }


# ------------------------------------------------------------------------------------------------ source
def _prepare_source(ckpt: Path, quant: str | None, tmp_root: Path, progress: bool) -> tuple[Path, bool, dict]:
    """-> (weights directory, quantized?, quantization manifest summary)."""
    from edge_gemma.quantize.recipes import get_recipe

    if (ckpt / QUANT_MANIFEST).is_file():
        manifest = json.loads((ckpt / QUANT_MANIFEST).read_text())
        name = manifest.get("recipe", {}).get("name")
        if quant is not None and quant != name:
            raise ExportError(f"{ckpt / QUANT_MANIFEST}: the checkpoint is already quantized with recipe {name!r} "
                              f"(field recipe.name) but --quant {quant} was asked; pass --quant {name} or the "
                              f"float checkpoint")
        return ckpt, True, manifest
    quant = quant or "int4"
    recipe = get_recipe(quant)  # unknown recipe: an error naming the known ones
    if recipe.default is None and not recipe.overrides:  # fp32: export the float weights as they are
        return ckpt, False, {"recipe": recipe.to_manifest(), "tensors": {}}
    from edge_gemma.quantize.stream import quantize_checkpoint

    out = tmp_root / _QUANT_TMP
    quantize_checkpoint(ckpt, recipe, out, progress=progress)
    return out, True, json.loads((out / QUANT_MANIFEST).read_text())


def _quant_summary(manifest: dict) -> dict[str, Any]:
    """The quantization manifest without bulky per-file details: recipe, algorithm and each tensor's scheme."""
    tensors = {
        name: {"scheme": e.get("scheme"), "role": e.get("role"), "shape": e.get("shape")}
        for name, e in manifest.get("tensors", {}).items()
    }
    return {
        "recipe": manifest.get("recipe"), "algorithm": manifest.get("algorithm"),
        "onnx_only": manifest.get("onnx_only", False), "tensors": tensors,
    }


def _ple_name(config: ModelConfig) -> str:
    return LAYOUTS[config.model_type][0][1] + "embed_tokens_per_layer.weight"


def _write_ple(path: Path, weights: Path, quantized: bool, config: ModelConfig, progress: bool) -> dict[str, Any]:
    from edge_gemma.ple import write_ple
    from edge_gemma.quantize.safetensors_io import SafetensorsFile, open_checkpoint_files

    t = config.text
    name = _ple_name(config)
    rows = t.vocab_size_per_layer_input
    bar = tqdm(total=rows, desc="ple.bin", unit="row", disable=not progress)
    try:
        if quantized:
            from edge_gemma.quantize.load import QuantizedCheckpoint

            with QuantizedCheckpoint(weights) as q:
                entry, scheme = q.entry(name), q.schemes[name]
                files = {s: SafetensorsFile(weights / entry["file"]) for s in entry["stored"]}
                try:
                    def read_rows(start: int, stop: int) -> dict[str, np.ndarray]:
                        out = {}
                        for suffix, s in entry["stored"].items():
                            raw = files[suffix].read_raw(s["name"], start, stop)
                            if s["dtype"] == "BF16":
                                from edge_gemma.quantize.schemes import bf16_bits_to_f32

                                raw = bf16_bits_to_f32(raw)
                            out[suffix] = raw if scheme is not None else raw.astype(np.float32)
                        return out

                    return write_ple(path, rows=rows, num_layers=t.num_hidden_layers,
                                     dim=t.hidden_size_per_layer_input, scheme=scheme, read_rows=read_rows,
                                     progress=bar.update)
                finally:
                    for f in files.values():
                        f.close()
        files, by_name = open_checkpoint_files(weights)
        try:
            if name not in by_name:
                raise ExportError(f"{weights}: no tensor {name!r} (the PLE table)")
            src = by_name[name]
            return write_ple(path, rows=rows, num_layers=t.num_hidden_layers, dim=t.hidden_size_per_layer_input,
                             scheme=None, read_rows=lambda a, b: {"tensor": src.read_f32(name, a, b)},
                             progress=bar.update)
        finally:
            for f in files:
                f.close()
    finally:
        bar.close()


def _check_tokenizer(src: Path) -> None:
    """Fail before quantizing (minutes on a full-size model) when the checkpoint has no tokenizer to copy."""
    if not any((src / f).is_file() for f in TOKENIZER_FILES[:3]):
        raise ExportError(f"{src}: no tokenizer.json or tokenizer.model to put into the artifact")


def _copy_tokenizer(writer: ArtifactWriter, src: Path) -> dict[str, Any]:
    copied = []
    for fname in TOKENIZER_FILES:
        if (src / fname).is_file():
            writer.copy_in(src / fname, f"tokenizer/{fname}")
            copied.append(fname)
    if not any(f.startswith("tokenizer.") and f != "tokenizer_config.json" for f in copied):
        raise ExportError(f"{src}: no tokenizer.json or tokenizer.model to put into the artifact")
    if "chat_template.jinja" not in copied:
        cfg = json.loads((src / "tokenizer_config.json").read_text()) if (src / "tokenizer_config.json").is_file() else {}
        if not isinstance(cfg.get("chat_template"), str):
            raise ExportError(f"{src}: no chat_template.jinja (and no chat_template in tokenizer_config.json)")
    return {"dir": "tokenizer", "files": [f"tokenizer/{f}" for f in copied],
            "chat_template": "tokenizer/chat_template.jinja" if "chat_template.jinja" in copied else None}


# ------------------------------------------------------------------------------------------------ fidelity
def release_memory() -> None:
    """Collect garbage (the eager models hold reference cycles, so `del` alone frees nothing) and hand glibc's free
    heap back to the system (`malloc_trim`): the graph exports leave much freed heap behind at full size,
    which would otherwise stay in the process while the fidelity check loads its reference and the backend (the
    export's peak before and after: benchmarks/README.md)."""
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def _reference_logits(reference_ckpt: Path, tokenizer_dir: Path, context: int, tokens: int,
                      progress: bool) -> tuple[list[int], np.ndarray]:
    """The held-out ids and the float reference's teacher-forced logits `[n, V]`, computed BEFORE anything is
    exported: the reference's weights (mapped bf16 pages) are then never resident together with what the exporters
    leave live, and are released (`release_memory`) before the first step."""
    from edge_gemma.processor import Processor

    proc = Processor.from_dir(tokenizer_dir)
    ids = proc.tokenizer.encode(heldout_text(), add_bos=True)[: min(tokens, context)]
    bar = tqdm(total=len(ids), desc="fidelity reference", unit="tok", disable=not progress)
    try:
        ref_backend = reference_backend(reference_ckpt, context=context)
        reference = teacher_forced_logits(ref_backend, ref_backend.ple_source().gather, ids, progress=bar.update)
        ref_backend.close()
        del ref_backend
    finally:
        bar.close()
    release_memory()
    return ids, reference


def _fidelity(root: Path, ids: list[int], reference: np.ndarray, weights: Path, quantized: bool,
              backends: list[str], context: int, progress: bool) -> dict[str, Any]:
    from edge_gemma.eager_backend import EagerBackend
    from edge_gemma.ple import PleTable
    from edge_gemma.runtimes.registry import open_backend

    art = Artifact(root)
    # Bounded memory (full-size targets E2B <= 8 GB, E4B <= 12 GB): the reference was run before the export
    # (`_reference_logits`), and the float32 eager-dequantized comparison runs only when it fits (export/fidelity.py).
    with_dequantized, note = dequantized_fits(weights) if quantized else (False, "")
    runs = (int(with_dequantized) + len(backends)) * len(ids)
    bar = tqdm(total=runs, desc="fidelity", unit="tok", disable=not progress)
    try:
        results: dict[str, Any] = {}
        ple = PleTable(root / art.manifest["ple"]["file"], art.manifest["ple"])
        try:
            if with_dequantized:  # the same quantized weights in the eager model: the quantization's share of the error
                deq = EagerBackend.from_checkpoint(weights, context=context, skip_ple=True)
                results["eager-dequantized"] = compare_logits(
                    reference, teacher_forced_logits(deq, ple.gather, ids, progress=bar.update), ids
                ).to_dict()
                del deq
                release_memory()
            for name in backends:
                with open_backend(art, name) as be:
                    logits = teacher_forced_logits(be, ple.gather, ids, progress=bar.update)
                results[name] = compare_logits(reference, logits, ids).to_dict()
                release_memory()
        finally:
            ple.close()
    finally:
        bar.close()
    out = {"text": "edge_gemma/data/fidelity_heldout.txt", "tokens": len(ids), "backends": results}
    if note:
        out["notes"] = [note]
    return out


def _run_exporter(name: str, job: ExportJob) -> dict[str, Any]:
    """The backend's exporter: `edge_gemma.export.<name>.export_backend(job)`."""
    return importlib.import_module(f"edge_gemma.export.{name}").export_backend(job)


def backend_files(entry: dict[str, Any]) -> list[str]:
    """The files a backend entry lists (`files` may be a list or a {role: path or None} dict)."""
    files = entry.get("files", [])
    if isinstance(files, dict):
        return [f for f in files.values() if f]
    return list(files)


def _resolve_drafter(drafter: str | Path | bool | None, ckpt: Path, config: ModelConfig) -> Path | None:
    """The drafter checkpoint to export (see `build_artifact`). Its config is checked here, before any work, so that
    a drafter that does not fit is refused at once; its tensors are read (and checked) by the exporters that use it,
    inside the artifact's temporary folder."""
    from edge_gemma.drafter import load_drafter_config
    from edge_gemma.paths import DEFAULT_CHECKPOINT, DEFAULT_DRAFTER

    if drafter is None:
        drafter = DEFAULT_DRAFTER if ckpt.resolve() == DEFAULT_CHECKPOINT.resolve() else False
    if drafter is False:
        return None
    path = DEFAULT_DRAFTER if str(drafter) == "default" else Path(drafter)
    load_drafter_config(path, config.text)
    return path


# ------------------------------------------------------------------------------------------------ build
def build_artifact(
    checkpoint: str | Path,
    quant: str | None,
    backends: list[str],
    out: str | Path,
    *,
    context: int = 4096,
    force: bool = False,
    check: bool = True,
    max_prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    fidelity_tokens: int = FIDELITY_TOKENS,
    name: str | None = None,
    progress: bool = True,
    text_only: bool = False,
    executorch_precise: bool = True,
    on_backend_written: Callable[[str], None] | None = None,
    drafter: str | Path | bool | None = None,
) -> BuildReport:
    """Export `checkpoint` (a directory, or `default`) to the artifact directory `out`. `text_only`: no vision/audio
    graphs (smaller, faster export); the manifest says `"text_only": true` and the runtime refuses images and audio.
    `drafter`: a Gemma 4 assistant checkpoint directory for speculative decoding, exported beside the target by the
    backends that support it (ONNX and ExecuTorch so far; LiteRT not yet); None: the embedded model's own drafter
    for `default`, none otherwise; False: none."""
    t0 = time.perf_counter()
    backends = _check_backends(list(backends))
    ckpt = resolve_checkpoint(checkpoint)
    config = load_config(ckpt)
    if context < 2:
        raise ExportError(f"--context must be at least 2, got {context}")
    if context > config.text.max_position_embeddings:
        raise ExportError(f"--context {context} exceeds the model's max_position_embeddings "
                          f"{config.text.max_position_embeddings} ({ckpt / 'config.json'})")
    max_prefill_chunk = max(1, min(max_prefill_chunk, context))
    out = Path(out)
    src, dst = ckpt.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        where = ("the checkpoint itself" if dst == src else "inside the checkpoint" if src in dst.parents
                 else "a folder that holds the checkpoint")
        raise ExportError(f"--out {out} is {where} ({ckpt}); the artifact must go elsewhere (replacing it would "
                          "delete the checkpoint)")
    _check_tokenizer(ckpt)
    drafter_dir = _resolve_drafter(drafter, ckpt, config)
    with ArtifactWriter(out, force=force) as writer:
        ref_ids = ref_logits = None
        reference = ckpt
        if check:
            src_manifest = ckpt / "quant_manifest.json"
            if src_manifest.is_file():  # given a quantized checkpoint: its float source is the reference
                src = Path(json.loads(src_manifest.read_text()).get("source", {}).get("path", ""))
                reference = src if (src / "config.json").is_file() else ckpt
            ref_ids, ref_logits = _reference_logits(reference, ckpt, context, fidelity_tokens, progress)
        weights, quantized, qmanifest = _prepare_source(ckpt, quant, writer.root, progress)
        recipe = (qmanifest.get("recipe") or {}).get("name", quant)
        writer.manifest.update({
            "name": name or ckpt.resolve().name,
            "variant": variant_of(config),
            "model": {"config": config.to_dict(), "source": str(ckpt)},
            "quantization": _quant_summary(qmanifest),
            "context": context,
            "prefill": {"max_chunk": max_prefill_chunk, "chunk_sizes": [1, max_prefill_chunk]},
            "stop_token_ids": sorted({*config.eos_token_id, *config.text.eos_token_id}),
            "caches": cache_layout(config, context),
            "text_only": bool(text_only),
        })
        writer.manifest["tokenizer"] = _copy_tokenizer(writer, weights)
        writer.manifest["ple"] = _write_ple(writer.path("ple.bin"), weights, quantized, config, progress)
        entries = {}
        for b in backends:
            job = ExportJob(config=config, checkpoint=weights, quantized=quantized, recipe=str(recipe),
                            context=context, max_prefill_chunk=max_prefill_chunk, artifact_root=writer.root,
                            folder=b, caches=writer.manifest["caches"], progress=progress, text_only=text_only,
                            executorch_precise=executorch_precise, drafter=drafter_dir)
            log.info("exporting %s", b)
            entry = _run_exporter(b, job)
            if not isinstance(entry, dict):
                raise ExportError(f"edge_gemma.export.{b}.export_backend returned {type(entry).__name__}, not a dict")
            towers = [k for k in ("vision", "audio") if isinstance(entry.get("files"), dict) and entry["files"].get(k)]
            if text_only and towers:
                raise ExportError(f"--text-only: the {b} exporter wrote {' and '.join(towers)} graphs anyway; it does "
                                  "not honour --text-only")
            entries[b] = entry
            release_memory()
            if on_backend_written is not None:
                on_backend_written(b)
        writer.manifest["backends"] = entries
        if check:
            # A provisional manifest (sizes, no checksums yet) so that the runtime can open the artifact as it is.
            listed = [{"path": p.relative_to(writer.root).as_posix(), "size": p.stat().st_size, "sha256": ""}
                      for p in sorted(writer.root.rglob("*"))
                      if p.is_file() and p.name != "manifest.json" and _QUANT_TMP not in p.parts]
            writer.write_json("manifest.json", {**writer.manifest, "files": listed})
            release_memory()  # what the exporters freed, before the check loads its models
            fidelity = _fidelity(writer.root, ref_ids, ref_logits, weights, quantized, backends, context, progress)
            fidelity["reference"] = "float checkpoint" if reference != weights or not quantized else \
                "dequantized checkpoint (the float source was not found)"
            writer.manifest["fidelity"] = fidelity
        else:
            writer.manifest["fidelity"] = None
        if (writer.root / _QUANT_TMP).exists():
            shutil.rmtree(writer.root / _QUANT_TMP)
        writer.commit()
    files = writer.manifest["files"]
    return BuildReport(
        out=writer.out, backends=tuple(backends), recipe=str(recipe), context=context, files=len(files),
        total_bytes=sum(f["size"] for f in files), fidelity=writer.manifest["fidelity"] or {},
        seconds=time.perf_counter() - t0,
    )


__all__ += ["cache_layout", "ArtifactError"]
