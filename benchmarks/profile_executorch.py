"""Per-operator time of an artifact's ExecuTorch `decode` or `prefill` method, from ExecuTorch's own ETDump profiler.

Loads `executorch/model.pte` + `model.ptd` with ETDump enabled, zeroes the caches (`reset`), runs the method
`--steps` times on random inputs at positions from `--start` (each prefill step a chunk of `--chunk` tokens), and
prints the time per step and the operators (portable kernels as `native_call_*`, XNNPACK operators by name) that
took the most time in total, over all steps but the first (which includes XNNPACK's first-run setup).

Usage:
    python benchmarks/profile_executorch.py ARTIFACT [--method decode] [--steps 12] [--threads 2] [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--method", choices=("decode", "prefill"), default="decode")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--chunk", type=int, default=128, help="tokens per prefill step")
    ap.add_argument("--start", type=int, default=600, help="position of the first token")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)

    import torch
    import executorch.kernels.quantized  # noqa: F401  (embedding_byte / embedding_4bit)
    from executorch.devtools import Inspector
    from executorch.extension.pybindings.portable_lib import _load_for_executorch, _unsafe_reset_threadpool

    manifest = json.loads((args.artifact / "manifest.json").read_text())
    entry = manifest["backends"]["executorch"]
    H, L, P = int(entry["hidden_size"]), int(entry["ple"]["num_layers"]), int(entry["ple"]["dim"])
    S = 1 if args.method == "decode" else min(args.chunk, int(entry["max_prefill_chunk"]))
    if args.start + args.steps * S > int(entry["context"]):
        sys.exit(f"positions {args.start}..{args.start + args.steps * S} exceed the context {entry['context']}")
    _unsafe_reset_threadpool(args.threads)
    folder = args.artifact / "executorch"
    module = _load_for_executorch(str(folder / "model.pte"), str(folder / "model.ptd"), enable_etdump=True)
    module.run_method("reset", [])
    rng = np.random.default_rng(0)
    keep = "keep" in entry["methods"]["prefill"].get("inputs", [])  # programs exported from 2026-12-08 on
    for step in range(args.steps):
        embeds = torch.from_numpy(rng.standard_normal((1, S, H), dtype=np.float32) * 0.1)
        rows = torch.from_numpy(rng.standard_normal((1, S, L, P), dtype=np.float32) * 0.1)
        pos = torch.arange(args.start + step * S, args.start + (step + 1) * S, dtype=torch.int64)
        t0 = time.perf_counter()
        module.run_method(args.method, [embeds, rows, pos] + ([torch.tensor([S - 1])] if keep else []))
        print(f"step {step}: {(time.perf_counter() - t0) * 1e3:.1f} ms", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        etdump = Path(tmp) / "run.etdp"
        module.write_etdump_result_to_file(str(etdump), str(Path(tmp) / "debug.bin"))
        inspector = Inspector(etdump_path=str(etdump))
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for block in inspector.event_blocks:
        if block.name != "Execute":
            continue
        for event in block.events:
            if event.perf_data is None:
                continue
            raw = list(event.perf_data.raw)
            if event.name == "Method::execute":
                raw = raw[2:]  # the reset call and the first step
            totals[event.name][0] += len(raw)
            totals[event.name][1] += sum(raw)
    steps = max(1, args.steps - 1)
    step_ms = totals.get("Method::execute", [0, 0.0])[1] / steps
    print(f"\n{args.method}: {step_ms:.1f} ms per step (ETDump, steps 2..{args.steps}); operators, ms per step "
          "(first step included, divided by the step count):")
    skip = {"Method::execute", "DELEGATE_CALL", "OPERATOR_CALL"}
    rows_out = sorted(((n, c, t) for n, (c, t) in totals.items() if n not in skip), key=lambda r: -r[2])
    for name, count, total in rows_out[:args.top]:
        print(f"  {name[:64]:64s} {count / args.steps:7.1f} calls {total / args.steps:9.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
