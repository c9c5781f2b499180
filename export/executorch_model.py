"""The eager model as the ExecuTorch exporter sees it: our integers as torchao tensors, and the method modules.

Quantized weights are built FROM the checkpoint's stored codes and scales, never re-quantized (`intx_weight`):

* int4 (`Int4Group`, group G): `qdata` uint8 `[N, K/2]` (offset-binary, low nibble first) -> signed codes
  `q = unpack_int4(qdata)` in [-8, 7] as int8 `[N, K]`; scales `[N, K/G]` float32 (bf16-exact); zero points 0;
  `IntxUnpackedToInt8Tensor(target_dtype=torch.int4, block_size=(1, G))`.
* int8 (`Int8PerChannel`): codes int8 `[N, K]`, scales `[N, 1]`, `block_size=(1, K)`, `target_dtype=torch.int8`.

A linear gets `activation_quantization="int8_asym_per_token"` (torchao's "8da4w"/"8da8w": XNNPACK's dynamically
quantized GEMM; weight-only int4/int8 linears are broken on XNNPACK, platform notes). The same module run eagerly IS
the reference with XNNPACK's activation quantization emulated (torchao quantizes each token's activations to
asymmetric int8 exactly as the lowered graph does). The embedding table gets a weight-only tensor (ExecuTorch lowers
the gather to `quantized_decomposed::embedding_4bit` / `embedding_byte`). `Int4GroupAsym` (ONNX-only) is refused.

The model is built on the meta device (`params_on_meta`): only the tensors the methods use are materialised; the PLE
table is never read (the engine feeds its rows from `ple.bin`) and is removed from the module before export.

Method modules (batch 1 added inside): `EmbedMethod` ids [S] -> [S, H]; `DecoderMethod` (prefill and decode: the same
module exported twice, S dynamic and S = 1) -> logits [1, V] of the last position, caches as mutable buffers updated
in place by the eager `KVCache.update` (`index_copy_`); `CacheReset` () -> zeros the same buffers (called once at load:
the caches are planned memory, not serialized zeros); the towers reuse `export/onnx_graphs.VisionGraph`/`AudioGraph`
inside `Scoped` so that every method's constants have names of their own in the shared `.ptd`.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_gemma.config import ModelConfig, load_config
from edge_gemma.quantize.schemes import Int4Group, Int4GroupAsym, Int8PerChannel, Scheme, unpack_int4

__all__ = ["CacheLoad", "CacheReset", "DecoderMethod", "EmbedMethod", "EtModel", "ExecutorchExportError", "Scoped",
           "cache_buffers", "intx_weight", "load_et_model", "stored_from_intx"]

log = logging.getLogger(__name__)

EMBED = "language_model.embed_tokens.weight"
PLE = "language_model.embed_tokens_per_layer.weight"


class ExecutorchExportError(ValueError):
    """The checkpoint cannot be exported to ExecuTorch as asked; the message names the tensor or setting."""


def torch_owned(arr: np.ndarray) -> torch.Tensor:
    """`arr`'s values in memory torch allocated (one copy). `torch.from_numpy` would share numpy's buffer, which torch
    cannot free in place; the exporter frees the weights XNNPACK has taken (`release_delegated_weights`)."""
    return torch.tensor(np.asarray(arr))  # (calling `.numpy()` on the result would make it non-resizable again)


def intx_weight(scheme: Scheme, stored: dict[str, np.ndarray], shape: tuple[int, int], *,
                dynamic_activations: bool, name: str = "?") -> torch.Tensor:
    """Stored checkpoint arrays -> `IntxUnpackedToInt8Tensor` over the same integers (see the module docstring)."""
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8TensorActivationQuantization as ActQ,
    )

    n, k = shape
    if isinstance(scheme, Int4GroupAsym) or not isinstance(scheme, (Int4Group, Int8PerChannel)):
        raise ExecutorchExportError(f"tensor {name!r} uses {scheme.label}; the ExecuTorch exporter takes symmetric "
                                    "int4 groups and int8 per channel (int4-asym is ONNX-only)")
    if isinstance(scheme, Int4Group):
        q = unpack_int4(np.asarray(stored["qdata"], dtype=np.uint8))
        scale = np.asarray(stored["scales"], dtype=np.float32).reshape(n, k // scheme.group_size)
        block, target = (1, scheme.group_size), torch.int4
    else:
        q = np.asarray(stored["qdata"])
        scale = np.asarray(stored["scales"], dtype=np.float32).reshape(n, 1)
        block, target = (1, k), torch.int8
    if q.shape != (n, k) or q.dtype != np.int8:
        raise ExecutorchExportError(f"tensor {name!r}: codes are {q.dtype} {q.shape}, expected int8 {(n, k)}")
    scale_t = torch_owned(scale)
    return IntxUnpackedToInt8Tensor(
        torch_owned(q), scale_t, torch.zeros(scale_t.shape, dtype=torch.int8), target,
        block, torch.float32, ActQ.INT8_ASYM_PER_TOKEN if dynamic_activations else None)


def stored_from_intx(scheme: Scheme, qdata: np.ndarray, scale: np.ndarray) -> dict[str, np.ndarray]:
    """Inverse of `intx_weight` (codes int8 [N, K], scales): the checkpoint's stored arrays, for bit-exact checks."""
    from edge_gemma.quantize.schemes import pack_int4

    q = np.asarray(qdata)
    if isinstance(scheme, Int4Group):
        return {"qdata": pack_int4(q), "scales": np.asarray(scale, np.float32).reshape(q.shape[0], -1)}
    return {"qdata": q.astype(np.int8), "scales": np.asarray(scale, np.float32).reshape(-1)}


