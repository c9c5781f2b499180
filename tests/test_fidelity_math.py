"""`export/fidelity.compare_logits` against figures computed by hand (closed forms, not our own output)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_gemma.export.fidelity import compare_logits


def test_compare_logits_matches_hand_computed_kl_top1_and_perplexity():
    ref = np.array([[0.0, 0.0], [2.0, 0.0]], np.float32)
    test = np.array([[math.log(3.0), 0.0], [0.0, 2.0]], np.float32)
    ids = [1, 0]  # the token after position 0 is 0
    f = compare_logits(ref, test, ids)
    # row 0: p = (1/2, 1/2), q = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3); argmaxes agree (index 0)
    kl0 = 0.5 * math.log(4.0 / 3.0)
    # row 1: p = (a, b) with a = e^2 / (e^2 + 1), q = (b, a): KL = (a - b) ln(a / b) = 2 (a - b); argmaxes differ
    a = math.exp(2) / (math.exp(2) + 1)
    kl1 = 2 * (a - (1 - a))
    assert f.tokens == 2
    assert f.top1_agreement == pytest.approx(0.5)
    assert f.kl_mean == pytest.approx((kl0 + kl1) / 2, rel=1e-6)
    assert f.kl_max == pytest.approx(kl1, rel=1e-6)
    # perplexity over the one next token (id 0 after position 0): reference p = 1/2, backend q = 3/4
    assert f.ppl_reference == pytest.approx(2.0, rel=1e-6)
    assert f.ppl_backend == pytest.approx(4.0 / 3.0, rel=1e-6)


def test_identical_logits_are_perfect_and_shape_mismatch_is_an_error():
    x = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    f = compare_logits(x, x.copy(), list(range(5)))
    assert f.top1_agreement == 1.0 and f.kl_max == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="differ"):
        compare_logits(x, x[:, :6], list(range(5)))
