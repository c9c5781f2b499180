#!/usr/bin/env python
"""Quantization quality of the embedded default model: fp32 vs int8 / int4 round-to-nearest / int4 GPTQ.

Two jobs:

* ``--make-data`` writes the two texts ``tests/test_quant_quality.py`` uses (the test must not read the stdlib):
  ``edge_gemma/data/text/heldout.txt``: docstrings of the modules ``scripts/train_default_model.py`` holds out
  (every 20th stdlib module; the model never saw them), in the training document format (half chat turns, half
  ``<bos>doc<eos>``); ``calibration.txt``: docstrings of *training* modules (a different source from the evaluation
  text: other modules, never the held-out ones), same format. Both are cut to whole documents.
* otherwise prints the quality table (``quality_table``; the test asserts on the same numbers).

Activations: for int4 linears the report emulates what the backends do at run time, int8 dynamic activation
quantization (XNNPACK's dynamically quantized linear, ORT ``MatMulNBits`` ``accuracy_level=4``): see
``edge_gemma.quantize.calibrate.activation_quant``.

    .venv/bin/python benchmarks/bench_quant_quality.py --make-data
    .venv/bin/python benchmarks/bench_quant_quality.py [--act-quant per-token|per-block|none] [--damp 0.01]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "edge_gemma" / "data" / "text"
HELDOUT_CHARS = 60_000
CALIBRATION_CHARS = 60_000


def make_data() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    import train_default_model as tdm  # the training split, reused (held-out = every 20th module)

    corpus = tdm.load_corpus()
    affixes = tdm.chat_affixes(tdm.OUT_DIR)
    heldout = tdm.documents(corpus.heldout, affixes)
    # calibration: training-split documents taken with a stride, so they span many modules
    train = tdm.documents(corpus.train, affixes)
    stride = max(1, len(train) // 400)
    calibration = train[::stride]
    heldout_names = {name for name, _ in corpus.heldout}
    assert not heldout_names & {name for name, _ in corpus.train[::stride]}
    DATA.mkdir(parents=True, exist_ok=True)
    for name, docs, limit in (("heldout.txt", heldout, HELDOUT_CHARS), ("calibration.txt", calibration,
                                                                          CALIBRATION_CHARS)):
        text, n = "", 0
        for d in docs:
            if len(text) + len(d) > limit:
                break
            text += d
            n += 1
        (DATA / name).write_text(text, encoding="utf-8")
        print(f"wrote {DATA / name}: {n} documents, {len(text)} characters")


def quality_table(*, act_quant: str = "per-token", damp: float = 0.01, act_order: bool = False, seq_len: int = 256,
                  eval_sequences: int = 24, calib_sequences: int = 32, checkpoint: Path | None = None,
                  extra_recipes: tuple[str, ...] = ()) -> dict:
    """fp32 / int8 / int4 RTN / int4 GPTQ (and RTN of each of `extra_recipes`, e.g. int4-g128) on the held-out text;
    returns name -> ModelQuality as a dict."""
    import torch

    from edge_gemma.checkpoint import load_model
    from edge_gemma.config import load_config
    from edge_gemma.paths import DEFAULT_CHECKPOINT
    from edge_gemma.quantize.calibrate import (activation_quant, apply_quantized, gptq_quantize_checkpoint,
                                               model_quality, token_batches)
    from edge_gemma.quantize.stream import quantize_checkpoint
    from edge_gemma.tokenizer import Tokenizer

    torch.manual_seed(0)
    src = checkpoint or DEFAULT_CHECKPOINT
    layout = load_config(src).model_type
    tok = Tokenizer.from_dir(src)
    evaluation = token_batches(tok.encode((DATA / "heldout.txt").read_text(encoding="utf-8")), seq_len, eval_sequences)
    calibration = token_batches(tok.encode((DATA / "calibration.txt").read_text(encoding="utf-8")), seq_len,
                                calib_sequences)
    reference = load_model(src, text_only=True)
    out: dict = {"eval_tokens": sum(int(b.numel()) - 1 for b in evaluation),
                 "calibration_tokens": sum(int(b.numel()) for b in calibration), "act_quant": act_quant}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"int8": ("int8", "rtn"), "int4-rtn": ("int4", "rtn"), "int4-gptq": ("int4", "gptq"),
                **{f"{r}-rtn": (r, "rtn") for r in extra_recipes}}
        for name, (recipe, algo) in runs.items():
            qdir = Path(tmp) / name
            t0 = time.perf_counter()
            if algo == "rtn":
                quantize_checkpoint(src, recipe, qdir, progress=False)
            else:
                gptq_quantize_checkpoint(src, recipe, qdir, calibration, damp=damp, act_order=act_order,
                                         progress=False)
            seconds = time.perf_counter() - t0
            quant = apply_quantized(load_model(src, text_only=True), qdir, layout=layout)
            handles = activation_quant(quant, qdir, layout=layout, mode=act_quant) if recipe.startswith("int4") else []
            q = model_quality(reference, quant, evaluation)
            for h in handles:
                h.remove()
            out[name] = {**q.__dict__, "quantize_seconds": seconds}
    out["fp32_ppl"] = out["int8"]["ppl_float"]
    rtn_inc = out["int4-rtn"]["ppl_quant"] - out["fp32_ppl"]
    gptq_inc = out["int4-gptq"]["ppl_quant"] - out["fp32_ppl"]
    out["gptq_over_rtn_ppl_increase"] = gptq_inc / rtn_inc if rtn_inc > 0 else float("nan")
    return out


def markdown(r: dict) -> str:
    rows = [f"| fp32 (reference) | {r['fp32_ppl']:.3f} | — | — | — | — |"]
    extra = [(name, f"{name[:-4]}, RTN") for name in r if name.endswith("-rtn") and name != "int4-rtn"]
    for name, label in (("int8", "int8 per-channel, RTN"), ("int4-rtn", "int4 g32, RTN"),
                        ("int4-gptq", "int4 g32, GPTQ"), *extra):
        q = r[name]
        rows.append(f"| {label} | {q['ppl_quant']:.3f} | {q['ppl_quant'] - r['fp32_ppl']:+.3f} | "
                    f"{q['kl_mean']:.5f} | {100 * q['top1_agreement']:.2f} % | {q['max_abs_logit_diff']:.3f} |")
    head = ("| model | held-out perplexity | increase | mean KL (nats) | top-1 agreement | max abs logit diff |\n"
            "|---|---:|---:|---:|---:|---:|")
    return head + "\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--make-data", action="store_true")
    p.add_argument("--act-quant", default="per-token", choices=("none", "per-token", "per-block"))
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--calib-sequences", type=int, default=32)
    p.add_argument("--eval-sequences", type=int, default=24)
    p.add_argument("--extra-recipes", nargs="*", default=[], metavar="RECIPE",
                   help="also round-to-nearest with these recipes (e.g. int4-g64 int4-g128 int4-emb4)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.make_data:
        make_data()
        return 0
    t0 = time.perf_counter()
    r = quality_table(act_quant=args.act_quant, damp=args.damp, act_order=args.act_order,
                      calib_sequences=args.calib_sequences, eval_sequences=args.eval_sequences,
                      extra_recipes=tuple(args.extra_recipes))
    print(json.dumps(r, indent=1) if args.json else markdown(r))
    print(f"eval tokens {r['eval_tokens']}, calibration tokens {r['calibration_tokens']}, act quant {r['act_quant']}, "
          f"GPTQ/RTN ppl increase {r['gptq_over_rtn_ppl_increase']:.3f}, {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
