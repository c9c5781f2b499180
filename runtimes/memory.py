"""Memory the runtimes give back: the pages of mapped weight files that packing read and nothing reads again.

No torch here.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path

__all__ = ["release_mapped_pages"]

log = logging.getLogger(__name__)


def release_mapped_pages(data_file: Path, *, unlock: bool = False) -> int:
    """Give back this process's resident pages of the mappings of `data_file` that hold only clean file pages
    (`madvise(MADV_DONTNEED)`, Linux only); -> the bytes of mappings advised.

    Both CPU runtimes pack weights into buffers of their own when they load and leave pages of the mapped originals
    resident that nothing reads again: ONNX Runtime the MatMulNBits scales of `decoder.onnx.data` (~0.27 GiB for the
    full-size E2B int4 decoder), ExecuTorch the tied table in `model.ptd` that XNNPACK packed for the head while the
    `embed` method reads only a row per token (~0.38 GiB). A mapping whose `/proc/self/smaps` entry counts no
    anonymous (written, copy-on-write) pages is an unmodified copy of the file, so dropping its pages loses nothing: a
    later read, if any, pages them in again. Mappings with written pages are left
    alone. Call it only while nothing over `data_file` is loading or closing: the ranges come from smaps first, and a
    range the runtime unmapped in between could by then hold another allocation (tried during an ONNX Runtime load:
    a crash one run in two). `unlock=True` first unlocks mappings the runtime locked (`munlock`): ExecuTorch's loader
    locks every segment of `model.ptd` it maps, so the table stayed pinned although XNNPACK holds its own copy."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        target = os.path.realpath(data_file)
        ranges, current = [], None  # [start, end, anonymous kB, locked kB] per mapping of the file
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                head = line.split(maxsplit=5)
                if "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line
                    match = len(head) == 6 and head[5].rstrip("\n") == target
                    current = [*(int(x, 16) for x in head[0].split("-")), 0, 0] if match else None
                    if current:
                        ranges.append(current)
                elif current is not None and head[0] in ("Anonymous:", "Locked:"):
                    current[2 if head[0] == "Anonymous:" else 3] = int(head[1])
        ranges = [r for r in ranges if r[2] == 0 and (unlock or r[3] == 0)]
        if not ranges:
            return 0
        libc = ctypes.CDLL(None, use_errno=True)
        for fn in (libc.madvise, libc.munlock):
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, *([ctypes.c_int] if fn is libc.madvise else [])]
        advised = 0
        for start, end, _, locked in ranges:
            if locked and libc.munlock(start, end - start) != 0:
                continue
            if libc.madvise(start, end - start, 4) == 0:  # MADV_DONTNEED
                advised += end - start
        return advised
    except (OSError, AttributeError, ValueError, IndexError) as e:  # no /proc or no libc symbol: keep the pages
        log.debug("could not release the mapped pages of %s: %s", data_file, e)
        return 0
