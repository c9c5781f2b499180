"""Issue 5 benchmarks: export a full-size checkpoint to an int4 ONNX artifact and measure it, one process per step.

Steps (each is skipped when its `--skip-*` flag is given):

1. export: `edge-gemma export CHECKPOINT --quant QUANT --backends onnx --out ARTIFACT --context C [--no-check]` in a
   child process; its wall time and peak RSS come from `os.wait4` (the child's own `ru_maxrss`, so this script's
   memory is not counted). A CHECKPOINT made by `edge-gemma quantize` keeps its own recipe (no `--quant` passed).
2. disk: the bytes each file of the artifact takes (`st_blocks`, like `du`), per top-level entry and in total.
3. bench: `edge-gemma bench ARTIFACT --threads T --prompt-tokens P --new-tokens N --ignore-eos --json`, `--runs`
   times, each in a fresh process; the medians of prefill tok/s, decode tok/s, TTFT, runtime peak RSS and the
   PLE figures after the generation: the bytes of `ple.bin` mapped into the bench process (/proc/self/smaps; 0, the
   engine reads rows with pread) and the bytes of it in the page cache (mincore). Before each run `ple.bin` is evicted
   from the page cache (`posix_fadvise(POSIX_FADV_DONTNEED)`, no root needed; `--warm-ple` keeps it), so the page
   cache figure is what that generation read.
4. profile (`--profile`): ONNX Runtime's profiler (`SessionOptions.enable_profiling`) on the decoder graph, one
   prefill chunk and a few decode steps, with zero caches (the cost does not depend on the cache contents, only on
   how many slots are passed: all `context` for graphs with a fixed slot count, else the slots in use rounded up to
   the runtime's bucket, as `runtimes/onnx.py` binds them); prints the operators that take the most time, by op
   type and by node.

Everything goes to `--results FILE` (JSON) and a summary to stdout. The page cache is not dropped (that needs root),
except `ple.bin`'s pages (see 3).

Usage (`make bench-onnx CHECKPOINT=/work/synthetic/e2b`):
    python benchmarks/bench_onnx.py --checkpoint /work/synthetic/e2b --artifact artifacts/e2b-int4 \
        [--quant int4] [--threads 2] [--prompt-tokens 512] [--new-tokens 128] [--runs 3] [--no-check] [--text-only]
        [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("edge-gemma")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "edge_gemma.cli"]


def run_measured(cmd: list[str], log_path: Path | None = None) -> dict:
    """Run `cmd`; -> returncode, wall seconds, the child's peak RSS (MiB, from wait4), stdout."""
    t0 = time.perf_counter()
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=out, cwd=REPO, text=True)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log_path:
            out.close()
    return {"returncode": proc.returncode, "wall_s": time.perf_counter() - t0,
            "peak_rss_mib": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime, "stdout": stdout}


def disk_usage(root: Path) -> dict:
    """Allocated bytes (st_blocks * 512, what `du` counts) per top-level entry of `root`, and the total."""
    per: dict[str, int] = defaultdict(int)
    total = 0
    for p in root.rglob("*"):
        if p.is_file():
            b = p.stat().st_blocks * 512
            per[p.relative_to(root).parts[0]] += b
            total += b
    return {"total_bytes": total, "entries": dict(sorted(per.items()))}


def export(args) -> dict:
    cmd = [*_cli(), "export", str(args.checkpoint), "--backends", "onnx", "--out", str(args.artifact),
           "--context", str(args.context), "--no-progress", "--force"]
    if not (Path(args.checkpoint) / "quant_manifest.json").is_file():
        cmd += ["--quant", args.quant]
    if args.no_check:
        cmd.append("--no-check")
    if args.text_only:
        cmd.append("--text-only")
    print("$", " ".join(cmd), flush=True)
    r = run_measured(cmd, Path(args.results).with_suffix(".export.log"))
    r["command"] = " ".join(cmd)
    print(r.pop("stdout").strip())
    if r["returncode"] != 0:
        raise SystemExit(f"export failed (status {r['returncode']}); see {Path(args.results).with_suffix('.export.log')}")
    print(f"export: {r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU, peak RSS {r['peak_rss_mib'] / 1024:.2f} GiB")
    return r


