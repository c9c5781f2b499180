"""GPTQ: exact reduction to round-to-nearest when inputs are uncorrelated, lower layer output error than
round-to-nearest on correlated inputs, codes in the schemes' own formats, and the calibrated checkpoint end to end
with the model-level quality report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edge_gemma.quantize.calibrate import (
    apply_quantized,
    gptq_quantize_checkpoint,
    model_quality,
    quality_report,
    token_batches,
)
from edge_gemma.quantize.gptq import GPTQError, gptq_quantize
from edge_gemma.quantize.load import QuantizedCheckpoint
from edge_gemma.quantize.schemes import Int4Group, Int4GroupAsym, Int8PerChannel, f32_to_bf16_bits
from edge_gemma.quantize.stream import quantize_checkpoint

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny forwards on a shared 2-core machine: 2 intra-op threads are ~25x slower than 1 when it is loaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SCHEMES = [Int8PerChannel(), Int4Group(group_size=32), Int4Group(group_size=128), Int4GroupAsym(group_size=32)]


def _problem(seed=0, n=32, k=256, t=1024):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    x = (rng.standard_normal((t, k)) @ mix).astype(np.float32)  # correlated inputs, like real activations
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    return w, x, 2.0 * x.T.astype(np.float64) @ x / t


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label)
def test_identity_hessian_gives_round_to_nearest_exactly(scheme):
    """With H proportional to I the inverse Hessian is diagonal, so no error is propagated: GPTQ is RTN."""
    w, _, _ = _problem(1)
    stored = gptq_quantize(w, 3.0 * np.eye(w.shape[1]), scheme)
    expected = scheme.encode(w)
    for suffix in expected:
        assert np.array_equal(stored[suffix], expected[suffix]), suffix


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label)
def test_gptq_lowers_the_layer_output_error(scheme):
    w, x, h = _problem(2)
    stored = gptq_quantize(w, h, scheme)
    w_gptq = scheme.decode(stored, w.shape)
    w_rtn = scheme.decode(scheme.encode(w), w.shape)
    err_gptq = np.linalg.norm(x @ (w - w_gptq).T)
    err_rtn = np.linalg.norm(x @ (w - w_rtn).T)
    assert err_gptq < 0.85 * err_rtn, (err_gptq, err_rtn)
    # the result is an ordinary instance of the scheme: same arrays, bf16-exact nonzero scales
    assert {k: (v.dtype, v.shape) for k, v in stored.items()} == \
        {k: (v.dtype, v.shape) for k, v in scheme.encode(w).items()}
    f32_to_bf16_bits(stored["scales"])
    assert np.all(stored["scales"] > 0)


def test_gptq_input_errors():
    w, _, h = _problem(3)
    with pytest.raises(GPTQError, match="Hessian has shape"):
        gptq_quantize(w, h[:10, :10], Int4Group(group_size=32))
    with pytest.raises(GPTQError, match="NaN"):
        gptq_quantize(w, h * np.nan, Int4Group(group_size=32))


def test_gptq_checkpoint_and_model_quality(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["a"]
    ids = torch.randint(3, 500, (8 * 32,), generator=torch.Generator().manual_seed(0)).tolist()
    calib, held_out = token_batches(ids[:128], 32), token_batches(ids[128:], 32)
    out = tmp_path / "gptq"
    report = gptq_quantize_checkpoint(src, "int4", out, calib, progress=False)
    manifest = json.loads((out / "quant_manifest.json").read_text())
    assert manifest["algorithm"]["name"] == "gptq" and manifest["algorithm"]["calibration"]["tokens"] == 128
    entries = manifest["tensors"]
    assert entries["model.language_model.layers.0.mlp.down_proj.weight"]["algorithm"] == "gptq"
    assert entries["model.language_model.per_layer_model_projection.weight"]["algorithm"] == "gptq"
    assert entries["model.language_model.embed_tokens.weight"]["algorithm"] == "rtn"
    assert entries["model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight"]["algorithm"] == "rtn"
    assert {t.scheme for t in report.tensors} == {"int4-g32", "int8"}
    QuantizedCheckpoint(out).close()  # headers agree with the manifest

    # Stage 0 (the PLE model projection) sees the same inputs in the float and the quantized model, so GPTQ's
    # objective can be checked directly there: its output error on the calibration inputs beats RTN's.
    from edge_gemma.checkpoint import load_model

    reference = load_model(src, text_only=True)
    proj = reference.language_model.per_layer_model_projection
    xs = []
    handle = proj.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for b in calib:
            reference(b, torch.arange(b.shape[1]))
    handle.remove()
    x = torch.cat(xs).numpy()
    w = proj.weight.numpy()
    name = "model.language_model.per_layer_model_projection.weight"
    dirs = {r: tmp_path / r for r in ("fp32", "int8", "int4")}
    for recipe, d in dirs.items():
        quantize_checkpoint(src, recipe, d, progress=False)
    with QuantizedCheckpoint(out) as g, QuantizedCheckpoint(dirs["int4"]) as r:
        err_g = np.linalg.norm(x @ (w - g.dequantized(name)).T)
        err_r = np.linalg.norm(x @ (w - r.dequantized(name)).T)
    assert err_g < err_r

    # model-level figures: the fp32 recipe is lossless, int8 is closer to float than int4
    work = load_model(src, text_only=True)
    q = {r: model_quality(reference, apply_quantized(work, d, layout="gemma4"), held_out) for r, d in dirs.items()}
    assert q["fp32"].kl_mean == 0.0 and q["fp32"].top1_agreement == 1.0 and q["fp32"].ppl_quant == q["fp32"].ppl_float
    assert 0.0 < q["int8"].kl_mean < q["int4"].kl_mean
    assert q["int8"].tokens == 4 * 31
    saved = quality_report(src, out, held_out)  # writes quant_quality.json
    assert json.loads((out / "quant_quality.json").read_text())["kl_mean"] == saved.kl_mean > 0


def test_apply_quantized_refuses_a_checkpoint_of_another_model(tiny_checkpoints, tmp_path):
    from edge_gemma.checkpoint import load_model

    out = tmp_path / "q"
    quantize_checkpoint(tiny_checkpoints["a"], "int8", out, progress=False)
    model = load_model(tiny_checkpoints["b"], text_only=True)  # 8 layers, the checkpoint has 6
    with pytest.raises(ValueError, match="embed_tokens_per_layer.weight.*has shape.*model expects"):
        apply_quantized(model, out, layout="gemma4")


def _byte_tokenizer(directory):
    """A byte-level tokenizer with every Gemma 4 special token, ids < 512 (the tiny model's vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from edge_gemma.tokenizer import SPECIAL_TOKEN_STRINGS

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = list(dict.fromkeys(SPECIAL_TOKEN_STRINGS.values()))
    vocab = {s: i for i, s in enumerate(specials)}
    vocab.update({c: len(specials) + i for i, c in enumerate(sorted(alphabet))})
    assert len(vocab) < 505  # below the tiny model's multimodal ids
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.save(str(directory / "tokenizer.json"))


def test_cli_gptq_with_calibration_text_and_quality_report(tiny_checkpoints, tmp_path, capsys):
    import argparse
    import shutil

    from edge_gemma.quantize import cli

    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoints["text_only"], src)
    _byte_tokenizer(src)
    text = "Quantize once, for every backend, and say what it costs. " * 6
    (tmp_path / "calib.txt").write_text(text)
    (tmp_path / "eval.txt").write_text(text[::-1])
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args([str(src), "--recipe", "int4", "--out", str(tmp_path / "q"), "--algorithm", "gptq",
                              "--calibration", str(tmp_path / "calib.txt"), "--quality-text",
                              str(tmp_path / "eval.txt"), "--seq-len", "32", "--max-sequences", "3",
                              "--no-progress"])
    assert cli.run(args) == 0
    printed = capsys.readouterr().out
    assert "int4-g32" in printed and "model-level (" in printed and "top-1 agreement" in printed
    manifest = json.loads((tmp_path / "q" / "quant_manifest.json").read_text())
    assert manifest["algorithm"]["name"] == "gptq" and manifest["algorithm"]["calibration"]["sequences"] == 3
    assert (tmp_path / "q" / "tokenizer.json").is_file()  # copied with the weights
    report = json.loads((tmp_path / "q" / "quant_report.json").read_text())
    assert report["unknown_tensors"] == [] and "model.layers.0.mlp.down_proj.weight" in manifest["tensors"]
    assert manifest["tensors"]["model.layers.0.mlp.down_proj.weight"]["algorithm"] == "gptq"
    assert json.loads((tmp_path / "q" / "quant_quality.json").read_text())["tokens"] == 3 * 31
    # without --calibration, GPTQ calibrates on the built-in text
    assert parser.parse_args([str(src), "--out", "x", "--algorithm", "gptq"]).calibration == str(cli.CALIBRATION_TEXT)
    assert cli.CALIBRATION_TEXT.is_file()
