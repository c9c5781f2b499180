"""`ple.bin`: the Per-Layer-Embedding table, outside every graph, memory-mapped and gathered a few rows at a time.

The PLE table (`embed_tokens_per_layer`, [vocab, layers * P]: 2.35 G values for E2B, 2.82 G for E4B) is the largest
tensor of the model, yet each token reads only one row of it. Every backend's decoder therefore takes the gathered
rows as an input, and the engine reads them from this file a row at a time.

How the rows are read: `os.pread` of each row's bytes (with `POSIX_FADV_RANDOM`, so the kernel does not read ahead),
not a fault on a memory map. A mapping was the first design, and it kept far more of the file resident than the rows
read: when the file sits in the page cache in large folios (right after the export wrote it, or after anything read
it sequentially), one fault on a row maps many times the row's size into the process (fault-around and whole
folios), and `madvise(MADV_RANDOM)` does not change that (figures: benchmarks/README.md). With
`pread` the process maps nothing of the file and holds only the rows it copied; what stays in the (reclaimable,
shared) page cache is measured separately by `edge-gemma bench` (mincore). `maps` still offers whole-segment numpy
memmaps for readers of whole segments (checks, tests).

Layout: raw segments, each starting on a 4096-byte page boundary, described by the manifest entry (never guessed)::

    {"file": "ple.bin", "rows": V, "num_layers": L, "dim": P, "scheme": <quantize scheme dict or null>,
     "segments": {"qdata": {"offset": 0, "dtype": "uint8", "shape": [V, L*P/2]},     # int4: two codes per byte
                  "scales": {"offset": 1179648000, "dtype": "bfloat16", "shape": [V, L*P/G]}}}

A float table has one segment `tensor` (float32). Quantized segments hold exactly the bytes of the quantized
checkpoint (`quantize/schemes.py` documents them); bfloat16 scales are stored as their raw 16-bit patterns.
The rows returned by `gather` are float32 and NOT multiplied by sqrt(P): the decoder graphs apply that scale.

No torch here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np

from edge_gemma.quantize.schemes import Scheme, bf16_bits_to_f32, f32_to_bf16_bits, scheme_from_dict

PAGE = 4096
ROW_CHUNK = 4096  # rows per write when streaming a table

_NP_DTYPES = {"uint8": np.uint8, "int8": np.int8, "float32": np.float32, "bfloat16": np.uint16}


def _align(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


@dataclass(frozen=True)
class _Segment:
    name: str
    dtype: str
    shape: tuple[int, ...]  # rows first: [V, ...]

    @property
    def nbytes(self) -> int:
        return int(np.dtype(_NP_DTYPES[self.dtype]).itemsize * np.prod(self.shape))


def _segments(rows: int, cols: int, scheme: Scheme | None) -> list[_Segment]:
    if scheme is None:
        return [_Segment("tensor", "float32", (rows, cols))]
    layout = scheme.stored_layout((rows, cols))
    out = []
    for name, (dtype, shape) in layout.items():
        dt = {"U8": "uint8", "I8": "int8", "BF16": "bfloat16", "F32": "float32"}.get(dtype, dtype)
        out.append(_Segment(name, dt, tuple(int(x) for x in shape)))
    return out


def write_ple(
    out: BinaryIO | str | Path,
    *,
    rows: int,
    num_layers: int,
    dim: int,
    scheme: Scheme | None,
    read_rows: Callable[[int, int], dict[str, np.ndarray]],
    file_name: str = "ple.bin",
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Stream the table into `out`, ROW_CHUNK rows at a time, and return its manifest entry.

    `read_rows(start, stop)` returns the stored arrays of those rows: `{"tensor": float}` for a float table, or the
    scheme's stored arrays (`qdata`, `scales` as bf16-exact float32, `zeros`) for a quantized one.
    """
    cols = num_layers * dim
    segments = _segments(rows, cols, scheme)
    offsets, pos = {}, 0
    for seg in segments:
        offsets[seg.name] = pos
        pos = _align(pos + seg.nbytes)
    own = isinstance(out, (str, Path))
    f = open(out, "wb") if own else out
    try:
        f.truncate(pos)
        for start in range(0, rows, ROW_CHUNK):
            stop = min(rows, start + ROW_CHUNK)
            arrays = read_rows(start, stop)
            for seg in segments:
                if seg.name not in arrays:
                    raise ValueError(f"{file_name}: rows {start}:{stop} lack the {seg.name!r} array")
                a = np.asarray(arrays[seg.name])
                if a.shape != (stop - start, *seg.shape[1:]):
                    raise ValueError(
                        f"{file_name}: {seg.name} rows {start}:{stop} have shape {a.shape}, expected "
                        f"{(stop - start, *seg.shape[1:])}"
                    )
                if seg.dtype == "bfloat16":
                    a = f32_to_bf16_bits(a.astype(np.float32))
                else:
                    a = a.astype(_NP_DTYPES[seg.dtype], copy=False)
                row_bytes = seg.nbytes // seg.shape[0]
                f.seek(offsets[seg.name] + start * row_bytes)
                f.write(np.ascontiguousarray(a).tobytes())
            if progress is not None:
                progress(stop - start)
    finally:
        if own:
            f.close()
    return {
        "file": file_name,
        "rows": rows,
        "num_layers": num_layers,
        "dim": dim,
        "scheme": scheme.to_dict() if scheme is not None else None,
        "size": pos,
        "segments": {
            s.name: {"offset": offsets[s.name], "dtype": s.dtype, "shape": list(s.shape)} for s in segments
        },
    }


