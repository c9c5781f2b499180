"""Parity of edge-gemma's vision and audio encoders with transformers' Gemma 4 towers.

The reference is the tiny `Gemma4ForConditionalGeneration` from `tests/tiny.py` built in memory (random init with a
fixed seed, weights scaled as in `tiny.write_checkpoint`), plain and perturbed (finite clip bounds, non-unit norms,
random `per_dim_scale` and position tables). Our towers load the reference towers' state dicts with `strict=True`;
every golden value is the reference's output on the same inputs (pixel values from the PIL image processor or a
hand-built patch grid, log-mel features from `Gemma4AudioFeatureExtractor`).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tiny
from edge_gemma.config import AudioConfig, VisionConfig, parse_config
from edge_gemma.model.audio import AudioEncoder, output_length
from edge_gemma.model.layers import ClippableLinear, MultimodalEmbedder, RMSNorm
from edge_gemma.model.vision import VisionEncoder

transformers = pytest.importorskip("transformers")

PATCH_DIM = 3 * 16 * 16
from paths import REPO  # noqa: E402


def _reference(perturbed: bool, eager: bool = True):
    """The tiny reference model; `eager=False` keeps transformers' default attention (SDPA in the vision tower)."""
    torch.manual_seed(0)
    config = tiny.hf_config("a")
    if eager:
        config._attn_implementation = "eager"
        for sub in (config.text_config, config.vision_config, config.audio_config):
            sub._attn_implementation = "eager"
    model = transformers.Gemma4ForConditionalGeneration(config).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(100)
        for _, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5))
    if perturbed:
        tiny.perturb_(model, seed=3)
    return model


@pytest.fixture(scope="module", params=["plain", "perturbed"])
def ref(request):
    """(transformers model, our ModelConfig) for the plain and the perturbed tiny model, eager attention."""
    model = _reference(request.param == "perturbed")
    return model, parse_config(model.config.to_dict())


@pytest.fixture(scope="module")
def perturbed_ref():
    model = _reference(True)
    return model, parse_config(model.config.to_dict())


def _vision(ref_model, cfg) -> VisionEncoder:
    ours = VisionEncoder(cfg.vision).eval()
    ours.load_state_dict(ref_model.model.vision_tower.state_dict(), strict=True)
    return ours


def _audio(ref_model, cfg) -> AudioEncoder:
    ours = AudioEncoder(cfg.audio).eval()
    ours.load_state_dict(ref_model.model.audio_tower.state_dict(), strict=True)
    return ours


def _embedder(hf_embedder) -> MultimodalEmbedder:
    w = hf_embedder.embedding_projection.weight
    ours = MultimodalEmbedder(w.shape[1], w.shape[0], eps=hf_embedder.eps).eval()
    ours.load_state_dict(hf_embedder.state_dict(), strict=True)
    return ours


def _grid_batch(grids: list[tuple[int, int]], num_patches: int, seed: int = 0):
    """Patchified images of `rows x cols` patches, row-major, positions (x=col, y=row), padded with (-1, -1) and
    zero pixels to `num_patches`, as the image processor lays them out."""
    g = torch.Generator().manual_seed(seed)
    pixels, positions = [], []
    for rows, cols in grids:
        ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        pos = torch.stack([xs.flatten(), ys.flatten()], dim=-1)
        pad = num_patches - rows * cols
        positions.append(torch.cat([pos, torch.full((pad, 2), -1)]))
        pixels.append(torch.cat([torch.rand(rows * cols, PATCH_DIM, generator=g), torch.zeros(pad, PATCH_DIM)]))
    return torch.stack(pixels), torch.stack(positions)


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------------


def test_rmsnorm_matches_reference_with_and_without_scale():
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

    x = torch.randn(3, 5, 64) * 4
    for with_scale in (True, False):
        hf = Gemma4RMSNorm(64, eps=1e-6, with_scale=with_scale)
        ours = RMSNorm(64, 1e-6, with_scale=with_scale)
        if with_scale:
            with torch.no_grad():
                hf.weight.copy_(torch.randn(64))
        ours.load_state_dict(hf.state_dict(), strict=True)
        assert torch.equal(ours(x), hf(x))
        # bfloat16 input: computed in float32, cast back, as the reference does
        assert torch.equal(ours.bfloat16()(x.bfloat16()), hf.bfloat16()(x.bfloat16()))
    # no `1 + w` offset: a zero weight gives zero output
    z = RMSNorm(64)
    with torch.no_grad():
        z.weight.zero_()
    assert torch.count_nonzero(z(x)) == 0


