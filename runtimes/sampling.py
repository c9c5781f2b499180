"""Next-token selection in numpy: greedy, temperature, top-k, top-p, min-p, repetition penalty, seeded.

The order of the filters is transformers' (`generate`'s logits processors): repetition penalty, temperature, top-k,
top-p, min-p, then a draw from the remaining distribution. Temperature 0 means greedy (argmax; the lowest id wins a tie,
as `numpy.argmax` and `torch.argmax` agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off; else drop tokens less likely than min_p x the most likely one
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_repetition_penalty(logits: np.ndarray, history: Iterable[int], penalty: float) -> np.ndarray:
    """CTRL-style penalty (transformers' `RepetitionPenaltyLogitsProcessor`): every token already seen has its
    logit divided by `penalty` when positive and multiplied by it when negative."""
    if penalty == 1.0:
        return logits
    seen = np.unique(np.fromiter(history, dtype=np.int64))
    if seen.size == 0:
        return logits
    out = logits.copy()
    vals = out[seen]
    out[seen] = np.where(vals < 0, vals * penalty, vals / penalty)
    return out


def filtered_probs(logits: np.ndarray, cfg: SamplingConfig, history: Iterable[int] = ()) -> np.ndarray:
    """The distribution a non-greedy draw samples from, after every filter (float64, sums to 1)."""
    x = apply_repetition_penalty(np.asarray(logits, dtype=np.float64), history, cfg.repetition_penalty)
    x = x / cfg.temperature
    if cfg.top_k and cfg.top_k < x.size:
        kth = np.partition(x, -cfg.top_k)[-cfg.top_k]
        x = np.where(x < kth, -np.inf, x)
    if cfg.top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p (transformers' TopPLogitsWarper:
        # drop a token when the mass of the strictly more likely ones already exceeds top_p; the top one stays).
        order = np.argsort(-x, kind="stable")
        p = _softmax(x[order])
        before = np.cumsum(p) - p
        drop = before > cfg.top_p
        drop[0] = False
        x[order[drop]] = -np.inf
    if cfg.min_p > 0.0:
        # transformers' MinPLogitsWarper: drop a token whose probability is below min_p x the top one's (that
        # one stays)
        p = _softmax(x)
        drop = p < cfg.min_p * p.max()
        drop[int(np.argmax(p))] = False
        x = np.where(drop, -np.inf, x)
    return _softmax(x)


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x)
    e = np.exp(x - m)
    return e / e.sum()


class Sampler:
    """Picks the next token from one row of logits. Seeded: the same seed gives the same tokens."""

    def __init__(self, cfg: SamplingConfig | None = None):
        self.cfg = cfg or SamplingConfig()
        self.rng = np.random.default_rng(self.cfg.seed)

    def __call__(self, logits: np.ndarray, history: Iterable[int] = ()) -> int:
        logits = np.asarray(logits).reshape(-1)
        if self.cfg.greedy:
            x = apply_repetition_penalty(logits.astype(np.float64), history, self.cfg.repetition_penalty)
            return int(np.argmax(x))
        p = filtered_probs(logits, self.cfg, history)
        return int(self.rng.choice(p.size, p=p))