@dataclass
class EtModel:
    cfg: ModelConfig
    model: nn.Module  # Gemma4Model with caches of `context` slots
    table: nn.Module  # nn.Embedding: the main table (float, or a weight-only intx tensor)
    head: nn.Module  # nn.Linear over the same integers (8da8w / 8da4w) or the float table
    schemes: dict[str, str]  # HF name -> scheme label or "float"


def _swap_weight(module: nn.Module, weight: torch.Tensor) -> None:
    module.weight = nn.Parameter(weight, requires_grad=False)


def load_et_model(checkpoint: str | Path, *, context: int, text_only: bool = False) -> EtModel:
    """`Gemma4Model` ready for export from a quantized (quant_manifest.json) or float checkpoint."""
    from edge_gemma.checkpoint import hf_name, load_model, params_on_meta
    from edge_gemma.model.gemma4 import Gemma4Model

    path = Path(checkpoint)
    if not (path / "quant_manifest.json").is_file():  # float Hugging Face checkpoint: plain float32
        model = load_model(path, text_only=text_only, max_len=context)
        lm = model.language_model
        head = nn.Linear(lm.cfg.hidden_size, lm.cfg.vocab_size, bias=False, device="meta")  # weight set below
        head.weight = lm.embed_tokens.weight
        lm._modules.pop("embed_tokens_per_layer")
        return EtModel(cfg=model.cfg, model=model.eval(), table=lm.embed_tokens, head=head, schemes={})

    from edge_gemma.quantize.load import QuantizedCheckpoint

    with QuantizedCheckpoint(path) as qc:
        cfg = load_config(path)
        layout = cfg.model_type
        if text_only:
            cfg = cfg.text_only()
        with params_on_meta():
            model = Gemma4Model(cfg, max_len=context)
        schemes: dict[str, str] = {}

        def hf(ours: str) -> str:
            name = hf_name(ours, layout)
            if name is None or name not in qc.manifest["tensors"]:
                raise ExecutorchExportError(f"{path}: the quantized checkpoint has no tensor for {ours!r} ({name!r})")
            return name

        lm = model.language_model
        lm._modules.pop("embed_tokens_per_layer")  # never read: rows come from ple.bin
        quantized: set[str] = set()
        for mod_name, mod in model.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            name = hf(mod_name + ".weight")
            scheme = qc.schemes[name]
            if scheme is None:
                continue
            shape = tuple(qc.entry(name)["shape"])
            _swap_weight(mod, intx_weight(scheme, qc.stored(name), shape, dynamic_activations=True, name=name))
            if mod.bias is not None:
                quantized.add(mod_name + ".bias")
            quantized.add(mod_name + ".weight")
            schemes[name] = scheme.label
        state = {}
        for ours, target in model.state_dict().items():
            if ours == EMBED or (ours in quantized and ours.endswith(".weight")):
                continue
            name = hf(ours)
            if qc.schemes[name] is not None:
                raise ExecutorchExportError(f"{path}: tensor {name!r} is quantized ({qc.schemes[name].label}) but "
                                            f"{ours!r} is not a linear weight the ExecuTorch exporter can quantize")
            arr = np.asarray(qc.stored(name)["tensor"], dtype=np.float32)
            if tuple(arr.shape) != tuple(target.shape):
                raise ExecutorchExportError(f"{path}: tensor {name!r} has shape {list(arr.shape)}, expected "
                                            f"{list(target.shape)}")
            state[ours] = torch_owned(arr)
            schemes[name] = "float"
        model.load_state_dict(state, strict=False, assign=True)
        for ours, p in model.named_parameters():
            if p.is_meta and ours != EMBED:
                raise ExecutorchExportError(f"{path}: parameter {ours!r} was not loaded")

        emb = hf(EMBED)
        scheme, shape = qc.schemes[emb], tuple(qc.entry(emb)["shape"])
        stored = qc.stored(emb)
        head = nn.Linear(shape[1], shape[0], bias=False, device="meta")  # no [V, H] float32 init (E4B: 2.7 GB)
        if scheme is None:
            w = torch_owned(np.asarray(stored["tensor"], dtype=np.float32))
            _swap_weight(lm.embed_tokens, w)
            head.weight = lm.embed_tokens.weight
            schemes[emb] = "float"
        else:
            _swap_weight(lm.embed_tokens, intx_weight(scheme, stored, shape, dynamic_activations=False, name=emb))
            _swap_weight(head, intx_weight(scheme, stored, shape, dynamic_activations=True, name=emb))
            schemes[emb] = scheme.label
    model.eval().requires_grad_(False)
    return EtModel(cfg=cfg, model=model, table=lm.embed_tokens, head=head, schemes=schemes)


