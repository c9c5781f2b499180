"""Speculative decoding, the backend-agnostic parts: the `--draft` setting and the draft-length controller.

The engine's loop (`engine.py`) drafts k tokens with the artifact's drafter at the position of the last token
(`Backend.draft`), runs the target once over the last token and the drafts (`Backend.verify`), keeps the drafts up to
the first one the target's own choice disagrees with, plus that choice. Greedy output is therefore the output of plain
greedy decoding whatever the drafter proposes; only the speed changes.

Sampling (`accept_sampled`): speculative sampling (Leviathan et al. 2023; Chen et al. 2023). The drafts are drawn
from the drafter's distribution q (the same filters as the target's: temperature, top-k, top-p, repetition
penalty); draft x at step j is kept with probability min(1, p_j(x) / q_j(x)), p_j the target's filtered distribution
after the tokens kept so far; the first rejected one is replaced by a draw from the residual max(0, p_j - q_j)
(normalised), and when all are kept one more token is drawn from p_k. Every emitted token then has exactly the
target's distribution: sampled output has the distribution of plain sampling, though not the same tokens for a seed.

`DraftController` picks k for each round. Fixed (`--draft N`): k = N. `auto`: from what it measures in this
generation -- the share of drafts accepted (alpha, a decayed estimate) and the costs of one draft step (t_d), of a
plain decode step (t_1) and of verify calls (modelled as t_1 * (1 + beta * k), beta fitted online) -- it picks the k
in 0..`MAX_DRAFT` that maximizes the expected tokens per second, where a round of k drafts yields
`1 + alpha + ... + alpha^k` tokens on average (drafts accepted left to right, each with probability alpha) in
`k * t_d + t_1 * (1 + beta * k)` seconds and plain decoding 1 token in t_1 (each cost measured as the engine pays it:
a plain step with its sampling, a verify call with the acceptance over its rows). Drafting is chosen only when it is
expected to be at least `MARGIN` faster than plain decoding: the estimates are noisy, and a wrong "draft" costs more
than a wrong "plain". k = 0 is plain decoding; after `PROBE_EVERY` plain steps in a row it drafts once more (k = 1),
so a change in acceptance is noticed.

No torch here.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DraftController", "MAX_DRAFT", "accept_sampled", "parse_draft"]

MAX_DRAFT = 8
PROBE_EVERY = 16
MARGIN = 1.05  # expected speed-up below which `auto` decodes plainly
_DECAY = 0.9  # weight of the past in the acceptance and cost estimates, per observation


def parse_draft(value: str | int | None) -> str | int:
    """`auto`, `off` or a draft length 1..`MAX_DRAFT` (an int or its string) -> "auto" | "off" | int."""
    if value is None:
        return "auto"
    if isinstance(value, str) and value.strip().lower() in ("auto", "off"):
        return value.strip().lower()
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"draft must be 'auto', 'off' or a number of draft tokens 1..{MAX_DRAFT}, "
                         f"found {value!r}") from None
    if not 1 <= n <= MAX_DRAFT or isinstance(value, bool):
        raise ValueError(f"draft must be 'auto', 'off' or a number of draft tokens 1..{MAX_DRAFT}, found {value!r}")
    return n


class DraftController:
    """The draft length of each round (module docstring). `fixed`: always that many (capped by `remaining`)."""

    def __init__(self, fixed: int | None = None, max_draft: int = MAX_DRAFT):
        self.fixed, self.max_draft = fixed, max_draft
        self.accepted = self.drafted = 0.0  # decayed counts of accepted and tested drafts: alpha = (a + 1) / (d + 2)
        self.t_draft: float | None = None  # seconds per draft step
        self.t_step: float | None = None  # seconds per plain decode step
        self.beta = 0.15  # verify cost per extra token, relative to a plain step (prior, then fitted)
        self.plain_run = 0
        self.rounds = 0

    @property
    def alpha(self) -> float:
        return (self.accepted + 1.0) / (self.drafted + 2.0)

    def expected_rate(self, k: int) -> float:
        """Expected tokens per second with k drafts (k = 0: plain decoding); needs the costs measured."""
        t1 = self.t_step or 1.0
        if k == 0:
            return 1.0 / t1
        a = self.alpha
        tokens = sum(a**i for i in range(k + 1))
        return tokens / (k * (self.t_draft or 0.0) + t1 * (1.0 + self.beta * k))

    def next_len(self, remaining: int) -> int:
        """Drafts for the next round (0: a plain step); `remaining`: tokens still allowed after the next one."""
        cap = max(0, min(self.max_draft, remaining))
        if self.fixed is not None:
            return min(self.fixed, cap)
        if cap == 0:
            return 0
        if self.t_step is None:  # measure a plain step first, then a small round
            return 0
        if self.t_draft is None:
            return min(2, cap)
        best = max(range(1, cap + 1), key=self.expected_rate)
        if self.expected_rate(best) >= MARGIN * self.expected_rate(0):
            return best
        return 1 if self.plain_run >= PROBE_EVERY else 0

    def record_plain(self, seconds: float) -> None:
        self.t_step = seconds if self.t_step is None else _DECAY * self.t_step + (1 - _DECAY) * seconds
        self.plain_run += 1

    def record_round(self, drafts: int, accepted: int, draft_seconds: float, verify_seconds: float) -> None:
        self.rounds += 1
        self.plain_run = 0
        # drafts after the first rejected one were never tested: the acceptance of a draft is estimated over the tested
        # ones (the maximum-likelihood estimate for drafts accepted left to right, each with the same probability)
        tested = accepted + (1 if accepted < drafts else 0)
        self.accepted = _DECAY * self.accepted + accepted
        self.drafted = _DECAY * self.drafted + tested
        per_draft = draft_seconds / drafts
        self.t_draft = per_draft if self.t_draft is None else _DECAY * self.t_draft + (1 - _DECAY) * per_draft
        if self.t_step is None:  # no plain step measured: treat this verify as one with the prior beta
            self.t_step = verify_seconds / (1.0 + self.beta * drafts)
        beta = max(0.0, (verify_seconds / self.t_step - 1.0) / drafts)
        self.beta = _DECAY * self.beta + (1 - _DECAY) * beta


def accept_sampled(drafts: list[int], q: list[np.ndarray], p, rng: np.random.Generator) -> list[int]:
    """Speculative sampling's acceptance (module docstring). `drafts[j]` was drawn from `q[j]`; `p(j, kept)` is the
    target's filtered distribution at step j given the tokens `kept` so far (called in order, j = 0..len(drafts)).
    -> the tokens to emit: the kept drafts and one token from the target's (residual) distribution."""
    kept: list[int] = []
    for j, x in enumerate(drafts):
        pj = p(j, kept)
        if rng.random() * q[j][x] < pj[x]:  # with probability min(1, p(x) / q(x)); q(x) > 0 since x ~ q
            kept.append(x)
            continue
        residual = np.maximum(pj - q[j], 0.0)
        total = residual.sum()
        dist = residual / total if total > 0 else pj
        return kept + [int(rng.choice(dist.size, p=dist))]
    last = p(len(drafts), kept)
    return kept + [int(rng.choice(last.size, p=last))]
