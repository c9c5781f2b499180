"""Streaming quantization of a Hugging Face checkpoint, tensor by tensor and row chunk by row chunk.

``quantize_checkpoint(src, "int4", out)`` reads the source safetensors (single file or sharded with an index) with
positioned reads, never mapping or holding a whole file: each tensor is processed in row chunks of about
``chunk_bytes`` of float32, quantized with the numpy reference (``schemes.py``), and written straight into its place in
the output shard (the output header is computed up front from the plan). Peak memory is therefore a few chunks, not
the model; ``tests/test_quant_stream.py`` measures it.

Output directory (written as ``.OUT.tmp-*`` beside OUT, then renamed into place):

* ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``): a quantized
  weight ``X.weight`` becomes ``X.weight.qdata`` / ``X.weight.scales`` (BF16) / ``X.weight.zeros`` (asym only), see
  the byte layout in ``schemes.py``; float tensors keep their name and, by default, their exact bytes;
* ``quant_manifest.json``: the recipe and, per tensor, role, scheme, original shape and dtype, stored arrays, shard;
* ``quant_report.json``: per-tensor errors; plus ``config.json`` and tokenizer/processor files copied from the source.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .recipes import Recipe, TensorPlan, get_recipe
from .report import REPORT_FILENAME, ErrorAccumulator, QuantReport, TensorError
from .safetensors_io import (DTYPES, FLOAT_DTYPES, SafetensorsWriter, bad_values, open_checkpoint_files,
                             raw_to_f32)

__all__ = ["quantize_checkpoint", "MANIFEST_FILENAME", "MANIFEST_FORMAT", "MANIFEST_VERSION", "QuantizeError"]

logger = logging.getLogger(__name__)

MANIFEST_FILENAME = "quant_manifest.json"
MANIFEST_FORMAT = "edge-gemma-quantized-checkpoint"
MANIFEST_VERSION = 1
COPIED_SUFFIXES = (".json", ".jinja", ".model", ".txt")  # config, generation config, tokenizer, chat template
NOT_COPIED = {"model.safetensors.index.json", MANIFEST_FILENAME, REPORT_FILENAME}


class QuantizeError(ValueError):
    """The source cannot be quantized as asked (already quantized, output exists, non-float weight, ...)."""


@dataclass(frozen=True, kw_only=True)
class _Item:
    """One source tensor and what becomes of it."""

    name: str
    plan: TensorPlan
    source_dtype: str
    shape: tuple[int, ...]
    source_bytes: int
    stored: dict[str, tuple[str, str, tuple[int, ...]]]  # suffix -> (output name, dtype, shape)

    @property
    def stored_bytes(self) -> int:
        return sum(int(np.prod(s, dtype=np.int64)) * DTYPES[d].itemsize for _, d, s in self.stored.values())


def _plan_items(recipe: Recipe, files, by_name) -> list[_Item]:
    order = sorted(by_name, key=lambda n: (files.index(by_name[n]), by_name[n].tensors[n].begin))
    items = []
    for name in order:
        info = by_name[name].tensors[name]
        plan = recipe.plan(name, info.shape)
        if plan.scheme is not None:
            if info.dtype not in FLOAT_DTYPES:
                raise QuantizeError(f"{by_name[name].path}: tensor {name!r} is {info.dtype}; only float weights can "
                                    f"be quantized (is this checkpoint already quantized?)")
            stored = {suffix: (f"{name}.{suffix}", dtype, shape)
                      for suffix, (dtype, shape) in plan.scheme.stored_layout(info.shape).items()}
        else:
            widen = recipe.float_dtype == "F32" and info.dtype in FLOAT_DTYPES
            stored = {"tensor": (name, "F32" if widen else info.dtype, info.shape)}
        items.append(_Item(name=name, plan=plan, source_dtype=info.dtype, shape=info.shape,
                           source_bytes=info.nbytes, stored=stored))
    return items


def _assign_shards(items: list[_Item], max_shard_bytes: int) -> list[list[_Item]]:
    shards: list[list[_Item]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.stored_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.stored_bytes
    return shards


def _rows_per_chunk(row_numel: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // max(1, row_numel * 4))


def _check_precomputed(item: _Item, stored: dict[str, np.ndarray]) -> None:
    for suffix, (_, dtype, shape) in item.stored.items():
        arr = stored.get(suffix)
        want = np.dtype(np.float32) if dtype == "BF16" else DTYPES[dtype]  # bf16 scales travel as exact float32
        if arr is None or tuple(arr.shape) != tuple(shape) or arr.dtype != want:
            found = None if arr is None else f"{arr.dtype} {list(arr.shape)}"
            raise QuantizeError(f"precomputed {item.plan.scheme.label} arrays for {item.name!r}: {suffix} is "
                                f"{found}, expected {want} {list(shape)}")


def _write_item(item: _Item, src, writer: SafetensorsWriter, chunk_bytes: int,
                precomputed: dict[str, np.ndarray] | None = None) -> ErrorAccumulator | None:
    info = src.tensors[item.name]
    step = _rows_per_chunk(info.row_numel, chunk_bytes)
    scheme = item.plan.scheme
    if scheme is None:
        out_name, out_dtype, _ = item.stored["tensor"]
        for r0 in range(0, info.rows, step):
            r1 = min(info.rows, r0 + step)
            chunk = src.read_f32(item.name, r0, r1) if out_dtype != info.dtype else src.read_raw(item.name, r0, r1)
            if info.dtype in FLOAT_DTYPES:  # a NaN in a norm weight exported "fine" before: every float tensor
                values = chunk if chunk.dtype == np.float32 else raw_to_f32(chunk, info.dtype)  # no second read
                if bad_values(item.name, values):
                    raise QuantizeError(f"{src.path}: tensor {item.name!r} has NaN or inf in rows [{r0}, {r1})")
            writer.write_rows(out_name, r0, chunk if info.shape else chunk.reshape(()))
        return None
    acc = ErrorAccumulator()
    for r0 in range(0, info.rows, step):
        r1 = min(info.rows, r0 + step)
        w = src.read_f32(item.name, r0, r1)  # (rows, K) float32
        if not np.all(np.isfinite(w)):
            raise QuantizeError(f"{src.path}: tensor {item.name!r} has NaN or inf in rows [{r0}, {r1})")
        if precomputed is None:
            quantized = scheme.quantize(w)
            stored = scheme.pack(quantized)
            w_hat = scheme.dequantize(quantized)  # == scheme.decode(stored), without unpacking again
        else:  # e.g. GPTQ codes: rows of every stored array line up with the weight's rows
            stored = {suffix: arr[r0:r1] for suffix, arr in precomputed.items()}
            w_hat = scheme.decode(stored, w.shape)
        for suffix, (out_name, _, _) in item.stored.items():
            writer.write_rows(out_name, r0, stored[suffix])
        acc.update(w, w_hat)
        del w, stored, w_hat
    return acc


def _manifest_entry(item: _Item, shard: str, algorithm: str) -> dict[str, Any]:
    scheme = item.plan.scheme
    return {
        "algorithm": None if scheme is None else algorithm,
        "role": item.plan.role,
        "rule": item.plan.rule,
        "shape": list(item.shape),
        "source_dtype": item.source_dtype,
        "scheme": None if scheme is None else scheme.to_dict(),
        "fallback_from": None if item.plan.fallback_from is None else item.plan.fallback_from.to_dict(),
        "onnx_only": bool(scheme is not None and scheme.onnx_only),
        "file": shard,
        "stored": {suffix: {"name": n, "dtype": d, "shape": list(s)} for suffix, (n, d, s) in item.stored.items()},
    }


def _copy_aux_files(src: Path, dst: Path) -> list[str]:
    if not src.is_dir():
        return []
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and p.suffix in COPIED_SUFFIXES and p.name not in NOT_COPIED:
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
    return copied


def quantize_checkpoint(src: str | os.PathLike, recipe: Recipe | str, out: str | os.PathLike, *,
                        max_shard_bytes: int = 2 * 2**30, chunk_bytes: int = 32 * 2**20, overwrite: bool = False,
                        progress: bool = True, precomputed: dict[str, dict[str, np.ndarray]] | None = None,
                        algorithm: dict[str, Any] | None = None) -> QuantReport:
    """Quantize the checkpoint at ``src`` with ``recipe`` into the directory ``out``; returns the error report.

    ``chunk_bytes`` bounds the float32 rows processed at once (peak memory is a small multiple of it).
    ``precomputed`` maps HF names to stored arrays made by another algorithm (GPTQ, ``calibrate.py``) in the scheme the
    recipe gives that tensor; every other quantized tensor is rounded to nearest. ``algorithm`` describes how
    ``precomputed`` was made, for the manifest.
    """
    precomputed = precomputed or {}
    algorithm = {"name": "gptq" if precomputed else "rtn", **(algorithm or {})}
    t0 = time.perf_counter()
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    src, out = Path(src), Path(out)
    if src.is_dir() and (src / MANIFEST_FILENAME).exists():
        raise QuantizeError(f"{src}: already a quantized checkpoint ({MANIFEST_FILENAME} present); quantize the float "
                            f"checkpoint instead")
    if out.exists() and not overwrite:
        raise QuantizeError(f"{out}: output already exists (pass overwrite=True / --overwrite to replace it)")
    files, by_name = open_checkpoint_files(src)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        items = _plan_items(recipe, files, by_name)
        planned = {i.name: i for i in items if i.plan.scheme is not None}
        unknown = sorted(set(precomputed) - set(planned))
        if unknown:
            raise QuantizeError(f"precomputed weights for tensors the recipe does not quantize: {unknown[:5]}")
        for name, stored in precomputed.items():
            _check_precomputed(planned[name], stored)
        shards = _assign_shards(items, max_shard_bytes)
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        manifest_tensors: dict[str, Any] = {}
        errors: list[TensorError] = []
        weight_map: dict[str, str] = {}
        bar = tqdm(total=len(items), desc=f"quantize {recipe.name}", unit="tensor", disable=not progress)
        for shard_name, shard_items in zip(names, shards):
            plan = [stored for item in shard_items for stored in item.stored.values()]
            writer = SafetensorsWriter(tmp / shard_name, plan, metadata={"format": "np", "quant_recipe": recipe.name})
            try:
                for item in shard_items:
                    bar.set_postfix_str(item.name[-60:], refresh=False)
                    acc = _write_item(item, by_name[item.name], writer, chunk_bytes, precomputed.get(item.name))
                    manifest_tensors[item.name] = _manifest_entry(
                        item, shard_name, algorithm["name"] if item.name in precomputed else "rtn")
                    for n, _, _ in item.stored.values():
                        weight_map[n] = shard_name
                    if acc is not None:
                        errors.append(TensorError(
                            name=item.name, role=item.plan.role, scheme=item.plan.scheme.label, shape=item.shape,
                            rel_error=acc.rel_error, max_abs_error=acc.max_abs_err, max_abs=acc.max_abs,
                            source_bytes=item.source_bytes, stored_bytes=item.stored_bytes))
                    bar.update(1)
            except BaseException:
                writer.abort()
                raise
            writer.close()
        bar.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(i.stored_bytes for i in items)}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        copied = _copy_aux_files(src, tmp)
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "recipe": recipe.to_manifest(),
            "algorithm": algorithm,
            "onnx_only": any(e["onnx_only"] for e in manifest_tensors.values()),
            "layout": "see edge_gemma.quantize.schemes: int4 = uint8 two codes per byte, low nibble first, "
                      "u = q + 8; scales bfloat16 [N, K/G]; int8 = int8 [N, K], scales bfloat16 [N]",
            "source": {"path": str(src), "files": [f.path.name for f in files]},
            "files": names,
            "copied_files": copied,
            "tensors": manifest_tensors,
        }
        (tmp / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=1))
        report = QuantReport(
            recipe=recipe.name, source=str(src), out=str(out), tensors=tuple(errors),
            float_tensors=sum(1 for i in items if i.plan.scheme is None),
            unknown_tensors=tuple(i.name for i in items if i.plan.role == "unknown"),
            source_bytes=sum(i.source_bytes for i in items), stored_bytes=sum(i.stored_bytes for i in items),
            seconds=time.perf_counter() - t0,
            fallbacks=tuple(f"{i.name}: {i.plan.fallback_from.label} -> "
                            f"{i.plan.scheme.label if i.plan.scheme else 'float'}"
                            for i in items if i.plan.fallback_from is not None))
        report.save(tmp / REPORT_FILENAME)
        for name in report.unknown_tensors:
            logger.warning("tensor %r is not in the role table; kept float", name)
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for f in files:
            f.close()
    logger.info("quantized %s with %s into %s in %.1f s", src, recipe.name, out, report.seconds)
    return report


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    if not overwrite:
        raise QuantizeError(f"{out}: appeared while quantizing; not replaced (pass overwrite=True)")
    old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)

