"""Write a random-weight Gemma 4 E2B/E4B checkpoint in the exact Hugging Face layout, streaming, in under 2 GB of RAM.

Why: the benchmarks (load time, quantization time, export memory) need full-size checkpoints, and the real weights are
gated, 10-16 GB, and not reachable from every machine. A synthetic checkpoint has the same tensor names, shapes, dtype
(bf16), sharding and index as `Gemma4ForConditionalGeneration.save_pretrained` writes, so every code path that reads a
real checkpoint reads this one the same way; only the numbers are random.

The tensor list is derived from our own config (`edge_gemma.config`), not from transformers, so this script runs
without torch. tests/test_synthetic_checkpoint.py checks that the list equals transformers' own state dict (tiny
models saved by `save_pretrained`, and the real E2B/E4B configs built on the meta device), and that transformers'
`from_pretrained` loads what this script writes.

Values mimic transformers' initialisation where it sets constants, and are random where it draws:
  * matrices, convs, embeddings: normal, std 1/sqrt(fan_in) (embeddings: 1/sqrt(the width the model rescales by:
    `hidden_size` for `embed_tokens`, `hidden_size_per_layer_input` for the PLE table), so activations are O(1));
  * the `pad_token_id` row of both embedding tables is zero, as `nn.Embedding(padding_idx=...)` initialises it;
  * RMSNorm/LayerNorm weights 1, `layer_scalar` 1, audio `per_dim_scale` 0, biases 0, vision `std_scale` 1 and
    `std_bias` 0, clip bounds -inf/+inf (or +-`clip_bound` when given: real checkpoints have finite ones);
  * the vision position table is random (transformers initialises it to ones; a trained one is not constant).
Each tensor has its own generator seeded from (seed, crc32(name)), so values do not depend on sharding or order.

bf16 is written from float32 by round-to-nearest-even on the bit pattern, in row chunks of a few million values: the
E2B PLE table (262144 x 8960 = 2.35 G values) is never held whole. The safetensors file format is written by hand
(8-byte little-endian header length, JSON header, raw bytes) because `safetensors.numpy.save_file` needs a whole
shard in memory.

Usage:
    python benchmarks/make_synthetic_checkpoint.py --variant e2b --out /work/synthetic/e2b [--seed 0] [--text-only]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from edge_gemma.config import AudioConfig, ModelConfig, TextConfig, VisionConfig, load_config

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "edge_gemma" / "data" / "configs"
PRESET_CONFIGS = {"e2b": CONFIG_DIR / "gemma-4-E2B-it.config.json", "e4b": CONFIG_DIR / "gemma-4-E4B-it.config.json"}
# `generation_config.json` of the -it checkpoints, as transformers' `convert_gemma4_weights.py` writes it.
IT_GENERATION_CONFIG = {
    "bos_token_id": 2, "do_sample": True, "eos_token_id": [1, 106, 50], "pad_token_id": 0,
    "temperature": 1.0, "top_k": 64, "top_p": 0.95,
}
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # "5GB" as huggingface_hub parses it: shards like the hub's big checkpoints
CHUNK_VALUES = 8 * 1024 * 1024  # float32 values generated at once: 32 MB, plus two temporaries of the same order


class SyntheticCheckpointError(ValueError):
    """Bad arguments for the synthetic checkpoint writer (the message names the argument or path)."""


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    """One tensor of the state dict: its name, shape and how to fill it."""

    name: str
    shape: tuple[int, ...]
    init: str  # "normal" | "ones" | "zeros" | "const"
    std: float = 0.0  # for "normal"
    value: float = 0.0  # for "const"
    pad_row: int | None = None  # for embedding tables: the row `nn.Embedding(padding_idx=...)` zeroes
    buffer: bool = False  # persistent buffer (saved, but not counted in `total_parameters`)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return 2 * self.numel  # bf16


# --------------------------------------------------------------------------------------------------------------------
# The tensor plan: names and shapes exactly as transformers' `state_dict()` (minus the tied `lm_head.weight`)
# --------------------------------------------------------------------------------------------------------------------


def _linear(name: str, out_f: int, in_f: int) -> TensorSpec:
    return TensorSpec(name=f"{name}.weight", shape=(out_f, in_f), init="normal", std=in_f**-0.5)


def _norm(name: str, dim: int) -> TensorSpec:
    return TensorSpec(name=f"{name}.weight", shape=(dim,), init="ones")


def _clippable(name: str, out_f: int, in_f: int, clipped: bool, clip_bound: float | None) -> list[TensorSpec]:
    """`Gemma4ClippableLinear`: `.linear.weight` plus, when `use_clipped_linears`, four scalar clip buffers."""
    specs = []
    if clipped:
        hi = float("inf") if clip_bound is None else float(clip_bound)
        for bound, sign in (("input_min", -1), ("input_max", 1), ("output_min", -1), ("output_max", 1)):
            specs.append(TensorSpec(name=f"{name}.{bound}", shape=(), init="const", value=sign * hi, buffer=True))
    specs.append(_linear(f"{name}.linear", out_f, in_f))
    return specs


def text_tensors(t: TextConfig, prefix: str) -> list[TensorSpec]:
    """The text decoder under `prefix` (`model.language_model.` or, for `Gemma4ForCausalLM`, `model.`)."""
    H, P, L = t.hidden_size, t.hidden_size_per_layer_input, t.num_hidden_layers
    specs = [
        TensorSpec(name=f"{prefix}embed_tokens.weight", shape=(t.vocab_size, H), init="normal", std=H**-0.5,
                   pad_row=t.pad_token_id),
    ]
    for i in range(L):
        p = f"{prefix}layers.{i}."
        hd, F = t.head_dim_for(i), t.intermediate_size_for(i)
        nh, nkv = t.num_attention_heads, t.num_key_value_heads
        specs.append(TensorSpec(name=f"{p}layer_scalar", shape=(1,), init="ones", buffer=True))
        specs += [_linear(f"{p}self_attn.q_proj", nh * hd, H), _norm(f"{p}self_attn.q_norm", hd)]
        if i < t.first_shared_layer:  # KV-shared layers own no k/v projections or k norm (v_norm has no weight)
            specs += [
                _norm(f"{p}self_attn.k_norm", hd),
                _linear(f"{p}self_attn.k_proj", nkv * hd, H),
                _linear(f"{p}self_attn.v_proj", nkv * hd, H),
            ]
        specs += [
            _linear(f"{p}self_attn.o_proj", H, nh * hd),
            _linear(f"{p}mlp.gate_proj", F, H),
            _linear(f"{p}mlp.up_proj", F, H),
            _linear(f"{p}mlp.down_proj", H, F),
            _norm(f"{p}input_layernorm", H),
            _norm(f"{p}post_attention_layernorm", H),
            _norm(f"{p}pre_feedforward_layernorm", H),
            _norm(f"{p}post_feedforward_layernorm", H),
            _linear(f"{p}per_layer_input_gate", P, H),
            _linear(f"{p}per_layer_projection", H, P),
            _norm(f"{p}post_per_layer_input_norm", H),
        ]
    specs += [
        _norm(f"{prefix}norm", H),
        TensorSpec(name=f"{prefix}embed_tokens_per_layer.weight", shape=(t.vocab_size_per_layer_input, L * P),
                   init="normal", std=P**-0.5, pad_row=t.pad_token_id),
        _linear(f"{prefix}per_layer_model_projection", L * P, H),
        _norm(f"{prefix}per_layer_projection_norm", P),
    ]
    return specs


def vision_tensors(v: VisionConfig, text_hidden: int, clip_bound: float | None) -> list[TensorSpec]:
    p, Hv, hd, c = "model.vision_tower.", v.hidden_size, v.head_dim, v.use_clipped_linears
    specs = [
        TensorSpec(name=f"{p}patch_embedder.position_embedding_table", shape=(2, v.position_embedding_size, Hv),
                   init="normal", std=Hv**-0.5),
        _linear(f"{p}patch_embedder.input_proj", Hv, 3 * v.patch_size**2),
    ]
    for i in range(v.num_hidden_layers):
        q = f"{p}encoder.layers.{i}."
        specs += _clippable(f"{q}self_attn.q_proj", v.num_attention_heads * hd, Hv, c, clip_bound)
        specs += _clippable(f"{q}self_attn.k_proj", v.num_key_value_heads * hd, Hv, c, clip_bound)
        specs += _clippable(f"{q}self_attn.v_proj", v.num_key_value_heads * hd, Hv, c, clip_bound)
        specs += _clippable(f"{q}self_attn.o_proj", Hv, v.num_attention_heads * hd, c, clip_bound)
        specs += [_norm(f"{q}self_attn.q_norm", hd), _norm(f"{q}self_attn.k_norm", hd)]
        specs += _clippable(f"{q}mlp.gate_proj", v.intermediate_size, Hv, c, clip_bound)
        specs += _clippable(f"{q}mlp.up_proj", v.intermediate_size, Hv, c, clip_bound)
        specs += _clippable(f"{q}mlp.down_proj", Hv, v.intermediate_size, c, clip_bound)
        specs += [_norm(f"{q}{n}", Hv) for n in (
            "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")]
    if v.standardize:
        specs += [
            TensorSpec(name=f"{p}std_bias", shape=(Hv,), init="zeros", buffer=True),
            TensorSpec(name=f"{p}std_scale", shape=(Hv,), init="ones", buffer=True),
        ]
    specs.append(_linear("model.embed_vision.embedding_projection", text_hidden, Hv))
    return specs


def audio_tensors(a: AudioConfig, text_hidden: int, clip_bound: float | None) -> list[TensorSpec]:
    p, Ha, c = "model.audio_tower.", a.hidden_size, a.use_clipped_linears
    c0, c1 = a.subsampling_conv_channels
    hd = Ha // a.num_attention_heads
    s = f"{p}subsample_conv_projection."
    specs = [
        TensorSpec(name=f"{s}layer0.conv.weight", shape=(c0, 1, 3, 3), init="normal", std=9**-0.5),
        _norm(f"{s}layer0.norm", c0),
        TensorSpec(name=f"{s}layer1.conv.weight", shape=(c1, c0, 3, 3), init="normal", std=(9 * c0) ** -0.5),
        _norm(f"{s}layer1.norm", c1),
        _linear(f"{s}input_proj_linear", Ha, (c0 // 4) * c1),
    ]
    for i in range(a.num_hidden_layers):
        q = f"{p}layers.{i}."
        for ff in ("feed_forward1", "feed_forward2"):
            specs += _clippable(f"{q}{ff}.ffw_layer_1", 4 * Ha, Ha, c, clip_bound)
            specs += _clippable(f"{q}{ff}.ffw_layer_2", Ha, 4 * Ha, c, clip_bound)
            specs += [_norm(f"{q}{ff}.pre_layer_norm", Ha), _norm(f"{q}{ff}.post_layer_norm", Ha)]
        specs.append(TensorSpec(name=f"{q}self_attn.per_dim_scale", shape=(hd,), init="zeros"))
        for proj in ("q_proj", "k_proj", "v_proj", "post"):
            specs += _clippable(f"{q}self_attn.{proj}", Ha, Ha, c, clip_bound)
        specs.append(_linear(f"{q}self_attn.relative_k_proj", Ha, Ha))
        specs += _clippable(f"{q}lconv1d.linear_start", 2 * Ha, Ha, c, clip_bound)
        specs += _clippable(f"{q}lconv1d.linear_end", Ha, Ha, c, clip_bound)
        specs += [
            TensorSpec(name=f"{q}lconv1d.depthwise_conv1d.weight", shape=(Ha, 1, a.conv_kernel_size), init="normal",
                       std=a.conv_kernel_size**-0.5),
            _norm(f"{q}lconv1d.pre_layer_norm", Ha),
            _norm(f"{q}lconv1d.conv_norm", Ha),
            _norm(f"{q}norm_pre_attn", Ha),
            _norm(f"{q}norm_post_attn", Ha),
            _norm(f"{q}norm_out", Ha),
        ]
    specs += [
        _linear(f"{p}output_proj", a.output_proj_dims, Ha),
        TensorSpec(name=f"{p}output_proj.bias", shape=(a.output_proj_dims,), init="zeros"),
        _linear("model.embed_audio.embedding_projection", text_hidden, a.output_proj_dims),
    ]
    return specs


def plan_tensors(cfg: ModelConfig, *, text_only: bool = False, clip_bound: float | None = None) -> list[TensorSpec]:
    """Every tensor `save_pretrained` writes for `cfg`: the `Gemma4ForConditionalGeneration` layout, or with
    `text_only` (or a `gemma4_text` config) the `Gemma4ForCausalLM` one. `lm_head.weight` is tied and never saved."""
    if text_only or cfg.model_type == "gemma4_text":
        return text_tensors(cfg.text, "model.")
    specs = text_tensors(cfg.text, "model.language_model.")
    if cfg.vision is not None:
        specs += vision_tensors(cfg.vision, cfg.text.hidden_size, clip_bound)
    if cfg.audio is not None:
        specs += audio_tensors(cfg.audio, cfg.text.hidden_size, clip_bound)
    return specs


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy in order, like huggingface_hub's `split_state_dict_into_shards`: a tensor bigger than the limit gets a
    shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


# --------------------------------------------------------------------------------------------------------------------
# Values and the safetensors writer
# --------------------------------------------------------------------------------------------------------------------


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even; `x` is clobbered (used as scratch)."""
    u = x.view(np.uint32)
    bias = u >> 16
    bias &= 1
    bias += 0x7FFF
    u += bias
    u >>= 16
    return u.astype(np.uint16)


