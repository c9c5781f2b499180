"""benchmarks/make_synthetic_checkpoint.py writes transformers' own checkpoint layout.

Golden layouts come from transformers: tiny models saved by `save_pretrained` (names, shapes, dtypes, the index's
parameter count), and the real E2B/E4B configs built on the meta device. `from_pretrained` must load what the script
writes, sharded or not, with nothing missing or unexpected.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from edge_gemma.config import load_config

import tiny

from paths import REPO  # noqa: E402
_SCRIPT = REPO / "benchmarks" / "make_synthetic_checkpoint.py"
_spec = importlib.util.spec_from_file_location("make_synthetic_checkpoint", _SCRIPT)
msc = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = msc  # dataclasses look their module up there
_spec.loader.exec_module(msc)

_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32"}


def _layout(ckpt: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, safetensors dtype)} over every *.safetensors file in `ckpt`."""
    out = {}
    for file in sorted(ckpt.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                s = f.get_slice(name)
                assert name not in out, f"{name} in two shards"
                out[name] = (tuple(s.get_shape()), s.get_dtype())
    return out


@pytest.fixture(scope="module")
def reference_tiny(tmp_path_factory) -> dict[str, Path]:
    """Tiny bf16 checkpoints saved by transformers itself (multimodal a/b, text-only b, a without towers)."""
    root = tmp_path_factory.mktemp("ref_tiny")
    return {
        "a": tiny.write_checkpoint(root / "a", "a", dtype=torch.bfloat16),
        "b": tiny.write_checkpoint(root / "b", "b", dtype=torch.bfloat16),
        "b_text": tiny.write_checkpoint(root / "b_text", "b", dtype=torch.bfloat16, text_only=True),
        "a_novision": tiny.write_checkpoint(root / "a_nv", "a", dtype=torch.bfloat16, vision=False, audio=False),
    }


@pytest.mark.parametrize("key", ["a", "b", "b_text", "a_novision"])
def test_tiny_layout_equals_save_pretrained(reference_tiny, tmp_path, key):
    ref = reference_tiny[key]
    out = msc.write_synthetic_checkpoint(ref / "config.json", tmp_path / "syn", seed=3, progress=False)
    want, got = _layout(ref), _layout(out)
    assert sorted(got) == sorted(want), (sorted(set(want) - set(got)), sorted(set(got) - set(want)))
    assert got == want
    assert (out / "config.json").read_bytes() == (ref / "config.json").read_bytes()


def test_text_only_flag_gives_causal_lm_layout(reference_tiny, tmp_path):
    """--text-only from a multimodal config writes what `Gemma4ForCausalLM.save_pretrained` writes."""
    out = msc.write_synthetic_checkpoint(reference_tiny["b"] / "config.json", tmp_path / "t", text_only=True,
                                         progress=False)
    assert _layout(out) == _layout(reference_tiny["b_text"])
    from transformers import AutoConfig

    assert type(AutoConfig.from_pretrained(out)).__name__ == "Gemma4TextConfig"


@pytest.mark.parametrize("variant", ["e2b", "e4b"])
@pytest.mark.parametrize("text_only", [False, True])
def test_full_size_plan_equals_meta_state_dict(variant, text_only):
    from transformers import Gemma4Config, Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    raw = json.loads(msc.PRESET_CONFIGS[variant].read_text())
    cfg = load_config(msc.PRESET_CONFIGS[variant])
    with torch.device("meta"):
        if text_only:
            from transformers import Gemma4TextConfig

            model = Gemma4ForCausalLM(Gemma4TextConfig(**raw["text_config"])).to(torch.bfloat16)
        else:
            model = Gemma4ForConditionalGeneration(Gemma4Config(**raw)).to(torch.bfloat16)
    want = {k: (tuple(v.shape), _DTYPES[v.dtype]) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    specs = msc.plan_tensors(cfg, text_only=text_only)
    got = {s.name: (s.shape, "BF16") for s in specs}
    assert len(got) == len(specs), "duplicate tensor names in the plan"
    assert sorted(got) == sorted(want), (sorted(set(want) - set(got))[:10], sorted(set(got) - set(want))[:10])
    assert got == want
    assert sum(s.numel for s in specs if not s.buffer) == model.num_parameters()


def test_sharded_checkpoint_loads_in_transformers(reference_tiny, tmp_path):
    from transformers import Gemma4ForConditionalGeneration

    ref = reference_tiny["a"]
    out = msc.write_synthetic_checkpoint(ref / "config.json", tmp_path / "sh", seed=5, max_shard_bytes=200_000,
                                         progress=False)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 3 and shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    layout = _layout(out)
    assert set(index["weight_map"]) == set(layout)
    for name, file in index["weight_map"].items():
        with safe_open(out / file, "pt") as f:
            assert name in f.keys()
    assert index["metadata"]["total_size"] == sum(2 * int(np.prod(s)) for s, _ in layout.values())
    for file in shards:  # no shard over the limit unless it holds a single tensor
        with safe_open(out / file, "pt") as f:
            keys = list(f.keys())
        assert len(keys) == 1 or (out / file).stat().st_size < 200_000 + 64 * 1024

    model, info = Gemma4ForConditionalGeneration.from_pretrained(out, output_loading_info=True, dtype=torch.bfloat16)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert index["metadata"]["total_parameters"] == model.num_parameters()
    sd = model.state_dict()
    with safe_open(out / index["weight_map"]["model.language_model.embed_tokens.weight"], "pt") as f:
        emb = f.get_tensor("model.language_model.embed_tokens.weight")
    assert torch.equal(sd["model.language_model.embed_tokens.weight"], emb)
    assert torch.equal(sd["lm_head.weight"], emb)  # tied
    # Values: random matrices at std 1/sqrt(fan_in), the pad row zero (as nn.Embedding(padding_idx) initialises),
    # norms and layer_scalar 1, clip bounds +-inf (transformers' init).
    q = sd["model.language_model.layers.0.self_attn.q_proj.weight"].float()
    assert abs(q.std().item() * q.shape[1] ** 0.5 - 1.0) < 0.05
    assert torch.all(emb[0] == 0) and torch.all(emb[1:].abs().amax(dim=1) > 0)
    ple = sd["model.language_model.embed_tokens_per_layer.weight"]
    assert torch.all(ple[0] == 0) and torch.all(ple[1:].abs().amax(dim=1) > 0)
    assert torch.all(sd["model.language_model.layers.2.input_layernorm.weight"] == 1)
    assert sd["model.language_model.layers.3.layer_scalar"].item() == 1.0
    assert sd["model.vision_tower.encoder.layers.0.mlp.up_proj.input_max"].item() == float("inf")
    assert sd["model.audio_tower.layers.1.self_attn.q_proj.output_min"].item() == float("-inf")


def test_single_file_checkpoint_loads_and_is_deterministic(reference_tiny, tmp_path):
    from transformers import Gemma4ForCausalLM

    cfg = reference_tiny["b_text"] / "config.json"
    a = msc.write_synthetic_checkpoint(cfg, tmp_path / "x", seed=7, progress=False)
    b = msc.write_synthetic_checkpoint(cfg, tmp_path / "y", seed=7, max_shard_bytes=100_000, progress=False)
    c = msc.write_synthetic_checkpoint(cfg, tmp_path / "z", seed=8, progress=False)
    assert [p.name for p in a.glob("*.safetensors")] == ["model.safetensors"]
    assert not (a / "model.safetensors.index.json").exists()
    model, info = Gemma4ForCausalLM.from_pretrained(a, output_loading_info=True, dtype=torch.bfloat16)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    # values depend on (seed, name) only, not on sharding
    name = "model.layers.1.mlp.down_proj.weight"
    sharded = json.loads((b / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(a / "model.safetensors", "pt") as fa, safe_open(b / sharded, "pt") as fb, \
            safe_open(c / "model.safetensors", "pt") as fc:
        assert torch.equal(fa.get_tensor(name), fb.get_tensor(name))
        assert not torch.equal(fa.get_tensor(name), fc.get_tensor(name))
    assert torch.equal(model.state_dict()[name], _read_tensor(a, name))
    logits = model(torch.tensor([[2, 10, 20, 30]])).logits
    assert torch.isfinite(logits).all()


def _read_tensor(ckpt: Path, name: str) -> torch.Tensor:
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        return f.get_tensor(name)


def test_bf16_rounding_is_round_to_nearest_even():
    x = torch.randn(10_000, dtype=torch.float32) * 3
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1.0, float("inf"), float("-inf"), 1.00390625, 1.01171875, 65504.0])])
    want = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = msc.f32_to_bf16_bits(x.numpy().copy())
    np.testing.assert_array_equal(got, want)


