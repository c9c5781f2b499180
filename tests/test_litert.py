"""LiteRT export, our LiteRT runtime, and the `.litertlm` bundle in Google's LiteRT-LM engine.

On the embedded default model (a tiny trained Gemma 4 with its own tokenizer: model vocab == tokenizer vocab, as
LiteRT-LM requires; sliding window 128):

* fp32 bundle in `litert_lm` (Google's engine, float32 activations, CPU): a 191-token prompt (longer than the sliding
  window, so prefill runs in two chunks and sliding layers mask) gives the same 32 greedy tokens as our eager model.
* int8 bundle in `litert_lm`: teacher-forced top-1 agreement >= 98 % against our eager model on the same quantized
  weights (LiteRT re-quantizes the dequantized weights and runs dynamic int8 activations).
* Our LiteRT runtime vs eager: fp32 logits within 1e-4 (chunked prefill through `prefill_<N>` + decode, and
  teacher-forced decode); int8 top-1 agreement >= 98 %.
* The stored integers are ours: int8 per channel and int4 group 32 (codes in [-8, 7], bf16 block scales stored as
  float16), read back from the written .tflite files, every block of every quantized text tensor.
* int4 bundle: our runtime's teacher-forced top-1 agreement >= 98 % against the eager model on the same weights, and
  LiteRT-LM's greedy continuation equals our runtime's (the same flatbuffer, external buffers included).

Artifacts are built once per session through `build_artifact` (the `edge-gemma export` path).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")
litert_lm = pytest.importorskip("litert_lm")

from edge_gemma.artifact import Artifact  # noqa: E402
from edge_gemma.eager_backend import EagerBackend, load_eager_model  # noqa: E402
from edge_gemma.export.build import build_artifact  # noqa: E402
from edge_gemma.export.fidelity import teacher_forced_logits  # noqa: E402
from edge_gemma.ple import PleTable  # noqa: E402
from edge_gemma.quantize.recipes import get_recipe  # noqa: E402
from edge_gemma.quantize.stream import quantize_checkpoint  # noqa: E402
from edge_gemma.runtimes.base import BackendError  # noqa: E402
from edge_gemma.runtimes.litert import LitertBackend  # noqa: E402
from edge_gemma.runtimes.litert_lm import LitertLmEngine, open_backend  # noqa: E402
from edge_gemma.tokenizer import Tokenizer  # noqa: E402

from paths import DEFAULT, REPO  # noqa: E402
HELDOUT = REPO / "edge_gemma" / "data" / "fidelity_heldout.txt"
from conftest import LITERT_CHUNK as CHUNK, LITERT_CONTEXT as CONTEXT  # noqa: E402


def _build(src, quant, out: Path, backends=("litert",)) -> Artifact:
    build_artifact(src, quant, list(backends), out, context=CONTEXT, max_prefill_chunk=CHUNK, check=False,
                   progress=False)
    return Artifact(out)


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(DEFAULT)


@pytest.fixture(scope="session")
def prompt_ids(tok) -> tuple[str, list[int]]:
    text = HELDOUT.read_text()[:700]
    return text, tok.encode(text)


@pytest.fixture(scope="session")
def fp32_artifact(embedded_litert_fp32_artifact) -> Artifact:
    return Artifact(embedded_litert_fp32_artifact)


@pytest.fixture(scope="session")
def onnx_fp32_artifact(tmp_path_factory) -> Artifact:
    """The ONNX export of the same fp32 recipe (text graphs only: the towers are not under test here)."""
    pytest.importorskip("onnxruntime")
    from edge_gemma.artifact import ArtifactWriter
    from edge_gemma.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("litert_onnx") / "fp32"
    with ArtifactWriter(out) as w:
        w.manifest["backends"] = {"onnx": export_onnx(DEFAULT, w.root / "onnx", context=CONTEXT, max_prefill_chunk=CHUNK,
                                                      text_only=True)}
    return Artifact(out)


@pytest.fixture(scope="session")
def int8_checkpoint(embedded_int8_checkpoint) -> Path:
    return embedded_int8_checkpoint


@pytest.fixture(scope="session")
def int8_artifact(embedded_litert_int8_artifact) -> Artifact:
    return Artifact(embedded_litert_int8_artifact)


@pytest.fixture(scope="session")
def int4_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("litert_q") / "int4"
    quantize_checkpoint(DEFAULT, get_recipe("int4"), out, progress=False)
    return out


@pytest.fixture(scope="session")
def int4_artifact(int4_checkpoint, tmp_path_factory) -> Artifact:
    return _build(int4_checkpoint, None, tmp_path_factory.mktemp("litert") / "int4")


def _backend_greedy(be, ple: PleTable, ids: list[int], n: int) -> list[int]:
    """Greedy decoding through the `Backend` contract (prefill in chunks, then one token at a time)."""
    be.reset()
    chunk = be.capabilities.max_prefill_chunk
    for s in range(0, len(ids), chunk):
        part = np.asarray(ids[s:s + chunk])
        logits = be.prefill(be.embed(part), ple.gather(part), np.arange(s, s + len(part)))
    out, pos = [], len(ids)
    while True:
        out.append(int(np.argmax(logits)))
        if len(out) == n:
            return out
        t = np.asarray(out[-1:])
        logits = be.decode(be.embed(t), ple.gather(t), np.asarray([pos]))
        pos += 1


def _eager_greedy(ckpt, ids: list[int], n: int) -> list[int]:
    model = load_eager_model(ckpt, context=CONTEXT)
    with torch.no_grad():
        return model.generate_greedy(torch.tensor([ids]), n)


# ------------------------------------------------------------------------------------------------ LiteRT-LM
def test_litertlm_fp32_greedy_tokens_equal_eager(fp32_artifact, prompt_ids, tok):
    text, ids = prompt_ids
    assert len(ids) + 1 > 128, "the prompt must be longer than the sliding window"
    expected = _eager_greedy(DEFAULT, [tok.token_to_id("<bos>"), *ids], 32)
    assert len(expected) == 32 and not set(expected) & {1, 16}, "pick a prompt without an early stop"
    with LitertLmEngine(fp32_artifact, threads=2) as engine:
        assert engine.tokenize(text) == ids  # same tokenizer inside the bundle
        got = engine.complete(text, max_new_tokens=32)
        assert engine.tokenize(got) == expected
    assert got == tok.decode(expected)


def test_litertlm_int8_teacher_forced_top1(int8_artifact, int8_checkpoint, prompt_ids, tok):
    text, ids = prompt_ids
    ids = ids[:64]
    ref = EagerBackend.from_checkpoint(int8_checkpoint, context=CONTEXT)
    full = [tok.token_to_id("<bos>"), *ids]
    logits = teacher_forced_logits(ref, ref.ple_source().gather, full)
    agree = total = 0
    with LitertLmEngine(int8_artifact, threads=2) as engine:
        for i in range(8, len(ids)):
            prefix = tok.decode(ids[:i])
            if engine.tokenize(prefix) != ids[:i]:
                continue  # the text of this prefix does not re-tokenize to the same ids
            total += 1
            agree += engine.complete(prefix, max_new_tokens=1) == tok.decode([int(logits[i].argmax())])
    assert total >= 40
    assert agree / total >= 0.98, f"top-1 agreement {agree}/{total}"


def test_litertlm_adapter_is_not_a_backend(fp32_artifact):
    with pytest.raises(BackendError, match="litert-lm runs the whole"):
        open_backend(fp32_artifact, threads=1)


# ------------------------------------------------------------------------------------------------ our runtime
def test_litert_runtime_fp32_within_1e4(fp32_artifact, prompt_ids, tok):
    _, ids = prompt_ids
    full = [tok.token_to_id("<bos>"), *ids][:160]
    ple = PleTable(fp32_artifact.path(fp32_artifact.manifest["ple"]["file"]), fp32_artifact.manifest["ple"])
    model = load_eager_model(DEFAULT, context=CONTEXT)
    lm = model.language_model
    with torch.no_grad():
        x = torch.tensor([full])
        e, p = model.embed(x)
        ref = lm(e, lm.ple_rows(p), torch.arange(len(full)))[0].numpy()  # [S, V]
    with LitertBackend(fp32_artifact, threads=2) as be:
        emb = be.embed(np.asarray(full))
        np.testing.assert_allclose(emb, e[0].numpy(), atol=1e-6)
        # chunked prefill: 100 tokens (prefill_128 + decode), then 60 more in one chunk
        rows = ple.gather(np.asarray(full))
        a = be.prefill(emb[:100], rows[:100], np.arange(100))
        b = be.prefill(emb[100:], rows[100:], np.arange(100, 160))
        assert np.abs(a - ref[99]).max() < 1e-4
        assert np.abs(b - ref[159]).max() < 1e-4
        tf = teacher_forced_logits(be, ple.gather, full[:40])
    assert np.abs(tf - ref[:40]).max() < 1e-4
    ple.close()


def test_litert_runtime_int8_top1(int8_artifact, int8_checkpoint, prompt_ids, tok):
    _, ids = prompt_ids
    full = [tok.token_to_id("<bos>"), *ids][:96]
    ref_be = EagerBackend.from_checkpoint(int8_checkpoint, context=CONTEXT)
    ref = teacher_forced_logits(ref_be, ref_be.ple_source().gather, full)
    ple = PleTable(int8_artifact.path(int8_artifact.manifest["ple"]["file"]), int8_artifact.manifest["ple"])
    with LitertBackend(int8_artifact, threads=2) as be:
        got = teacher_forced_logits(be, ple.gather, full)
    ple.close()
    agree = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    assert agree >= 0.98, agree


def _assert_integers_are_ours(report):
    """Every quantized text tensor is in the graph and LiteRT stores exactly our codes, block for block."""
    assert report["unchecked"] == [] and report["not_in_graph"] == [], report
    assert report["differ"] == [], {n: report["tensors"][n] for n in report["differ"]}
    for name, r in report["tensors"].items():
        assert r["equal_blocks"] == r["blocks"] > 0, (name, r)
        if r["factor"] == 1.0:  # scales stored exactly (bf16-exact values in float16 / float32)
            assert r["scales_equal"], (name, r)
        else:  # a constant the converter folded into the weight: only the storage rounding of scale * factor
            assert r["max_scale_rel_err"] < 1e-3, (name, r)


def test_int8_integers_are_ours(int8_artifact):
    report = int8_artifact.backends["litert"]["quantization"]["integer_check"]
    _assert_integers_are_ours(report)
    names = set(report["tensors"])
    assert any(n.endswith("embed_tokens_per_layer.weight") for n in names)
    assert any(n.endswith("per_layer_model_projection.weight") for n in names)


def test_int4_integers_are_ours_and_runtime_top1(int4_artifact, int4_checkpoint, prompt_ids, tok):
    """int4 group 32: LiteRT stores our codes in [-8, 7] and our bf16 block scales (as float16), where
    ai-edge-quantizer's own rule (max/7, codes in [-7, 7]) would change them; our runtime then agrees with the eager
    model on the same quantized weights."""
    entry = int4_artifact.backends["litert"]["quantization"]
    report = entry["integer_check"]
    _assert_integers_are_ours(report)
    assert any(label == "int4-g32" for label in entry["tensors"].values())
    assert sum(r["blocks"] for n, r in report["tensors"].items() if entry["tensors"][n] == "int4-g32") > 1000
    _, ids = prompt_ids
    full = [tok.token_to_id("<bos>"), *ids][:96]
    ref_be = EagerBackend.from_checkpoint(int4_checkpoint, context=CONTEXT)
    ref = teacher_forced_logits(ref_be, ref_be.ple_source().gather, full)
    ple = PleTable(int4_artifact.path(int4_artifact.manifest["ple"]["file"]), int4_artifact.manifest["ple"])
    with LitertBackend(int4_artifact, threads=2) as be:
        got = teacher_forced_logits(be, ple.gather, full)
        ours = _backend_greedy(be, ple, full[:40], 8)
    ple.close()
    agree = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    assert agree >= 0.98, agree
    with LitertLmEngine(int4_artifact, threads=2) as engine:  # Google's engine on the same int4 bundle
        text = tok.decode(full[1:40])
        assert engine.tokenize(text) == full[1:40]
        assert engine.complete(text, max_new_tokens=8) == tok.decode(ours)


def test_onnx_and_litert_artifacts_give_the_same_greedy_tokens(fp32_artifact, onnx_fp32_artifact, prompt_ids, tok):
    """The fp32 recipe through ONNX and LiteRT: the same 32 greedy tokens as each other and as the eager model
    (both read the PLE rows of the same table, the LiteRT artifact's ple.bin)."""
    from edge_gemma.runtimes.onnx import OnnxBackend

    _, ids = prompt_ids
    full = [tok.token_to_id("<bos>"), *ids]
    ple = PleTable(fp32_artifact.path(fp32_artifact.manifest["ple"]["file"]), fp32_artifact.manifest["ple"])
    with LitertBackend(fp32_artifact, threads=2) as be:
        lt = _backend_greedy(be, ple, full, 32)
    with OnnxBackend(onnx_fp32_artifact, threads=2) as be:
        ox = _backend_greedy(be, ple, full, 32)
    ple.close()
    assert lt == ox == _eager_greedy(DEFAULT, full, 32)


def test_runtime_refuses_non_consecutive_positions(fp32_artifact):
    with LitertBackend(fp32_artifact, threads=1) as be:
        e = np.zeros((3, be.capabilities.hidden_size), np.float32)
        ple = np.zeros((3, 6, 128), np.float32)
        with pytest.raises(BackendError, match="consecutive"):
            be.prefill(e, ple, np.array([0, 2, 3]))


def test_litert_runtime_image_within_1e4(fp32_artifact):
    """Soft tokens of a 6x9-patch image (padded by the runtime to the static patch count) vs the eager tower."""
    model = load_eager_model(DEFAULT, context=CONTEXT)
    v = model.cfg.vision
    rng = np.random.default_rng(0)
    w, h = 2 * v.pooling_kernel_size, 3 * v.pooling_kernel_size
    xs, ys = np.meshgrid(np.arange(w), np.arange(h), indexing="xy")
    pos = np.stack([xs.reshape(-1), ys.reshape(-1)], -1)
    pv = rng.random((pos.shape[0], 3 * v.patch_size**2), dtype=np.float32)
    with torch.no_grad():
        ref = model.encode_image(torch.from_numpy(pv)[None], torch.from_numpy(pos)[None]).numpy()
    with LitertBackend(fp32_artifact, threads=2) as be:
        assert be.capabilities.vision
        got = be.encode_image(pv, pos)
    assert got.shape == ref.shape == (w * h // v.pooling_kernel_size**2, model.cfg.text.hidden_size)
    assert np.abs(got - ref).max() < 1e-4


def test_litert_runtime_audio_within_1e4(fp32_artifact):
    """Soft tokens of 203 frames (padded by the runtime to the static 30 s) vs the eager tower on the 203 alone."""
    model = load_eager_model(DEFAULT, context=CONTEXT)
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((203, 128), dtype=np.float32)
    with torch.no_grad():
        ref = model.encode_audio(torch.from_numpy(feats)[None], torch.ones(1, 203, dtype=torch.bool)).numpy()
    with LitertBackend(fp32_artifact, threads=2) as be:
        assert be.capabilities.audio
        got = be.encode_audio(feats, np.ones(203, bool))
    assert got.shape == ref.shape == (51, model.cfg.text.hidden_size)
    assert np.abs(got - ref).max() < 1e-4
