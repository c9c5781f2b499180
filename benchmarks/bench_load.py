"""Time and peak memory to load a full-size checkpoint's text decoder into our model (`edge_gemma.checkpoint`).

One configuration per process, so the peak RSS (`resource.getrusage`, which never goes down) is this load's own.
The baseline (the interpreter with torch and edge_gemma imported) is reported separately so it can be subtracted.

Three phases are timed: `load_model` itself; reading every weight once ("touch": with a bf16 checkpoint loaded as bf16,
safetensors returns tensors backed by the file's memory map, so `load_model` reads almost nothing and the disk reads
happen on first use; with `--mmap-embeddings` the two embedding tables are not touched, as intended); and a short
prompt through the model (last-token logits), a sanity check that the weights are usable. The OS page cache is not
dropped (that needs root and would slow other users), so a recently written or read checkpoint loads faster.

Usage:
    python benchmarks/bench_load.py --checkpoint /work/synthetic/e2b [--dtype bf16|f32] [--mmap-embeddings]
        [--multimodal] [--prompt-tokens 8] [--no-touch] [--json]

The checkpoints come from benchmarks/make_synthetic_checkpoint.py (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from edge_gemma.checkpoint import EMBEDDING_TABLES, load_model

DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}


def _rss_mib() -> float:
    """Current resident set size (MiB), from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench_load(
    checkpoint: str | Path,
    *,
    dtype: str = "bf16",
    mmap_embeddings: bool = False,
    text_only: bool = True,
    prompt_tokens: int = 8,
    touch: bool = True,
) -> dict[str, object]:
    """Load once and return the figures (seconds, MiB) as a dict."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    import edge_gemma.model.audio  # noqa: F401  (imported before timing: the loader imports them lazily)
    import edge_gemma.model.gemma4  # noqa: F401
    import edge_gemma.model.vision  # noqa: F401

    baseline = _rss_mib()
    t0 = time.perf_counter()
    model = load_model(checkpoint, dtype=DTYPES[dtype], text_only=text_only, mmap_embeddings=mmap_embeddings)
    load_s = time.perf_counter() - t0
    after_load = _rss_mib()
    peak_load = _peak_rss_mib()
    params = sum(p.numel() for p in model.parameters())
    result: dict[str, object] = {
        "checkpoint": str(checkpoint),
        "dtype": dtype,
        "mmap_embeddings": mmap_embeddings,
        "text_only": text_only,
        "parameters": params,
        "load_s": round(load_s, 2),
        "baseline_rss_mib": round(baseline),
        "rss_after_load_mib": round(after_load),
        "peak_rss_load_mib": round(peak_load),
    }
    if touch:
        # safetensors hands out bf16 tensors backed by the file's memory map, so `load_model` in the file's dtype reads
        # almost nothing; reading every weight once is the honest "weights in RAM" figure.
        t1 = time.perf_counter()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not (mmap_embeddings and name in EMBEDDING_TABLES):  # those stay mapped on purpose
                    p.max()
        result["touch_s"] = round(time.perf_counter() - t1, 2)
        result["rss_after_touch_mib"] = round(_rss_mib())
        result["peak_rss_touch_mib"] = round(_peak_rss_mib())
    if prompt_tokens:
        ids = torch.arange(2, 2 + prompt_tokens).unsqueeze(0)  # (1, S): bos then ordinary ids
        t1 = time.perf_counter()
        with torch.no_grad():
            logits = model(ids, torch.arange(prompt_tokens), last_only=True)  # (1, 1, V)
        result["forward_s"] = round(time.perf_counter() - t1, 2)
        result["logits_finite"] = bool(torch.isfinite(logits).all())
        result["peak_rss_total_mib"] = round(_peak_rss_mib())
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--mmap-embeddings", action="store_true", help="keep embed_tokens and the PLE table memory-mapped")
    ap.add_argument("--multimodal", action="store_true", help="also load the vision and audio towers")
    ap.add_argument("--prompt-tokens", type=int, default=8, help="tokens for the sanity forward pass (0: skip)")
    ap.add_argument("--no-touch", action="store_true", help="skip reading every weight once after loading")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    args = ap.parse_args(argv)
    r = bench_load(args.checkpoint, dtype=args.dtype, mmap_embeddings=args.mmap_embeddings,
                   text_only=not args.multimodal, prompt_tokens=args.prompt_tokens, touch=not args.no_touch)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['checkpoint']} ({r['dtype']}, mmap_embeddings={r['mmap_embeddings']}, text_only={r['text_only']}): "
              f"{r['parameters'] / 1e9:.2f} G parameters loaded in {r['load_s']} s; RSS baseline "
              f"{r['baseline_rss_mib']} MiB, after load {r['rss_after_load_mib']} MiB, "
              f"peak {r['peak_rss_load_mib']} MiB")
        if "touch_s" in r:
            print(f"  reading every weight once: {r['touch_s']} s, RSS after {r['rss_after_touch_mib']} MiB")
        if "forward_s" in r:
            print(f"  {args.prompt_tokens}-token forward: {r['forward_s']} s, logits finite: {r['logits_finite']}, "
                  f"peak RSS incl. forward {r['peak_rss_total_mib']} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
