"""Streaming quantization of checkpoints written by transformers: agreement with the numpy reference, bit-exact float
copies, sharding, strict reading back, clear errors for corrupt or mismatched checkpoints, and a measured memory
bound showing the quantizer never holds the model."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from edge_gemma.quantize import cli
from edge_gemma.quantize.load import QuantizedCheckpoint, QuantizedCheckpointError, load_dequantized
from edge_gemma.quantize.recipes import get_recipe
from edge_gemma.quantize.report import QuantReport
from edge_gemma.quantize.safetensors_io import CheckpointFormatError, SafetensorsWriter
from edge_gemma.quantize.schemes import relative_error
from edge_gemma.quantize.stream import QuantizeError, quantize_checkpoint

Q_PROJ = "model.language_model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory) -> Path:
    """The tiny perturbed multimodal model saved by transformers in bfloat16 (like the real hub checkpoints)."""
    import tiny

    return tiny.write_checkpoint(tmp_path_factory.mktemp("bf16") / "ckpt", "a", seed=5, perturbed=True,
                                 dtype=torch.bfloat16)


def _reference(src: Path) -> dict[str, torch.Tensor]:
    return load_file(src / "model.safetensors")  # decoded by the safetensors library, independently of ours


def test_int4_stream_matches_the_reference_and_keeps_floats_bit_exact(bf16_checkpoint, tmp_path):
    out = tmp_path / "q"
    # a tiny chunk forces every tensor through many row chunks
    report = quantize_checkpoint(bf16_checkpoint, "int4", out, chunk_bytes=4096, progress=False)
    ref = _reference(bf16_checkpoint)
    recipe = get_recipe("int4")
    written = load_file(out / "model.safetensors")
    errors = {t.name: t for t in report.tensors}
    with QuantizedCheckpoint(out) as ckpt:
        assert ckpt.names() and set(ckpt.names()) == set(ref)
        for name, tensor in ref.items():
            scheme = recipe.scheme_for(name, tuple(tensor.shape))
            if scheme is None:
                assert written[name].dtype == torch.bfloat16 and torch.equal(written[name], tensor), name
                continue
            w = tensor.float().numpy()
            expected = scheme.encode(w)
            stored = ckpt.stored(name)
            assert set(stored) == set(expected)
            for suffix in expected:
                assert np.array_equal(stored[suffix], expected[suffix]), (name, suffix)
            assert written[f"{name}.scales"].dtype == torch.bfloat16
            deq = ckpt.dequantized(name)
            assert np.array_equal(deq, scheme.decode(expected, w.shape))
            assert errors[name].rel_error == pytest.approx(relative_error(w, deq), rel=1e-6)
            assert errors[name].scheme == scheme.label
    assert {t.scheme for t in report.tensors} == {"int4-g32", "int8"}
    assert QuantReport.load(out / "quant_report.json") == report
    assert (out / "config.json").read_bytes() == (bf16_checkpoint / "config.json").read_bytes()


def test_manifest_records_scheme_shape_dtype_and_onnx_only(bf16_checkpoint, tmp_path):
    out = tmp_path / "asym"
    quantize_checkpoint(bf16_checkpoint, "int4-asym-onnx", out, progress=False)
    m = json.loads((out / "quant_manifest.json").read_text())
    assert m["recipe"]["name"] == "int4-asym-onnx" and m["onnx_only"] is True
    e = m["tensors"][Q_PROJ]
    assert e["scheme"]["kind"] == "int4_group_asym" and e["scheme"]["group_size"] == 32 and e["onnx_only"] is True
    assert e["source_dtype"] == "BF16" and e["shape"] == [128, 128] and e["role"] == "linear"
    assert set(e["stored"]) == {"qdata", "scales", "zeros"}
    emb = m["tensors"]["model.language_model.embed_tokens.weight"]
    assert emb["scheme"]["kind"] == "int8_per_channel" and emb["onnx_only"] is False and emb["role"] == "embedding"
    norm = m["tensors"]["model.language_model.norm.weight"]
    assert norm["scheme"] is None and norm["stored"]["tensor"]["dtype"] == "BF16"
    w = _reference(bf16_checkpoint)[Q_PROJ].float().numpy()
    assert relative_error(w, load_dequantized(out)[Q_PROJ]) < 0.1


def test_fp32_recipe_widens_every_tensor_exactly(bf16_checkpoint, tmp_path):
    out = tmp_path / "fp32"
    report = quantize_checkpoint(bf16_checkpoint, "fp32", out, progress=False)
    assert report.tensors == ()
    ref, written = _reference(bf16_checkpoint), load_file(out / "model.safetensors")
    assert set(written) == set(ref)
    for name, tensor in ref.items():
        assert written[name].dtype == torch.float32 and torch.equal(written[name], tensor.float()), name


def test_sharded_input_and_output(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["perturbed"]
    tensors = load_file(src / "model.safetensors")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(src / "config.json", sharded / "config.json")
    names = sorted(tensors)
    weight_map = {}
    for i in range(3):
        shard = f"model-{i + 1:05d}-of-00003.safetensors"
        part = {n: tensors[n] for n in names[i::3]}
        save_file(part, sharded / shard)
        weight_map.update({n: shard for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    single = quantize_checkpoint(src, "int4", tmp_path / "single", progress=False)
    multi = quantize_checkpoint(sharded, "int4", tmp_path / "multi", max_shard_bytes=1 << 20, progress=False)
    shards = sorted(p.name for p in (tmp_path / "multi").glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((tmp_path / "multi" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert not (tmp_path / "multi" / "model.safetensors").exists()
    a, b = load_dequantized(tmp_path / "single"), load_dequantized(tmp_path / "multi")
    assert a.keys() == b.keys() == tensors.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    assert {t.name: t.rel_error for t in single.tensors} == {t.name: t.rel_error for t in multi.tensors}


# ------------------------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def quantized(bf16_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qd") / "int4"
    quantize_checkpoint(bf16_checkpoint, "int4", out, progress=False)
    return out


def _corrupt(quantized: Path, tmp_path: Path, edit) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(quantized, bad)
    tensors = load_file(bad / "model.safetensors")
    edit(tensors)
    save_file(tensors, bad / "model.safetensors")
    return bad


def _as_int8(t):
    """Replace the int4 arrays of q_proj by an int8 quantization of the same weight (manifest still says int4)."""
    w = torch.randn(128, 128)
    t[f"{Q_PROJ}.qdata"] = torch.randint(-127, 128, (128, 128), dtype=torch.int8)
    t[f"{Q_PROJ}.scales"] = (w.abs().amax(1) / 127).to(torch.bfloat16)


CORRUPTIONS = {
    "int8 under an int4 manifest": (_as_int8, r"q_proj\.weight\.qdata.*int4-g32 qdata.*dtype I8, manifest expects U8"),
    "missing scales": (lambda t: t.pop(f"{Q_PROJ}.scales"), r"q_proj\.weight\.scales.*is missing from the file"),
    "wrong scales shape": (lambda t: t.__setitem__(f"{Q_PROJ}.scales", t[f"{Q_PROJ}.scales"][:, :2].contiguous()),
                           r"q_proj\.weight\.scales.*shape \[128, 2\], manifest expects \[128, 4\]"),
    "float stored as another dtype": (
        lambda t: t.__setitem__("model.language_model.norm.weight", t["model.language_model.norm.weight"].float()),
        r"norm\.weight.*dtype F32, manifest expects BF16"),
    "stray tensor": (lambda t: t.__setitem__("extra.weight", torch.zeros(2)), r"not described by.*extra\.weight"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_or_mismatched_checkpoint_is_a_clear_error(quantized, tmp_path, case):
    edit, message = CORRUPTIONS[case]
    bad = _corrupt(quantized, tmp_path, edit)
    with pytest.raises(QuantizedCheckpointError, match=message) as exc:
        QuantizedCheckpoint(bad)
    assert str(bad) in str(exc.value)


def test_manifest_that_disagrees_with_the_data(quantized, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(quantized, bad)
    m = json.loads((bad / "quant_manifest.json").read_text())
    m["tensors"][Q_PROJ]["scheme"]["group_size"] = 64  # data was written with group 32
    (bad / "quant_manifest.json").write_text(json.dumps(m))
    with pytest.raises(QuantizedCheckpointError,
                       match=r"q_proj\.weight\.scales.*shape \[128, 4\], manifest expects \[128, 2\]"):
        QuantizedCheckpoint(bad)
    m["tensors"][Q_PROJ]["scheme"] = {"kind": "int3"}
    (bad / "quant_manifest.json").write_text(json.dumps(m))
    with pytest.raises(QuantizedCheckpointError, match=r"q_proj\.weight.*unknown scheme kind 'int3'"):
        QuantizedCheckpoint(bad)
    (bad / "model.safetensors").write_bytes((quantized / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(CheckpointFormatError, match=r"bad/model\.safetensors"):
        QuantizedCheckpoint(bad)
    (bad / "quant_manifest.json").unlink()
    with pytest.raises(QuantizedCheckpointError, match="no quant_manifest.json"):
        QuantizedCheckpoint(bad)


def test_bad_sources_and_outputs(bf16_checkpoint, quantized, tmp_path):
    with pytest.raises(QuantizeError, match="already a quantized checkpoint"):
        quantize_checkpoint(quantized, "int4", tmp_path / "again", progress=False)
    with pytest.raises(QuantizeError, match="already exists"):
        quantize_checkpoint(bf16_checkpoint, "int4", quantized, progress=False)
    with pytest.raises(CheckpointFormatError, match="no model.safetensors"):
        quantize_checkpoint(tmp_path, "int4", tmp_path / "o", progress=False)
    out = tmp_path / "ow"
    quantize_checkpoint(bf16_checkpoint, "int8", out, progress=False)
    quantize_checkpoint(bf16_checkpoint, "int4", out, overwrite=True, progress=False)
    assert json.loads((out / "quant_manifest.json").read_text())["recipe"]["name"] == "int4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ow"]  # no temporary or old directories left


def test_failure_leaves_nothing_behind(bf16_checkpoint, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(bf16_checkpoint, src)
    tensors = load_file(src / "model.safetensors")
    tensors[Q_PROJ][3, 5] = float("nan")
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(QuantizeError, match=r"q_proj\.weight.*NaN"):
        quantize_checkpoint(src, "int4", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_cli_prints_the_table_and_a_progress_bar(bf16_checkpoint, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args([str(bf16_checkpoint), "--recipe", "int8", "--out", str(tmp_path / "o")])
    assert cli.run(args) == 0
    captured = capsys.readouterr()
    assert Q_PROJ in captured.out and "rel err" in captured.out and "int8:" in captured.out
    assert "quantize int8" in captured.err and "tensor" in captured.err


# ------------------------------------------------------------------------------------------------- memory
# Peak RSS is read from /proc/self/status (VmHWM, per address space): getrusage's ru_maxrss of a spawned child can
# report the parent's (pytest's) size at fork time instead of its own.
_CHILD = textwrap.dedent("""
    import json, sys
    def status_kib(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    def hwm_kib():
        return status_kib("VmHWM")  # resident high-water mark
    from edge_gemma.quantize.stream import quantize_checkpoint
    base = hwm_kib()
    report = quantize_checkpoint(sys.argv[1], "int4", sys.argv[2], chunk_bytes=4 << 20, progress=False)
    print(json.dumps({"base_kib": base, "peak_kib": hwm_kib(), "vm_peak_kib": status_kib("VmPeak"),
                      "tensors": len(report.tensors)}))
""")


def _write_synthetic(path: Path) -> int:
    """A ~290 MB checkpoint with real-looking names (float32 and bf16), written a few MB at a time."""
    rng = np.random.default_rng(0)
    plan = [("model.language_model.embed_tokens.weight", "F32", (32768, 1024)),
            ("model.language_model.embed_tokens_per_layer.weight", "BF16", (32768, 1024))]
    for i in range(4):
        plan += [(f"model.language_model.layers.{i}.mlp.gate_proj.weight", "F32", (2048, 1024)),
                 (f"model.language_model.layers.{i}.mlp.up_proj.weight", "F32", (2048, 1024)),
                 (f"model.language_model.layers.{i}.mlp.down_proj.weight", "F32", (1024, 2048)),
                 (f"model.language_model.layers.{i}.input_layernorm.weight", "F32", (1024,))]
    writer = SafetensorsWriter(path, plan)
    for name, dtype, shape in plan:
        step = max(1, (1 << 20) // int(np.prod(shape[1:], dtype=np.int64)))
        for r0 in range(0, shape[0], step):
            rows = rng.standard_normal((min(step, shape[0] - r0),) + shape[1:], dtype=np.float32) * 0.02
            if dtype == "BF16":
                rows = (rows.view(np.uint32) >> 16).astype(np.uint16)  # truncation is fine for test data
            writer.write_rows(name, r0, rows)
    writer.close()
    return path.stat().st_size


def test_streaming_never_holds_the_model(tmp_path):
    src = tmp_path / "big"
    src.mkdir()
    size = _write_synthetic(src / "model.safetensors")
    assert size > 280e6
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(tmp_path / "out")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print("quantizer child:", r)
    peak, grew = r["peak_kib"] * 1024, (r["peak_kib"] - r["base_kib"]) * 1024
    # The float model is 290 MB; the quantizer's whole process peaks far below it, and grows by a few chunks only.
    assert peak < 0.4 * size, (peak, size)
    assert grew < 80e6, grew
    assert r["tensors"] == 14
    with QuantizedCheckpoint(tmp_path / "out") as ckpt:  # validates every header against the manifest
        assert ckpt.schemes["model.language_model.layers.0.mlp.up_proj.weight"].label == "int4-g32"
        assert ckpt.schemes["model.language_model.embed_tokens_per_layer.weight"].label == "int8"


def test_precomputed_arrays_are_checked(bf16_checkpoint, tmp_path):
    w = _reference(bf16_checkpoint)[Q_PROJ].float().numpy()
    scheme = get_recipe("int4").scheme_for(Q_PROJ, w.shape)
    good = scheme.encode(w)
    out = tmp_path / "ok"
    quantize_checkpoint(bf16_checkpoint, "int4", out, precomputed={Q_PROJ: good}, algorithm={"note": "test"},
                        progress=False)
    m = json.loads((out / "quant_manifest.json").read_text())
    assert m["algorithm"] == {"name": "gptq", "note": "test"} and m["tensors"][Q_PROJ]["algorithm"] == "gptq"
    with pytest.raises(QuantizeError, match=r"q_proj\.weight.*qdata is int8 \[128, 64\], expected uint8"):
        quantize_checkpoint(bf16_checkpoint, "int4", tmp_path / "bad",
                            precomputed={Q_PROJ: {**good, "qdata": good["qdata"].astype(np.int8)}}, progress=False)
    with pytest.raises(QuantizeError, match="does not quantize"):
        quantize_checkpoint(bf16_checkpoint, "int4", tmp_path / "bad",
                            precomputed={"model.language_model.norm.weight": good}, progress=False)
    assert not (tmp_path / "bad").exists()
