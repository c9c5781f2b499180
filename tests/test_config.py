"""Config parsing: the published E2B/E4B config.json files give exactly the presets; parsing is strict."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from edge_gemma.config import E2B, E4B, ConfigError, ModelConfig, load_config, parse_config

CONFIGS = Path(__file__).resolve().parents[1] / "edge_gemma" / "data" / "configs"


def _load(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


@pytest.mark.parametrize("name,preset", [("gemma-4-E2B-it.config.json", E2B), ("gemma-4-E4B-it.config.json", E4B)])
def test_published_configs_equal_presets(name, preset):
    assert load_config(CONFIGS / name) == preset


def test_preset_geometry_matches_the_reference_study():
    # gemma4-architecture.md sections 1.5, 3 and 4.
    t = E2B.text
    assert [i for i in range(35) if t.is_full(i)] == [4, 9, 14, 19, 24, 29, 34]
    assert t.cache_layers == tuple(range(15))
    assert {t.kv_producer(i) for i in range(15, 35) if not t.is_full(i)} == {13}
    assert {t.kv_producer(i) for i in range(15, 35) if t.is_full(i)} == {14}
    assert [t.intermediate_size_for(i) for i in (0, 14, 15, 34)] == [6144, 6144, 12288, 12288]
    assert t.head_dim_for(4) == 512 and t.head_dim_for(3) == 256
    assert t.ple_dim == 8960
    u = E4B.text
    assert [i for i in range(42) if u.is_full(i)] == [5, 11, 17, 23, 29, 35, 41]
    assert len(u.cache_layers) == 42 - 18
    assert {u.kv_producer(i) for i in range(24, 42)} == {22, 23}
    assert u.intermediate_size_for(41) == 10240 and u.ple_dim == 10752


def test_global_head_dim_form_equals_per_layer_config_form():
    d = _load("gemma-4-E2B-it.config.json")
    t = d["text_config"]
    del t["per_layer_config"]
    t["global_head_dim"] = 512
    assert parse_config(d) == E2B


def test_unpadded_per_layer_keys_are_accepted():
    d = _load("gemma-4-E4B-it.config.json")
    pl = d["text_config"]["per_layer_config"]
    d["text_config"]["per_layer_config"] = {str(int(k)): v for k, v in pl.items()}
    assert parse_config(d) == E4B


@pytest.mark.parametrize(
    "where,key",
    [(None, "mystery_flag"), ("text_config", "altup_num_inputs"), ("vision_config", "foo"), ("audio_config", "bar")],
)
def test_unknown_key_is_an_error_naming_the_key(where, key):
    d = _load("gemma-4-E2B-it.config.json")
    (d if where is None else d[where])[key] = 1
    with pytest.raises(ConfigError, match=key):
        parse_config(d)


def test_ignored_bookkeeping_keys_are_accepted():
    d = _load("gemma-4-E2B-it.config.json")
    d["architectures"] = ["Gemma4ForConditionalGeneration"]
    d["text_config"]["dtype"] = "bfloat16"
    assert parse_config(d) == E2B


@pytest.mark.parametrize(
    "key,value",
    [("enable_moe_block", True), ("attention_k_eq_v", True), ("use_bidirectional_attention", "vision"),
     ("hidden_activation", "relu"), ("tie_word_embeddings", False)],
)
def test_unsupported_features_are_refused_by_name(key, value):
    d = _load("gemma-4-E2B-it.config.json")
    d["text_config"][key] = value
    with pytest.raises(ConfigError, match=key):
        parse_config(d)


def test_inconsistent_head_dims_are_refused():
    d = _load("gemma-4-E2B-it.config.json")
    d["text_config"]["global_head_dim"] = 256
    with pytest.raises(ConfigError, match="global_head_dim"):
        parse_config(d)
    d = _load("gemma-4-E2B-it.config.json")
    del d["text_config"]["per_layer_config"]["04"]
    with pytest.raises(ConfigError, match="per_layer_config"):
        parse_config(d)


def test_unsupported_model_type_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="gemma3"):
        parse_config({"model_type": "gemma3"})
    with pytest.raises(ConfigError, match="missing config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)


def test_text_only_layout_parses():
    d = copy.deepcopy(_load("gemma-4-E2B-it.config.json")["text_config"])
    cfg = parse_config(d)
    assert cfg.model_type == "gemma4_text" and cfg.vision is None and cfg.audio is None
    assert cfg.text == E2B.text


def test_manifest_round_trip():
    for preset in (E2B, E4B):
        assert ModelConfig.from_dict(json.loads(json.dumps(preset.to_dict()))) == preset


def test_tiny_reference_checkpoints_parse(tiny_checkpoints):
    # Configs written by transformers' save_pretrained (unpadded per_layer_config keys, current field set).
    for name, path in tiny_checkpoints.items():
        cfg = load_config(path)
        assert len(cfg.text.cache_layers) == cfg.text.num_hidden_layers - cfg.text.num_kv_shared_layers
        assert (cfg.vision is None) == (name == "text_only")
