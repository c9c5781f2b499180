"""Torch-free safetensors reading and streaming writing, with bfloat16 handled as raw bits.

Why not ``safetensors.numpy``: numpy has no bfloat16 (real Gemma checkpoints are bf16) and ``save_file`` needs every
tensor in memory at once. The format is simple enough to do by hand (https://github.com/huggingface/safetensors):
an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets: [begin, end]}}`` padded
with spaces to a multiple of 8, then the raw little-endian data. Reading uses ``os.pread`` of row ranges, so the
resident memory of a reader is one chunk, never one file. Writing first fixes the whole header from the planned
names, dtypes and shapes, then fills each tensor by row ranges with ``os.pwrite``.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .schemes import bf16_bits_to_f32, f32_to_bf16_bits

__all__ = ["CheckpointFormatError", "TensorInfo", "SafetensorsFile", "SafetensorsWriter", "DTYPES", "FLOAT_DTYPES",
           "open_checkpoint_files"]

# safetensors dtype -> numpy storage dtype (BF16 is stored as its uint16 bit pattern)
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
_MAX_HEADER = 100 * 1024 * 1024


# Clipping bounds of Gemma 4's ClippableLinear (audio/vision towers): +-inf is their "no clipping" value.
CLIP_BOUNDS = ("input_min", "input_max", "output_min", "output_max")


def bad_values(name: str, values: np.ndarray) -> int:
    """How many values of float tensor `name` no trained weight can hold: NaN anywhere, +-inf outside the clipping
    bounds (`CLIP_BOUNDS`)."""
    if name.rsplit(".", 1)[-1] in CLIP_BOUNDS:
        return int(np.isnan(values).sum())
    return int(values.size - np.isfinite(values).sum())


class CheckpointFormatError(ValueError):
    """A safetensors file or checkpoint directory is malformed (the message names the file and tensor)."""


def parse_header(raw: bytes, path: Path) -> dict:
    """A safetensors header's JSON, refusing what readers would silently resolve one way or another: a name given
    twice (JSON parsers keep one of them: a checkpoint whose `gate_proj` is read as its `up_proj` loads), and two
    tensors whose byte ranges overlap (`data_offsets` within the data section; bounds are checked by the callers,
    who know the data section's size)."""
    def unique(pairs):
        seen: dict = {}
        for key, value in pairs:
            if key in seen:
                raise CheckpointFormatError(f"{path}: the header names tensor {key!r} twice")
            seen[key] = value
        return seen

    try:
        header = json.loads(raw, object_pairs_hook=unique)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(f"{path}: header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path}: header is not a JSON object")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            b, e = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            continue  # the caller reports the malformed entry with its own message
        spans.append((b, e, name))
    last = None  # the non-empty range reaching furthest so far, in order of start
    for b, e, name in sorted(s for s in spans if s[1] > s[0]):
        if last is not None and b < last[1]:
            raise CheckpointFormatError(f"{path}: tensors {last[2]!r} [{last[0]}, {last[1]}) and {name!r} [{b}, {e}) "
                                        "overlap in the data section")
        if last is None or e > last[1]:
            last = (b, e, name)
    return header


@dataclass(frozen=True, kw_only=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    nbytes: int

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def rows(self) -> int:
        """Rows along the first axis (1 for a scalar)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) if self.shape else 1


class SafetensorsFile:
    """Header of one safetensors file plus row-range reads of its tensors (no mmap, no torch)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointFormatError(f"{self.path}: cannot open ({e.strerror})") from e
        size = os.fstat(self._fd).st_size
        raw = os.pread(self._fd, 8, 0)
        if len(raw) != 8:
            raise CheckpointFormatError(f"{self.path}: too short for a safetensors file ({size} bytes)")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > _MAX_HEADER or 8 + hlen > size:
            raise CheckpointFormatError(f"{self.path}: header length {hlen} is impossible for a {size}-byte file")
        header = parse_header(os.pread(self._fd, hlen, 8), self.path)
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        data_start = 8 + hlen
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            try:
                dtype, shape, (b, e) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointFormatError(f"{self.path}: tensor {name!r} has a malformed header entry") from exc
            if dtype not in DTYPES:
                raise CheckpointFormatError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype!r}")
            expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
            if e - b != expected or b < 0 or data_start + e > size:
                raise CheckpointFormatError(
                    f"{self.path}: tensor {name!r} ({dtype}, shape {list(shape)}) needs {expected} bytes, header says "
                    f"[{b}, {e}) in a data section of {size - data_start} bytes")
            self.tensors[name] = TensorInfo(name=name, dtype=dtype, shape=shape, begin=data_start + b, nbytes=e - b)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointFormatError(f"{self.path}: no tensor named {name!r}") from None

    def read_raw(self, name: str, row_start: int = 0, row_stop: int | None = None) -> np.ndarray:
        """Rows [row_start, row_stop) of a tensor in its storage dtype (BF16 as uint16), shape kept."""
        t = self.info(name)
        row_stop = t.rows if row_stop is None else row_stop
        if not 0 <= row_start <= row_stop <= t.rows:
            raise CheckpointFormatError(f"{self.path}: rows [{row_start}, {row_stop}) out of range for {name!r}")
        row_bytes = t.row_numel * t.itemsize
        nbytes = (row_stop - row_start) * row_bytes
        buf = bytearray(nbytes)
        view = memoryview(buf)
        done = 0
        while done < nbytes:  # pread may return short reads for very large requests
            n = os.preadv(self._fd, [view[done:]], t.begin + row_start * row_bytes + done)
            if n <= 0:
                raise CheckpointFormatError(f"{self.path}: unexpected end of file reading {name!r}")
            done += n
        arr = np.frombuffer(buf, dtype=DTYPES[t.dtype])
        shape = ((row_stop - row_start),) + t.shape[1:] if t.shape else ()
        return arr.reshape(shape)

    def read_f32(self, name: str, row_start: int = 0, row_stop: int | None = None) -> np.ndarray:
        """Rows of a float tensor decoded to float32 (bf16 and f16 exactly; f64 rounded)."""
        t = self.info(name)
        if t.dtype not in FLOAT_DTYPES:
            raise CheckpointFormatError(f"{self.path}: tensor {name!r} is {t.dtype}, not a float tensor")
        return raw_to_f32(self.read_raw(name, row_start, row_stop), t.dtype)


def raw_to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Rows read with `read_raw` from a float tensor of safetensors dtype `dtype`, as float32 (what `read_f32`
    returns, without reading the file again)."""
    return bf16_bits_to_f32(raw) if dtype == "BF16" else raw.astype(np.float32)


def open_checkpoint_files(src: str | os.PathLike) -> tuple[list[SafetensorsFile], dict[str, SafetensorsFile]]:
    """Open a Hugging Face checkpoint directory (``model.safetensors`` or sharded with
    ``model.safetensors.index.json``) or a single ``.safetensors`` file. Returns the files and name -> file."""
    src = Path(src)
    if src.is_file():
        paths = [src]
        expected: dict[str, str] | None = None
    elif (src / "model.safetensors.index.json").is_file():
        index_path = src / "model.safetensors.index.json"
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointFormatError(f"{index_path}: not a safetensors index (no 'weight_map')") from e
        expected = dict(weight_map)
        paths = [src / f for f in sorted(set(weight_map.values()))]
    elif (src / "model.safetensors").is_file():
        paths, expected = [src / "model.safetensors"], None
    else:
        raise CheckpointFormatError(f"{src}: no model.safetensors or model.safetensors.index.json found")
    files, by_name = [], {}
    for p in paths:
        if not p.is_file():
            raise CheckpointFormatError(f"{p}: shard listed in the index is missing")
        f = SafetensorsFile(p)
        files.append(f)
        for name in f.tensors:
            if name in by_name:
                raise CheckpointFormatError(f"{p}: tensor {name!r} is also in {by_name[name].path}")
            by_name[name] = f
    if expected is not None:
        for name, shard in expected.items():
            if name not in by_name:
                raise CheckpointFormatError(f"{src / shard}: index lists {name!r} but the shard does not contain it")
            if by_name[name].path.name != shard:
                raise CheckpointFormatError(
                    f"{src}: index puts {name!r} in {shard}, found in {by_name[name].path.name}")
        extra = sorted(set(by_name) - set(expected))
        if extra:
            raise CheckpointFormatError(f"{src}: tensors missing from the index: {extra[:5]}")
    return files, by_name


class SafetensorsWriter:
    """Write one safetensors file whose tensors are all declared up front and filled in by row ranges.

    ``plan`` is an ordered list of (name, dtype, shape). Data is laid out in plan order, contiguously. Every byte of
    every tensor must be written before :meth:`close` (checked), so a half-filled file is never mistaken for a
    finished one. Float32 arrays given for a BF16 tensor must be exactly bf16-representable (quantization scales are).
    """

    def __init__(self, path: str | os.PathLike, plan: Iterable[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._infos: dict[str, TensorInfo] = {}
        offset = 0
        entries = []
        for name, dtype, shape in plan:
            if dtype not in DTYPES:
                raise CheckpointFormatError(f"{self.path}: tensor {name!r}: unsupported dtype {dtype!r}")
            if name in self._infos or name == "__metadata__":
                raise CheckpointFormatError(f"{self.path}: tensor {name!r} planned twice")
            shape = tuple(int(s) for s in shape)
            nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
            entries.append((name, dtype, shape, offset, nbytes))
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._infos[name] = TensorInfo(name=name, dtype=dtype, shape=shape, begin=offset, nbytes=nbytes)
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)
        self._data_start = 8 + len(blob)
        self._written = {name: 0 for name in self._infos}
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, struct.pack("<Q", len(blob)) + blob, 0)
        os.ftruncate(self._fd, self._data_start + offset)

    def write_rows(self, name: str, row_start: int, array: np.ndarray) -> None:
        """Write ``array`` as rows [row_start, row_start + len(array)) of tensor ``name``."""
        t = self._infos[name]
        arr = np.asarray(array)
        if t.dtype == "BF16" and arr.dtype == np.float32:
            arr = f32_to_bf16_bits(arr)
        arr = np.ascontiguousarray(arr, dtype=DTYPES[t.dtype]).reshape(arr.shape)  # (keeps 0-d arrays 0-d)
        rows = arr.shape[0] if t.shape else 1
        if tuple(arr.shape[1:] if t.shape else arr.shape) != t.shape[1:] or row_start + rows > t.rows:
            raise CheckpointFormatError(f"{self.path}: rows of shape {arr.shape} at {row_start} do not fit tensor "
                                        f"{name!r} of shape {list(t.shape)}")
        row_bytes = t.row_numel * t.itemsize
        data = arr.tobytes()
        pos = self._data_start + t.begin + row_start * row_bytes
        view = memoryview(data)
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, view[done:], pos + done)
        self._written[name] += len(data)

    def close(self) -> None:
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1
        short = [n for n, t in self._infos.items() if self._written[n] != t.nbytes]
        if short:
            raise CheckpointFormatError(f"{self.path}: tensors not completely written: {short[:5]}")

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
