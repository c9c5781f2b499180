"""`make bench-peers [CHECKPOINT=dir]`: the peers and our backends side by side, in one period, interleaved.

What it does (everything expensive is cached under `--cache`, keyed by the checkpoint, so a rerun only benchmarks):

1. The checkpoint: `--checkpoint DIR`, or the synthetic full-size E2B (`benchmarks/make_synthetic_checkpoint.py`,
   text-only, random weights: the same speed and memory as the real ones) with the real Gemma 4 tokenizer
   (`tests/data/gemma4_tokenizer/`).
2. llama.cpp, from the source distribution of `llama-cpp-python` (it vendors llama.cpp with Gemma 4): `llama-bench`
   and `llama-quantize` built with cmake (`-DGGML_NATIVE=ON -DLLAMA_CURL=OFF`, Ninja, 2 jobs); its own
   `convert_hf_to_gguf.py` (its `gguf-py` on `PYTHONPATH`) to BF16, then `llama-quantize` to Q4_0 and Q4_K_M.
3. Ours: `edge-gemma quantize --recipe int4` once, then one text-only artifact with every backend
   (`edge-gemma export --backends onnx,executorch,litert --text-only --no-check`); for `ours/onnx-mixed48` and
   `litert-lm/ours-mixed48` the same with our `gemma4-mixed48` recipe (every tensor at least as precise as in
   LiteRT-LM's `gemma4_mixed48`), ONNX and LiteRT only.
4. LiteRT-LM on Google's own bundles: `litert-torch`'s Gemma 4 exporter on the same checkpoint, one process per
   stage (`google_bundle.py`: float32 graphs, then ai-edge-quantizer, then packaging; in one process the stock
   exporter needs more than 24 GB for E2B), with the `dynamic_wi4b32_afp32` recipe and LiteRT-LM's own
   `gemma4_mixed48`; the KV cache as long as our artifact's context (`--context`), the prefill signature 512.
5. `--rounds` rounds; each round runs every runtime once, in a fresh process, after dropping the page cache of its
   model files (`posix_fadvise(DONTNEED)`): llama.cpp through `llama-bench -p P -n N -r 1 -o json` (its time to
   first token is P / prefill speed + 1 / decode speed: llama-bench reports speeds only), ours through
   `edge-gemma bench --json --ignore-eos` (TTFT as `GenerationStats.ttft_s` measures it), LiteRT-LM through its own
   `Session.get_benchmark_info()` on a raw session (benchmarks/bench_litert.py's child script), after one uncounted
   warm-up run that builds its XNNPACK weight cache. Peak RSS is the process's (the helper's `RUSAGE_CHILDREN`),
   measured the same way for every runtime.

Writes `--out`.json (`{"date", "machine", "checkpoint", "threads", "prompt_tokens", "new_tokens", "results"}`: one
record per runtime with the medians `prefill_tok_s`, `decode_tok_s`, `ttft_s`, `peak_rss_gib`, `file_size_gib`,
each also `_min` / `_max`, and `runs`; or `error`), `--out`.md (the table) and `--out`.png (grouped bars per metric).
Not part of CI or `make test`: the first run takes hours and tens of GB of disk.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import lzma
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
CLI = str(Path(sys.executable).with_name("edge-gemma"))
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
METRICS = ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_gib")
GOOGLE_RECIPES = {"litert-lm/google-int4": "dynamic_wi4b32_afp32", "litert-lm/google-mixed48": "gemma4_mixed48"}
# ours: runtime -> (artifact key, backend, what it reads under the artifact); OUR_RECIPES: artifact key -> recipe
OUR_RECIPES = {"int4": "int4", "mixed48": "gemma4-mixed48"}
OURS = {"litert-lm/ours-int4": ("int4", "litert-lm", "litert/model.litertlm"),
        "litert-lm/ours-mixed48": ("mixed48", "litert-lm", "litert/model.litertlm"),
        "ours/onnx": ("int4", "onnx", "onnx"), "ours/executorch": ("int4", "executorch", "executorch"),
        "ours/litert": ("int4", "litert", "litert"), "ours/onnx-mixed48": ("mixed48", "onnx", "onnx")}
EXPORTED = {"onnx": "onnx", "executorch": "executorch", "litert": "litert", "litert-lm": "litert"}
ALL_RUNTIMES = ("llama.cpp-q4_0", "llama.cpp-q4_k_m", *GOOGLE_RECIPES, *OURS)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(cmd: list[str], *, log_file: Path, env: dict | None = None, cwd: Path | None = None) -> None:
    """Run a build step, its output into `log_file`; a failure names the log."""
    log("$ " + " ".join(map(str, cmd)))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("w") as f:
        r = subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    if r.returncode != 0:
        last = next((line.strip() for line in reversed(log_file.read_text(errors="replace").splitlines())
                     if line.strip()), "")
        raise RuntimeError(f"{Path(str(cmd[0])).name} failed with status {r.returncode} ({last[:300]}); see {log_file}")


def _child_rss(cmd: list[str]) -> tuple[str, float]:
    """Run `cmd` under a fresh helper process that reports the child's peak RSS (`RUSAGE_CHILDREN` of the helper:
    the largest of its children, and it has one) -> (stdout, GiB)."""
    helper = ("import json,os,resource,subprocess,sys\n"
              "p=subprocess.run(sys.argv[1:],capture_output=True,text=True)\n"
              "rss=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
              "print(json.dumps({'rc':p.returncode,'out':p.stdout,'err':p.stderr[-2000:],'rss_kib':rss}))\n")
    r = subprocess.run([PY, "-c", helper, *map(str, cmd)], capture_output=True, text=True, check=True)
    res = json.loads(r.stdout)
    if res["rc"] != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({res['rc']}): {res['err']}")
    return res["out"], res["rss_kib"] / 2**20


def evict(paths: list[Path]) -> None:
    """Drop the page cache of these files (cold start for the next run)."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_under(*roots: Path) -> list[Path]:
    out = []
    for r in roots:
        out += [r] if r.is_file() else [p for p in r.rglob("*") if p.is_file()]
    return out


