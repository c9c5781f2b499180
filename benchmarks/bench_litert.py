"""Issue 7 benchmarks: one LiteRT artifact, our LiteRT runtime and Google's LiteRT-LM engine side by side.

Steps (each in its own child process, so each peak RSS is that process's own, from `os.wait4`):

1. export (`--checkpoint`, skipped with `--skip-export`): `edge-gemma export CHECKPOINT --quant QUANT --backends
   litert --out ARTIFACT --context C --no-check`; wall time, CPU time and peak RSS.
2. ours: `edge-gemma bench ARTIFACT --backend litert --threads T --prompt-tokens P --new-tokens N --ignore-eos --json`
   (our engine on `ai_edge_litert` signature runners over `litert/*.tflite`, PLE rows from `ple.bin`).
3. litert-lm: `litert_lm.Engine(ARTIFACT/litert/model.litertlm, Backend.CPU(thread_count=T), enable_benchmark=True)`,
   a raw session (no chat template) prefilled with a P-token prompt (P-1 text tokens + the bundle's start token) and
   decoded for N tokens; the figures are LiteRT-LM's own `Session.get_benchmark_info()` (its TTFT, prefill and decode
   tokens per second), plus our wall clock around each call.

`--runs K` repeats steps 2 and 3 (alternating) and reports medians. Everything goes to `--results FILE` (JSON).

Usage:
    python benchmarks/bench_litert.py --artifact /work/artifacts/e2b-int4-litert --skip-export --threads 2 \
        --prompt-tokens 512 --new-tokens 128 [--runs 1] [--results benchmarks/results/litert_e2b.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_onnx import _cli, run_measured  # noqa: E402  (one copy of the measuring helpers)

# Runs in a child process: LiteRT-LM on the bundle, prints one JSON line.
_LITERT_LM = r"""
import json, sys, time
import litert_lm
bundle, threads, P, N, text_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
from pathlib import Path
from edge_gemma.runtimes.litert_lm import _cache_dir  # its XNNPACK cache goes where the runtime keeps it, never
litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)  # into the artifact's folder
t0 = time.perf_counter()
engine = litert_lm.Engine(bundle, litert_lm.Backend.CPU(thread_count=threads), enable_benchmark=True,
                          cache_dir=str(_cache_dir(Path(bundle))))
t_load = time.perf_counter() - t0
source = open(text_path).read()
while len(engine.tokenize(source)) < P:
    source = source + " " + source
ids = engine.tokenize(source)[: P - 1]  # + the start token LiteRT-LM prepends = P
prompt = engine.detokenize(ids)
n_prompt = len(engine.tokenize(prompt)) + 1
session = engine.create_session(apply_prompt_template=False, max_output_tokens=N,
                                sampler_config=litert_lm.SamplerConfig(top_k=1, temperature=0.0))  # greedy
t1 = time.perf_counter()
session.run_prefill([prompt])
t2 = time.perf_counter()
out = session.run_decode()
t3 = time.perf_counter()
info = session.get_benchmark_info()
n_out = len(engine.tokenize(out.texts[0])) if out.texts else 0
print(json.dumps({"load_s": t_load, "prompt_tokens": n_prompt, "generated_tokens_retokenized": n_out,
                  "wall_prefill_s": t2 - t1, "wall_decode_s": t3 - t2,
                  "info": {k: getattr(info, k) for k in ("init_time_in_second", "time_to_first_token_in_second",
                                                          "last_prefill_token_count", "last_prefill_tokens_per_second",
                                                          "last_decode_token_count", "last_decode_tokens_per_second")}}))
