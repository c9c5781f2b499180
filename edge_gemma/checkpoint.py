"""Strict loading of a Hugging Face Gemma 4 checkpoint directory into `Gemma4Model`.

gpt-fast / mlx-lm style: build the model with its parameters on the meta device, read each safetensors tensor
memory-mapped (`safetensors.safe_open`), map names with ONE explicit table (`LAYOUTS` below), and finish with
`load_state_dict(strict=True, assign=True)`. Anything the table does not explain is an error naming the file and the
tensor: a missing tensor, an unexpected one, a wrong shape (expected vs found), an unsupported `model_type`, a corrupt or
truncated file, a missing config.

Explicitly ignored (and only these):
* `k_proj`, `v_proj`, `k_norm`, `v_norm` of KV-shared layers: the reference drops them on load
  (`_keys_to_ignore_on_load_unexpected`), so a checkpoint may carry them.
* `lm_head.weight`: Gemma 4 ties the head to `embed_tokens`; a saved copy is accepted when it equals the embedding
  exactly, and is an error naming the difference otherwise.
* With `text_only=True`, the tower tensors (`vision_tower`, `audio_tower`, `embed_vision`, `embed_audio`).

Tokens beyond the PLE vocabulary (`vocab_size > vocab_size_per_layer_input`): such a checkpoint loads (the PLE table
has `vocab_size_per_layer_input` rows), and `Gemma4Model.check_token_ids` refuses those ids with a clear error, as
transformers (an IndexError) does; multimodal placeholders are mapped to pad before the PLE lookup and are fine.

PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`) are merged at load:
`W += (lora_alpha / r) * B @ A` (`lora_alpha / sqrt(r)` with `use_rslora`), in float32, for every `lora_A`/`lora_B` pair;
DoRA, biases, `modules_to_save` and per-module rank/alpha patterns are refused with a message saying how to merge
with PEFT (`merge_and_unload()` then `save_pretrained`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .config import ConfigError, ModelConfig, load_config
from .quantize.safetensors_io import CheckpointFormatError, bad_values, parse_header

if TYPE_CHECKING:
    from .model.gemma4 import Gemma4Model

__all__ = ["CheckpointError", "LAYOUTS", "checkpoint_tensors", "hf_name", "load_model", "params_on_meta"]

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint edge-gemma cannot load; the message names the file and the tensor."""


# One explicit name table: (our state-dict prefix, checkpoint prefix) per layout. Every tensor name is one of these
# prefixes followed by the same remainder (our module names are transformers' names).
LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    # Gemma4ForConditionalGeneration (model_type "gemma4")
    "gemma4": (
        ("language_model.", "model.language_model."),
        ("vision_tower.", "model.vision_tower."),
        ("audio_tower.", "model.audio_tower."),
        ("embed_vision.", "model.embed_vision."),
        ("embed_audio.", "model.embed_audio."),
    ),
    # Gemma4ForCausalLM (model_type "gemma4_text")
    "gemma4_text": (("language_model.", "model."),),
}
TOWER_PREFIXES = ("vision_tower.", "audio_tower.", "embed_vision.", "embed_audio.")
LM_HEAD = "lm_head.weight"
EMBEDDING_TABLES = ("language_model.embed_tokens.weight", "language_model.embed_tokens_per_layer.weight")
_SHARED_KV_IGNORED = ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_norm.weight",
                      "self_attn.v_norm.weight")