def gib(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / 2**30


# ------------------------------------------------------------------------------------------------ the checkpoint
def checkpoint(args) -> Path:
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
    else:
        ckpt = args.cache / "checkpoints" / "e2b-synthetic"
        if not (ckpt / "config.json").is_file():
            sh([PY, REPO / "benchmarks" / "make_synthetic_checkpoint.py", "--variant", "e2b", "--text-only",
                "--out", ckpt, "--overwrite"], log_file=args.cache / "logs" / "synthetic.log")
    tok = REPO / "tests" / "data" / "gemma4_tokenizer"
    if not (ckpt / "tokenizer.json").is_file():  # the real Gemma 4 tokenizer (llama.cpp's converter reads it)
        (ckpt / "tokenizer.json").write_bytes(lzma.decompress((tok / "tokenizer.json.xz").read_bytes()))
        for name in ("tokenizer_config.json", "chat_template.jinja"):
            if not (ckpt / name).is_file():
                shutil.copyfile(tok / name, ckpt / name)
    return ckpt


def checkpoint_key(ckpt: Path) -> str:
    h = hashlib.sha256((ckpt / "config.json").read_bytes())
    for p in sorted(ckpt.glob("*.safetensors")):
        h.update(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode())
    return h.hexdigest()[:12]


# ------------------------------------------------------------------------------------------------ llama.cpp
def llama_cpp(args, ckpt: Path, work: Path) -> dict[str, Path]:
    src = args.cache / "llama-cpp-python"
    vendor = src / "vendor" / "llama.cpp"
    if not vendor.is_dir():
        dl = args.cache / "dl"
        dl.mkdir(parents=True, exist_ok=True)
        if not list(dl.glob("llama_cpp_python-*.tar.gz")):
            sh([PY, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", LLAMA_CPP_PYTHON, "-d", dl],
               log_file=args.cache / "logs" / "llama-download.log")
        tarball = sorted(dl.glob("llama_cpp_python-*.tar.gz"))[-1]
        tmp = args.cache / "llama-cpp-python.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.unpack_archive(tarball, tmp)
        next(tmp.iterdir()).rename(src)
        shutil.rmtree(tmp)
    build = args.cache / "llama.cpp-build"
    bins = {name: build / "bin" / name for name in ("llama-bench", "llama-quantize")}
    if not all(p.is_file() for p in bins.values()):
        sh(["cmake", "-S", vendor, "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
            "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
            "-DLLAMA_BUILD_TOOLS=ON"], log_file=args.cache / "logs" / "llama-configure.log")
        sh(["cmake", "--build", build, "-j", "2", "--target", "llama-bench", "llama-quantize"],
           log_file=args.cache / "logs" / "llama-build.log")
    gguf = work / "gguf"
    gguf.mkdir(parents=True, exist_ok=True)
    bf16 = gguf / "model-BF16.gguf"
    wanted = [gguf / f"model-{q}.gguf" for q in ("Q4_0", "Q4_K_M")]
    if not bf16.is_file() and not all(p.is_file() for p in wanted):  # the BF16 file only feeds llama-quantize
        env = {**os.environ, "PYTHONPATH": str(vendor / "gguf-py")}
        tmp = bf16.with_suffix(".tmp")
        sh([PY, vendor / "convert_hf_to_gguf.py", ckpt, "--outtype", "bf16", "--outfile", tmp], env=env,
           log_file=work / "logs" / "convert.log")
        tmp.rename(bf16)
    out = {}
    for q in ("Q4_0", "Q4_K_M"):
        path = gguf / f"model-{q}.gguf"
        if not path.is_file():
            tmp = path.with_suffix(".tmp")
            sh([bins["llama-quantize"], bf16, tmp, q, "2"], log_file=work / "logs" / f"quantize-{q}.log")
            tmp.rename(path)
        out[q] = path
    out["bench"] = bins["llama-bench"]
    return out


def bench_llama(bench: Path, gguf: Path, args) -> dict:
    out, rss = _child_rss([bench, "-m", gguf, "-t", args.threads, "-p", args.prompt_tokens, "-n", args.new_tokens,
                           "-r", "1", "-o", "json"])
    rows = json.loads(out)
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return {"prefill_tok_s": pp, "decode_tok_s": tg, "ttft_s": args.prompt_tokens / pp + 1 / tg, "peak_rss_gib": rss}


# ------------------------------------------------------------------------------------------------ ours
def ours(args, ckpt: Path, work: Path, backends: list[str], key: str = "int4", recipe: str = "int4") -> Path:
    """Our text-only artifact of `ckpt` quantized with `recipe`, holding at least `backends` (cached as
    `ours-<key>`)."""
    quantized = work / f"ours-{key}-quantized"
    if not (quantized / "quant_manifest.json").is_file():
        sh([CLI, "quantize", ckpt, "--recipe", recipe, "--out", quantized, "--force", "--no-progress"],
           log_file=work / "logs" / f"ours-{key}-quantize.log")
    artifact = work / f"ours-{key}"
    manifest = artifact / "manifest.json"
    stamp = work / f"ours-{key}.exporter-sha256"  # the sources that wrote the artifact (beside it, not in it)
    digest = f"{exporter_digest()} context {args.context}"
    fresh = stamp.is_file() and stamp.read_text().strip() == digest
    have = set(json.loads(manifest.read_text())["backends"]) if manifest.is_file() and fresh else set()
    if not set(backends) <= have:
        sh([CLI, "export", quantized, "--backends", ",".join(sorted(set(backends) | have)), "--out", artifact,
            "--context", args.context, "--text-only", "--no-check", "--no-progress", "--force"],
           log_file=work / "logs" / f"ours-{key}-export.log")
        stamp.write_text(digest + "\n")
    return artifact


def exporter_digest() -> str:
    """sha256 over the sources that decide what an artifact holds (the model, the exporters, the quantizer, the
    artifact format): a cached artifact written by other code is exported again."""
    h = hashlib.sha256()
    for folder in ("edge_gemma", "export", "quantize"):
        for path in sorted((REPO / folder).rglob("*.py")):
            h.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def bench_ours(artifact: Path, backend: str, args) -> dict:
    out, rss = _child_rss([CLI, "bench", artifact, "--backend", backend, "--threads", args.threads,
                           "--prompt-tokens", args.prompt_tokens, "--new-tokens", args.new_tokens, "--ignore-eos",
                           "--json"])
    m = json.loads(out)["measured"]
    return {"prefill_tok_s": m["prefill_tok_s"], "decode_tok_s": m["decode_tok_s"], "ttft_s": m["ttft_s"],
            "peak_rss_gib": rss}


# ------------------------------------------------------------------------------------------------ Google's bundles
def google_bundle(args, ckpt: Path, work: Path, recipe: str) -> Path:
    """LiteRT-LM bundle of `ckpt` made by litert-torch's exporter with an ai-edge-quantizer recipe, one stage per
    process; each stage's result is kept until the bundle is written, so a failed run resumes where it stopped."""
    final = work / f"google-{recipe}-c{args.context}.litertlm"
    if final.is_file():
        return final
    stages = work / f"google-{recipe}-c{args.context}.stages"
    script = [PY, REPO / "benchmarks" / "peers" / "google_bundle.py"]
    common = ["--checkpoint", ckpt, "--out", stages, "--recipe", recipe, "--cache-length", args.context]

    def stage(name: str, *extra) -> Path:
        done = stages / f"{name}.done.json"
        if not done.is_file():
            log_file = work / "logs" / f"google-{recipe}-{name}.log"
            sh([*script, name.split(":")[0], *common, *extra], log_file=log_file)
            done.write_text(log_file.read_text().strip().splitlines()[-1])
        return Path(json.loads(done.read_text())["wrote"])

    quantized = {}
    for section in ("embedder", "decoder", "ple"):
        if (stages / f"quantize:{section}.done.json").is_file():
            quantized[section] = stage(f"quantize:{section}")
            continue
        float_model = stage(section)
        quantized[section] = stage(f"quantize:{section}", "--model", float_model, "--section", section)
        float_model.unlink(missing_ok=True)  # 9 GB each for the decoder and the per-layer embedder
    bundle = stage("package", "--models", json.dumps({k: str(v) for k, v in quantized.items()}))
    bundle.rename(final)
    shutil.rmtree(stages)
    return final


def bench_litert_lm(bundle: Path, args) -> dict:
    """LiteRT-LM's own benchmark figures (`Session.get_benchmark_info`) on a raw session: a P-token prompt, N greedy
    tokens (benchmarks/bench_litert.py's child script)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_litert import _LITERT_LM

    text = REPO / "edge_gemma" / "data" / "fidelity_heldout.txt"
    out, rss = _child_rss([PY, "-c", _LITERT_LM, bundle, args.threads, args.prompt_tokens, args.new_tokens, text])
    info = json.loads(out.strip().splitlines()[-1])["info"]
    return {"prefill_tok_s": info["last_prefill_tokens_per_second"],
            "decode_tok_s": info["last_decode_tokens_per_second"], "ttft_s": info["time_to_first_token_in_second"],
            "peak_rss_gib": rss}


# ------------------------------------------------------------------------------------------------ report
def summarize(name: str, runs: list[dict], size_gib: float) -> dict:
    rec: dict = {"runtime": name, "file_size_gib": size_gib, "file_size_gib_min": size_gib,
                 "file_size_gib_max": size_gib, "runs": runs}
    for k in METRICS:
        vals = [r[k] for r in runs]
        rec[k], rec[f"{k}_min"], rec[f"{k}_max"] = statistics.median(vals), min(vals), max(vals)
    return rec


def table(doc: dict) -> str:
    lines = [f"Side by side on {doc['machine']}, {doc['date']}: {doc['checkpoint']}, {doc['threads']} threads, "
             f"{doc['prompt_tokens']}-token prompt, {doc['new_tokens']} new tokens; medians of "
             f"{doc['rounds']} interleaved fresh processes (min-max). llama.cpp's time to first token is the prefill "
             "time plus one decode step (llama-bench reports speeds only).", "",
             "| runtime | prefill tok/s | decode tok/s | TTFT s | peak RSS GiB | files GiB |", "|---|---|---|---|---|---|"]
    for r in doc["results"]:
        if "error" in r:
            lines.append(f"| {r['runtime']} | {r['error']} | | | | |")
            continue
        cells = [f"{r[k]:.2f} ({r[k + '_min']:.2f}-{r[k + '_max']:.2f})" for k in METRICS]
        lines.append(f"| {r['runtime']} | " + " | ".join(cells) + f" | {r['file_size_gib']:.2f} |")
    return "\n".join(lines) + "\n"


def chart(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in doc["results"] if "error" not in r]
    keys = (*METRICS, "file_size_gib")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 4.5))
    for ax, k in zip(axes, keys):
        vals = [r[k] for r in ok]
        lo = [r[k] - r.get(f"{k}_min", r[k]) for r in ok]
        hi = [r.get(f"{k}_max", r[k]) - r[k] for r in ok]
        ax.bar(range(len(ok)), vals, yerr=[lo, hi], color=["tab:orange" if r["runtime"].startswith("ours")
                                                          or "ours" in r["runtime"] else "tab:blue" for r in ok])
        ax.set_xticks(range(len(ok)), [r["runtime"] for r in ok], rotation=60, ha="right", fontsize=8)
        ax.set_title(k)
    fig.suptitle(f"{doc['checkpoint']} ({doc['date'][:10]}, {doc['threads']} threads)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def machine() -> str:
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model or platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the synthetic E2B)")
    ap.add_argument("--cache", type=Path, default=REPO / ".cache" / "peers")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "peers-e2b-int4")
    ap.add_argument("--runtimes", default=",".join(ALL_RUNTIMES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--context", type=int, default=4096, help="KV cache length of every LiteRT-LM bundle and ours")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--build-only", action="store_true", help="build and cache everything, benchmark nothing")
    args = ap.parse_args(argv)
    wanted = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    unknown = sorted(set(wanted) - set(ALL_RUNTIMES))
    if unknown:
        ap.error(f"unknown runtime(s) {unknown}; known: {', '.join(ALL_RUNTIMES)}")
    args.cache.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(args)
    work = args.cache / checkpoint_key(ckpt)
    runners, errors = {}, {}
    if any(r.startswith("llama.cpp") for r in wanted):
        try:
            lc = llama_cpp(args, ckpt, work)
            for q in ("Q4_0", "Q4_K_M"):
                name = f"llama.cpp-{q.lower()}"
                runners[name] = (lambda g=lc[q]: bench_llama(lc["bench"], g, args), [lc[q]])
        except RuntimeError as exc:
            errors.update({f"llama.cpp-{q}": str(exc) for q in ("q4_0", "q4_k_m")})
    for key, recipe in OUR_RECIPES.items():
        mine = {name: how for name, how in OURS.items() if how[0] == key and name in wanted}
        if not mine:
            continue
        needed = sorted({EXPORTED[b] for _, b, _ in mine.values()})
        try:
            art = ours(args, ckpt, work, needed, key, recipe)
        except RuntimeError:  # one exporter refused (LiteRT takes one scheme per decoder linear): the others alone
            art = None
            for exported in needed:
                try:
                    art = ours(args, ckpt, work, [exported], key, recipe)
                except RuntimeError as exc:
                    errors.update({n: str(exc) for n, (_, b, _) in mine.items() if EXPORTED[b] == exported})
        if art is None:
            continue
        for name, (_, backend, folder) in mine.items():
            if name in errors:
                continue
            paths = files_under(art / folder) + ([art / "ple.bin"] if backend != "litert-lm" else [])
            if backend == "litert":  # our engine reads the .tflite models, not the bundle
                paths = [p for p in paths if p.suffix != ".litertlm"]
            if backend == "litert-lm":
                runners[name] = (lambda b=art / folder: bench_litert_lm(b, args), paths)
            else:
                runners[name] = (lambda a=art, b=backend: bench_ours(a, b, args), paths)
    for name, recipe in GOOGLE_RECIPES.items():
        if name not in wanted:
            continue
        try:
            bundle = google_bundle(args, ckpt, work, recipe)
            runners[name] = (lambda b=bundle: bench_litert_lm(b, args), [bundle])
        except RuntimeError as exc:
            errors[name] = str(exc)
    if args.build_only:
        return 0
    runs: dict[str, list[dict]] = {n: [] for n in wanted if n in runners}
    for name in runs:  # LiteRT-LM builds its XNNPACK weight cache on the first run: one warm-up, not counted
        if name.startswith("litert-lm/"):
            try:
                runners[name][0]()
            except RuntimeError as exc:
                errors[name] = str(exc).splitlines()[0][:300]
    for rnd in range(args.rounds):
        for name in runs:
            if name in errors:
                continue
            fn, paths = runners[name]
            evict(paths)
            try:
                m = fn()
            except RuntimeError as exc:
                errors[name] = str(exc).splitlines()[0][:300]
                continue
            runs[name].append(m)
            log(f"round {rnd + 1} {name}: prefill {m['prefill_tok_s']:.1f} decode {m['decode_tok_s']:.2f} tok/s, "
                f"TTFT {m['ttft_s']:.2f} s, {m['peak_rss_gib']:.2f} GiB")
    results = []
    for name in wanted:
        if name in runs and runs[name] and name not in errors:
            results.append(summarize(name, runs[name], gib(runners[name][1])))
        else:
            results.append({"runtime": name, "error": errors.get(name, "no run")})
    doc = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(),
           "checkpoint": "synthetic full-size E2B, random weights, text only" if not args.checkpoint else
           f"{ckpt} ({json.loads((ckpt / 'config.json').read_text()).get('architectures', ['?'])[0]})",
           "threads": args.threads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
           "rounds": args.rounds, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(table(doc))
    chart(doc, args.out.with_suffix(".png"))
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
