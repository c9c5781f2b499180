"""Speculative decoding at full size: what a draft step and verify calls of k = 1..8 tokens cost, the speed-up they
give at acceptance rates from 30 % to 90 %, and `--draft auto` against `--draft off` with an oracle drafter.

Random weights make a real drafter's acceptance meaningless, so acceptance is imposed: `OracleBackend` wraps the
artifact's backend; every verify call runs the real target, then each draft is made to agree with the target's greedy
choice with probability `alpha` (the drafts are accepted left to right, each with that probability, as the model of
step 2 assumes). (Proposing the target's own continuation from a plain run does not work with random weights: the
top-2 logit margins are so small that a verify call, which runs k + 1 tokens through other kernels than a one-token
step, flips a greedy choice within a few tokens, after which such an oracle is never right again.) A draft step
costs what `--draft-cost-ms` says (the backend's real drafter is called for its cost when the artifact has one;
otherwise the oracle sleeps that long). The generated tokens are the oracle's, not the model's: this measures time.

1. Costs, in one process after a `--prompt-tokens` prefill: a plain decode step, `verify` of k + 1 tokens for
   k = 1..8, and the artifact's draft step when it has a drafter (medians of `--repeats` calls).
2. The model: tokens per second of k drafts at acceptance a, `(1 + a + .. + a^k) / (k t_d + t_v(k))`, against plain
   decoding's `1 / t_1` (`runtimes/speculative.DraftController.expected_rate` with the measured t_v(k)).
3. The oracle, end to end: `--new-tokens` greedy tokens with `--draft auto` and `--draft off` at each acceptance,
   interleaved, `--rounds` times (the prompt's cache is reused, so decode is what differs); decode tok/s medians
   (`auto`'s decode time includes the draft steps, the verify calls and the controller).

    python benchmarks/bench_speculative.py ARTIFACT [--backend onnx] [--threads 2] [--prompt-tokens 512] \\
        [--new-tokens 128] [--draft-cost-ms MS] [--rounds 3] [--json OUT.json] [--plot OUT.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ALPHAS = (0.3, 0.5, 0.7, 0.9)
KS = tuple(range(1, 9))


class OracleBackend:
    """The inner backend with acceptance imposed (module docstring): `draft` proposes a random token (after calling
    the real drafter for its cost, or sleeping `cost_s`), and `verify` runs the real target, then makes its greedy
    choice at each draft agree with the draft with probability `alpha` (that row's argmax set to the draft) or not
    (the draft's logit lowered below the row's maximum). The last row, the target's own next token, is left alone."""

    def __init__(self, inner, alpha: float, cost_s: float, seed: int = 0):
        from dataclasses import replace

        self.inner, self.alpha, self.cost_s = inner, alpha, cost_s
        self.name = f"oracle({inner.name})"
        self.capabilities = replace(inner.capabilities, drafter=True)
        self.rng = np.random.default_rng(seed)
        self.proposed: list[int] = []  # this round's drafts (the engine takes each draft's argmax)

    def __getattr__(self, name):  # embed, prefill, decode, reset, last_hidden: the inner backend's
        return getattr(self.inner, name)

    def draft(self, token_embed, hidden, position):
        if self.inner.capabilities.drafter:
            _, hidden = self.inner.draft(token_embed, hidden, position)  # the real drafter's cost
        else:
            time.sleep(self.cost_s)
        logits = np.zeros(self.capabilities.vocab_size, np.float32)
        self.proposed.append(int(self.rng.integers(100, self.capabilities.vocab_size)))
        logits[self.proposed[-1]] = 1.0
        return logits, hidden

    def verify(self, embeds, ple_rows, positions):
        logits, hidden = self.inner.verify(embeds, ple_rows, positions)
        drafts, self.proposed = self.proposed, []
        for j, d in enumerate(drafts):
            row = logits[j]
            top = float(row.max())
            if self.rng.random() < self.alpha:
                row[d] = top + 1.0
            elif row[d] >= top:
                row[d] = top - 1.0
        return logits, hidden


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: the first call pays page faults and allocations
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def measure_costs(model, prompt_tokens: int, repeats: int) -> dict:
    engine, backend = model.engine, model.engine.backend
    ids = np.arange(prompt_tokens) % 1000 + 100  # ordinary tokens
    engine.generate_ids(ids, options=model.options(max_new_tokens=1, draft="off", ignore_eos=True)).result()
    P = prompt_tokens

    def inputs(n: int):
        tid = np.full(n, 200, np.int64)
        return (np.asarray(backend.embed(tid), np.float32), engine.ple.gather(tid), np.arange(P, P + n))

    costs = {"decode_ms": _median_ms(lambda: backend.decode(*inputs(1)), repeats)}
    costs["verify_ms"] = {k: _median_ms(lambda k=k: backend.verify(*inputs(k + 1)), repeats) for k in KS}
    costs["draft_ms"] = None
    if backend.capabilities.drafter:
        emb, hidden = inputs(1)[0][0], backend.last_hidden()
        costs["draft_ms"] = _median_ms(lambda: backend.draft(emb, hidden, P), repeats)
    engine.reset()
    return costs


def speedups(costs: dict, draft_ms: float) -> dict:
    t1 = costs["decode_ms"]
    out = {}
    for a in ALPHAS:
        row = {}
        for k in KS:
            tokens = sum(a**i for i in range(k + 1))
            row[k] = tokens / (k * draft_ms + costs["verify_ms"][k]) * t1
        out[a] = row
    return out


def oracle_runs(model, args, draft_ms: float) -> dict:
    engine = model.engine
    inner = engine.backend
    ids = np.arange(args.prompt_tokens) % 1000 + 100
    engine.generate_ids(ids, options=model.options(max_new_tokens=1, draft="off", ignore_eos=True)).result()
    results: dict = {a: {"auto": [], "off": [], "draft_len": [], "acceptance": []} for a in ALPHAS}
    try:
        for r in range(args.rounds):
            for a in ALPHAS:
                for mode in ("off", "auto"):
                    engine.backend = OracleBackend(inner, a, draft_ms / 1000, seed=r)
                    done = engine.generate_ids(ids, options=model.options(max_new_tokens=args.new_tokens, draft=mode,
                                                                          ignore_eos=True)).result()
                    results[a][mode].append(done.stats.decode_tok_s)
                    drafted = mode == "auto" and done.stats.draft_len is not None
                    if drafted:
                        results[a]["draft_len"].append(done.stats.draft_len)
                        results[a]["acceptance"].append(done.stats.draft_acceptance)
                    print(f"round {r + 1} alpha {a:.1f} {mode:4s}: decode {done.stats.decode_tok_s:.2f} tok/s"
                          + (f", {done.stats.draft_len:.2f} drafts/round, {done.stats.draft_acceptance:.0%} accepted"
                             if drafted else ""), flush=True)
    finally:
        engine.backend = inner
    return results


def plot(path: Path, table: dict, oracle: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for k in KS:
        ax.plot(ALPHAS, [table[a][k] for a in ALPHAS], marker=".", lw=1, label=f"k={k} (model)")
    ratio = [statistics.median(oracle[a]["auto"]) / statistics.median(oracle[a]["off"]) for a in ALPHAS]
    ax.plot(ALPHAS, ratio, "k*-", ms=10, lw=2, label="auto / off (oracle, measured)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("acceptance of each draft")
    ax.set_ylabel("decode speed-up over plain decoding")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--backend", default="onnx")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--draft-cost-ms", type=float, default=None,
                    help="cost of one draft step without a real drafter (default: 10 %% of a plain decode step)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from edge_gemma import api

    with api.open(args.artifact, backend=args.backend, threads=args.threads) as model:
        costs = measure_costs(model, args.prompt_tokens, args.repeats)
        draft_ms = costs["draft_ms"] if costs["draft_ms"] is not None else (
            args.draft_cost_ms if args.draft_cost_ms is not None else 0.1 * costs["decode_ms"])
        print(f"plain decode step {costs['decode_ms']:.1f} ms; draft step {draft_ms:.1f} ms "
              f"({'measured' if costs['draft_ms'] is not None else 'assumed'})")
        print("| k | " + " | ".join(str(k) for k in KS) + " |\n|---|" + "---|" * len(KS))
        print("| verify ms | " + " | ".join(f"{costs['verify_ms'][k]:.1f}" for k in KS) + " |")
        table = speedups(costs, draft_ms)
        for a in ALPHAS:
            print(f"| speed-up at {a:.0%} | " + " | ".join(f"{table[a][k]:.2f}" for k in KS) + " |")
        oracle = oracle_runs(model, args, draft_ms)
    print("\n| acceptance | off tok/s | auto tok/s | auto / off | auto drafts per round |\n|---|---|---|---|---|")
    for a in ALPHAS:
        off, auto = statistics.median(oracle[a]["off"]), statistics.median(oracle[a]["auto"])
        lens = oracle[a]["draft_len"]
        print(f"| {a:.0%} | {off:.2f} | {auto:.2f} | {auto / off:.3f} | "
              f"{statistics.median(lens) if lens else 0:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"costs": costs, "draft_ms": draft_ms, "speedups": table,
                                         "oracle": oracle, "settings": vars(args)}, indent=1, default=str))
    if args.plot:
        plot(args.plot, table, oracle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
