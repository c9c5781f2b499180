"""Time several artifact/backend pairs side by side: rounds of fresh `edge-gemma bench` processes, interleaved.

    python benchmarks/bench_interleaved.py --rounds 3 \
        --run parent/onnx ARTIFACT_A onnx --run new/onnx ARTIFACT_B onnx [--run ...] \
        [--threads 2 --prompt-tokens 512 --new-tokens 128] [--json out.json]

Each round runs every pair once, in the order given, each in a fresh process (`edge-gemma bench --json
--ignore-eos`); these VMs drift between periods, so only figures from one interleaved run are compared. Prints the
median (min-max) of prefill and decode tok/s, time to first token and the runtime's peak RSS per pair.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

KEYS = ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mb")


def _bench(artifact: str, backend: str, args) -> dict:
    cli = Path(sys.executable).with_name("edge-gemma")
    cmd = [str(cli), "bench", artifact, "--backend", backend, "--threads", str(args.threads), "--prompt-tokens",
           str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--ignore-eos", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return json.loads(r.stdout)["measured"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", nargs=3, action="append", metavar=("LABEL", "ARTIFACT", "BACKEND"), required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in args.run}
    for rnd in range(args.rounds):
        for label, artifact, backend in args.run:
            m = _bench(artifact, backend, args)
            runs[label].append({k: m[k] for k in KEYS})
            print(f"round {rnd + 1} {label}: prefill {m['prefill_tok_s']:.1f} tok/s, decode {m['decode_tok_s']:.2f} "
                  f"tok/s, TTFT {m['ttft_s']:.2f} s, peak RSS {m['peak_rss_mb'] / 1024:.2f} GiB", flush=True)
    print("\n| run | prefill tok/s | decode tok/s | TTFT s | peak RSS GiB |\n|---|---|---|---|---|")
    summary = {}
    for label, rs in runs.items():
        cells, summary[label] = [], {}
        for k in KEYS:
            vals = [r[k] / (1024 if k == "peak_rss_mb" else 1) for r in rs]
            med = statistics.median(vals)
            summary[label][k] = {"median": med, "min": min(vals), "max": max(vals)}
            cells.append(f"{med:.2f} ({min(vals):.2f}-{max(vals):.2f})")
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": runs,
                                         "summary": summary}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
