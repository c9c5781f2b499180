"""`edge-gemma verify`: passes on good tiny checkpoints, and FAILS (non-zero exit) on deliberately broken models."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from edge_gemma import cli
from edge_gemma.config import TextConfig
from edge_gemma.model import text as text_module
from edge_gemma.verify import verify_checkpoint

KEYS = {"max_abs_logit_diff", "greedy_tokens_equal", "greedy_tokens_total", "vision_max_abs_diff", "audio_max_abs_diff"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_json(path, capsys) -> tuple[int, dict]:
    rc = cli.main(["verify", str(path), "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    return rc, json.loads(out[0])


def test_verify_passes_with_towers(tiny_checkpoints):
    report = verify_checkpoint(tiny_checkpoints["perturbed"])
    assert report["ok"] is True
    assert report["prompt_tokens"] >= 2 * 4  # at least twice the sliding window (4 for variant "a")
    assert report["max_abs_logit_diff"] <= 1e-4
    assert report["greedy_tokens_equal"] == report["greedy_tokens_total"] == 32
    assert report["vision_max_abs_diff"] is not None and report["vision_max_abs_diff"] <= 1e-4
    assert report["audio_max_abs_diff"] is not None and report["audio_max_abs_diff"] <= 1e-4


def test_cli_json_text_only(tiny_checkpoints, capsys):
    rc, report = run_json(tiny_checkpoints["text_only"], capsys)
    assert rc == 0
    assert set(report) == KEYS
    assert report["vision_max_abs_diff"] is None and report["audio_max_abs_diff"] is None
    assert report["greedy_tokens_equal"] == report["greedy_tokens_total"] == 32
    assert report["max_abs_logit_diff"] <= 1e-4


def _layer_without_scalar(self, x, ple, cos, sin, mask, input_pos, shared_kv=None):
    a, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, shared_kv)
    x = x + self.post_attention_layernorm(a)
    x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
    g = F.gelu(self.per_layer_input_gate(x), approximate="tanh") * ple
    return x + self.post_per_layer_input_norm(self.per_layer_projection(g)), kv  # BUG: no `* layer_scalar`


def test_verify_fails_without_layer_scalar(tiny_checkpoints, capsys, monkeypatch):
    monkeypatch.setattr(text_module.TextDecoderLayer, "forward", _layer_without_scalar)
    rc, report = run_json(tiny_checkpoints["perturbed"], capsys)  # layer_scalar is 0.7 there
    assert rc == 1
    assert report["max_abs_logit_diff"] > 1e-4


def test_verify_fails_when_a_shared_layer_reads_the_wrong_producer(tiny_checkpoints, capsys, monkeypatch):
    def first_of_kind(self, layer):  # BUG: the FIRST layer of the same type instead of the last non-shared one
        if layer < self.first_shared_layer:
            return layer
        return min(i for i in range(self.first_shared_layer) if self.layer_types[i] == self.layer_types[layer])

    monkeypatch.setattr(TextConfig, "kv_producer", first_of_kind)
    rc, report = run_json(tiny_checkpoints["b"], capsys)
    assert rc == 1
    assert report["max_abs_logit_diff"] > 1e-4


def test_missing_transformers_is_a_clear_error(tiny_checkpoints, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(RuntimeError, match=r"pip install 'edge-gemma\[reference\]'"):
        verify_checkpoint(tiny_checkpoints["a"])


def test_low_memory_reference_is_the_float32_reference(tmp_path):
    """Full-size mode: the reference keeps its embedding tables in the file's dtype (bf16) and skips the towers; it
    must compute exactly what a float32 load computes."""
    import tiny
    from edge_gemma.config import load_config
    from edge_gemma.verify import _reference, fixed_prompt

    path = tiny.write_checkpoint(tmp_path / "bf16", "a", seed=5, dtype=torch.bfloat16, perturbed=True)
    cfg = load_config(path)
    ids = fixed_prompt(cfg, 16)
    full = _reference(path, cfg, ids, with_towers=False, low_memory=False)
    low = _reference(path, cfg, ids, with_towers=False, low_memory=True)
    assert (full["logits"] - low["logits"]).abs().max().item() <= 1e-6
    assert full["tokens"] == low["tokens"]
    report = verify_checkpoint(path, towers=False, low_memory=True)
    assert report["ok"] and report["vision_max_abs_diff"] is None


DRAFTER_KEYS = KEYS | {"drafter_max_abs_logit_diff", "assisted_tokens_equal", "assisted_tokens_total"}


@pytest.fixture(scope="module")
def tiny_assistant(tmp_path_factory):
    import tiny

    return tiny.write_assistant(tmp_path_factory.mktemp("assistant") / "d", "a", seed=4, ordered=True)


def run_drafter_json(target, drafter, capsys) -> tuple[int, dict]:
    rc = cli.main(["verify", str(target), "--no-towers", "--drafter", str(drafter), "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    return rc, json.loads(out[0])


def test_cli_json_with_a_drafter(tiny_checkpoints, tiny_assistant, capsys):
    rc, report = run_drafter_json(tiny_checkpoints["perturbed"], tiny_assistant, capsys)
    assert rc == 0
    assert set(report) == DRAFTER_KEYS
    assert isinstance(report["drafter_max_abs_logit_diff"], float) and report["drafter_max_abs_logit_diff"] <= 1e-4
    assert isinstance(report["assisted_tokens_equal"], int)
    assert report["assisted_tokens_equal"] == report["assisted_tokens_total"] == 32


def test_verify_fails_when_the_drafter_sees_one_key_too_few(tiny_checkpoints, tiny_assistant, capsys, monkeypatch):
    """A sliding window of `window` keys instead of the reference's `window + 1` moves the draft logits."""
    from edge_gemma.model import drafter as drafter_module

    original = drafter_module.drafter_masks
    monkeypatch.setattr(drafter_module, "drafter_masks", lambda p, k, w: original(p, k, w - 1))
    rc, report = run_drafter_json(tiny_checkpoints["perturbed"], tiny_assistant, capsys)
    assert rc == 1
    assert report["drafter_max_abs_logit_diff"] > 1e-4
    assert report["assisted_tokens_equal"] == report["assisted_tokens_total"]  # a worse drafter, the same tokens