session.close()
engine.close()
"""


def export(args) -> dict:
    cmd = [*_cli(), "export", str(args.checkpoint), "--backends", "litert", "--out", str(args.artifact),
           "--context", str(args.context), "--no-progress", "--force", "--no-check"]
    if not (Path(args.checkpoint) / "quant_manifest.json").is_file():
        cmd += ["--quant", args.quant]
    print("$", " ".join(cmd), flush=True)
    r = run_measured(cmd, Path(args.results).with_suffix(".export.log"))
    r["command"] = " ".join(cmd)
    r.pop("stdout")
    if r["returncode"] != 0:
        raise SystemExit(f"export failed (status {r['returncode']}); see {Path(args.results).with_suffix('.export.log')}")
    print(f"export: {r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU, peak RSS {r['peak_rss_mib'] / 1024:.2f} GiB")
    return r


def ours(args, i: int) -> dict:
    cmd = [*_cli(), "bench", str(args.artifact), "--backend", "litert", "--threads", str(args.threads),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--ignore-eos", "--json"]
    print("$", " ".join(cmd), flush=True)
    r = run_measured(cmd, Path(args.results).with_suffix(f".ours{i}.log"))
    if r["returncode"] != 0:
        raise SystemExit(f"our bench failed (status {r['returncode']}); see the .ours{i}.log next to {args.results}")
    m = json.loads(r["stdout"])["measured"]
    return {"command": " ".join(cmd), "prefill_tok_s": m["prefill_tok_s"], "decode_tok_s": m["decode_tok_s"],
            "ttft_s": m["ttft_s"], "peak_rss_mib": r["peak_rss_mib"], "wall_s": r["wall_s"], "measured": m}


def litert_lm(args, i: int) -> dict:
    bundle = Path(args.artifact) / "litert" / "model.litertlm"
    text = REPO / "edge_gemma" / "data" / "fidelity_heldout.txt"
    cmd = [sys.executable, "-c", _LITERT_LM, str(bundle), str(args.threads), str(args.prompt_tokens),
           str(args.new_tokens), str(text)]
    print(f"$ {sys.executable} -c <LiteRT-LM benchmark> {bundle} {args.threads} {args.prompt_tokens} "
          f"{args.new_tokens}", flush=True)
    r = run_measured(cmd, Path(args.results).with_suffix(f".litertlm{i}.log"))
    if r["returncode"] != 0:
        raise SystemExit(f"LiteRT-LM failed (status {r['returncode']}); see the .litertlm{i}.log next to "
                         f"{args.results}")
    m = json.loads(r["stdout"].strip().splitlines()[-1])
    info = m["info"]
    return {"prefill_tok_s": info["last_prefill_tokens_per_second"],
            "decode_tok_s": info["last_decode_tokens_per_second"], "ttft_s": info["time_to_first_token_in_second"],
            "peak_rss_mib": r["peak_rss_mib"], "wall_s": r["wall_s"], "measured": m}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, help="export this checkpoint first (else --skip-export)")
    ap.add_argument("--skip-export", action="store_true")
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "litert.json")
    args = ap.parse_args(argv)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    if not args.skip_export:
        if not args.checkpoint:
            raise SystemExit("--checkpoint is needed unless --skip-export")
        results["export"] = export(args)
    runs: dict[str, list[dict]] = {"ours": [], "litert_lm": []}
    for i in range(args.runs):
        runs["ours"].append(ours(args, i))
        runs["litert_lm"].append(litert_lm(args, i))
    results["runs"] = runs
    print(f"\n{'runtime':<34} {'prefill tok/s':>14} {'decode tok/s':>13} {'TTFT s':>8} {'peak RSS MiB':>13}")
    for key, label in (("ours", "edge-gemma LiteRT runtime"), ("litert_lm", "LiteRT-LM Engine (same bundle)")):
        med = {k: statistics.median(r[k] for r in runs[key])
               for k in ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mib")}
        results.setdefault("median", {})[key] = med
        print(f"{label:<34} {med['prefill_tok_s']:>14.1f} {med['decode_tok_s']:>13.2f} {med['ttft_s']:>8.2f} "
              f"{med['peak_rss_mib']:>13.0f}")
    tmp = args.results.with_name(args.results.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, args.results)
    print(f"results: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
