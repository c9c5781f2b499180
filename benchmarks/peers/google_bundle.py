"""One stage of Google's own LiteRT-LM bundle of a checkpoint, made by `litert-torch`'s Gemma 4 exporter.

`benchmarks/peers/run.py` runs each stage in a process of its own: in one process the stock `export_hf` keeps the
whole float32 model (18.5 GB for E2B) while it converts and quantizes, and does not fit in 24 GB. Each stage builds
the transformers model on the meta device and materializes, in float32, only the weights its graph reads; the
graphs, the recipes and the packaging are the exporter's own functions, with the configuration `export_hf` would
use (prefill 512, the cache length asked for, embedder outside the decoder, lightweight conversion).

Stages (`python google_bundle.py STAGE --checkpoint CKPT --out DIR [--recipe R]`):
  embedder  -> embedder.tflite (float32)             reads the token embedding table only
  decoder   -> model.tflite (float32)                reads everything but the per-layer table (LiteRT-LM looks PLE
                                                     rows up in the per-layer embedder model)
  ple       -> per_layer_embedder.tflite (float32)   reads the per-layer table only
  quantize --model M --recipe R --section S  -> M with `_q` before `.tflite` (ai-edge-quantizer)
  package   -> model.litertlm                        tokenizer, LlmMetadata, the three quantized models

`--recipe` names an ai-edge-quantizer recipe: `dynamic_wi4b32_afp32` (int4 block-32 weights, float activations,
the same recipe for every section) or `gemma4_mixed48` (LiteRT-LM's own per-section Gemma 4 recipe: a dict keyed
by section, `tf_lite_embedder`, `tf_lite_prefill_decode`, `tf_lite_per_layer_embedder`).

A text-only checkpoint (`Gemma4ForCausalLM`, tensors named `model.*`) is presented to the exporter as the `gemma4`
model it expects (`text_config` = the checkpoint's config, no vision or audio tower; tensors looked up under
`model.language_model.*` or `model.*`). An embedding row that is all zero (the pad row of a random checkpoint:
`nn.Embedding(padding_idx=...)` zeroes it; trained checkpoints have none) gets small random values, because the
quantizer gives it a zero scale that XNNPACK refuses to load; speed and memory do not depend on that row.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
import sys
import time
import types
from pathlib import Path

SECTIONS = {"embedder": "tf_lite_embedder", "decoder": "tf_lite_prefill_decode",
            "ple": "tf_lite_per_layer_embedder"}
PREFILL = 512
EMBEDDINGS = ("embed_tokens.weight", "embed_tokens_per_layer.weight")


def tensorflow_schema_alias() -> None:
    """litert-torch 0.10.0 imports `tensorflow.lite.python.schema_py_generated` at import time, though TensorFlow
    is not one of its dependencies; ai-edge-litert ships the same flatbuffer schema module."""
    if "tensorflow" in sys.modules:
        return
    from ai_edge_litert import schema_py_generated

    names = ("tensorflow", "tensorflow.lite", "tensorflow.lite.python")
    mods = []
    for name in names:
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        mod.__path__ = []
        sys.modules[name] = mod
        mods.append(mod)
    mods[0].lite, mods[1].python = mods[1], mods[2]
    mods[2].schema_py_generated = schema_py_generated
    sys.modules["tensorflow.lite.python.schema_py_generated"] = schema_py_generated


def gemma4_view(ckpt: Path, view: Path) -> Path:
    """A folder the exporter reads as a `gemma4` checkpoint: config.json (wrapping a text-only config) and links to
    the tokenizer files. Weights are read from `ckpt` by `load_weights`, not from here."""
    cfg = json.loads((ckpt / "config.json").read_text())
    if cfg.get("model_type") != "gemma4":
        text = {k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")}
        cfg = {"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"], "text_config": text,
               "vision_config": None, "audio_config": None, "tie_word_embeddings": text.get("tie_word_embeddings", True),
               "eos_token_id": text.get("eos_token_id", 1)}
    else:
        cfg = {**cfg, "vision_config": None, "audio_config": None}
    view.mkdir(parents=True, exist_ok=True)
    (view / "config.json").write_text(json.dumps(cfg, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                 "tokenizer.model", "special_tokens_map.json"):
        src, dst = ckpt / name, view / name
        if src.is_file() and not dst.exists():
            dst.symlink_to(src.resolve())
    return view


def load_config(view: Path):
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(view), dtype=torch.float32)
    for c in (config, config.text_config):
        if hasattr(c, "allow_global_per_layer_attribute_access"):
            c.allow_global_per_layer_attribute_access = True
    config._attn_implementation = "lrt_transposed_attention"  # what export_hf sets for LiteRT-LM's cache layout
    config.text_config.dtype = torch.float32
    return config


def partial_model(config, ckpt: Path, keep):
    """The transformers model on the meta device; the parameters whose name passes `keep` are read from the
    checkpoint into float32, one tensor at a time; the per-layer table, when not kept, becomes a 1-row stand-in
    (its graph never reads it)."""
    import torch
    import transformers
    from litert_torch.generative.export_hf.model_ext import patches

    with patches.get_patch_context(config.model_type), torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lm = model.model.language_model
    if not keep("model.language_model.embed_tokens_per_layer.weight"):
        old = lm.embed_tokens_per_layer
        lm.embed_tokens_per_layer = type(old)(1, old.embedding_dim, padding_idx=None,
                                              embed_scale=old.scalar_embed_scale)
    model.to_empty(device="cpu")
    model.tie_weights()
    for module in model.modules():
        if any(True for _ in module.buffers(recurse=False)):
            model._init_weights(module)  # RoPE frequencies, embedding scales: the transformers way
    load_weights(model, ckpt, keep)
    model.eval()
    model.generation_config.cache_implementation = "static"
    model.generation_config.do_sample = False
    return model


def load_weights(model, ckpt: Path, keep) -> None:
    import torch
    from safetensors import safe_open

    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        where = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
            where = {k: "model.safetensors" for k in f.keys()}
    by_file: dict[str, list[tuple[str, str]]] = {}
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = []
    for name in params:
        if not keep(name) or name == "lm_head.weight":  # tied to the token table
            continue
        stored = next((n for n in (name, name.replace("model.language_model.", "model.", 1)) if n in where), None)
        if stored is None:
            missing.append(name)
        else:
            by_file.setdefault(where[stored], []).append((name, stored))
    if missing:
        raise SystemExit(f"{ckpt}: no tensor for {missing[:5]} ({len(missing)} in all)")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for file, names in by_file.items():
            with safe_open(str(ckpt / file), framework="pt") as f:
                for name, stored in names:
                    params[name].copy_(f.get_tensor(stored))
                    if name.endswith(EMBEDDINGS):
                        zero = (params[name] == 0).all(dim=1).nonzero().flatten().tolist()
                        for row in zero:
                            params[name][row].normal_(0.0, 0.02, generator=gen)
                        if zero:
                            print(f"{stored}: rows {zero} were all zero; filled N(0, 0.02) for the quantizer")


def export_config(out: Path, view: Path, recipe: str | None, source, cache: int):
    from litert_torch.generative.export_hf.core import export_lib, exportable_module

    cfg = exportable_module.ExportableModuleConfig(
        model=str(view), output_dir=str(out), work_dir=str(out), task="text_generation", prefill_lengths=[PREFILL],
        cache_length=cache, quantization_recipe=recipe, externalize_embedder=True, keep_temporary_files=True,
        experimental_lightweight_conversion=True, extra_kwargs={})
    cfg = export_lib.update_export_config(cfg, source)
    cfg.quantization_recipe = recipe
    return cfg


def source(model, config, view: Path):
    import transformers
    from litert_torch.generative.export_hf.core import export_lib

    return export_lib.SourceModelArtifacts(model=model, model_config=config, text_model_config=config.text_config,
                                           tokenizer=transformers.AutoTokenizer.from_pretrained(str(view)))


def export_graph(stage: str, ckpt: Path, view: Path, out: Path, cache: int) -> Path:
    from litert_torch._convert import interface as converter
    from litert_torch.generative.export_hf.core import export_lib
    from litert_torch.generative.export_hf.model_ext import exportables

    config = load_config(view)
    keep = {"embedder": lambda n: n == "model.language_model.embed_tokens.weight",
            "decoder": lambda n: "embed_tokens_per_layer" not in n,
            "ple": lambda n: "embed_tokens_per_layer" in n}[stage]
    model = partial_model(config, ckpt, keep)
    src = source(model, config, view)
    cfg = export_config(out, view, None, src, cache)
    if stage == "embedder":
        art = export_lib.export_embedder_model(src, cfg, export_lib.ExportedModelArtifacts())
        return Path(art.embedder_model_path)
    if stage == "decoder":
        art = export_lib.export_text_prefill_decode_model(src, cfg, export_lib.ExportedModelArtifacts())
        return Path(art.prefill_decode_model_path)
    # export_lib.export_additional_models_impl converts without lightweight conversion, which would hold the
    # float32 per-layer table twice more; the same conversion, lightweight.
    (name, cls), = exportables.get_additional_exportables(config).items()
    module = cls(model).eval()
    conv = converter.Converter()
    for sig, (inputs, _) in module.get_sample_inputs(config.text_config, cfg).items():
        conv.add_signature(sig, module, sample_kwargs=inputs)
    path = out / f"{name}.tflite"
    conv.convert(strict_export=False, lightweight_conversion=True).export(str(path))
    return path


def quantize(model: Path, recipe: str, section: str) -> Path:
    from ai_edge_quantizer import quantizer, recipe as recipes

    made = recipes.__dict__[recipe]()
    if isinstance(made, dict):  # a per-section recipe (LiteRT-LM's own Gemma 4 recipes)
        made = made[SECTIONS[section]]
    q = quantizer.Quantizer(str(model))
    q.load_quantization_recipe(made)
    out = model.with_name(model.stem + "_q.tflite")
    q.quantize().export_model(str(out), overwrite=True)
    return out


def package(view: Path, out: Path, models: dict[str, Path], cache: int) -> Path:
    import torch
    import transformers
    from litert_torch.generative.export_hf.core import export_lib, litert_lm_builder

    config = load_config(view)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    src = source(model, config, view)
    cfg = export_config(out, view, None, src, cache)
    art = export_lib.ExportedModelArtifacts(prefill_decode_model_path=str(models["decoder"]),
                                            embedder_model_path=str(models["embedder"]),
                                            additional_model_paths={"per_layer_embedder": str(models["ple"])})
    art = export_lib.export_tokenizer(src, cfg, art)
    litert_lm_builder.package_model(src, cfg, art)
    bundles = sorted(out.glob("*.litertlm"), key=lambda p: p.stat().st_mtime)
    if not bundles:
        raise SystemExit(f"package wrote no .litertlm in {out}")
    return bundles[-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=("embedder", "decoder", "ple", "quantize", "package"))
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", type=Path, help="quantize: the float32 .tflite")
    ap.add_argument("--recipe", default="dynamic_wi4b32_afp32")
    ap.add_argument("--cache-length", type=int, default=4096, help="KV cache length (LiteRT-LM's max tokens)")
    ap.add_argument("--section", choices=sorted(SECTIONS), help="quantize: which model it is")
    ap.add_argument("--models", help="package: JSON {embedder, decoder, ple} -> quantized .tflite")
    args = ap.parse_args(argv)
    t0 = time.time()
    tensorflow_schema_alias()
    args.out.mkdir(parents=True, exist_ok=True)
    view = gemma4_view(args.checkpoint, args.out / "gemma4-view")
    if args.stage == "quantize":
        made = quantize(args.model, args.recipe, args.section)
    elif args.stage == "package":
        made = package(view, args.out, {k: Path(v) for k, v in json.loads(args.models).items()}, args.cache_length)
    else:
        made = export_graph(args.stage, args.checkpoint, view, args.out, args.cache_length)
    print(json.dumps({"stage": args.stage, "wrote": str(made), "bytes": made.stat().st_size,
                      "seconds": round(time.time() - t0, 1)}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
