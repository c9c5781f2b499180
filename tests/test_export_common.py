"""The shared export loader (`export/common.load_export_model`) and the module swaps every backend is built from.

* One strict loader for every backend: a left-over tensor, a missing tensor and a quantized tensor that no linear can
  take are each one clear error naming the tensor.
* `replace_modules` swaps by exact type, in place, and keeps the replaced module's parameters.
* The swapped decoders, run eagerly, compute what the plain eager decoder computes (ONNX's caches-as-inputs with the
  two-block attention; ExecuTorch's key-major one-token steps; LiteRT's transposed-V caches are checked through the
  exported files in test_litert.py, since their `dynamic_update_slice` op is litert-torch's).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edge_gemma.export.common import ExportModelError, load_export_model, replace_modules  # noqa: E402
from edge_gemma.export.onnx import OnnxLinears  # noqa: E402
from edge_gemma.model.attention import GroupedSDPA  # noqa: E402

from paths import DEFAULT  # noqa: E402


@pytest.fixture(scope="module")
def int8_checkpoint(embedded_int8_checkpoint) -> Path:
    return embedded_int8_checkpoint


def _copy(src: Path, dst: Path) -> tuple[Path, dict]:
    shutil.copytree(src, dst)
    return dst, json.loads((dst / "quant_manifest.json").read_text())


def _save(dst: Path, manifest: dict) -> None:
    (dst / "quant_manifest.json").write_text(json.dumps(manifest))


def test_left_over_tensor_is_an_error_naming_it(int8_checkpoint, tmp_path):
    from safetensors.numpy import save_file

    dst, m = _copy(int8_checkpoint, tmp_path / "extra")
    name = "model.language_model.extra_proj.weight"
    save_file({name: np.zeros((4, 4), np.float32)}, str(dst / "extra.safetensors"))
    m["files"].append("extra.safetensors")
    m["tensors"][name] = {"shape": [4, 4], "scheme": None, "file": "extra.safetensors",
                          "stored": {"tensor": {"name": name, "dtype": "F32", "shape": [4, 4]}}}
    _save(dst, m)
    with pytest.raises(ExportModelError, match="unexpected tensor.*extra_proj"):
        load_export_model(dst, OnnxLinears(), text_only=True)


def test_missing_tensor_is_an_error_naming_it(int8_checkpoint, tmp_path):
    dst, m = _copy(int8_checkpoint, tmp_path / "missing")
    name = "model.language_model.layers.0.post_attention_layernorm.weight"
    entry = m["tensors"].pop(name)
    _save(dst, m)
    # the shard still holds the tensor: drop it from the file too, so the checkpoint itself stays consistent
    from safetensors.torch import load_file, save_file

    shard = dst / entry["file"]
    tensors = {k: v for k, v in load_file(str(shard)).items() if k != name}
    save_file(tensors, str(shard))
    with pytest.raises(ExportModelError, match="no tensor for.*layers.0.post_attention_layernorm"):
        load_export_model(dst, OnnxLinears(), text_only=True)


def test_every_backend_loads_the_same_tensors(int8_checkpoint):
    """The loader, not the backend, decides which tensors a model holds: ONNX's and ExecuTorch's factories see the
    same quantized names and the same float names."""
    pytest.importorskip("torchao")
    from edge_gemma.export.executorch.model import EtLinears

    seen = {}
    for label, linears in (("onnx", OnnxLinears()), ("executorch", EtLinears())):
        em = load_export_model(int8_checkpoint, linears, text_only=True)
        seen[label] = em.schemes
    assert seen["onnx"] == seen["executorch"]
    assert any(v != "float" for v in seen["onnx"].values()) and any(v == "float" for v in seen["onnx"].values())


def test_replace_modules_swaps_exact_type_and_keeps_parameters():
    from torch import nn

    from edge_gemma.export.executorch.swaps import KeyMajorSDPA

    root = nn.Sequential(nn.Linear(2, 2), nn.Sequential(GroupedSDPA(), KeyMajorSDPA()))
    weight = root[0].weight
    assert replace_modules(root, GroupedSDPA, lambda _: nn.Identity()) == 1
    assert isinstance(root[1][0], nn.Identity) and isinstance(root[1][1], KeyMajorSDPA)  # subclass left alone
    assert root[0].weight is weight


def test_onnx_swapped_decoder_matches_the_eager_decoder():
    """`CachedDecoder` run eagerly (old caches as inputs, new K/V out, two-block attention, the rms_norm op), fed a
    prompt (every position kept, as a verify call) then three decode steps (the last kept), gives the plain eager
    decoder's logits and final hidden states of those positions at each step."""
    from edge_gemma.checkpoint import load_model
    from edge_gemma.export.onnx.graphs import CachedDecoder

    ref = load_model(DEFAULT, max_len=64, text_only=True)
    swapped = load_model(DEFAULT, text_only=True)
    lm_ref, lm = ref.language_model, swapped.language_model
    graph = CachedDecoder(lm, _float_head(lm)).eval()
    text = lm.cfg
    ids = torch.tensor([[2, 81, 52, 29, 33, 61, 107, 45, 19, 7, 9, 11]])
    embeds, rows = lm_ref.embed(ids), lm_ref.ple_rows(ids)
    past = {i: [torch.zeros(1, text.num_key_value_heads, 0, text.head_dim_for(i)) for _ in range(2)]
            for i in text.cache_layers}
    with torch.no_grad():
        for start, stop in ((0, 9), (9, 10), (10, 11), (11, 12)):
            pos = torch.arange(start, stop)
            # the prompt asks for every position (a verify call), the steps for the last one (a prefill)
            keep = torch.arange(stop - start) if start == 0 else torch.tensor([stop - start - 1])
            want_h = lm_ref.hidden_states(embeds[:, start:stop], rows[:, start:stop], pos)[:, keep]
            want = lm_ref.logits(want_h)
            flat = [t for i in text.cache_layers for t in past[i]]
            got, hidden, *new = graph(embeds[:, start:stop], rows[:, start:stop], pos, keep, flat)
            assert got.shape == want.shape == (1, keep.numel(), text.vocab_size)
            assert (got - want).abs().max().item() <= 1e-5
            assert (hidden - want_h).abs().max().item() <= 1e-5
            for n, i in enumerate(text.cache_layers):
                past[i] = [torch.cat([past[i][0], new[2 * n]], 2), torch.cat([past[i][1], new[2 * n + 1]], 2)]


