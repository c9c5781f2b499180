"""Per-turn latency of a voice turn, judged against a device budget (`edge_gemma/data/budgets.json`).

What a speaker feels is the time from the end of their speech to the first word of the answer. It adds up:
the endpointing wait (the silence the VAD needs to be sure the utterance ended), the audio features and encoder,
the prefill of the new turn, and the first decode step. The engine's `ttft_s` covers all but the first part.

The budgets are published peer figures: `decode_tok_s_min` compares directly; `ttft_s_max` is for a prompt of
`ttft_prompt_tokens` (1024 for the Pi 5) and a voice turn prefills fewer tokens, so we judge the whole
speech-end-to-first-token time against it as an upper bound that a turn should never exceed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edge_gemma.runtimes.budget import Miss, budget_for, verdict
from edge_gemma.runtimes.engine import GenerationStats

__all__ = ["TurnLatency", "model_variant", "turn_budget"]


@dataclass(frozen=True, kw_only=True)
class TurnLatency:
    turn: int
    speech_s: float  # length of the utterance sent
    endpoint_s: float  # speech end -> utterance emitted (the VAD's silence wait; 0 for a file)
    first_token_s: float | None  # speech end -> first token (None: no token came)
    stats: GenerationStats

    def measured(self) -> dict[str, float | None]:
        """Figures in the keys of `runtimes.budget.verdict`."""
        return {"decode_tok_s": self.stats.decode_tok_s, "ttft_s": self.first_token_s}

    def misses(self, budget: dict[str, Any] | None) -> list[Miss]:
        return verdict(self.measured(), budget) if budget else []

    def format(self, budget: dict[str, Any] | None = None, budget_name: str | None = None) -> str:
        def ms(x: float | None) -> str:
            return "n/a" if x is None else f"{x * 1000:.0f} ms"

        rate = self.stats.decode_tok_s
        line = (
            f"turn {self.turn}: {self.speech_s:.1f} s of speech, {self.stats.prompt_tokens} prompt tok "
            f"({self.stats.prefilled_tokens} prefilled) | speech end -> first token {ms(self.first_token_s)} "
            f"(endpointing {ms(self.endpoint_s)}, ttft {ms(self.stats.ttft_s)}) | decode "
            f"{'n/a' if rate is None else f'{rate:.1f} tok/s'} ({self.stats.new_tokens} tok)"
        )
        if budget_name is None:
            return line
        if not budget:
            return f"{line} | {budget_name}: no budget for this model"
        misses = self.misses(budget)
        if not misses:
            return f"{line} | {budget_name}: within budget"
        return f"{line} | {budget_name}: OVER BUDGET: " + "; ".join(str(m) for m in misses)


def model_variant(model) -> str | None:
    """e2b / e4b from the artifact's manifest, else from the config (same text decoder as a preset), else None
    (the embedded test model, a custom model)."""
    if getattr(model, "artifact", None) is not None:
        variant = model.artifact.manifest.get("variant")
        if variant:
            return str(variant)
    from edge_gemma.config import PRESETS

    for name, preset in PRESETS.items():
        if model.config.text == preset.text:
            return name
    return None


def turn_budget(device: str | None, variant: str | None) -> dict[str, Any] | None:
    """The budget entry for (device, variant), or None when there is no device or no such entry."""
    if not device or not variant:
        return None
    try:
        return budget_for(device, variant)
    except ValueError:
        return None
