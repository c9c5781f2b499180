"""Read a quantized checkpoint back, strictly: the manifest is checked against every shard header before any data
is used, so a corrupt or mismatched checkpoint (manifest says int4, tensor is int8; a missing ``.scales``; a wrong
shape; a stray tensor) fails with an error naming the file and the tensor.

``QuantizedCheckpoint(path)`` gives the stored arrays of a tensor (for exporters, which must store them bit-exactly)
and its dequantized float32 value (for the eager model and for tests). Torch-free.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .recipes import Recipe, RecipeError
from .safetensors_io import SafetensorsFile
from .schemes import Scheme, SchemeError, bf16_bits_to_f32, scheme_from_dict
from .stream import MANIFEST_FILENAME, MANIFEST_FORMAT, MANIFEST_VERSION

__all__ = ["QuantizedCheckpointError", "QuantizedCheckpoint", "load_dequantized"]


class QuantizedCheckpointError(ValueError):
    """A quantized checkpoint does not match its manifest (the message names file, tensor, expected and found)."""


class QuantizedCheckpoint:
    """A validated quantized checkpoint directory. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mpath = self.path / MANIFEST_FILENAME
        if not mpath.is_file():
            raise QuantizedCheckpointError(f"{self.path}: no {MANIFEST_FILENAME}; not a quantized checkpoint")
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise QuantizedCheckpointError(f"{mpath}: not valid JSON ({e})") from e
        if self.manifest.get("format") != MANIFEST_FORMAT:
            raise QuantizedCheckpointError(f"{mpath}: format is {self.manifest.get('format')!r}, "
                                           f"expected {MANIFEST_FORMAT!r}")
        if self.manifest.get("format_version") != MANIFEST_VERSION:
            raise QuantizedCheckpointError(f"{mpath}: format_version {self.manifest.get('format_version')!r} is not "
                                           f"supported (this reader knows {MANIFEST_VERSION})")
        try:
            self.recipe = Recipe.from_manifest(self.manifest["recipe"])
        except (KeyError, RecipeError) as e:
            raise QuantizedCheckpointError(f"{mpath}: bad recipe entry: {e}") from e
        self._files: dict[str, SafetensorsFile] = {}
        self.schemes: dict[str, Scheme | None] = {}
        try:
            self._validate(mpath)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------ validation
    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._files:
            p = self.path / name
            if not p.is_file():
                raise QuantizedCheckpointError(f"{p}: shard named in {MANIFEST_FILENAME} is missing")
            self._files[name] = SafetensorsFile(p)
        return self._files[name]

    def _validate(self, mpath: Path) -> None:
        tensors = self.manifest.get("tensors")
        if not isinstance(tensors, dict) or not tensors:
            raise QuantizedCheckpointError(f"{mpath}: no 'tensors' table")
        for fname in self.manifest.get("files", []):
            self._file(fname)
        claimed: dict[str, set[str]] = {}
        for name, entry in tensors.items():
            try:
                shape = tuple(int(s) for s in entry["shape"])
                fname = entry["file"]
                stored = entry["stored"]
                scheme = None if entry["scheme"] is None else scheme_from_dict(entry["scheme"])
            except (KeyError, TypeError, ValueError, SchemeError) as e:
                raise QuantizedCheckpointError(f"{mpath}: entry for tensor {name!r} is malformed ({e})") from e
            f = self._file(fname)
            if scheme is None:
                expected = {"tensor": (name, None, shape)}
            else:
                try:
                    layout = scheme.stored_layout(shape)
                except SchemeError as e:
                    raise QuantizedCheckpointError(f"{mpath}: tensor {name!r}: {e}") from e
                expected = {suffix: (f"{name}.{suffix}", dtype, shp) for suffix, (dtype, shp) in layout.items()}
            if set(stored) != set(expected):
                raise QuantizedCheckpointError(
                    f"{mpath}: tensor {name!r} ({scheme.label if scheme else 'float'}) lists stored arrays "
                    f"{sorted(stored)}, expected {sorted(expected)}")
            for suffix, (sname, dtype, shp) in expected.items():
                what = f"{f.path}: tensor {sname!r} ({scheme.label if scheme else 'float'} {suffix} of {name!r})"
                if sname not in f.tensors:
                    raise QuantizedCheckpointError(f"{what} is missing from the file")
                info = f.tensors[sname]
                want_dtype = dtype if dtype is not None else stored[suffix].get("dtype")
                if info.dtype != want_dtype:
                    raise QuantizedCheckpointError(f"{what}: dtype {info.dtype}, manifest expects {want_dtype}")
                if tuple(info.shape) != tuple(shp):
                    raise QuantizedCheckpointError(f"{what}: shape {list(info.shape)}, manifest expects {list(shp)}")
                claimed.setdefault(fname, set()).add(sname)
            self.schemes[name] = scheme
        for fname, f in self._files.items():
            extra = sorted(set(f.tensors) - claimed.get(fname, set()))
            if extra:
                raise QuantizedCheckpointError(f"{f.path}: tensors not described by {MANIFEST_FILENAME}: {extra[:5]}")

    # ------------------------------------------------------------------------------------------------ access
    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def names(self) -> list[str]:
        """Hugging Face names of the original tensors, in checkpoint order."""
        return list(self.manifest["tensors"])

    def entry(self, name: str) -> dict[str, Any]:
        try:
            return self.manifest["tensors"][name]
        except KeyError:
            raise QuantizedCheckpointError(f"{self.path}: no tensor {name!r} in {MANIFEST_FILENAME}") from None

    def stored(self, name: str) -> dict[str, np.ndarray]:
        """The stored arrays of a tensor: ``qdata``/``zeros`` as integers, ``scales`` as float32 (bf16-exact) —
        or ``{"tensor": float array}`` for a float tensor (bf16 decoded to float32)."""
        entry = self.entry(name)
        f = self._file(entry["file"])
        out = {}
        for suffix, s in entry["stored"].items():
            raw = f.read_raw(s["name"])
            out[suffix] = bf16_bits_to_f32(raw) if s["dtype"] == "BF16" else raw
        return out

    def dequantized(self, name: str) -> np.ndarray:
        """The tensor as float32 (dequantized if quantized), in its original shape."""
        scheme = self.schemes.get(name)
        stored = self.stored(name)
        if scheme is None:
            return np.asarray(stored["tensor"], dtype=np.float32)
        try:
            return scheme.decode(stored, tuple(self.entry(name)["shape"]))
        except SchemeError as e:
            raise QuantizedCheckpointError(f"{self.path}: tensor {name!r}: {e}") from e

    def iter_dequantized(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.names():
            yield name, self.dequantized(name)


def load_dequantized(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a quantized checkpoint as float32 numpy arrays by Hugging Face name (for the eager model)."""
    with QuantizedCheckpoint(path) as ckpt:
        return dict(ckpt.iter_dequantized())

