"""Per-tensor quantization error report: accumulated chunk by chunk while streaming, printed as a table, saved as JSON.

The figure per tensor is the relative Frobenius error ``||W - deq(q(W))|| / ||W||`` (what a person can compare across
tensors of different scales), plus the max absolute error. Model-level figures (logit / perplexity drift) are a
separate, data-aware step.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["ErrorAccumulator", "TensorError", "QuantReport", "REPORT_FILENAME"]

REPORT_FILENAME = "quant_report.json"


class ErrorAccumulator:
    """Running sums for the relative error of one tensor, fed one row chunk at a time (float64 accumulation)."""

    def __init__(self) -> None:
        self.err_sq = 0.0
        self.ref_sq = 0.0
        self.max_abs_err = 0.0
        self.max_abs = 0.0

    def update(self, w: np.ndarray, w_hat: np.ndarray) -> None:
        # float32 sums within a chunk are pairwise in numpy (relative error ~1e-7), float64 across chunks
        d = np.subtract(w, w_hat, dtype=np.float32).ravel()
        w = np.asarray(w, dtype=np.float32).ravel()
        if not d.size:
            return
        self.err_sq += float(np.sum(d * d))
        self.ref_sq += float(np.sum(w * w))
        self.max_abs_err = max(self.max_abs_err, float(np.max(np.abs(d))))
        self.max_abs = max(self.max_abs, float(np.max(np.abs(w))))

    @property
    def rel_error(self) -> float:
        if self.ref_sq == 0.0:
            return 0.0 if self.err_sq == 0.0 else math.inf
        return math.sqrt(self.err_sq / self.ref_sq)


@dataclass(frozen=True, kw_only=True)
class TensorError:
    name: str
    role: str
    scheme: str  # scheme label, e.g. "int4-g32"
    shape: tuple[int, ...]
    rel_error: float
    max_abs_error: float
    max_abs: float
    source_bytes: int
    stored_bytes: int


@dataclass(frozen=True, kw_only=True)
class QuantReport:
    recipe: str
    source: str
    out: str
    tensors: tuple[TensorError, ...]  # quantized tensors, in checkpoint order
    float_tensors: int
    unknown_tensors: tuple[str, ...] = ()  # names the role table did not know (kept float)
    source_bytes: int = 0
    stored_bytes: int = 0
    seconds: float = 0.0
    fallbacks: tuple[str, ...] = field(default=())  # "name: int4-g32 -> int8"

    def to_json(self) -> dict:
        d = asdict(self)
        d["tensors"] = [{**asdict(t), "shape": list(t.shape)} for t in self.tensors]
        d["unknown_tensors"] = list(self.unknown_tensors)
        d["fallbacks"] = list(self.fallbacks)
        d["summary"] = self.summary()
        return d

    def summary(self) -> dict:
        by_scheme: dict[str, list[TensorError]] = {}
        for t in self.tensors:
            by_scheme.setdefault(t.scheme, []).append(t)
        worst = max(self.tensors, key=lambda t: t.rel_error, default=None)
        return {
            "quantized_tensors": len(self.tensors),
            "float_tensors": self.float_tensors,
            "compression": (self.source_bytes / self.stored_bytes) if self.stored_bytes else None,
            "worst": None if worst is None else {"name": worst.name, "rel_error": worst.rel_error},
            "by_scheme": {k: {"tensors": len(v), "mean_rel_error": float(np.mean([t.rel_error for t in v])),
                              "max_rel_error": float(max(t.rel_error for t in v))} for k, v in by_scheme.items()},
        }

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, allow_nan=True))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QuantReport":
        d = json.loads(Path(path).read_text())
        tensors = tuple(TensorError(**{**t, "shape": tuple(t["shape"])}) for t in d["tensors"])
        return cls(recipe=d["recipe"], source=d["source"], out=d["out"], tensors=tensors,
                   float_tensors=d["float_tensors"], unknown_tensors=tuple(d.get("unknown_tensors", ())),
                   source_bytes=d["source_bytes"], stored_bytes=d["stored_bytes"], seconds=d["seconds"],
                   fallbacks=tuple(d.get("fallbacks", ())))

    def format_table(self, limit: int | None = None, sort: str = "order") -> str:
        """A plain-text table, one line per quantized tensor (``sort="error"``: worst first; ``limit``: top rows)."""
        rows = list(self.tensors)
        if sort == "error":
            rows.sort(key=lambda t: -t.rel_error)
        shown = rows if limit is None else rows[:limit]
        width = max([len(t.name) for t in shown] + [6])
        lines = [f"{'tensor':<{width}}  {'scheme':<14} {'shape':<16} {'rel err':>9} {'max abs err':>12}"]
        for t in shown:
            lines.append(f"{t.name:<{width}}  {t.scheme:<14} {'x'.join(map(str, t.shape)):<16} "
                         f"{t.rel_error:>9.5f} {t.max_abs_error:>12.4g}")
        if len(shown) < len(rows):
            lines.append(f"... {len(rows) - len(shown)} more tensors (see {REPORT_FILENAME})")
        s = self.summary()
        lines.append("")
        for scheme, v in s["by_scheme"].items():
            lines.append(f"{scheme}: {v['tensors']} tensors, mean rel err {v['mean_rel_error']:.5f}, "
                         f"max {v['max_rel_error']:.5f}")
        ratio = f"{s['compression']:.2f}x" if s["compression"] else "n/a"
        lines.append(f"recipe {self.recipe}: {len(self.tensors)} quantized, {self.float_tensors} float; "
                     f"{self.source_bytes / 2**20:.1f} MiB -> {self.stored_bytes / 2**20:.1f} MiB ({ratio}) "
                     f"in {self.seconds:.1f} s")
        if self.fallbacks:
            lines.append(f"{len(self.fallbacks)} tensors fell back: " + "; ".join(self.fallbacks[:5]))
        if self.unknown_tensors:
            lines.append(f"{len(self.unknown_tensors)} tensors not in the role table were kept float: "
                         + ", ".join(self.unknown_tensors[:5]))
        return "\n".join(lines)
