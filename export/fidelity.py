"""Export fidelity: how closely an exported backend follows the float model on held-out text.

Teacher forcing: the same token sequence is fed, one position at a time, to the backend under test and to the
reference (the eager model on the FLOAT checkpoint), and the next-token distributions are compared at every
position: top-1 agreement (how often both pick the same next token), KL(reference || backend) in nats (mean and
max over positions), and each side's perplexity on the text itself. A quantized artifact's figures therefore
include both the quantization error and the conversion error; the eager model on the dequantized weights
(`eager-dequantized`) separates the two.

The held-out text (`edge_gemma/data/fidelity_heldout.txt`) is a few docstrings of Python standard-library modules
that `scripts/train_default_model.py` holds out of the embedded model's training set.

Backends are driven through the `Backend` contract only (`decode` one token at a time, since `prefill` returns the
last position's logits), so the figures describe exactly what the engine will run. No torch here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edge_gemma.runtimes.base import Backend

HELDOUT_FILE = Path(__file__).resolve().parents[1] / "edge_gemma" / "data" / "fidelity_heldout.txt"

__all__ = ["Fidelity", "compare_logits", "heldout_text", "teacher_forced_logits"]


def heldout_text() -> str:
    try:
        from importlib.resources import files

        return (files("edge_gemma") / "data" / "fidelity_heldout.txt").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        return HELDOUT_FILE.read_text(encoding="utf-8")


@dataclass(frozen=True, kw_only=True)
class Fidelity:
    tokens: int  # positions compared
    top1_agreement: float  # fraction of positions where both argmaxes agree
    kl_mean: float  # mean KL(reference || backend), nats
    kl_max: float
    ppl_reference: float  # perplexity of the held-out continuation under each model
    ppl_backend: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        return (
            f"top-1 agreement {self.top1_agreement * 100:.1f}% | KL mean {self.kl_mean:.4g} max {self.kl_max:.4g} nats"
            f" | ppl {self.ppl_backend:.3g} (float {self.ppl_reference:.3g}) over {self.tokens} tokens"
        )


def teacher_forced_logits(
    backend: Backend,
    gather_ple: Callable[[np.ndarray], np.ndarray],
    ids: Sequence[int],
    *,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Logits after each of `ids` (`[N, V]` float32): token t is decoded at position t after a reset."""
    backend.reset()
    out = []
    for t, tok in enumerate(ids):
        tid = np.asarray([int(tok)], np.int64)
        logits = backend.decode(np.asarray(backend.embed(tid), np.float32), gather_ple(tid), np.asarray([t], np.int64))
        out.append(np.asarray(logits, np.float32).reshape(-1))
        if progress is not None:
            progress(1)
    backend.reset()
    return np.stack(out)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def compare_logits(reference: np.ndarray, test: np.ndarray, ids: Sequence[int]) -> Fidelity:
    """Compare `[N, V]` logits position by position; `ids` (length N) gives the next tokens for the perplexities."""
    if reference.shape != test.shape:
        raise ValueError(f"fidelity: reference logits {reference.shape} and backend logits {test.shape} differ")
    lp, lq = _log_softmax(reference), _log_softmax(test)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)  # (N,)
    agree = reference.argmax(-1) == test.argmax(-1)
    nxt = np.asarray(ids[1:], np.int64)
    n = nxt.size
    rows = np.arange(n)
    ppl_ref = float(np.exp(-lp[rows, nxt].mean())) if n else float("nan")
    ppl_test = float(np.exp(-lq[rows, nxt].mean())) if n else float("nan")
    return Fidelity(
        tokens=int(reference.shape[0]), top1_agreement=float(agree.mean()), kl_mean=float(np.maximum(kl, 0).mean()),
        kl_max=float(kl.max()), ppl_reference=ppl_ref, ppl_backend=ppl_test,
    )