class PleTable:
    """Read-only view of `ple.bin`: `gather(ids) -> [S, L, P] float32`, each row read with `os.pread`."""

    def __init__(self, path: str | Path, entry: dict[str, Any]):
        self.path = Path(path)
        self.rows, self.num_layers, self.dim = int(entry["rows"]), int(entry["num_layers"]), int(entry["dim"])
        self.scheme = scheme_from_dict(entry["scheme"]) if entry.get("scheme") else None
        size = self.path.stat().st_size
        self._segments: dict[str, tuple[int, Any, tuple[int, ...]]] = {}
        for name, seg in entry["segments"].items():
            dtype = np.dtype(_NP_DTYPES[seg["dtype"]])
            shape = tuple(int(x) for x in seg["shape"])
            end = int(seg["offset"]) + int(dtype.itemsize * np.prod(shape))
            if end > size:
                raise ValueError(f"{self.path}: segment {name!r} ends at byte {end}, but the file has {size} bytes")
            self._segments[name] = (int(seg["offset"]), dtype, shape)
        self._fd: int | None = os.open(self.path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
        self._maps: dict[str, np.ndarray] | None = None

    @property
    def maps(self) -> dict[str, np.ndarray]:
        """Whole segments as read-only numpy memmaps (opened on first use; `gather` does not use them)."""
        if self._maps is None:
            self._maps = {name: np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape)
                          for name, (offset, dtype, shape) in self._segments.items()}
        return self._maps

    def _read_rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        offset, dtype, shape = self._segments[name]
        row_bytes = int(dtype.itemsize * np.prod(shape[1:]))
        if self._fd is None:
            raise ValueError(f"{self.path}: the PLE table is closed")
        parts = []
        for i in ids.tolist():
            data = os.pread(self._fd, row_bytes, offset + i * row_bytes)
            if len(data) != row_bytes:
                raise OSError(f"{self.path}: short read of row {i} of segment {name!r} "
                              f"({len(data)} of {row_bytes} bytes; was the file truncated?)")
            parts.append(data)
        return np.frombuffer(b"".join(parts), dtype=dtype).reshape(ids.size, *shape[1:])

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """Rows of the table for `ids` [S] as float32 `[S, num_layers, dim]` (unscaled)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.rows):
            bad = ids[(ids < 0) | (ids >= self.rows)][0]
            raise ValueError(f"{self.path}: token id {bad} is outside the PLE table (rows 0..{self.rows - 1})")
        unique, inverse = np.unique(ids, return_inverse=True)  # a row repeated in a prompt is read once
        if self.scheme is None:
            rows = np.asarray(self._read_rows("tensor", unique), dtype=np.float32)
        else:
            stored = {}
            for name, (_, dtype, _) in self._segments.items():
                part = self._read_rows(name, unique)
                stored[name] = bf16_bits_to_f32(part) if dtype == np.uint16 else part
            rows = self.scheme.decode(stored, (unique.size, self.num_layers * self.dim)).astype(np.float32, copy=False)
        return rows[inverse.reshape(-1)].reshape(ids.size, self.num_layers, self.dim)

    def iter_segments(self) -> Iterator[tuple[str, np.ndarray]]:
        yield from self.maps.items()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for m in (self._maps or {}).values():
            mm = getattr(m, "_mmap", None)
            if mm is not None:
                mm.close()
        self._maps = None
