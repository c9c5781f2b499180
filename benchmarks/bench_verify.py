#!/usr/bin/env python
"""`edge-gemma verify` with its full report (the CLI's `--json` prints the five contract keys only): adds the
reference's max |logit| and its top-1 minus top-2 logit margins, which tell a real mismatch from a near-tie flip.

    /usr/bin/time -v .venv/bin/python benchmarks/bench_verify.py /work/synthetic/e2b
    /usr/bin/time -v .venv/bin/python benchmarks/bench_verify.py /work/synthetic/e2b --ours-margins

`--ours-margins` runs only OUR model (no transformers): verify's prompt and greedy decode, printing the tokens and our
top-1 minus top-2 logit at every generated step (7 minutes and 9.9 GiB peak RSS for E2B here).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from edge_gemma.verify import verify_checkpoint


def ours_margins(path: str) -> dict:
    import torch

    from edge_gemma.checkpoint import load_model
    from edge_gemma.config import load_config
    from edge_gemma.verify import NEW_TOKENS, fixed_prompt

    cfg = load_config(path)
    S = 2 * cfg.text.sliding_window + 8
    ids = fixed_prompt(cfg, S)
    t0 = time.perf_counter()
    model = load_model(path, mmap_embeddings=True, max_len=S + NEW_TOKENS, text_only=True)
    calls: list[tuple[float, float]] = []  # (top-1 minus top-2, max |logit|) of the last position of every call

    def hook(module, args, out):
        last = (out if torch.is_tensor(out) else out[0])[0, -1].float()
        top = torch.topk(last, 2).values
        calls.append((float(top[0] - top[1]), float(last.abs().max())))

    model.language_model.register_forward_hook(hook)
    with torch.no_grad():
        tokens = model.generate_greedy(ids, NEW_TOKENS, prefill_chunk=cfg.text.sliding_window + 3)
    steps = calls[-NEW_TOKENS:]  # the last prefill chunk gives token 0, each decode call the next one
    return {"tokens": tokens, "margins": [round(m, 6) for m, _ in steps],
            "max_abs_logit": [round(a, 3) for _, a in steps], "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--ours-margins", action="store_true", help="our model only: greedy tokens and logit margins")
    args = p.parse_args(argv)
    if args.ours_margins:
        print(json.dumps(ours_margins(args.checkpoint)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.perf_counter()
    report = verify_checkpoint(args.checkpoint, args.atol)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