def test_clippable_linear_applies_bounds():
    lin = ClippableLinear(4, 3)
    assert {k for k, _ in lin.named_buffers()} == {"input_min", "input_max", "output_min", "output_max"}
    with torch.no_grad():
        lin.linear.weight.copy_(torch.eye(3, 4))
        lin.input_min.fill_(-1.0), lin.input_max.fill_(2.0), lin.output_min.fill_(-0.5), lin.output_max.fill_(1.5)
    out = lin(torch.tensor([[-3.0, 0.25, 5.0, 9.0]]))
    # input clamp [-1, 2] -> [-1, 0.25, 2, 2]; identity rows -> [-1, 0.25, 2]; output clamp [-0.5, 1.5]
    assert torch.equal(out, torch.tensor([[-0.5, 0.25, 1.5]]))
    assert "input_min" not in dict(ClippableLinear(4, 3, clipped=False).named_buffers())


# --------------------------------------------------------------------------------------------------------------------
# Vision
# --------------------------------------------------------------------------------------------------------------------


def test_vision_state_dict_names_and_shapes_match(ref):
    model, cfg = ref
    theirs = model.model.vision_tower.state_dict()
    ours = VisionEncoder(cfg.vision).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


@pytest.mark.parametrize(
    "grids",
    [
        [(3, 3)],  # one soft token
        [(6, 9)],  # landscape
        [(12, 3)],  # tall
        [(9, 6), (3, 12), (6, 6)],  # a batch of three shapes, each padded differently
    ],
    ids=["3x3", "6x9", "12x3", "batch"],
)
def test_vision_soft_tokens_match_reference(ref, grids):
    model, cfg = ref
    ours = _vision(model, cfg)
    num_patches = max(r * c for r, c in grids) + 18  # always some padding patches
    pixels, positions = _grid_batch(grids, num_patches)
    with torch.no_grad():
        expected = model.model.vision_tower(pixel_values=pixels, pixel_position_ids=positions).last_hidden_state
        tokens, valid = ours(pixels, positions)
    cells = num_patches // 9
    assert tokens.shape == (len(grids), cells, cfg.vision.hidden_size) and valid.shape == (len(grids), cells)
    counts = torch.tensor([r * c // 9 for r, c in grids])
    assert torch.equal(valid, torch.arange(cells)[None, :] < counts[:, None])  # the first N cells are the valid ones
    _close(tokens[valid], expected)


def test_vision_image_processor_inputs_and_embed_vision(perturbed_ref):
    """Real processor output (three aspect ratios, padded to 630 patches) through the tower and `embed_vision`,
    against `Gemma4Model.get_image_features` (perturbed model only: the hand-built grids cover the plain one)."""
    from PIL import Image

    model, cfg = perturbed_ref
    rng = np.random.default_rng(0)
    sizes = [(100, 300), (400, 90), (64, 64)]  # landscape, portrait (both downscaled), square (upscaled)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    batch = transformers.Gemma4ImageProcessorPil(max_soft_tokens=70)(images, return_tensors="pt")
    pixels, positions = batch["pixel_values"], batch["image_position_ids"]
    ours, embed = _vision(model, cfg), _embedder(model.model.embed_vision)
    with torch.no_grad():
        expected = model.model.get_image_features(pixels, positions).pooler_output  # tuple, one entry per image
        tokens, valid = ours(pixels, positions)
        embedded = embed(tokens)
    assert valid.sum(-1).tolist() == batch["num_soft_tokens_per_image"].tolist() == [e.shape[0] for e in expected]
    for i, e in enumerate(expected):
        _close(embedded[i][valid[i]], e)


def test_vision_matches_sdpa_reference_within_tolerance():
    """transformers' default attention (SDPA) differs from eager only by float rounding."""
    model = _reference(True, eager=False)
    assert model.model.vision_tower.config._attn_implementation == "sdpa"
    cfg = parse_config(model.config.to_dict())
    pixels, positions = _grid_batch([(6, 9), (9, 3)], 63)
    with torch.no_grad():
        expected = model.model.vision_tower(pixel_values=pixels, pixel_position_ids=positions).last_hidden_state
        tokens, valid = _vision(model, cfg)(pixels, positions)
    torch.testing.assert_close(tokens[valid], expected, atol=5e-4, rtol=1e-4)


def test_vision_valid_tokens_do_not_depend_on_padding(perturbed_ref):
    model, cfg = perturbed_ref
    ours = _vision(model, cfg)
    a_pix, a_pos = _grid_batch([(6, 6)], 36)
    b_pix, b_pos = _grid_batch([(6, 6)], 36 + 27)
    with torch.no_grad():
        a, a_valid = ours(a_pix, a_pos)
        b, b_valid = ours(b_pix, b_pos)
    assert a_valid.sum() == b_valid.sum() == 4
    _close(b[b_valid], a[a_valid])


def test_vision_standardize_matches_reference():
    from transformers import Gemma4VisionConfig, Gemma4VisionModel

    torch.manual_seed(0)
    hf_cfg = Gemma4VisionConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        head_dim=64, position_embedding_size=64, standardize=True, use_clipped_linears=False,
    )
    hf_cfg._attn_implementation = "eager"
    hf = Gemma4VisionModel(hf_cfg).eval()
    with torch.no_grad():
        hf.std_bias.copy_(torch.randn(128))
        hf.std_scale.copy_(torch.rand(128) + 0.5)
        hf.patch_embedder.position_embedding_table.normal_(0, 0.1)
    cfg = VisionConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        head_dim=64, position_embedding_size=64, standardize=True, use_clipped_linears=False,
    )
    ours = VisionEncoder(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    assert "input_min" not in "".join(ours.state_dict())
    pixels, positions = _grid_batch([(6, 3)], 27)
    with torch.no_grad():
        expected = hf(pixel_values=pixels, pixel_position_ids=positions).last_hidden_state
        tokens, valid = ours(pixels, positions)
    _close(tokens[valid], expected)


def test_vision_rejects_bad_shapes(perturbed_ref):
    model, cfg = perturbed_ref
    ours = _vision(model, cfg)
    with pytest.raises(ValueError, match="pixel_values"):
        ours(torch.zeros(1, 9, 100), torch.zeros(1, 9, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of pooling_kernel_size"):
        ours(torch.zeros(1, 10, PATCH_DIM), torch.zeros(1, 10, 2, dtype=torch.long))


# --------------------------------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------------------------------

# Soft tokens per clip: 25 per second (gemma4-architecture.md section 5, measured with transformers: 0.5 s -> 13,
# 1 s -> 25, 2 s -> 50, 10 s -> 250); 0.1 s -> 3 and 0.37 s -> 9 measured with transformers 5.24 likewise.
AUDIO_CASES = {"0.1s": [0.1], "0.5s": [0.5], "1s": [1.0], "3s": [3.0], "batch": [1.0, 0.37]}
EXPECTED_TOKENS = {0.1: 3, 0.5: 13, 1.0: 25, 3.0: 75, 0.37: 9}


def _features(seconds: list[float], seed: int = 0):
    rng = np.random.default_rng(seed)
    t = [np.arange(int(s * 16000)) / 16000 for s in seconds]
    waves = [(0.3 * np.sin(2 * np.pi * 440 * x) + 0.05 * rng.standard_normal(x.shape)).astype(np.float32) for x in t]
    out = transformers.Gemma4AudioFeatureExtractor()(waves, return_tensors="pt")
    return out["input_features"], out["input_features_mask"]


def test_audio_state_dict_names_and_shapes_match(ref):
    model, cfg = ref
    theirs = model.model.audio_tower.state_dict()
    ours = AudioEncoder(cfg.audio).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


@pytest.mark.parametrize("case", list(AUDIO_CASES))
def test_audio_encoder_matches_reference(ref, case):
    model, cfg = ref
    seconds = AUDIO_CASES[case]
    features, mask = _features(seconds)
    ours, embed = _audio(model, cfg), _embedder(model.model.embed_audio)
    with torch.no_grad():
        expected = model.model.get_audio_features(features, mask)
        hidden, out_mask = ours(features, mask)
        embedded = embed(hidden)
    assert hidden.shape == (len(seconds), output_length(features.shape[1]), cfg.audio.output_proj_dims)
    assert torch.equal(out_mask, expected.attention_mask)
    assert out_mask.sum(-1).tolist() == [EXPECTED_TOKENS[s] for s in seconds]
    # padding frames included: the reference computes them the same way
    _close(hidden, expected.last_hidden_state)
    _close(embedded, expected.pooler_output)


def test_audio_valid_frames_do_not_depend_on_padding(perturbed_ref):
    """A runtime may pad audio to a fixed length: the valid frames must not change."""
    model, cfg = perturbed_ref
    ours = _audio(model, cfg)
    features, mask = _features([0.6])
    t = features.shape[1]
    padded = torch.cat([features, torch.zeros(1, 77, 128)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 77, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        a, a_mask = ours(features, mask)
        b, b_mask = ours(padded, padded_mask)
    n = int(a_mask.sum())
    assert n == int(b_mask.sum()) == 15 and a.shape[1] == output_length(t)
    _close(b[:, :n], a[:, :n])


def test_audio_clip_bounds_change_the_output(perturbed_ref):
    """The perturbed bounds are active, so the parity tests above would fail if the clamps were skipped."""
    model, cfg = perturbed_ref
    ours = _audio(model, cfg)
    features, mask = _features([0.5])
    with torch.no_grad():
        clipped, _ = ours(features, mask)
        for name, buf in ours.named_buffers():
            if name.endswith(("_min", "_max")):
                buf.fill_(float("-inf") if name.endswith("_min") else float("inf"))
        unclipped, _ = ours(features, mask)
    assert (clipped - unclipped).abs().max() > 1e-2


def test_audio_attention_is_local_and_causal(perturbed_ref):
    """Changing frame j (after the SSCP) changes outputs only at frames j..j+11 of the first layer's attention."""
    model, cfg = perturbed_ref
    attn = _audio(model, cfg).layers[0].self_attn
    from edge_gemma.model.audio import block_attention_mask, relative_position_table

    h = torch.randn(1, 40, cfg.audio.hidden_size)
    valid = block_attention_mask(cfg.audio, torch.ones(1, 40, dtype=torch.bool))
    rel = relative_position_table(cfg.audio, h.dtype)
    with torch.no_grad():
        base = attn(h, rel, valid)
        h2 = h.clone()
        h2[0, 17] += 1.0
        changed = (attn(h2, rel, valid) - base).abs().amax(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == list(range(17, 17 + cfg.audio.attention_context_left - 1))


def test_audio_rejects_bad_shapes(perturbed_ref):
    model, cfg = perturbed_ref
    with pytest.raises(ValueError, match="features"):
        _audio(model, cfg)(torch.zeros(1, 10, 128), torch.ones(1, 11, dtype=torch.bool))


def test_output_length_is_25_per_second():
    assert [output_length(n) for n in (1, 2, 3, 4, 5, 99, 100, 2999)] == [1, 1, 1, 1, 2, 25, 25, 750]


# --------------------------------------------------------------------------------------------------------------------
# Export friendliness: meta-device build, torch.export with static shapes
# --------------------------------------------------------------------------------------------------------------------


def test_towers_build_on_meta_and_load_with_assign(perturbed_ref):
    model, cfg = perturbed_ref
    with torch.device("meta"):
        vision, audio = VisionEncoder(cfg.vision), AudioEncoder(cfg.audio)
    vision.load_state_dict(model.model.vision_tower.state_dict(), strict=True, assign=True)
    audio.load_state_dict(model.model.audio_tower.state_dict(), strict=True, assign=True)
    for module in (vision, audio):
        assert not any(t.is_meta for t in list(module.parameters()) + list(module.buffers()))
    features, mask = _features([0.5])
    pixels, positions = _grid_batch([(3, 6)], 27)
    with torch.no_grad():
        _close(audio.eval()(features, mask)[0], _audio(model, cfg)(features, mask)[0])
        _close(vision.eval()(pixels, positions)[0], _vision(model, cfg)(pixels, positions)[0])


def test_towers_torch_export_static_shapes(perturbed_ref):
    model, cfg = perturbed_ref
    audio, vision = _audio(model, cfg), _vision(model, cfg)
    features, mask = _features([1.0, 0.37])
    pixels, positions = _grid_batch([(6, 9), (3, 3)], 63)
    with torch.no_grad():
        audio_ep = torch.export.export(audio, (features, mask), strict=False)
        vision_ep = torch.export.export(vision, (pixels, positions), strict=False)
        for eager, exported in ((audio(features, mask), audio_ep.module()(features, mask)),
                                (vision(pixels, positions), vision_ep.module()(pixels, positions))):
            _close(exported[0], eager[0])
            assert torch.equal(exported[1], eager[1])
    # no data-dependent ops survive in the graphs
    for ep in (audio_ep, vision_ep):
        targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        assert not {t for t in targets if "nonzero" in t or "item" in t or "_local_scalar_dense" in t}


@pytest.mark.parametrize("name", ["gemma-4-E2B-it", "gemma-4-E4B-it"])
def test_real_tower_geometry_matches_reference(name):
    """The real E2B/E4B towers (config.json shipped in the repo) have the reference's tensor names and shapes, and
    the presets in edge_gemma.config agree with the parsed config.json."""
    from edge_gemma.config import E2B, E4B, load_config

    path = REPO / "edge_gemma" / "data" / "configs" / f"{name}.config.json"
    cfg = load_config(path)
    assert (cfg.vision, cfg.audio) == ((E2B if "E2B" in name else E4B).vision, (E2B if "E2B" in name else E4B).audio)
    hf_cfg = transformers.Gemma4Config.from_dict(json.loads(path.read_text()))
    with torch.device("meta"):
        theirs = {
            "vision": transformers.Gemma4VisionModel(hf_cfg.vision_config).state_dict(),
            "audio": transformers.Gemma4AudioModel(hf_cfg.audio_config).state_dict(),
        }
        ours = {"vision": VisionEncoder(cfg.vision).state_dict(), "audio": AudioEncoder(cfg.audio).state_dict()}
    for tower in ("vision", "audio"):
        assert {k: tuple(v.shape) for k, v in ours[tower].items()} == {
            k: tuple(v.shape) for k, v in theirs[tower].items()
        }, tower


def test_clipped_linears_sharing_an_input_export_to_valid_onnx(tmp_path):
    """q/k/v read the same input; with `torch.clamp` bounds, torch.onnx's optimizer wrote an invalid graph. The
    `where` form in `layers.clamp` must keep exporting (optimize=True) and agree with eager in onnxruntime."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.q, self.k = RMSNorm(8), ClippableLinear(8, 8), ClippableLinear(8, 8)

        def forward(self, x):
            x = self.norm(x)
            return self.q(x) + self.k(x)

    module = Shared().eval()
    with torch.no_grad():
        for i, (name, buf) in enumerate(module.named_buffers()):
            buf.fill_((-0.4 if name.endswith("_min") else 0.6) + 0.01 * i)
    x = torch.randn(3, 8) * 3
    with torch.no_grad():
        program = torch.onnx.export(module, (x,), dynamo=True, optimize=True, verbose=False)
        expected = module(x).numpy()
    program.save(str(tmp_path / "shared.onnx"))
    session = ort.InferenceSession(str(tmp_path / "shared.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("left,right", [(13, 0), (5, 3)])
def test_block_attention_mask_matches_reference(left, right):
    """Our (B, nb, C, ctx) mask equals the reference's 4-D sliding mask converted to blocks, including a config with
    right context (unused by E2B/E4B, but the geometry must stay right if a checkpoint sets it)."""
    import types

    from transformers.masking_utils import create_bidirectional_mask
    from transformers.models.gemma4.modeling_gemma4 import Gemma4AudioModel, sliding_window_mask_function

    from edge_gemma.model.audio import block_attention_mask

    hf_cfg = transformers.Gemma4AudioConfig(
        hidden_size=128, num_attention_heads=2, attention_chunk_size=4, attention_context_left=left,
        attention_context_right=right,
    )
    hf_cfg._attn_implementation = "eager"
    cfg = AudioConfig(
        hidden_size=128, num_attention_heads=2, attention_chunk_size=4, attention_context_left=left,
        attention_context_right=right,
    )
    valid = torch.ones(2, 19, dtype=torch.bool)
    valid[1, 11:] = False
    mask4 = create_bidirectional_mask(
        config=hf_cfg, inputs_embeds=torch.zeros(2, 19, 128), attention_mask=valid,
        and_mask_function=sliding_window_mask_function((left - 1, right)),
    )
    mask5 = Gemma4AudioModel._convert_4d_mask_to_blocked_5d(types.SimpleNamespace(config=hf_cfg), mask4)
    expected = mask5[:, 0] == 0  # (B, nb, C, ctx), True = attend
    # the reference leaves padded-query rows (frames >= T) all masked; ours too
    assert torch.equal(block_attention_mask(cfg, valid), expected)


def test_audio_encoder_nondefault_geometry_matches_reference():
    """A standalone reference audio tower with a different chunk / left / right context (and no clipped linears):
    the blocking, gather and relative shift are general, not tuned to 12/13/0."""
    torch.manual_seed(0)
    geometry = dict(
        hidden_size=128, num_hidden_layers=1, num_attention_heads=4, subsampling_conv_channels=[128, 4],
        output_proj_dims=64, attention_chunk_size=5, attention_context_left=4, attention_context_right=3,
        use_clipped_linears=False,
    )
    hf_cfg = transformers.Gemma4AudioConfig(**geometry)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.Gemma4AudioModel(hf_cfg).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for name, p in hf.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.ndim >= 2 else 0.3))
    cfg = AudioConfig(**{**geometry, "subsampling_conv_channels": (128, 4)})
    ours = AudioEncoder(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    assert "input_min" not in "".join(ours.state_dict())
    features, mask = _features([0.9, 0.5])
    with torch.no_grad():
        expected = hf(features, mask)
        hidden, out_mask = ours(features, mask)
    assert torch.equal(out_mask, expected.attention_mask)
    _close(hidden, expected.last_hidden_state)