def _float_head(lm):
    from torch import nn

    w = lm.embed_tokens.weight.detach().float()
    head = nn.Linear(w.shape[1], w.shape[0], bias=False)
    head.weight = nn.Parameter(w, requires_grad=False)
    return head


def test_swapped_decoders_leave_the_model_definition_alone():
    """No backend adds a flag to the model: after every swap the eager classes are unchanged and the swapped
    modules are instances of the backends' own classes."""
    from edge_gemma.checkpoint import load_model
    from edge_gemma.export.executorch.swaps import KeyMajorSDPA, replace_for_executorch
    from edge_gemma.export.onnx.swaps import InputKVCache, TwoBlockSDPA, replace_for_onnx
    from edge_gemma.model.text import TextAttention

    before = dict(vars(TextAttention))
    a = load_model(DEFAULT, max_len=16, text_only=True).language_model
    b = load_model(DEFAULT, text_only=True).language_model
    replace_for_executorch(a)
    replace_for_onnx(b, _float_head(b))
    assert dict(vars(TextAttention)) == before
    assert all(type(layer.self_attn.sdpa) is KeyMajorSDPA for layer in a.layers)
    assert all(type(layer.self_attn.sdpa) is TwoBlockSDPA for layer in b.layers)
    assert all(type(b.layers[i].self_attn.kv_cache) is InputKVCache for i in b.cfg.cache_layers)
