"""`runtimes.memory.release_mapped_pages`: what the ONNX and ExecuTorch backends do to the runtimes' private mappings
of their weight files after loading."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_gemma.runtimes.memory import release_mapped_pages


def _resident_kib(path: Path) -> tuple[int, int]:
    """(Rss, Anonymous) kB of this process's mappings of `path`, from /proc/self/smaps."""
    target, rss, anon, match = os.path.realpath(path), 0, 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if "-" in head[0] and not head[0].endswith(":"):
                match = len(head) == 6 and head[5].rstrip("\n") == target
            elif match and head[0] in ("Rss:", "Anonymous:"):
                rss, anon = (rss + int(head[1]), anon) if head[0] == "Rss:" else (rss, anon + int(head[1]))
    return rss, anon


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/smaps are Linux's")
def test_release_mapped_pages_drops_clean_pages_and_keeps_written_ones(tmp_path):
    """Clean pages leave the RSS and read back the same bytes; a mapping holding a written (copy-on-write) page is
    untouched."""
    import mmap

    data = np.random.default_rng(0).integers(0, 256, 64 * mmap.PAGESIZE, dtype=np.uint8).tobytes()
    clean_path, written_path = tmp_path / "clean.data", tmp_path / "written.data"
    clean_path.write_bytes(data)
    written_path.write_bytes(data)
    with open(clean_path, "rb") as f1, open(written_path, "r+b") as f2:
        clean = mmap.mmap(f1.fileno(), 0, access=mmap.ACCESS_COPY)  # MAP_PRIVATE, as ORT maps external data
        written = mmap.mmap(f2.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            assert bytes(clean[:]) == data and bytes(written[:]) == data  # every page resident
            written[5] = (data[5] + 1) % 256
            assert _resident_kib(clean_path)[0] >= 64 * mmap.PAGESIZE // 1024
            assert _resident_kib(written_path)[1] > 0

            assert release_mapped_pages(clean_path) == len(data)
            assert release_mapped_pages(written_path) == 0
            assert _resident_kib(clean_path)[0] == 0
            assert bytes(clean[:]) == data  # paged in again from the file
            assert written[5] == (data[5] + 1) % 256 and bytes(written[6:]) == data[6:]
            assert release_mapped_pages(tmp_path / "not-mapped.data") == 0
        finally:
            clean.close()
            written.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/smaps are Linux's")
def test_locked_pages_are_released_only_when_asked_to_unlock(tmp_path):
    """ExecuTorch's loader maps `model.ptd` shared, read-only and locked: a locked mapping is left alone unless
    `unlock=True`, which unlocks and drops it; its bytes read back the same."""
    import ctypes
    import mmap

    data = np.random.default_rng(1).integers(0, 256, 16 * mmap.PAGESIZE, dtype=np.uint8).tobytes()
    path = tmp_path / "model.ptd"
    path.write_bytes(data)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        try:
            assert bytes(mapped[:]) == data
            target = os.path.realpath(path)
            (start, end), = [tuple(int(x, 16) for x in line.split()[0].split("-"))
                             for line in open("/proc/self/maps") if line.rstrip("\n").endswith(target)]
            if libc.mlock(start, end - start) != 0:
                pytest.skip(f"mlock refused (errno {ctypes.get_errno()}): RLIMIT_MEMLOCK too small here")
            assert release_mapped_pages(path) == 0  # locked: kept
            assert _resident_kib(path)[0] >= len(data) // 1024
            assert release_mapped_pages(path, unlock=True) == len(data)
            assert _resident_kib(path)[0] == 0
            assert bytes(mapped[:]) == data
        finally:
            mapped.close()
