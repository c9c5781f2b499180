"""Latency budget verdicts, with injected timings (never a wall clock)."""

import pytest

from edge_gemma.runtimes.budget import budget_for, load_budgets, verdict


def test_pi5_e2b_budget_is_the_published_litert_lm_figure():
    b = budget_for("pi5", "e2b")
    assert (b["decode_tok_s_min"], b["ttft_s_max"], b["ttft_prompt_tokens"], b["peak_rss_mb_max"]) == (8.0, 7.8, 1024, 1546)
    assert "source" in b


def test_within_budget_has_no_miss():
    b = budget_for("pi5", "e2b")
    assert verdict({"decode_tok_s": 8.0, "ttft_s": 7.8, "peak_rss_mb": 1546}, b) == []
    assert verdict({"decode_tok_s": 12.0, "ttft_s": 2.0, "peak_rss_mb": 900}, b) == []


def test_misses_say_by_how_much():
    b = budget_for("pi5", "e2b")
    misses = verdict({"decode_tok_s": 4.0, "ttft_s": 15.6, "peak_rss_mb": 1000}, b)
    assert [m.figure for m in misses] == ["decode_tok_s", "ttft_s"]
    assert misses[0].ratio == pytest.approx(2.0) and misses[1].ratio == pytest.approx(2.0)
    text = str(misses[1])
    assert "15.6 s" in text and "7.8 s above the maximum" in text and "100.0% off" in text


def test_unmeasured_figures_are_not_judged():
    assert verdict({"decode_tok_s": 1.0}, {"ttft_s_max": 1.0}) == []


def test_unknown_device_or_variant():
    with pytest.raises(ValueError, match="known devices"):
        budget_for("toaster", "e2b")
    with pytest.raises(ValueError, match="budgets exist for"):
        budget_for("phone", "e4b")
    assert "pi5" in load_budgets()
