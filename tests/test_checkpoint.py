"""Strict checkpoint loading: every supported layout loads (and matches the reference), every bad input fails with an
error naming the file and the tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from edge_gemma.checkpoint import CheckpointError, load_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def copy_ckpt(src: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def edit_tensors(directory: Path, fn) -> None:
    file = directory / "model.safetensors"
    tensors = fn(load_file(str(file)))
    save_file(tensors, str(file), metadata={"format": "pt"})


def edit_config(directory: Path, fn) -> None:
    file = directory / "config.json"
    file.write_text(json.dumps(fn(json.loads(file.read_text()))))


def ids_for(model, length=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (1, length), generator=g)
    ids[0, 0] = 2
    return ids


def reference_logits(path: Path, ids: torch.Tensor, text_only: bool = False) -> torch.Tensor:
    from transformers import Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    cls = Gemma4ForCausalLM if text_only else Gemma4ForConditionalGeneration
    with torch.no_grad():
        return cls.from_pretrained(path, dtype=torch.float32).eval()(input_ids=ids).logits


def our_logits(model, ids):
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]))


# --------------------------------------------------------------------------------------------------------------------
# Layouts that load
# --------------------------------------------------------------------------------------------------------------------


def test_multimodal_layout_loads_everything(tiny_checkpoints):
    model = load_model(tiny_checkpoints["a"])
    assert model.vision_tower is not None and model.audio_tower is not None
    assert model.embed_vision is not None and model.embed_audio is not None
    assert not any(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_text_only_layout_gemma4_for_causal_lm(tiny_checkpoints):
    path = tiny_checkpoints["text_only"]
    model = load_model(path)
    assert model.vision_tower is None and model.audio_tower is None
    ids = ids_for(model)
    assert (our_logits(model, ids) - reference_logits(path, ids, text_only=True)).abs().max() <= 1e-4


def test_text_only_option_skips_towers(tiny_checkpoints):
    full = load_model(tiny_checkpoints["b"])
    text = load_model(tiny_checkpoints["b"], text_only=True)
    assert text.vision_tower is None and text.audio_tower is None
    assert not any(k.startswith(("vision_tower", "audio_tower", "embed_")) for k in text.state_dict())
    ids = ids_for(full)
    assert torch.equal(our_logits(full, ids), our_logits(text, ids))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files(tmp_path, dtype):
    path = tiny.write_checkpoint(tmp_path / "half", "a", seed=4, dtype=dtype)
    ids = ids_for(None)
    expected = reference_logits(path, ids)  # transformers upcasts the same file to float32
    model = load_model(path)
    assert model.language_model.embed_tokens.weight.dtype == torch.float32
    assert (our_logits(model, ids) - expected).abs().max() <= 1e-4
    # memory-mapped tables stay in the file's dtype (no float32 copy) and give the same logits
    mapped = load_model(path, mmap_embeddings=True)
    assert mapped.language_model.embed_tokens.weight.dtype == dtype
    assert mapped.language_model.embed_tokens_per_layer.weight.dtype == dtype
    assert mapped.language_model.norm.weight.dtype == torch.float32
    assert (our_logits(mapped, ids) - expected).abs().max() <= 1e-4


def test_compute_dtype_option(tiny_checkpoints):
    model = load_model(tiny_checkpoints["a"], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ref = our_logits(load_model(tiny_checkpoints["a"]), ids_for(model))
    got = our_logits(model, ids_for(model))
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max() < 1.0  # bf16 is coarse, but it is the same model


def test_sharded_checkpoint(tiny_checkpoints, tmp_path):
    from transformers import Gemma4ForConditionalGeneration

    src = tiny_checkpoints["perturbed"]
    ref = Gemma4ForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    out = tmp_path / "sharded"
    ref.save_pretrained(out, max_shard_size="300KB")
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    ids = ids_for(None)
    assert torch.equal(our_logits(load_model(out), ids), our_logits(load_model(src), ids))
    # a missing shard is named
    victim = sorted(out.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_model(out)


def test_mmap_embeddings_same_logits(tiny_checkpoints):
    ids = ids_for(None)
    a = our_logits(load_model(tiny_checkpoints["a"]), ids)
    b = our_logits(load_model(tiny_checkpoints["a"], mmap_embeddings=True), ids)
    assert torch.equal(a, b)


def test_shared_layer_kv_weights_are_ignored(tiny_checkpoints, tmp_path):
    """The reference drops k/v projections and norms of KV-shared layers on load; so do we."""
    path = copy_ckpt(tiny_checkpoints["a"], tmp_path)
    last = 5  # variant "a": 6 layers, the last two share K/V; layer 5 is a full layer (head_dim 64)
    prefix = f"model.language_model.layers.{last}.self_attn."

    def add(t):
        t[prefix + "k_proj.weight"] = torch.randn(64, 128)
        t[prefix + "v_proj.weight"] = torch.randn(64, 128)
        t[prefix + "k_norm.weight"] = torch.ones(64)
        return t

    edit_tensors(path, add)
    ids = ids_for(None)
    assert torch.equal(our_logits(load_model(path), ids), our_logits(load_model(tiny_checkpoints["a"]), ids))


def test_lm_head_equal_to_embedding_is_accepted(tiny_checkpoints, tmp_path):
    path = copy_ckpt(tiny_checkpoints["a"], tmp_path)
    edit_tensors(path, lambda t: {**t, "lm_head.weight": t["model.language_model.embed_tokens.weight"].clone()})
    load_model(path)


def test_lm_head_that_differs_is_an_error(tiny_checkpoints, tmp_path):
    path = copy_ckpt(tiny_checkpoints["a"], tmp_path)

    def add(t):
        head = t["model.language_model.embed_tokens.weight"].clone()
        head[7] += 0.25
        return {**t, "lm_head.weight": head}

    edit_tensors(path, add)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: lm_head\.weight differs .*0\.25 in 1 rows"):
        load_model(path)


# --------------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------------


def test_missing_config(tiny_checkpoints, tmp_path):
    path = copy_ckpt(tiny_checkpoints["a"], tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing config\.json"):
        load_model(path)


def test_unsupported_model_type(tiny_checkpoints, tmp_path):
    path = copy_ckpt(tiny_checkpoints["a"], tmp_path)
    edit_config(path, lambda c: {**c, "model_type": "gemma3"})
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported model_type 'gemma3'"):
        load_model(path)


def test_missing_safetensors(tiny_checkpoints, tmp_path):
    path = copy_ckpt(tiny_checkpoints["a"], tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(path)


def test_truncated_file(tiny_checkpoints, tmp_path):
    path = copy_ckpt(tiny_checkpoints["a"], tmp_path)
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated safetensors file: tensor '.*' ends at"):
        load_model(path)


def test_corrupt_header(tiny_checkpoints, tmp_path):
    path = copy_ckpt(tiny_checkpoints["a"], tmp_path)
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[12:20] = b"\xff" * 8  # inside the JSON header
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        load_model(path)


def test_corrupt_header_length(tiny_checkpoints, tmp_path):
    path = copy_ckpt(tiny_checkpoints["a"], tmp_path)
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[0:8] = (10**12).to_bytes(8, "little")
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header \(header length"):
        load_model(path)


def test_missing_tensor(tiny_checkpoints, tmp_path):
    path = copy_ckpt(tiny_checkpoints["a"], tmp_path)
    name = "model.language_model.layers.1.mlp.up_proj.weight"
    edit_tensors(path, lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(CheckpointError, match=rf"missing tensor '{name}' \(expected shape \(256, 128\)\)"):
        load_model(path)


def test_unexpected_tensor(tiny_checkpoints, tmp_path):
    path = copy_ckpt(tiny_checkpoints["a"], tmp_path)
    edit_tensors(path, lambda t: {**t, "model.language_model.layers.0.mystery.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor\(s\) \['model\.language_model\.layers\.0\.mystery\.weight'\]"):
        load_model(path)


def test_tower_tensor_without_tower_config_is_unexpected(tiny_checkpoints, tmp_path):
    path = copy_ckpt(tiny_checkpoints["a"], tmp_path)
    edit_config(path, lambda c: {**c, "audio_config": None})
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) \['model\.audio_tower\."):
        load_model(path)


def test_wrong_shape(tiny_checkpoints, tmp_path):
    path = copy_ckpt(tiny_checkpoints["a"], tmp_path)
    name = "model.language_model.layers.2.self_attn.q_proj.weight"
    edit_tensors(path, lambda t: {**t, name: torch.zeros(128, 128)})
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{name}' has shape \[128, 128\], expected \[256, 128\]"):
        load_model(path)


def test_tokens_beyond_the_ple_vocabulary(tiny_checkpoints, tmp_path):
    """vocab_size > vocab_size_per_layer_input: the checkpoint loads; ids without a PLE row are refused, as in
    transformers (where the lookup raises IndexError)."""
    from transformers import Gemma4ForConditionalGeneration

    path = copy_ckpt(tiny_checkpoints["a"], tmp_path)

    def grow(t):
        e = t["model.language_model.embed_tokens.weight"]
        t["model.language_model.embed_tokens.weight"] = torch.cat([e, torch.randn(8, e.shape[1])])
        return t

    edit_tensors(path, grow)
    edit_config(path, lambda c: {**c, "text_config": {**c["text_config"], "vocab_size": 520}})
    model = load_model(path)
    ok = ids_for(model)
    assert our_logits(model, ok).shape == (1, ok.shape[1], 520)  # ordinary ids still work
    bad = ok.clone()
    bad[0, 3] = 515
    with pytest.raises(ValueError, match="token id 515 has no Per-Layer-Embedding row: vocab_size_per_layer_input is 512"):
        model.generate_greedy(bad, 2)
    ref = Gemma4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    with pytest.raises(IndexError):
        ref(input_ids=bad)


# --------------------------------------------------------------------------------------------------------------------
# PEFT LoRA adapters
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_adapter(tiny_checkpoints, tmp_path_factory):
    """(base dir, adapter dir, reference logits of the un-merged PEFT model, ids), built with the `peft` library."""
    peft = pytest.importorskip("peft")  # a dev dependency; see the report
    from transformers import Gemma4ForConditionalGeneration

    base = tiny_checkpoints["perturbed"]
    model = Gemma4ForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(
        r=4, lora_alpha=12, init_lora_weights=False,
        target_modules=r".*language_model\.layers\.\d+\.(self_attn\.(q_proj|v_proj|o_proj)|mlp\.down_proj)",
    )
    peft_model = peft.get_peft_model(model, config).eval()
    out = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(out)
    ids = ids_for(None, seed=9)
    with torch.no_grad():
        merged = peft_model.merge_and_unload()  # PEFT's own merge is the golden
        expected = merged(input_ids=ids).logits
    return base, out, expected, ids


def test_lora_adapter_is_merged(lora_adapter):
    base, adapter, expected, ids = lora_adapter
    merged = load_model(base, adapter=adapter)
    got = our_logits(merged, ids)
    assert (got - expected).abs().max() <= 1e-4
    assert (our_logits(load_model(base), ids) - expected).abs().max() > 1e-2  # the adapter changed something


def test_lora_adapter_directory_finds_its_base(lora_adapter):
    base, adapter, expected, ids = lora_adapter
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]).resolve() == Path(base).resolve()
    assert (our_logits(load_model(adapter), ids) - expected).abs().max() <= 1e-4


def test_lora_unsupported_variant_says_how_to_merge(lora_adapter, tmp_path):
    base, adapter, _, _ = lora_adapter
    dora = tmp_path / "dora"
    shutil.copytree(adapter, dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: use_dora=True is not supported; .*merge_and_unload"):
        load_model(base, adapter=dora)


def test_lora_adapter_with_unknown_base(lora_adapter, tmp_path):
    _, adapter, _, _ = lora_adapter
    lost = tmp_path / "lost"
    shutil.copytree(adapter, lost)
    cfg = json.loads((lost / "adapter_config.json").read_text())
    (lost / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "google/gemma-4-E2B-it"}))
    with pytest.raises(CheckpointError, match="not a local checkpoint directory.*merge_and_unload"):
        load_model(lost)


def _rewrite_header(file: Path, edit_text) -> None:
    """Rewrite a safetensors file's JSON header as text (`edit_text(str) -> str`), keeping its data section."""
    import struct

    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    text = edit_text(data[8:8 + n].decode("utf-8").rstrip())
    raw = text.encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