class EmbedMethod(nn.Module):
    """`ids [S] int64 -> table[ids] * sqrt(H)` `[S, H]` float32, the scale rounded to float32 as the eager model."""

    def __init__(self, table: nn.Module, hidden_size: int):
        super().__init__()
        self.table = table
        self.register_buffer("scale", torch.tensor(hidden_size**0.5, dtype=torch.float32), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.table.weight).float() * self.scale


def _head_logits(self, h: torch.Tensor) -> torch.Tensor:
    logits = self.export_head(h)
    cap = self.cfg.final_logit_softcapping
    return torch.tanh(logits / cap) * cap if cap is not None else logits


class DecoderMethod(nn.Module):
    """`(inputs_embeds [1,S,H], ple_rows [1,S,L,P], positions [S]) -> logits [1, V]` of the last position.

    The eager `TextDecoder` with its static caches (`layers.i.self_attn.kv_cache.{k,v}_cache`, cache-owning layers
    only) and `last_only=True`; its tied head is swapped for `head` (the quantized linear over the table's
    integers). One-token steps (`decode`, and the KV-shared layers of `prefill`, which run on the last position only)
    attend key-major (`TextAttention._attend_one_query`): SDPA's decomposition copied the whole K cache per layer
    and per token (transposed, scaled, expanded), most of a decode step at 4096 slots."""

    def __init__(self, lm: nn.Module, head: nn.Module):
        super().__init__()
        lm.export_head = head
        lm.logits = types.MethodType(_head_logits, lm)
        lm.attend_one_query_key_major()
        self.lm = lm

    def forward(self, inputs_embeds: torch.Tensor, ple_rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.lm(inputs_embeds, ple_rows, positions, last_only=True)[:, -1]


def cache_buffers(lm: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The KV cache buffers of the cache-owning layers, `(name, tensor)` in module order (k then v per layer)."""
    return [(name, buf) for name, buf in lm.named_buffers()
            if name.endswith(("kv_cache.k_cache", "kv_cache.v_cache"))]


class CacheReset(nn.Module):
    """`() -> zeros [1]`: fills every KV cache buffer with zeros, in place.

    The caches are mutable buffers in planned memory (shared by `prefill`, `decode` and this method by name, hence
    `self.lm` as in `DecoderMethod`), so nothing initialises them when a program loads. Masked slots must hold finite
    values -- a zero attention weight times NaN is NaN -- so the runtime calls this once after loading. Serializing
    the zeros instead would add the caches' full size to the `.pte` (~150 MB for E2B at 4096 positions)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self) -> torch.Tensor:
        for _, buf in cache_buffers(self.lm):
            buf.zero_()
        return torch.zeros(1)


class CacheLoad(nn.Module):
    """`(k_0, v_0, k_1, v_1, ...) -> zeros [1]`: copies the given tensors into the KV cache buffers, in place.

    One input per buffer of `cache_buffers` (its shape, float32). It lets a caller put the program in a known cache
    state: the tests feed the program and the eager reference the SAME history (teacher forcing, as for ONNX, whose
    graphs take the caches as inputs), and an application could restore a saved prompt's caches. No weights; the
    runtime loads it only when it is called."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        for (_, buf), t in zip(cache_buffers(self.lm), tensors, strict=True):
            buf.copy_(t)
        return torch.zeros(1)


class Scoped(nn.Module):
    """`module` registered under the attribute `scope`: its parameters are named `<scope>.<name>`.

    ExecuTorch keys a constant in the external `.ptd` by its name in the exported module; the vision and audio
    graphs both call their tower `tower`, so without a scope their weights would collide (the runtime then fails to
    load the method: "Scalar type mismatch", error 0x24 InvalidExternalData)."""

    def __init__(self, scope: str, module: nn.Module):
        super().__init__()
        self.scope = scope
        setattr(self, scope, module)

    def forward(self, first: torch.Tensor, second: torch.Tensor):  # both towers take two tensors
        return getattr(self, self.scope)(first, second)
