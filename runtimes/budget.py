"""Latency budgets: is a measured run within what the peers publish for a device? (`edge-gemma bench --budget`)

The budgets are data (`edge_gemma/data/budgets.json`), one entry per device and variant with its source. A verdict
compares a measurement with a budget and says, for every figure over budget, by how much. Timings are passed in, so
the verdict is tested with injected numbers, never with a wall clock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUDGETS_FILE = Path(__file__).resolve().parents[1] / "edge_gemma" / "data" / "budgets.json"  # source checkout

# figure in the budget -> (key in the measurement, unit, True when larger is better)
_CHECKS = {
    "decode_tok_s_min": ("decode_tok_s", "tok/s", True),
    "prefill_tok_s_min": ("prefill_tok_s", "tok/s", True),
    "ttft_s_max": ("ttft_s", "s", False),
    "peak_rss_mb_max": ("peak_rss_mb", "MB", False),
}


@dataclass(frozen=True, kw_only=True)
class Miss:
    """One figure over budget."""

    figure: str
    measured: float
    limit: float
    unit: str
    higher_is_better: bool

    @property
    def ratio(self) -> float:
        """How far off, as a factor > 1 (2.0 means half as fast, or twice as large, as the budget allows)."""
        return self.limit / self.measured if self.higher_is_better else self.measured / self.limit

    def __str__(self) -> str:
        word = "below the minimum" if self.higher_is_better else "above the maximum"
        return (
            f"{self.figure}: {self.measured:.4g} {self.unit} is {abs(self.measured - self.limit):.4g} {self.unit} "
            f"{word} of {self.limit:.4g} {self.unit} ({(self.ratio - 1) * 100:.1f}% off)"
        )


def load_budgets(path: str | Path | None = None) -> dict[str, Any]:
    try:
        from importlib.resources import files

        text = (files("edge_gemma") / "data" / "budgets.json").read_text() if path is None else Path(path).read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        text = Path(path or BUDGETS_FILE).read_text()
    return json.loads(text)


def budget_for(device: str, variant: str, budgets: dict[str, Any] | None = None) -> dict[str, Any]:
    budgets = load_budgets() if budgets is None else budgets
    devices = sorted(k for k in budgets if not k.startswith("_"))
    if device not in budgets:
        raise ValueError(f"no latency budget for device {device!r}; known devices: {devices}")
    if variant not in budgets[device]:
        raise ValueError(
            f"no latency budget for {variant!r} on {device!r}; budgets exist for {sorted(budgets[device])}"
        )
    return budgets[device][variant]


def verdict(measured: dict[str, float], budget: dict[str, Any]) -> list[Miss]:
    """Every figure of `budget` that `measured` misses. A figure that was not measured is not judged.

    `measured` keys: decode_tok_s, prefill_tok_s, ttft_s (for the budget's `ttft_prompt_tokens`), peak_rss_mb.
    """
    misses = []
    for figure, (key, unit, higher_is_better) in _CHECKS.items():
        if figure not in budget or measured.get(key) is None:
            continue
        limit, value = float(budget[figure]), float(measured[key])
        over = value < limit if higher_is_better else value > limit
        if over:
            misses.append(Miss(figure=key, measured=value, limit=limit, unit=unit, higher_is_better=higher_is_better))
    return misses