GATE, UP = "model.language_model.layers.1.mlp.gate_proj.weight", "model.language_model.layers.1.mlp.up_proj.weight"


def test_a_tensor_named_twice_in_the_header_is_refused(tiny_checkpoints, tmp_path):
    """JSON parsers keep one of two equal keys: without the check, `up_proj` would load as whichever came last."""
    from edge_gemma.quantize.safetensors_io import CheckpointFormatError, SafetensorsFile

    path = copy_ckpt(tiny_checkpoints["a"], tmp_path)
    file = path / "model.safetensors"
    _rewrite_header(file, lambda text: text.replace(f'"{GATE}"', f'"{UP}"'))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: corrupt safetensors header .*names tensor '{UP}' twice"):
        load_model(path)
    with pytest.raises(CheckpointFormatError, match=rf"names tensor '{UP}' twice"):  # quantize's reader
        SafetensorsFile(file)


def test_tensors_whose_bytes_overlap_are_refused(tiny_checkpoints, tmp_path):
    from edge_gemma.quantize.safetensors_io import CheckpointFormatError, SafetensorsFile

    path = copy_ckpt(tiny_checkpoints["a"], tmp_path)
    file = path / "model.safetensors"

    def same_bytes(text: str) -> str:
        header = json.loads(text)
        header[GATE]["data_offsets"] = header[UP]["data_offsets"]  # same shape and dtype: gate reads up's bytes
        return json.dumps(header)

    _rewrite_header(file, same_bytes)
    with pytest.raises(CheckpointError, match=r"corrupt safetensors header .*overlap"):
        load_model(path)
    with pytest.raises(CheckpointFormatError, match=rf"'{GATE}'.*overlap|'{UP}'.*overlap"):
        SafetensorsFile(file)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_by_load_and_quantize(tiny_checkpoints, tmp_path, value):
    """A NaN in a norm weight used to load and export (fidelity "KL nan", exit 0): load_model and quantize (which
    the exporters stream through) now name the tensor."""
    from edge_gemma.quantize.stream import QuantizeError, quantize_checkpoint

    path = copy_ckpt(tiny_checkpoints["a"], tmp_path)
    norm = "model.language_model.layers.0.input_layernorm.weight"

    def poison(t):
        w = t[norm].clone()
        w[3] = value
        return {**t, norm: w}

    edit_tensors(path, poison)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{norm}' has 1 NaN or inf"):
        load_model(path)
    for recipe in ("int4", "fp32"):  # kept float (the norm) and widened
        with pytest.raises(QuantizeError, match=rf"tensor '{norm}' has NaN or inf"):
            quantize_checkpoint(path, recipe, tmp_path / f"q-{recipe}", progress=False)
        assert not (tmp_path / f"q-{recipe}").exists()  # nothing half-written left behind
