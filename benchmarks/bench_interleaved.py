"""Time several artifact/backend pairs side by side: rounds of fresh `edge-gemma bench` processes, interleaved.

    python benchmarks/bench_interleaved.py --rounds 3 \
        --run parent/onnx ARTIFACT_A onnx --run new/onnx ARTIFACT_B onnx [--run ...] \
        [--code parent/onnx CHECKOUT] [--threads 2 --prompt-tokens 512 --new-tokens 128] [--json out.json]

Each round runs every pair once, in the order given, each in a fresh process (`edge-gemma bench --json
--ignore-eos`); these VMs drift between periods, so only figures from one interleaved run are compared. Prints the
median (min-max) of prefill and decode tok/s, time to first token and the runtime's peak RSS per pair.

`--code LABEL CHECKOUT` runs LABEL's bench with the edge-gemma sources of another checkout (e.g. the parent commit
from `git worktree add /tmp/parent HEAD~1`) instead of the installed ones, with the same Python environment: the
checkout's `edge_gemma/`, `export/`, `quantize/` and `runtimes/` are imported as the packages `pyproject.toml` maps
them to.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

KEYS = ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mb")


# `python -c` bootstrap for --code: the checkout's source folders as the packages pyproject.toml maps them to
_FROM_CHECKOUT = """
import importlib.util, sys
root = sys.argv.pop(1)
for name, folder in (("edge_gemma", "edge_gemma"), ("edge_gemma.export", "export"),
                     ("edge_gemma.quantize", "quantize"), ("edge_gemma.runtimes", "runtimes")):
    spec = importlib.util.spec_from_file_location(name, f"{root}/{folder}/__init__.py",
                                                  submodule_search_locations=[f"{root}/{folder}"])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
from edge_gemma.cli import main
sys.argv[0] = "edge-gemma"
sys.exit(main())
"""


def _bench(artifact: str, backend: str, args, code: str | None = None) -> dict:
    cli = [str(Path(sys.executable).with_name("edge-gemma"))] if code is None else \
        [sys.executable, "-c", _FROM_CHECKOUT, str(Path(code).resolve())]
    cmd = [*cli, "bench", artifact, "--backend", backend, "--threads", str(args.threads), "--prompt-tokens",
           str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--ignore-eos", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return json.loads(r.stdout)["measured"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", nargs=3, action="append", metavar=("LABEL", "ARTIFACT", "BACKEND"), required=True)
    ap.add_argument("--code", nargs=2, action="append", default=[], metavar=("LABEL", "CHECKOUT"),
                    help="run LABEL with the sources of another checkout (see the module docstring)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in args.run}
    code = dict(args.code)
    unknown = sorted(set(code) - set(runs))
    if unknown:
        ap.error(f"--code names labels no --run has: {', '.join(unknown)}")
    for rnd in range(args.rounds):
        for label, artifact, backend in args.run:
            m = _bench(artifact, backend, args, code.get(label))
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
