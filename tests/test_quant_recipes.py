"""Recipes and the role table, checked on the real tensor names of Gemma 4 E2B as transformers builds them."""

from __future__ import annotations

import json

import pytest

from edge_gemma.quantize.recipes import RECIPES, Override, Recipe, RecipeError, classify, get_recipe
from edge_gemma.quantize.schemes import Int4Group, Int4GroupAsym, Int8PerChannel

from paths import REPO  # noqa: E402


@pytest.fixture(scope="module")
def e2b_tensors() -> dict[str, tuple[int, ...]]:
    """Every tensor of the real E2B model (name -> shape), from transformers on the meta device."""
    import torch
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    config = Gemma4Config(**json.loads((REPO / "edge_gemma/data/configs/gemma-4-E2B-it.config.json").read_text()))
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(config)
    # lm_head.weight is tied to embed_tokens and not saved in the checkpoint
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}


def test_role_table_covers_every_real_tensor(e2b_tensors):
    roles = {name: classify(name, shape) for name, shape in e2b_tensors.items()}
    assert not [n for n, r in roles.items() if r == "unknown"]
    # On E2B every 2-D tensor is a matmul weight or an embedding table, and nothing else is.
    for name, shape in e2b_tensors.items():
        assert (roles[name] != "float") == (len(shape) == 2), (name, shape, roles[name])
    assert [n for n, r in roles.items() if r == "embedding"] == [
        "model.language_model.embed_tokens.weight", "model.language_model.embed_tokens_per_layer.weight"]
    for name in ("model.language_model.layers.0.layer_scalar", "model.language_model.norm.weight",
                 "model.vision_tower.encoder.layers.0.mlp.down_proj.input_max",
                 "model.audio_tower.layers.0.self_attn.per_dim_scale", "model.audio_tower.output_proj.bias",
                 "model.audio_tower.layers.0.lconv1d.depthwise_conv1d.weight",
                 "model.vision_tower.patch_embedder.position_embedding_table",
                 "model.audio_tower.subsample_conv_projection.layer0.conv.weight",
                 "model.audio_tower.layers.0.norm_out.weight"):
        assert roles[name] == "float", name
    for name in ("model.language_model.per_layer_model_projection.weight",
                 "model.language_model.layers.3.per_layer_input_gate.weight",
                 "model.audio_tower.layers.0.self_attn.relative_k_proj.weight",
                 "model.audio_tower.subsample_conv_projection.input_proj_linear.weight",
                 "model.vision_tower.patch_embedder.input_proj.weight",
                 "model.embed_audio.embedding_projection.weight"):
        assert roles[name] == "linear", name


def test_int4_recipe_on_e2b(e2b_tensors):
    r = get_recipe("int4")
    plans = {n: r.plan(n, s) for n, s in e2b_tensors.items()}
    assert not [n for n, p in plans.items() if p.fallback_from is not None]  # every E2B K is a multiple of 32
    for name, p in plans.items():
        if p.role == "float":
            assert p.scheme is None
        elif p.role == "embedding" or name.startswith(("model.audio_tower.", "model.vision_tower.",
                                                         "model.embed_audio.", "model.embed_vision.")):
            assert p.scheme == Int8PerChannel(), name
        else:
            assert name.startswith("model.language_model.") and p.scheme == Int4Group(group_size=32), name
    text_int4 = [n for n, p in plans.items() if p.scheme == Int4Group(group_size=32)]
    # 35 q/o + 15 k/v (own KV layers only) + 3 MLP + 2 PLE linears per layer + the PLE model projection
    assert len(text_int4) == 35 * 2 + 15 * 2 + 35 * 3 + 35 * 2 + 1


def test_untied_lm_head_follows_the_embedding():
    assert classify("lm_head.weight", (512, 128)) == "linear"
    assert get_recipe("int4").scheme_for("lm_head.weight", (512, 128)) == Int8PerChannel()
    assert get_recipe("int4-emb4").scheme_for("lm_head.weight", (512, 128)) == Int4Group(group_size=32)


def test_text_only_layout_gets_the_same_decisions(e2b_tensors):
    """Gemma4ForCausalLM checkpoints name the decoder `model.` instead of `model.language_model.`."""
    prefix = "model.language_model."
    for recipe in (get_recipe("int4"), get_recipe("int4-emb4"), get_recipe("int8")):
        for name, shape in e2b_tensors.items():
            if name.startswith(prefix):
                text_name = "model." + name[len(prefix):]
                assert classify(text_name, shape) == classify(name, shape), text_name
                assert recipe.scheme_for(text_name, shape) == recipe.scheme_for(name, shape), text_name


def test_int8_and_fp32_recipes(e2b_tensors):
    for name, shape in e2b_tensors.items():
        s8 = RECIPES["int8"].scheme_for(name, shape)
        assert (s8 == Int8PerChannel()) == (len(shape) == 2)
        assert RECIPES["fp32"].scheme_for(name, shape) is None
    assert RECIPES["fp32"].float_dtype == "F32" and RECIPES["int4"].float_dtype == "source"


def test_fallback_when_group_does_not_fit():
    r = get_recipe("int4-g128")
    p = r.plan("model.language_model.layers.0.mlp.down_proj.weight", (64, 96))
    assert p.scheme == Int8PerChannel() and p.fallback_from == Int4Group(group_size=128) and "fallback" in p.rule
    assert r.scheme_for("model.language_model.layers.0.mlp.down_proj.weight", (64, 256)) == Int4Group(group_size=128)