_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------------------------
# Reading safetensors
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors dtype string ("F32", "BF16", ...)
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`


def _read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check that every tensor's bytes lie inside the file."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(f"{file}: corrupt safetensors header (header length {n}, file size {size})")
            header = parse_header(fh.read(n), file)
    except CheckpointFormatError as exc:
        detail = str(exc).removeprefix(f"{file}: ")
        raise CheckpointError(f"{file}: corrupt safetensors header ({detail})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in meta["data_offsets"])
            shape = tuple(int(d) for d in meta["shape"])
            dtype = str(meta["dtype"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: corrupt safetensors header entry for tensor {name!r}") from None
        if 8 + n + end > size:
            raise CheckpointError(
                f"{file}: truncated safetensors file: tensor {name!r} ends at byte {8 + n + end}, the file has {size}"
            )
        out[name] = TensorInfo(file=file, dtype=dtype, shape=shape, offset=8 + n + begin)
    return out


def checkpoint_tensors(directory: Path) -> dict[str, TensorInfo]:
    """name -> TensorInfo over a single `model.safetensors` or the shards of `model.safetensors.index.json`."""
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc!r})") from None
        files = sorted(set(weight_map.values()))
    elif single.is_file():
        weight_map, files = None, ["model.safetensors"]
    else:
        raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{index}: shard {name} is missing")
        for tname, info in _read_header(path).items():
            if tname in tensors:
                raise CheckpointError(f"{path}: tensor {tname!r} also in {tensors[tname].file.name}")
            if weight_map is not None and weight_map.get(tname) != name:
                raise CheckpointError(f"{path}: tensor {tname!r} is not listed for this shard in {index.name}")
            tensors[tname] = info
    if weight_map is not None:
        for tname, fname in weight_map.items():
            if tname not in tensors:
                raise CheckpointError(f"{directory / fname}: tensor {tname!r} listed in {index.name} is missing")
    return tensors


class _Reader:
    """Opens each shard once with `safe_open` (memory-mapped) and reads tensors one by one."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._open: dict[Path, object] = {}

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def get(self, name: str, info: TensorInfo) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        try:
            if info.file not in self._open:
                self._open[info.file] = self._stack.enter_context(safe_open(str(info.file), framework="pt"))
            return self._open[info.file].get_tensor(name)
        except SafetensorError as exc:
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r} ({exc})") from None


def _mmap_tensor(name: str, info: TensorInfo) -> torch.Tensor:
    """A tensor that shares the file's pages (copy-on-write map): a 2 G-parameter table costs no RAM until read."""
    if info.dtype not in _NP_DTYPES:
        raise CheckpointError(f"{info.file}: tensor {name!r} has dtype {info.dtype}; a float table is expected")
    arr = np.memmap(info.file, dtype=_NP_DTYPES[info.dtype], mode="c", offset=info.offset, shape=info.shape)
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if info.dtype == "BF16" else t


# --------------------------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device but buffers on the CPU, so non-persistent buffers (RoPE frequencies, KV
    caches) are computed normally while no weight memory is allocated before loading."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def hf_name(ours: str, layout: str) -> str | None:
    """Our parameter name -> the Hugging Face tensor name in `layout` ("gemma4" or "gemma4_text"), by `LAYOUTS`."""
    for our_prefix, their_prefix in LAYOUTS[layout]:
        if ours.startswith(our_prefix):
            return their_prefix + ours[len(our_prefix):]
    return None


def _ignored(name: str, cfg: ModelConfig, layout: str, text_only: bool) -> bool:
    lm_prefix = LAYOUTS[layout][0][1]
    if text_only and layout == "gemma4":
        if any(name.startswith(theirs) for ours, theirs in LAYOUTS[layout][1:]):
            return True
    if name.startswith(lm_prefix + "layers."):
        rest = name[len(lm_prefix + "layers."):]
        idx, _, leaf = rest.partition(".")
        if idx.isdigit() and int(idx) >= cfg.text.first_shared_layer and leaf in _SHARED_KV_IGNORED:
            return True
    return False


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    text_only: bool = False,
    mmap_embeddings: bool = False,
    max_len: int | None = None,
    batch_size: int = 1,
    sliding_ring: bool = False,
    adapter: str | Path | None = None,
) -> "Gemma4Model":
    """Load a checkpoint directory into an eval-mode `Gemma4Model`.

    dtype: compute dtype of every weight (float32 default). mmap_embeddings: keep `embed_tokens` and
    `embed_tokens_per_layer` memory-mapped in the file's dtype (the decoder casts the rows it reads), so full-size
    checkpoints fit in RAM. max_len: allocate static KV caches of that length (sliding_ring: ring buffers of
    2 * sliding_window slots for the sliding layers, see `TextDecoder.setup_caches`). adapter: a PEFT LoRA directory to merge
    (also found automatically when `path` itself is an adapter directory whose base is reachable).
    """
    from .model.gemma4 import Gemma4Model

    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory")
    if adapter is None and (directory / "adapter_config.json").is_file() and not (directory / "config.json").is_file():
        adapter, directory = directory, _adapter_base(directory)
    try:
        cfg = load_config(directory)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    layout = cfg.model_type
    if text_only:
        cfg = cfg.text_only()
    if cfg.text.vocab_size > cfg.text.vocab_size_per_layer_input:
        log.warning(
            "%s: vocab_size %d > vocab_size_per_layer_input %d: ids from %d up have no PLE row and are refused",
            directory, cfg.text.vocab_size, cfg.text.vocab_size_per_layer_input, cfg.text.vocab_size_per_layer_input,
        )
    tensors = checkpoint_tensors(directory)
    lora = _read_adapter(Path(adapter)) if adapter is not None else {}

    with params_on_meta():
        model = Gemma4Model(cfg, max_len=max_len, batch_size=batch_size, cache_dtype=dtype, sliding_ring=sliding_ring)
    expected = model.state_dict()

    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    with _Reader() as reader:
        progress = tqdm(expected.items(), desc=f"loading {directory.name}", unit="tensor", disable=None, leave=False)
        for ours, target in progress:
            theirs = hf_name(ours, layout)
            if theirs is None or theirs not in tensors:
                raise CheckpointError(
                    f"{directory}: missing tensor {theirs or ours!r} (expected shape {tuple(target.shape)})"
                )
            info = tensors[theirs]
            if info.shape != tuple(target.shape):
                raise CheckpointError(
                    f"{info.file}: tensor {theirs!r} has shape {list(info.shape)}, expected {list(target.shape)}"
                )
            used.add(theirs)
            if mmap_embeddings and ours in EMBEDDING_TABLES and theirs not in lora:
                state[ours] = _mmap_tensor(theirs, info)
                continue
            t = reader.get(theirs, info)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = bad_values(theirs, t.float().numpy())
                if bad:
                    raise CheckpointError(f"{info.file}: tensor {theirs!r} has {bad} NaN or inf value(s); a model "
                                          "with them cannot give a right answer")
            if theirs in lora:
                t = _merge_lora(t, lora.pop(theirs), theirs)
            state[ours] = t.to(dtype) if t.is_floating_point() else t
        if lora:
            raise CheckpointError(f"{adapter}: LoRA weights for unknown module(s) {sorted(lora)[:5]}")
        if LM_HEAD in tensors:
            used.add(LM_HEAD)
            _check_lm_head(reader, tensors, LAYOUTS[layout][0][1] + "embed_tokens.weight")
    unexpected = sorted(n for n in tensors if n not in used and not _ignored(n, cfg, layout, text_only))
    if unexpected:
        where = tensors[unexpected[0]].file
        raise CheckpointError(
            f"{where}: unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
            f"({len(unexpected)} in all) for a {layout!r} checkpoint"
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _check_lm_head(reader: _Reader, tensors: dict[str, TensorInfo], embed_name: str) -> None:
    head, emb = tensors[LM_HEAD], tensors[embed_name]
    if head.shape != emb.shape:
        raise CheckpointError(
            f"{head.file}: {LM_HEAD} has shape {list(head.shape)}, but Gemma 4 ties it to {embed_name} "
            f"{list(emb.shape)}"
        )
    a, b = reader.get(LM_HEAD, head), reader.get(embed_name, emb)
    if not torch.equal(a.float(), b.float()):
        diff = (a.float() - b.float()).abs()
        rows = int((diff.amax(dim=1) > 0).sum())
        raise CheckpointError(
            f"{head.file}: {LM_HEAD} differs from {embed_name} (max abs difference {float(diff.max()):.3g} in "
            f"{rows} rows); Gemma 4 ties the LM head to the embedding, an untied head is not supported"
        )


# --------------------------------------------------------------------------------------------------------------------
# PEFT LoRA
# --------------------------------------------------------------------------------------------------------------------

_MERGE_HINT = (
    "merge it with PEFT first: PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(out)"
)


def _adapter_base(adapter: Path) -> Path:
    cfg_file = adapter / "adapter_config.json"
    try:
        base = json.loads(cfg_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({exc})") from None
    for candidate in ([Path(base), adapter.parent / base] if base else []):
        if (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError(
        f"{cfg_file}: base_model_name_or_path={base!r} is not a local checkpoint directory; pass the base "
        f"checkpoint as the path and this directory as the adapter, or {_MERGE_HINT}"
    )


def _read_adapter(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """-> {checkpoint weight name: (A [r, in], B [out, r], scale)}."""
    cfg_file, weights = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
    if not cfg_file.is_file():
        raise CheckpointError(f"{adapter}: missing adapter_config.json (not a PEFT adapter directory)")
    if not weights.is_file():
        hint = " (adapter_model.bin is not supported; re-save with safe_serialization)" if (
            adapter / "adapter_model.bin").is_file() else ""
        raise CheckpointError(f"{adapter}: missing adapter_model.safetensors{hint}")
    try:
        acfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({exc})") from None
    if acfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cfg_file}: peft_type={acfg.get('peft_type')!r}; only LORA can be merged at load; "
                              + _MERGE_HINT)
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False)):
        if bool(acfg.get(key, False)) != ok:
            raise CheckpointError(f"{cfg_file}: {key}={acfg.get(key)!r} is not supported; {_MERGE_HINT}")
    if acfg.get("bias", "none") != "none":
        raise CheckpointError(f"{cfg_file}: bias={acfg.get('bias')!r} is not supported; {_MERGE_HINT}")
    for key in ("modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform"):
        if acfg.get(key):
            raise CheckpointError(f"{cfg_file}: {key}={acfg[key]!r} is not supported; {_MERGE_HINT}")
    try:
        r, alpha = int(acfg["r"]), float(acfg["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{cfg_file}: needs integer 'r' and numeric 'lora_alpha'") from None
    scale = alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r

    infos = _read_header(weights)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    with _Reader() as reader:
        for name, info in infos.items():
            stem = name.removeprefix("base_model.model.")
            for part in ("lora_A", "lora_B"):
                marker = f".{part}."
                if marker in stem:
                    module, _, tail = stem.partition(marker)
                    if tail not in ("weight", "default.weight"):
                        raise CheckpointError(f"{weights}: unexpected LoRA tensor {name!r}")
                    pairs.setdefault(module + ".weight", {})[part] = reader.get(name, info).float()
                    break
            else:
                raise CheckpointError(f"{weights}: unexpected tensor {name!r} (only lora_A/lora_B are merged); "
                                      + _MERGE_HINT)
    out = {}
    for target, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{weights}: {target}: lora_A and lora_B must both be present")
        A, B = ab["lora_A"], ab["lora_B"]
        if A.shape[0] != r or B.shape[1] != r:
            raise CheckpointError(f"{weights}: {target}: lora_A {list(A.shape)} / lora_B {list(B.shape)} "
                                  f"do not have rank r={r}")
        out[target] = (A, B, scale)
    log.info("%s: merging %d LoRA pairs (scale %.4g)", adapter, len(out), scale)
    return out


def _merge_lora(w: torch.Tensor, lora: tuple[torch.Tensor, torch.Tensor, float], name: str) -> torch.Tensor:
    A, B, scale = lora
    if (B.shape[0], A.shape[1]) != tuple(w.shape):
        raise CheckpointError(f"LoRA for {name!r}: B @ A is {[B.shape[0], A.shape[1]]}, the weight is {list(w.shape)}")
    return (w.float() + scale * (B @ A)).to(w.dtype)
