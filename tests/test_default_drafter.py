"""The embedded default model's drafter (`edge_gemma/data/default_drafter`, `scripts/train_default_drafter.py`)."""

from __future__ import annotations

import json
import math

import pytest

from edge_gemma.paths import DEFAULT_CHECKPOINT, DEFAULT_DRAFTER

FILES = ("config.json", "generation_config.json", "model.safetensors", "training_report.json")


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads((DEFAULT_DRAFTER / "training_report.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def trainer():
    import train_default_drafter

    return train_default_drafter


# the training code sets global torch state; tests/conftest.py restores it after this module
pytestmark = pytest.mark.usefixtures("restore_torch_state")


@pytest.fixture(scope="module")
def data(trainer):
    return trainer.load_data()


def test_folder_is_complete_and_within_two_mib():
    names = {p.name for p in DEFAULT_DRAFTER.iterdir()}
    assert set(FILES) <= names, f"missing {sorted(set(FILES) - names)}"
    total = sum(p.stat().st_size for p in DEFAULT_DRAFTER.iterdir() if p.is_file())
    assert total <= 2 * 2**20, f"{DEFAULT_DRAFTER}: {total} bytes, budget 2 MiB"


def test_transformers_and_our_loader_load_it_strictly():
    from transformers import Gemma4AssistantForCausalLM

    from edge_gemma.config import load_config
    from edge_gemma.drafter import load_drafter

    _, info = Gemma4AssistantForCausalLM.from_pretrained(str(DEFAULT_DRAFTER), output_loading_info=True)
    assert not any(info.values()), info
    drafter = load_drafter(DEFAULT_DRAFTER, load_config(DEFAULT_CHECKPOINT).text)
    assert drafter.cfg.backbone_hidden_size == load_config(DEFAULT_CHECKPOINT).text.hidden_size


def test_verify_with_the_drafter_passes():
    """Our drafter against transformers' on the default pair, and our assisted decoding against its `generate`."""
    from edge_gemma.verify import verify_checkpoint

    report = verify_checkpoint(DEFAULT_CHECKPOINT, towers=False, drafter=DEFAULT_DRAFTER)
    assert report["ok"], report
    assert report["drafter_max_abs_logit_diff"] <= 1e-4
    assert report["assisted_tokens_equal"] == report["assisted_tokens_total"] == 32


def test_first_steps_reproduce_recorded_losses(trainer, report, data):
    """As for the default model (tests/test_default_model.py): steps 0-1 within 1e-5, later steps within 2 % (Adam
    amplifies the ulp differences of another CPU's summation order)."""
    recorded = report["first_step_losses"]
    losses = trainer.first_step_losses(len(recorded), data=data)
    for step, (got, want) in enumerate(zip(losses, recorded, strict=True)):
        tol = 1e-5 if step < 2 else 2e-2
        assert math.isclose(got, want, rel_tol=tol), f"step {step}: loss {got} != recorded {want} (rel_tol {tol})"
    assert losses[-1] < losses[0]  # it learns


def test_held_out_acceptance_is_what_the_report_says_and_far_above_untrained(trainer, report, data):
    """Greedy drafts on held-out prompts: the acceptance the report records (the same counts, up to a near-tie flip
    on another CPU), far above the untrained drafter's, and every assisted output equal to plain greedy."""
    from edge_gemma.checkpoint import load_model
    from edge_gemma.drafter import load_drafter

    target = load_model(DEFAULT_CHECKPOINT)
    drafter = load_drafter(DEFAULT_DRAFTER, target.cfg.text)
    got = trainer.acceptance(target, drafter, data.heldout_blocks)
    want = report["heldout_acceptance"]
    assert got["equals_plain_greedy"] is True
    assert abs(got["acceptance"] - want["acceptance"]) <= 0.02, (got, want)
    assert got["acceptance"] >= report["heldout_acceptance_untrained"]["acceptance"] + 0.2
    assert got["tokens_per_target_call"] > 1.5