def test_atomic_write_and_errors(reference_tiny, tmp_path):
    cfg = reference_tiny["b_text"] / "config.json"
    out = msc.write_synthetic_checkpoint(cfg, tmp_path / "o", progress=False)
    with pytest.raises(msc.SyntheticCheckpointError, match="already exists"):
        msc.write_synthetic_checkpoint(cfg, out, progress=False)
    msc.write_synthetic_checkpoint(cfg, out, seed=1, overwrite=True, progress=False)
    with pytest.raises(msc.SyntheticCheckpointError, match="neither a preset"):
        msc.write_synthetic_checkpoint(tmp_path / "missing.json", tmp_path / "p", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no temp dirs left behind


def test_cli_writes_checkpoint_and_reports(reference_tiny, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = msc.main(["--config", str(reference_tiny["b"] / "config.json"), "--out", str(out), "--seed", "2",
                   "--text-only", "--max-shard-gb", "0.0002"])
    assert rc == 0
    assert _layout(out) == _layout(reference_tiny["b_text"])
    assert (out / "model.safetensors.index.json").is_file()
    report = capsys.readouterr().out
    assert f"wrote {out}" in report and "peak RSS" in report
    with pytest.raises(SystemExit):
        msc.main(["--variant", "e2b", "--config", "x.json", "--out", str(tmp_path / "never")])