def bench(args) -> dict:
    cmd = [*_cli(), "bench", str(args.artifact), "--backend", "onnx", "--threads", str(args.threads),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--ignore-eos", "--json"]
    print("$", " ".join(cmd), flush=True)
    runs = []
    for i in range(args.runs):
        if not args.warm_ple:
            evict_from_page_cache(Path(args.artifact) / "ple.bin")
        r = run_measured(cmd, Path(args.results).with_suffix(f".bench{i}.log"))
        if r["returncode"] != 0:
            raise SystemExit(f"bench failed (status {r['returncode']}); see the .bench{i}.log next to {args.results}")
        m = json.loads(r["stdout"])["measured"]
        m["process_peak_rss_mib"] = r["peak_rss_mib"]
        m["wall_s"] = r["wall_s"]
        runs.append(m)
        ple = m.get("ple") or {}
        print(f"  run {i + 1}: prefill {m['prefill_tok_s']:.1f} tok/s, decode {m['decode_tok_s']:.2f} tok/s, "
              f"TTFT {m['ttft_s']:.2f} s, peak RSS {m['peak_rss_mb'] / 1024:.2f} GiB, ple.bin in the process "
              f"{ple.get('resident_bytes', 0) / 2**20:.2f} MiB ({100 * ple.get('resident_fraction', 0):.3f} %), "
              f"in the page cache {(ple.get('page_cache_bytes') or 0) / 2**20:.2f} MiB "
              f"({100 * (ple.get('page_cache_fraction') or 0):.3f} %)", flush=True)

    def med(key, sub=None):
        vals = [(r.get(key) or {}).get(sub) if sub else r.get(key) for r in runs]
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None

    return {"command": " ".join(cmd), "runs": runs, "median": {
        "prefill_tok_s": med("prefill_tok_s"), "decode_tok_s": med("decode_tok_s"), "ttft_s": med("ttft_s"),
        "peak_rss_mb": med("peak_rss_mb"), "ple_resident_bytes": med("ple", "resident_bytes"),
        "ple_resident_fraction": med("ple", "resident_fraction"), "ple_file_bytes": med("ple", "file_bytes"),
        "ple_page_cache_bytes": med("ple", "page_cache_bytes"),
        "ple_page_cache_fraction": med("ple", "page_cache_fraction")}}


def evict_from_page_cache(path: Path) -> None:
    """Drop `path`'s clean pages from the page cache (POSIX_FADV_DONTNEED), so a run starts with the file cold."""
    if not path.is_file() or not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def profile(args) -> dict:
    """ORT's profiler on decoder.onnx: one prefill chunk, then decode steps; the top operators."""
    import numpy as np
    import onnxruntime as ort

    from edge_gemma.runtimes.onnx import CACHE_BUCKET

    manifest = json.loads((Path(args.artifact) / "manifest.json").read_text())
    entry = manifest["backends"]["onnx"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if args.threads <= 2:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(args.results).with_suffix("")) + ".ortprofile"
    sess = ort.InferenceSession(str(Path(args.artifact) / entry["files"]["decoder"]), sess_options=opts,
                                providers=["CPUExecutionProvider"])
    H = int(entry["hidden_size"])
    L, P = int(entry["ple"]["num_layers"]), int(entry["ple"]["dim"])
    chunk = int(entry["max_prefill_chunk"])
    # graphs with a dynamic slot count get what the runtime binds (the slots in use, rounded up to its bucket)
    inputs = {i.name: i.shape for i in sess.get_inputs()}
    dynamic = bool(entry["caches"]) and not isinstance(inputs[entry["caches"][0]["past_key"]][2], int)
    past = {}
    for c in entry["caches"]:
        shape = [int(x) for x in c["shape"]]
        if dynamic:
            shape[2] = min(shape[2], -(-(chunk + args.profile_steps) // CACHE_BUCKET) * CACHE_BUCKET)
        past[c["past_key"]] = np.zeros(shape, np.float32)
        past[c["past_value"]] = np.zeros(shape, np.float32)
    rng = np.random.default_rng(0)

    def feed(p0: int, s: int) -> dict:
        return {"inputs_embeds": rng.standard_normal((1, s, H), dtype=np.float32),
                "ple_rows": rng.standard_normal((1, s, L, P), dtype=np.float32) * 0.1,
                "positions": np.arange(p0, p0 + s, dtype=np.int64), "keep": np.asarray([s - 1], np.int64), **past}

    t0 = time.perf_counter()
    sess.run(None, feed(0, chunk))
    prefill_s = time.perf_counter() - t0
    steps = []
    for k in range(args.profile_steps):
        t0 = time.perf_counter()
        sess.run(None, feed(chunk + k, 1))
        steps.append(time.perf_counter() - t0)
    trace_path = sess.end_profiling()
    trace = json.loads(Path(trace_path).read_text())
    # Node events carry args.op_name; the first run is the prefill chunk, the rest decode steps.
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    runs.sort(key=lambda e: e["ts"])
    nodes = [e for e in trace if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]

    def top(events, key):
        agg: dict[str, float] = defaultdict(float)
        for e in events:
            agg[key(e)] += e["dur"]
        total = sum(agg.values()) or 1.0
        return [{"name": k, "us": v, "share": v / total} for k, v in sorted(agg.items(), key=lambda kv: -kv[1])[:15]]

    result = {"prefill_chunk": chunk, "prefill_chunk_s": prefill_s, "decode_step_s": steps,
              "trace": str(trace_path)}
    if runs:
        first_end = runs[0]["ts"] + runs[0]["dur"]
        pre = [e for e in nodes if e["ts"] <= first_end]
        dec = [e for e in nodes if e["ts"] > first_end]
        result["prefill_by_op"] = top(pre, lambda e: e["args"].get("op_name", "?"))
        result["decode_by_op"] = top(dec, lambda e: e["args"].get("op_name", "?"))
        result["decode_by_node"] = top(dec, lambda e: e["name"][: -len("_kernel_time")])
    for title in ("decode_by_op", "prefill_by_op", "decode_by_node"):
        print(f"{title}:")
        for row in result.get(title, [])[:12]:
            print(f"  {row['name'][:70]:70s} {row['us'] / 1000:9.1f} ms  {100 * row['share']:5.1f} %")
    print(f"prefill chunk of {chunk}: {prefill_s:.2f} s; decode steps: "
          f"{', '.join(f'{s * 1000:.0f}' for s in steps)} ms")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="float or quantized checkpoint to export (needed unless --skip-export)")
    ap.add_argument("--artifact", required=True, help="artifact directory to write / measure")
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--no-check", action="store_true", help="export without the fidelity check")
    ap.add_argument("--text-only", action="store_true", help="export the text graphs only (no vision/audio)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-export", action="store_true", help="measure an existing artifact")
    ap.add_argument("--warm-ple", action="store_true", help="do not evict ple.bin from the page cache before a run")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also profile the decoder graph with ORT's profiler")
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--results", default=None, help="JSON file for every figure (default ARTIFACT.bench.json)")
    args = ap.parse_args(argv)
    args.results = args.results or str(Path(args.artifact).with_suffix(".bench.json"))
    result: dict = {"args": {k: v for k, v in vars(args).items()}, "cpus": os.cpu_count(),
                    "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if not args.skip_export:
        if not args.checkpoint:
            ap.error("--checkpoint is needed to export (or pass --skip-export)")
        result["export"] = export(args)
    result["disk"] = disk_usage(Path(args.artifact))
    print(f"artifact on disk: {result['disk']['total_bytes'] / 2**30:.2f} GiB "
          + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in result["disk"]["entries"].items()))
    if not args.skip_bench:
        result["bench"] = bench(args)
        m = result["bench"]["median"]
        print(f"median of {args.runs}: prefill {m['prefill_tok_s']:.1f} tok/s, decode {m['decode_tok_s']:.2f} tok/s, "
              f"TTFT {m['ttft_s']:.2f} s, peak RSS {m['peak_rss_mb'] / 1024:.2f} GiB")
    if args.profile:
        result["profile"] = profile(args)
    tmp = Path(args.results).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, args.results)
    print(f"figures: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
