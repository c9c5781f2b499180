"""Sampling: greedy, filters equal to transformers' logits processors, seeded draws follow the distribution."""

from __future__ import annotations

import numpy as np
import pytest

from edge_gemma.runtimes.sampling import Sampler, SamplingConfig, apply_repetition_penalty, filtered_probs


def _logits(seed=0, v=64):
    return np.random.default_rng(seed).normal(size=v).astype(np.float32) * 3


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    x = _logits()
    assert Sampler()(x) == int(np.argmax(x))
    assert Sampler(SamplingConfig(temperature=0.7, top_k=1, seed=3))(x) == int(np.argmax(x))


@pytest.mark.parametrize("temperature,top_k,top_p,penalty,min_p", [
    (0.7, 0, 1.0, 1.0, 0.0), (1.3, 10, 1.0, 1.0, 0.0), (1.0, 0, 0.8, 1.0, 0.0), (0.9, 20, 0.9, 1.3, 0.0),
    (1.0, 0, 1.0, 1.0, 0.05), (0.8, 30, 0.95, 1.1, 0.1), (1.5, 0, 1.0, 1.0, 1.0)])
def test_filters_equal_transformers_processors(temperature, top_k, top_p, penalty, min_p):
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import (
        MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
        TopPLogitsWarper,
    )

    x = _logits(1)
    history = [3, 5, 5, 9, int(np.argmax(x))]
    ids = torch.tensor([history])
    t = torch.tensor(x, dtype=torch.float64)[None]
    if penalty != 1.0:
        t = RepetitionPenaltyLogitsProcessor(penalty)(ids, t)
    t = TemperatureLogitsWarper(temperature)(ids, t)
    if top_k:
        t = TopKLogitsWarper(top_k)(ids, t)
    if top_p < 1.0:
        t = TopPLogitsWarper(top_p)(ids, t)
    if min_p:
        t = MinPLogitsWarper(min_p)(ids, t)
    ref = torch.softmax(t, -1)[0].numpy()
    ours = filtered_probs(x, SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                            repetition_penalty=penalty), history)
    np.testing.assert_allclose(ours, ref, atol=1e-9)
    assert ((ours == 0) == (ref == 0)).all()


def test_repetition_penalty_math():
    x = np.array([2.0, -2.0, 1.0])
    np.testing.assert_allclose(apply_repetition_penalty(x, [0, 1], 2.0), [1.0, -4.0, 1.0])
    assert Sampler(SamplingConfig(repetition_penalty=10.0))(np.array([2.0, 1.9]), history=[0]) == 1


def test_seeded_draws_are_reproducible_and_follow_the_distribution():
    x = _logits(2, v=8)
    cfg = SamplingConfig(temperature=1.0, seed=42)
    a = [Sampler(cfg)(x) for _ in range(3)]
    s1, s2 = Sampler(cfg), Sampler(cfg)
    assert [s1(x) for _ in range(50)] == [s2(x) for _ in range(50)]
    assert len(set(a)) == 1  # a fresh sampler with the same seed draws the same first token
    n = 20000
    s = Sampler(cfg)
    counts = np.bincount([s(x) for _ in range(n)], minlength=8)
    p = filtered_probs(x, cfg)
    # every bin within 5 standard deviations of its binomial expectation
    assert (np.abs(counts - n * p) <= 5 * np.sqrt(n * p * (1 - p)) + 1).all()


def test_top_p_keeps_the_nucleus_only():
    x = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    p = filtered_probs(x, SamplingConfig(temperature=1.0, top_p=0.75))
    np.testing.assert_allclose(p, [0.625, 0.375, 0, 0])


def test_min_p_keeps_tokens_at_least_that_fraction_of_the_top_one():
    x = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    p = filtered_probs(x, SamplingConfig(temperature=1.0, min_p=0.2))  # threshold 0.1: drops 0.05 only
    np.testing.assert_allclose(p, np.array([0.5, 0.3, 0.15, 0]) / 0.95)
    assert Sampler(SamplingConfig(temperature=2.0, min_p=1.0, seed=0))(x) == 0  # only the top token is left


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5), dict(repetition_penalty=0),
                                dict(min_p=-0.1), dict(min_p=1.5)])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ValueError):
        SamplingConfig(**kw)
