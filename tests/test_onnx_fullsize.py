"""The ONNX audio graph as exported for full-size models (frames a multiple of 48, dynamic in blocks) against the eager
model, through the ONNX backend's own `encode_audio` (which pads the features with masked frames), and the
text-only export switch.

The full-size measurements themselves (E2B export peak RSS, time) are in benchmarks/README.md; here the same code
runs on the tiny multimodal checkpoint.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from edge_gemma.export.onnx import audio_frame_layout, load_onnx_model, write_audio_graph  # noqa: E402
from edge_gemma.runtimes.onnx import OnnxBackend  # noqa: E402


@pytest.fixture(scope="module")
def audio_graph(tiny_checkpoints, tmp_path_factory):
    import onnxruntime as ort

    em = load_onnx_model(tiny_checkpoints["a"])
    path = tmp_path_factory.mktemp("onnx_audio") / "audio.onnx"
    layout = write_audio_graph(em, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # the backend's encode_audio on just this session (the rest of an artifact is not needed for the audio path)
    backend = types.SimpleNamespace(entry={"audio": layout}, capabilities=types.SimpleNamespace(audio=True),
                                    _tower={"audio": session}.__getitem__)
    return em, layout, session, backend


def test_audio_layout_is_a_multiple_of_four_attention_chunks(audio_graph):
    em, layout, session, _ = audio_graph
    unit = 4 * em.cfg.audio.attention_chunk_size
    assert layout == audio_frame_layout(em.cfg)
    assert layout["frame_multiple"] == unit and layout["max_frames"] % unit == 0 and layout["max_frames"] >= 2999
    dim = session.get_inputs()[0].shape[0]
    assert isinstance(dim, str) and str(unit) in dim  # dynamic: a multiple of the block count, not a fixed size


@pytest.mark.parametrize("seconds", [0.23, 2.57])  # shorter than one frame block; many attention chunks and blocks
def test_padded_audio_graph_matches_eager_unpadded(audio_graph, seconds):
    em, layout, _, backend = audio_graph
    T = int(seconds * 100)
    rng = np.random.default_rng(int(seconds * 100))
    feats = rng.standard_normal((T, 128)).astype(np.float32)
    mask = np.ones(T, bool)
    mask[-3:] = False  # the processor's trailing invalid frames
    feats[~mask] = 0
    assert T % layout["frame_multiple"] != 0  # the backend has to pad
    with torch.no_grad():
        ref = em.model.encode_audio(torch.from_numpy(feats)[None], torch.from_numpy(mask)[None]).numpy()
    got = OnnxBackend.encode_audio(backend, feats, mask)
    assert got.shape == ref.shape == (int(mask[::2][::2].sum()), em.cfg.text.hidden_size)
    assert np.abs(got - ref).max() < 1e-4


# ------------------------------------------------------------------------------------------------ fidelity reference
def test_bounded_reference_gives_the_float32_models_logits():
    """The fidelity reference keeps the bf16 checkpoint's linears in bf16 and upcasts per call; its logits must be
    those of the plain float32 model (the upcast is exact, every sum is float32)."""
    from edge_gemma.checkpoint import load_model
    from edge_gemma.eager_backend import EagerBackend
    from edge_gemma.export.fidelity import reference_backend, teacher_forced_logits
    from edge_gemma.paths import DEFAULT_CHECKPOINT

    ids = [2, 17, 30, 9, 40, 11, 6, 12]
    ref = reference_backend(DEFAULT_CHECKPOINT, context=16)
    model = ref.model
    assert model.vision_tower is None and model.audio_tower is None  # text only
    assert model.language_model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16  # stored dtype kept
    assert model.language_model.norm.weight.dtype == torch.float32
    got = teacher_forced_logits(ref, ref.ple_source().gather, ids)
    full = EagerBackend(load_model(DEFAULT_CHECKPOINT, max_len=16, mmap_embeddings=True))
    want = teacher_forced_logits(full, full.ple_source().gather, ids)
    assert got.shape == want.shape == (len(ids), model.cfg.text.vocab_size)
    assert np.abs(got - want).max() < 1e-5


def test_eager_dequantized_comparison_is_left_out_above_the_budget(tmp_path):
    import shutil

    from edge_gemma.export.fidelity import dequantized_fits
    from edge_gemma.paths import DEFAULT_CHECKPOINT

    assert dequantized_fits(DEFAULT_CHECKPOINT) == (True, "")
    e2b = tmp_path / "e2b"
    e2b.mkdir()
    shutil.copy(DEFAULT_CHECKPOINT.parent / "configs" / "gemma-4-E2B-it.config.json", e2b / "config.json")
    fits, note = dequantized_fits(e2b)
    # E2B: text 1.88 G (embedding table included) + towers 0.48 G values, PLE table excluded -> ~10 GiB in float32
    assert not fits and "eager-dequantized not run" in note and "GiB" in note