def _tensor_chunks(spec: TensorSpec, seed: int) -> Iterator[np.ndarray]:
    """bf16 bit patterns of `spec`, in row chunks (each a C-contiguous uint16 array)."""
    if spec.init != "normal":
        value = {"ones": 1.0, "zeros": 0.0, "const": spec.value}[spec.init]
        yield f32_to_bf16_bits(np.full(spec.numel, value, dtype=np.float32))
        return
    rows = spec.shape[0] if spec.shape else 1
    cols = spec.numel // rows
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    step = max(1, CHUNK_VALUES // max(cols, 1))
    for start in range(0, rows, step):
        n = min(step, rows - start)
        x = rng.standard_normal((n, cols), dtype=np.float32)
        x *= np.float32(spec.std)
        if spec.pad_row is not None and start <= spec.pad_row < start + n:
            x[spec.pad_row - start] = 0.0
        yield f32_to_bf16_bits(x)


def _header(shard: list[TensorSpec]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in shard:
        header[spec.name] = {"dtype": "BF16", "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the safetensors library pads the header to 8 bytes; so do we
    return struct.pack("<Q", len(raw)) + raw


def _write_shard(path: Path, shard: list[TensorSpec], seed: int, progress) -> None:
    with open(path, "wb") as f:
        f.write(_header(shard))
        for spec in shard:
            written = 0
            for chunk in _tensor_chunks(spec, seed):
                f.write(memoryview(chunk).cast("B"))
                written += chunk.nbytes
                if progress is not None:
                    progress.update(chunk.nbytes)
            if written != spec.nbytes:  # a bug in the plan, not bad input
                raise AssertionError(f"{path.name}: {spec.name} wrote {written} bytes, planned {spec.nbytes}")


# --------------------------------------------------------------------------------------------------------------------
# Configs and the public entry point
# --------------------------------------------------------------------------------------------------------------------


def _resolve_config(config_path_or_preset: str | Path) -> tuple[Path, dict, ModelConfig]:
    key = str(config_path_or_preset).lower()
    path = PRESET_CONFIGS[key] if key in PRESET_CONFIGS else Path(config_path_or_preset)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise SyntheticCheckpointError(
            f"{config_path_or_preset!r}: neither a preset ({sorted(PRESET_CONFIGS)}) nor a config.json file"
        )
    return path, json.loads(path.read_text(encoding="utf-8")), load_config(path)


def _text_only_config(raw: dict) -> dict:
    """The `Gemma4ForCausalLM` config.json: the `text_config` itself, as transformers saves it."""
    text = dict(raw["text_config"]) if raw.get("model_type") == "gemma4" else dict(raw)
    text["architectures"] = ["Gemma4ForCausalLM"]
    text["model_type"] = "gemma4_text"
    text["dtype"] = "bfloat16"
    return dict(sorted(text.items()))


def _generation_config(cfg: ModelConfig, raw: dict, preset: bool) -> dict:
    if preset:
        gen = dict(IT_GENERATION_CONFIG)
    else:
        gen = {"bos_token_id": cfg.text.bos_token_id, "pad_token_id": cfg.text.pad_token_id,
               "eos_token_id": list(cfg.eos_token_id) if len(cfg.eos_token_id) > 1 else cfg.eos_token_id[0]}
    gen["transformers_version"] = raw.get("transformers_version", "5.23.0")
    return gen


def write_synthetic_checkpoint(
    config_path_or_preset: str | Path,
    out: str | Path,
    seed: int = 0,
    *,
    text_only: bool = False,
    clip_bound: float | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a random-weight checkpoint for a preset ("e2b"/"e4b") or a config.json path into `out`.

    The directory is built next to `out` under a temporary name and renamed into place, so `out` is either complete
    or absent. Returns `out`.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise SyntheticCheckpointError(f"{out}: already exists (pass overwrite=True / --overwrite to replace it)")
    if max_shard_bytes <= 0:
        raise SyntheticCheckpointError(f"max_shard_bytes={max_shard_bytes}: must be positive")
    config_file, raw, cfg = _resolve_config(config_path_or_preset)
    preset = str(config_path_or_preset).lower() in PRESET_CONFIGS
    text_only = text_only or cfg.model_type == "gemma4_text"
    specs = plan_tensors(cfg, text_only=text_only, clip_bound=clip_bound)
    shards = plan_shards(specs, max_shard_bytes)
    total = sum(s.nbytes for s in specs)
    log.info("%s: %d tensors, %.2f GB in %d shard(s)", out, len(specs), total / 1e9, len(shards))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        if text_only:
            (tmp / "config.json").write_text(json.dumps(_text_only_config(raw), indent=2) + "\n", encoding="utf-8")
        elif "architectures" in raw:  # the config file itself, byte for byte
            shutil.copyfile(config_file, tmp / "config.json")
        else:  # as `save_pretrained` writes it: converters (llama.cpp's) dispatch on `architectures`
            full = {"architectures": ["Gemma4ForConditionalGeneration"], **raw}
            (tmp / "config.json").write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
        gen = _generation_config(cfg, raw, preset)
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=out.name)
        try:
            if len(shards) == 1:
                _write_shard(tmp / "model.safetensors", shards[0], seed, bar)
            else:
                n = len(shards)
                weight_map = {}
                for k, shard in enumerate(shards, 1):
                    name = f"model-{k:05d}-of-{n:05d}.safetensors"
                    _write_shard(tmp / name, shard, seed, bar)
                    weight_map.update({spec.name: name for spec in shard})
                index = {
                    "metadata": {
                        "total_parameters": sum(s.numel for s in specs if not s.buffer),
                        "total_size": total,
                    },
                    "weight_map": dict(sorted(weight_map.items())),
                }
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        finally:
            if bar is not None:
                bar.close()
        if out.exists():  # overwrite: move the old one aside first, so a failure never leaves neither
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=sorted(PRESET_CONFIGS), help="preset config (edge_gemma/data/configs/)")
    ap.add_argument("--config", type=Path, help="a config.json instead of --variant")
    ap.add_argument("--out", type=Path, required=True, help="output directory (must not exist unless --overwrite)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text-only", action="store_true", help="Gemma4ForCausalLM layout: the text decoder only")
    ap.add_argument("--clip-bound", type=float, default=None,
                    help="finite clip bounds +-VALUE for the clippable linears (default: +-inf, as transformers)")
    ap.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1e9)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if (args.variant is None) == (args.config is None):
        ap.error("give exactly one of --variant and --config")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    out = write_synthetic_checkpoint(
        args.variant or args.config, args.out, args.seed, text_only=args.text_only, clip_bound=args.clip_bound,
        max_shard_bytes=int(args.max_shard_gb * 1e9), overwrite=args.overwrite,
    )
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in out.iterdir())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(f"wrote {out}: {size / 1e9:.2f} GB in {seconds:.1f} s ({size / 1e6 / seconds:.0f} MB/s), "
          f"peak RSS {peak_mb:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