def test_overrides_first_match_wins_and_none_keeps_float():
    r = Recipe(name="custom", default=Int4Group(group_size=32), overrides=(
        Override(pattern=r"\.layers\.0\.", scheme=None),
        Override(pattern=r"mlp", scheme=Int8PerChannel()),
        Override(pattern=r"down_proj", scheme=Int4Group(group_size=64)),
    ))
    assert r.scheme_for("model.language_model.layers.0.mlp.down_proj.weight", (8, 64)) is None
    assert r.scheme_for("model.language_model.layers.1.mlp.down_proj.weight", (8, 64)) == Int8PerChannel()
    assert r.scheme_for("model.language_model.layers.1.self_attn.q_proj.weight", (8, 64)) == Int4Group(group_size=32)
    # an override can never quantize a float tensor
    assert Recipe(name="x", default=Int8PerChannel(), overrides=(Override(pattern="norm", scheme=Int8PerChannel()),)
                  ).scheme_for("model.language_model.norm.weight", (64,)) is None


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipes_round_trip_through_the_manifest(name):
    r = RECIPES[name]
    d = json.loads(json.dumps(r.to_manifest()))
    assert Recipe.from_manifest(d) == r
    assert d["onnx_only"] == (name == "int4-asym-onnx")


def test_asym_recipe_is_onnx_only():
    r = get_recipe("int4-asym-onnx")
    assert r.onnx_only and r.default == Int4GroupAsym(group_size=32)
    assert r.scheme_for("model.language_model.embed_tokens.weight", (512, 128)) == Int8PerChannel()


def test_recipe_errors():
    with pytest.raises(RecipeError, match="unknown quantization recipe 'int3'.*int4"):
        get_recipe("int3")
    with pytest.raises(RecipeError, match="float_dtype"):
        Recipe(name="x", default=None, float_dtype="F16")
    with pytest.raises(RecipeError, match="not a valid regex"):
        Override(pattern="(", scheme=None)
    d = RECIPES["int4"].to_manifest()
    with pytest.raises(RecipeError, match="missing field 'default'"):
        Recipe.from_manifest({k: v for k, v in d.items() if k != "default"})
    with pytest.raises(RecipeError, match="unknown fields"):
        Recipe.from_manifest({**d, "bits": 3})
    with pytest.raises(RecipeError, match="onnx_only"):
        Recipe.from_manifest({**d, "onnx_only": True})
    with pytest.raises(RecipeError, match="not 2-D"):
        classify("model.language_model.layers.0.mlp.up_proj.weight", (4, 4, 4))


def test_makefile_quant_names_are_recipes():
    makefile = (REPO / "Makefile").read_text()
    assert "--recipe $(QUANT)" in makefile
    assert {"int4", "int8"} <= set(RECIPES)


def _aeq_channelwise(w, bits: int):
    """ai-edge-quantizer's own symmetric per-output-channel quantization (what `gemma4_mixed48` applies to a
    FULLY_CONNECTED or EMBEDDING_LOOKUP weight), quantized and dequantized."""
    import numpy as np
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithms.uniform_quantize import uniform_quantize_tensor as uq

    amax = np.abs(w).max(axis=1, keepdims=True)
    zp, scale = uq.tensor_zp_scale_from_min_max(-amax, amax, bits, True, qtyping.QuantGranularity.CHANNELWISE)
    params = qtyping.UniformQuantParams(num_bits=bits, quantized_dimension=0, scale=scale, zero_point=zp,
                                        symmetric=True)
    return uq.uniform_dequantize(uq.uniform_quantize(w, params), params)


def test_gemma4_mixed48_is_at_least_as_precise_as_litert_lms_recipe(e2b_tensors):
    """Every text tensor LiteRT-LM's `gemma4_mixed48` quantizes (int4 per channel; int8 per channel for the
    per-layer-input linears, ai-edge-quantizer's `regex='per_layer'`) gets a scheme of ours whose error is no larger
    than ai-edge-quantizer's on the same weights: int4 groups of 128 are finer than a channel; for int8 per channel
    the one difference is our bf16 scale (rounded up: at most 2^-7 larger than the float32 one)."""
    import numpy as np

    r = get_recipe("gemma4-mixed48")
    rng = np.random.default_rng(0)
    layer0 = [n for n in e2b_tensors if n.startswith("model.language_model.") and e2b_tensors[n].__len__() == 2
              and (".layers." not in n or ".layers.0." in n or ".layers.20." in n)]
    assert len(layer0) == 2 + 1 + 2 * 9 - 2  # the two tables, the PLE projection, layer 0 and shared layer 20
    int8 = 0
    for name in layer0:
        plan = r.plan(name, e2b_tensors[name])
        assert plan.fallback_from is None, name
        google_int8 = "per_layer" in name and "embed_tokens_per_layer" not in name
        assert plan.scheme == (Int8PerChannel() if google_int8 else Int4Group(group_size=128)), name
        int8 += google_int8
        k = e2b_tensors[name][1]
        w = (rng.standard_t(4, size=(48, k)) * 0.02).astype(np.float32)  # heavy tails, as trained weights have
        ours = plan.scheme.decode(plan.scheme.encode(w), w.shape)
        theirs = _aeq_channelwise(w, 8 if google_int8 else 4)
        rms = lambda d: float(np.sqrt(np.mean(d.astype(np.float64) ** 2)))  # noqa: E731
        bound = rms(w - theirs) * (1 + 2 ** -7 if google_int8 else 1.0)
        assert rms(w - ours) <= bound, (name, rms(w - ours), rms(w - theirs))
        if not google_int8:
            assert rms(w - ours) < 0.8 * rms(w - theirs), name  # and much finer, not merely level
    assert int8 == 1 + 2 * 2  # per_layer_model_projection; per_layer_input_gate and per_layer_projection twice
    towers = [n for n in e2b_tensors if n.startswith("model.audio_tower.") and len(e2b_tensors[n]) == 2]
    assert {r.scheme_for(n, e2b_tensors[n]) for n in towers} == {Int8PerChannel()}
