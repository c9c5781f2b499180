#!/usr/bin/env python
"""Time and memory of GPTQ calibration (``calibrate.gptq_text_weights``) on a checkpoint, optionally bounded to the
first ``--layers`` decoder layers (the model's layer list is cut; the PLE projection stage always runs).

Reports, per stage: the wall time of the calibration forwards + Hessian collection, and of the GPTQ solves
(inverse-Hessian factors + column loop), so a bounded run can be extrapolated: stage ``i`` re-runs the calibration
batches through layers ``0..i`` (``gptq_text_weights`` does not cache layer inputs), so forward time grows linearly
with the stage index and the total quadratically with the layer count, while the solves are per linear.

Calibration tokens: ``--sequences`` x ``--seq-len`` ids drawn with a fixed seed (a random-weight checkpoint has no
text it would "understand"; the timing and memory do not depend on the ids).

    /usr/bin/time -v .venv/bin/python benchmarks/bench_gptq_calibration.py /work/synthetic/e2b --layers 4 --json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--recipe", default="int4")
    p.add_argument("--layers", type=int, default=None, help="only the first N decoder layers (default: all)")
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch

    from edge_gemma.checkpoint import load_model
    from edge_gemma.config import load_config
    from edge_gemma.quantize import calibrate

    cfg = load_config(args.checkpoint)
    t0 = time.perf_counter()
    model = load_model(args.checkpoint, text_only=True, mmap_embeddings=True)
    load_s = time.perf_counter() - t0
    rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    lm = model.language_model
    total_layers = len(lm.layers)
    if args.layers is not None:
        lm.layers = lm.layers[:args.layers]
    g = torch.Generator().manual_seed(0)
    high = min(cfg.text.vocab_size, cfg.text.vocab_size_per_layer_input)
    batches = [torch.randint(3, high, (1, args.seq_len), generator=g) for _ in range(args.sequences)]

    solve = {"s": 0.0, "linears": 0}
    stage_marks: list[float] = []
    real_gptq, real_factor = calibrate.gptq_quantize, calibrate._inverse_hessian_factor

    def timed_gptq(*a, **k):
        t = time.perf_counter()
        try:
            return real_gptq(*a, **k)
        finally:
            solve["s"] += time.perf_counter() - t
            solve["linears"] += 1

    def timed_factor(*a, **k):
        t = time.perf_counter()
        try:
            return real_factor(*a, **k)
        finally:
            solve["s"] += time.perf_counter() - t

    stages = []

    class Bar:  # replaces tqdm inside gptq_text_weights to time each stage
        def __init__(self, *a, **k):
            self.t = time.perf_counter()
            self.solve0 = 0.0

        def update(self, n):
            now = time.perf_counter()
            stages.append({"seconds": round(now - self.t, 2), "solve_seconds": round(solve["s"] - self.solve0, 2)})
            self.t, self.solve0 = now, solve["s"]

        def close(self):
            pass

    calibrate.gptq_quantize, calibrate._inverse_hessian_factor, calibrate.tqdm = timed_gptq, timed_factor, Bar
    t1 = time.perf_counter()
    stored = calibrate.gptq_text_weights(model, args.recipe, batches, layout=cfg.model_type, progress=False)
    gptq_s = time.perf_counter() - t1
    quantized_params = sum(int(a["qdata"].size) * (2 if a["qdata"].dtype == "uint8" else 1) for a in stored.values())
    report = {
        "checkpoint": args.checkpoint, "recipe": args.recipe, "layers": len(lm.layers), "total_layers": total_layers,
        "calibration": {"sequences": args.sequences, "seq_len": args.seq_len},
        "load_seconds": round(load_s, 1), "rss_after_load_gib": round(rss_load, 2),
        "gptq_seconds": round(gptq_s, 1), "solve_seconds": round(solve["s"], 1), "linears": solve["linears"],
        "quantized_params": quantized_params,
        "stages": stages, "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "cpu_seconds": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 1), "threads": torch.get_num_threads(),
    }
    print(json.dumps(report) if args.json else json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
