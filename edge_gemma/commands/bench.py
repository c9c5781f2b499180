"""`edge-gemma bench ARTIFACT [--budget pi5|phone]`: prefill and decode speed, time to first token, peak memory.

The prompt is made of exactly `--prompt-tokens` tokens (held-out text, repeated as needed); `--ignore-eos` keeps
decoding past stop tokens so that `--new-tokens` are always measured. With `--budget DEVICE`, the measurement is
judged against the published figures of peers (edge_gemma/data/budgets.json, runtimes/budget.py): the command
exits with status 1 when a figure is over budget and says by how much. `--from-json FILE` judges a measurement
saved earlier with `--json` (for example one taken on the device) without running anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edge_gemma.runtimes.budget import budget_for, verdict

from ._common import add_draft_argument, add_model_arguments

DEFAULT_PROMPT_TOKENS = 128


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--budget", choices=["pi5", "phone"], help="judge the figures against this device's budget")
    parser.add_argument("--variant", choices=["e2b", "e4b"],
                        help="which budget entry (default: the artifact's variant)")
    parser.add_argument("--prompt-tokens", type=int, default=None,
                        help=f"prompt length (default: the budget's TTFT prompt length, else {DEFAULT_PROMPT_TOKENS})")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--ignore-eos", action="store_true", help="decode past stop tokens")
    add_draft_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the measurement (and verdict) as JSON on stdout")
    parser.add_argument("--from-json", metavar="FILE", help="judge this saved measurement instead of running")


def prompt_ids(tokenizer, n: int) -> list[int]:
    from edge_gemma.export.fidelity import heldout_text

    body = tokenizer.encode(heldout_text())
    if not body:
        raise ValueError("the held-out text tokenizes to nothing")
    ids = [tokenizer.special.bos]
    while len(ids) < n:
        ids.extend(body[: n - len(ids)])
    return ids[:n]


def mapped_resident_bytes(path: str | Path) -> tuple[int, int] | None:
    """(resident bytes, mapped bytes) of this process's mappings of `path`, summed from /proc/self/smaps.

    This is what the memory-mapped PLE table really costs: the pages of the rows that were gathered, not the whole
    file. None where /proc is not there (macOS) or the file is not mapped."""
    target = str(Path(path).resolve())
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    rss = size = 0
    found = inside = False
    for line in lines:
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):  # a mapping's header line
            inside = len(head) == 6 and head[5].strip() == target
            found = found or inside
        elif inside and head and head[0] in ("Rss:", "Size:"):
            kib = int(head[1]) * 1024
            if head[0] == "Rss:":
                rss += kib
            else:
                size += kib
    return (rss, size) if found else None


def page_cache_bytes(path: str | Path) -> int | None:
    """Bytes of `path` in the kernel's page cache (mincore over a fresh mapping that touches no page), or None where
    mmap/mincore cannot be called (not Linux or macOS)."""
    import ctypes
    import ctypes.util
    import os

    size = Path(path).stat().st_size
    if size == 0:
        return 0
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                return None
            import numpy as np

            return int((np.frombuffer(vec, np.uint8) & 1).sum()) * page
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from ._common import open_model

    with open_model(args) as model:
        budget = None
        n = args.prompt_tokens
        if n is None and args.budget:
            budget = budget_for(args.budget, _variant(args, model))
            n = int(budget.get("ttft_prompt_tokens", DEFAULT_PROMPT_TOKENS))
        n = n or DEFAULT_PROMPT_TOKENS
        if n < 1 or args.new_tokens < 1:
            raise ValueError("--prompt-tokens and --new-tokens must be >= 1")
        ids = prompt_ids(model.processor.tokenizer, n)
        opts = model.options(max_new_tokens=args.new_tokens, ignore_eos=args.ignore_eos, draft=args.draft)
        stats = model.engine.generate_ids(ids, options=opts).result().stats
        ple = None
        if model.artifact is not None and "ple" in model.artifact.manifest:
            ple_path = model.artifact.path(model.artifact.manifest["ple"]["file"])
            size = ple_path.stat().st_size
            resident = mapped_resident_bytes(ple_path)
            cached = page_cache_bytes(ple_path)
            ple = {"file_bytes": size,
                   # pages of ple.bin in this process's memory (0: the engine reads rows with pread, maps nothing)
                   "resident_bytes": resident[0] if resident else 0,
                   "resident_fraction": (resident[0] if resident else 0) / max(1, size),
                   # pages of ple.bin in the kernel's page cache (shared, reclaimable; includes what earlier
                   # processes read or wrote); None where mincore is not available
                   "page_cache_bytes": cached,
                   "page_cache_fraction": None if cached is None else cached / max(1, size)}
        return {
            "artifact": str(args.artifact), "backend": model.backend.name,
            "variant": _variant(args, model, required=False), "threads": args.threads,
            "prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens,
            "ttft_s": stats.ttft_s, "prefill_tok_s": stats.prefill_tok_s, "decode_tok_s": stats.decode_tok_s,
            "peak_rss_mb": stats.peak_rss_mb, "stop_reason": stats.stop_reason,
            # speculative decoding (None: no round drafted)
            "draft_acceptance": stats.draft_acceptance, "mean_accepted_tokens": stats.mean_accepted_tokens,
            "draft_len": stats.draft_len,
            "ple": ple,  # the PLE table's resident pages after the generation (None: not an artifact, or no /proc)
        }


def _variant(args: argparse.Namespace, model=None, *, required: bool = True) -> str | None:
    if args.variant:
        return args.variant
    variant = None
    if model is not None and model.artifact is not None:
        variant = model.artifact.manifest.get("variant")
    if variant is None and model is not None:
        from edge_gemma.export.source import variant_of

        variant = variant_of(model.config)
    if variant is None and required:
        raise ValueError(f"{args.artifact}: not an E2B or E4B model, so no budget applies; pass --variant to judge "
                         "it against one anyway")
    return variant


def judge(measured: dict[str, Any], device: str, variant: str) -> tuple[dict[str, Any], list]:
    budget = budget_for(device, variant)
    figures = dict(measured)
    want = budget.get("ttft_prompt_tokens")
    if want is not None and measured.get("prompt_tokens") not in (None, want):
        figures["ttft_s"] = None  # a TTFT for another prompt length is not comparable
    return budget, verdict(figures, budget)


def run(args: argparse.Namespace) -> int:
    if args.from_json:
        try:
            measured = json.loads(Path(args.from_json).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{args.from_json}: cannot read the measurement ({exc})") from None
        measured = measured.get("measured", measured)
    else:
        measured = measure(args)
    result: dict[str, Any] = {"measured": measured}
    misses = []
    if args.budget:
        variant = args.variant or measured.get("variant")
        if not variant:
            raise ValueError("no variant to pick a budget for; pass --variant e2b|e4b")
        budget, misses = judge(measured, args.budget, variant)
        result["budget"] = {"device": args.budget, "variant": variant, **budget}
        result["over_budget"] = [
            {"figure": m.figure, "measured": m.measured, "limit": m.limit, "unit": m.unit, "ratio": m.ratio,
             "message": str(m)} for m in misses
        ]
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        m = measured

        def fmt(x, unit, scale=1.0):
            return "n/a" if x is None else f"{x * scale:.4g} {unit}"

        print(f"prompt {m.get('prompt_tokens')} tokens, {m.get('new_tokens')} new tokens "
              f"({m.get('backend', '?')} backend)")
        print(f"  time to first token  {fmt(m.get('ttft_s'), 's')}")
        print(f"  prefill              {fmt(m.get('prefill_tok_s'), 'tok/s')}")
        print(f"  decode               {fmt(m.get('decode_tok_s'), 'tok/s')}")
        if m.get("draft_acceptance") is not None:
            print(f"  drafts               {m['draft_len']:.2f} per round, {m['draft_acceptance']:.1%} accepted, "
                  f"{m['mean_accepted_tokens']:.2f} accepted per round")
        print(f"  peak RSS             {fmt(m.get('peak_rss_mb'), 'MB')}")
        if m.get("ple"):
            p = m["ple"]
            print(f"  ple.bin resident     {p['resident_bytes'] / 2**20:.4g} MiB of {p['file_bytes'] / 2**20:.4g} MiB "
                  f"({100 * p['resident_fraction']:.2f} %) in this process")
            if p.get("page_cache_bytes") is not None:
                print(f"  ple.bin page cache   {p['page_cache_bytes'] / 2**20:.4g} MiB "
                      f"({100 * p['page_cache_fraction']:.2f} %, shared and reclaimable)")
        if args.budget:
            src = result["budget"].get("source", "")
            if not misses:
                print(f"within the {args.budget}/{result['budget']['variant']} budget ({src})")
    if misses:
        print(f"over the {args.budget}/{result['budget']['variant']} budget "
              f"({result['budget'].get('source', '')}):", file=sys.stderr)
        for miss in misses:
            print(f"  {miss}", file=sys.stderr)
        return 1
    return 0
