"""Issue 6 benchmarks: export a checkpoint to an int4 ExecuTorch artifact, measure it, and put ONNX beside it.

Steps, one child process each (wall time and the child's own peak RSS from `os.wait4`, as `bench_onnx.py`):

1. export: `edge-gemma export CHECKPOINT --backends executorch [--quant Q] --out ARTIFACT --context C --no-check`
   [--text-only] (the `lowering` seconds the exporter writes into the manifest split torch.export from XNNPACK
   lowering).
2. disk: bytes per top-level entry (`st_blocks`), and the `.pte` / `.ptd` sizes.
3. bench: `edge-gemma bench ARTIFACT --backend executorch --threads T --prompt-tokens P --new-tokens N --ignore-eos
   --json`, `--runs` times in fresh processes; medians of prefill tok/s, decode tok/s, TTFT, runtime peak RSS.
4. `--onnx-artifact DIR`: the same bench with `--backend onnx` on that artifact in the same run (export it with
   `benchmarks/bench_onnx.py`), so both backends are measured under the same machine load.

Usage:
    python benchmarks/bench_executorch.py --checkpoint /work/synthetic/e2b --artifact artifacts/e2b-int4-et \
        --text-only [--quant int4] [--context 4096] [--threads 2] [--prompt-tokens 512] [--new-tokens 128] \
        [--runs 3] [--onnx-artifact artifacts/e2b-int4-text]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_onnx import _cli, disk_usage, run_measured  # noqa: E402

def export(args) -> dict:
    cmd = [*_cli(), "export", str(args.checkpoint), "--backends", "executorch", "--out", str(args.artifact),
           "--context", str(args.context), "--prefill-chunk", str(args.prefill_chunk), "--no-progress", "--force",
           "--no-check"]
    if args.text_only:
        cmd.append("--text-only")
    if not (Path(args.checkpoint) / "quant_manifest.json").is_file():
        cmd += ["--quant", args.quant]
    print("$", " ".join(cmd), flush=True)
    r = run_measured(cmd, Path(args.results).with_suffix(".export.log"))
    r["command"] = " ".join(cmd)
    print(r.pop("stdout").strip())
    if r["returncode"] != 0:
        raise SystemExit(f"export failed (status {r['returncode']}); see {Path(args.results).with_suffix('.export.log')}")
    manifest = json.loads((Path(args.artifact) / "manifest.json").read_text())
    r["lowering"] = manifest["backends"]["executorch"].get("lowering")
    print(f"export: {r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU, peak RSS {r['peak_rss_mib'] / 1024:.2f} GiB, "
          f"{r['lowering']}")
    return r


def bench(args, artifact: str, backend: str) -> dict:
    cmd = [*_cli(), "bench", str(artifact), "--backend", backend, "--threads", str(args.threads),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--ignore-eos", "--json"]
    print("$", " ".join(cmd), flush=True)
    runs = []
    for i in range(args.runs):
        r = run_measured(cmd, Path(args.results).with_suffix(f".{backend}.bench{i}.log"))
        if r["returncode"] != 0:
            raise SystemExit(f"{backend} bench failed (status {r['returncode']}); see the .{backend}.bench{i}.log "
                             f"next to {args.results}")
        m = json.loads(r["stdout"])["measured"]
        m["process_peak_rss_mib"] = r["peak_rss_mib"]
        m["wall_s"] = r["wall_s"]
        runs.append(m)
        print(f"  {backend} run {i + 1}: prefill {m['prefill_tok_s']:.1f} tok/s, decode {m['decode_tok_s']:.2f} "
              f"tok/s, TTFT {m['ttft_s']:.2f} s, peak RSS {m['peak_rss_mb'] / 1024:.2f} GiB", flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mb")}
    print(f"  {backend} median of {args.runs}: prefill {med['prefill_tok_s']:.1f} tok/s, decode "
          f"{med['decode_tok_s']:.2f} tok/s, TTFT {med['ttft_s']:.2f} s, peak RSS {med['peak_rss_mb'] / 1024:.2f} GiB")
    return {"command": " ".join(cmd), "runs": runs, "median": med}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="float or quantized checkpoint to export (needed unless --skip-export)")
    ap.add_argument("--artifact", required=True, help="artifact directory to write / measure")
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--prefill-chunk", type=int, default=128)
    ap.add_argument("--text-only", action="store_true", help="export the text methods only (no vision/audio)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-export", action="store_true", help="measure an existing artifact")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--onnx-artifact", help="also bench this ONNX artifact (--backend onnx) in the same run")
    ap.add_argument("--results", default=None, help="JSON file for every figure (default ARTIFACT.bench.json)")
    args = ap.parse_args(argv)
    args.results = args.results or str(Path(args.artifact).with_suffix(".bench.json"))
    result: dict = {"args": dict(vars(args)), "cpus": os.cpu_count(),
                    "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if not args.skip_export:
        if not args.checkpoint:
            ap.error("--checkpoint is needed to export (or pass --skip-export)")
        result["export"] = export(args)
    result["disk"] = disk_usage(Path(args.artifact))
    et = Path(args.artifact) / "executorch"
    result["disk"]["executorch_files"] = {p.name: p.stat().st_size for p in sorted(et.glob("*.pt*"))}
    print(f"artifact on disk: {result['disk']['total_bytes'] / 2**30:.2f} GiB; "
          + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in result["disk"]["executorch_files"].items()))
    if not args.skip_bench:
        result["bench"] = {"executorch": bench(args, args.artifact, "executorch")}
        if args.onnx_artifact:
            result["bench"]["onnx"] = bench(args, args.onnx_artifact, "onnx")
    tmp = Path(args.results).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, args.results)
    print(f"figures: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
