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

The model comes from the shared loader (`export/common.load_export_model`, with `EtLinears`): built on the meta
device, only the tensors the methods use are materialised; the PLE table is never read (the engine feeds its rows from
`ple.bin`) and is not part of the module.

Method modules (batch 1 added inside): `EmbedMethod` ids [S] -> [S, H]; `DecoderMethod` (prefill and decode: the same
module exported twice, S dynamic and S = 1) -> logits [n, V] and hidden states [n, H] of the chunk positions `keep`
(the last one, or all of them for a speculative verify call), caches as mutable buffers updated in place by the eager
`KVCache.update` (`index_copy_`); `CacheReset` () -> zeros the same buffers (called once at load: the caches are
planned memory, not serialized zeros); `DraftMethod` one drafter step over the same buffers, in place; the towers
are `export/common.VisionGraph`/`AudioGraph` inside `Scoped` so that every method's constants have names of their own
in the shared `.ptd`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_gemma.config import ModelConfig
from edge_gemma.quantize.schemes import Int4Group, Int4GroupAsym, Int8PerChannel, Scheme, unpack_int4

from ..common import EMBED
from .swaps import replace_for_executorch

__all__ = ["CacheLoad", "CacheReset", "DecoderMethod", "DraftMethod", "EmbedMethod", "EtLinears", "EtModel",
           "ExecutorchExportError", "Scoped", "cache_buffers", "intx_weight", "load_et_model", "stored_from_intx"]

log = logging.getLogger(__name__)



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


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


class EtLinears:
    """How the `.pte` holds the checkpoint's weights: `nn.Linear`s over torchao tensors of the stored integers with
    dynamic int8 activations (`intx_weight`); a float table stays float32."""

    def linear(self, scheme, stored, shape, bias, name):
        return _linear(intx_weight(scheme, stored, shape, dynamic_activations=True, name=name), bias)

    def head(self, scheme, stored, shape, name):
        if scheme is None:
            return _linear(torch_owned(np.asarray(stored["tensor"], dtype=np.float32)))
        return _linear(intx_weight(scheme, stored, shape, dynamic_activations=True, name=name))


def load_et_model(checkpoint: str | Path, *, context: int, text_only: bool = False) -> EtModel:
    """`Gemma4Model` ready for export from a quantized (quant_manifest.json) or float checkpoint, with static caches of
    `context` slots; the embedding table is the head's float weight, or a weight-only intx tensor over the same
    integers (ExecuTorch lowers its gather to `embedding_4bit` / `embedding_byte`)."""
    from ..common import load_export_model

    em = load_export_model(checkpoint, EtLinears(), text_only=text_only)
    lm = em.model.language_model
    table = nn.Embedding(*em.head.weight.shape, device="meta")
    if em.embed_scheme is None:
        table.weight = em.head.weight
    else:
        weight = intx_weight(em.embed_scheme, em.embed_stored, tuple(em.head.weight.shape), dynamic_activations=False,
                             name=EMBED)
        table.weight = nn.Parameter(weight, requires_grad=False)
    lm.embed_tokens = table
    lm.setup_caches(context)
    return EtModel(cfg=em.cfg, model=em.model.eval().requires_grad_(False), table=table, head=em.head,
                   schemes=em.schemes)


class EmbedMethod(nn.Module):
    """`ids [S] int64 -> table[ids] * sqrt(H)` `[S, H]` float32, the scale rounded to float32 as the eager model."""

    def __init__(self, table: nn.Module, hidden_size: int):
        super().__init__()
        self.table = table
        self.register_buffer("scale", torch.tensor(hidden_size**0.5, dtype=torch.float32), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.table.weight).float() * self.scale


class DecoderMethod(nn.Module):
    """`(inputs_embeds [1,S,H], ple_rows [1,S,L,P], positions [S], keep [n]) -> (logits [n, V], hidden [n, H])` of the
    chunk positions `keep` (indices into the chunk).

    The one decoder with its static caches (`layers.i.self_attn.kv_cache.{k,v}_cache`, cache-owning layers only),
    swapped for ExecuTorch (`swaps.replace_for_executorch`: attention over the cache slots in use, key-major one-token
    attention, `head` as the tied head). Like the ONNX decoder graph, the KV-shared layers and the head run on the
    `keep` positions only: a prefill or decode step asks for its last position (`[S - 1]`: the head costs what it
    cost before), a speculative verify call for all of them; the final normed hidden states are what a drafter step
    starts from."""

    def __init__(self, lm: nn.Module, head: nn.Module):
        super().__init__()
        self.lm = replace_for_executorch(lm, head)

    def forward(self, inputs_embeds: torch.Tensor, ple_rows: torch.Tensor, positions: torch.Tensor,
                keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.lm.hidden_states(inputs_embeds, ple_rows, positions, keep=keep)  # (1, n, H)
        return self.lm.logits(hidden)[0], hidden[0]


class DraftMethod(nn.Module):
    """`(token_embed [1,1,H], hidden [1,1,H], position [1]) -> (logits [1, V], projected [1, H])`: one step of the
    drafter (`edge_gemma.model.drafter.DraftStep`) over the target's KV caches in place, the buffers of the layers
    `layers` (`{sliding flag: cache layer}`), the slots before `position` only.

    ExecuTorch shares a buffer between methods only if every method that names it mutates it (a buffer a method only
    reads is a constant of that method: a frozen copy of the zeros). So the step first writes back the value the slot
    `position` holds (a no-op, one slot), which makes the caches this method's mutable buffers, planned in the memory
    `prefill`/`decode` write. `self.lm` names the buffers exactly as `DecoderMethod` does."""

    def __init__(self, lm: nn.Module, step: nn.Module, layers: dict[bool, int]):
        super().__init__()
        self.lm, self.step, self.layers = lm, step, layers

    def forward(self, token_embed: torch.Tensor, hidden: torch.Tensor, position: torch.Tensor):
        end = torch.ops.aten._local_scalar_dense(position[0])  # the keys before the last token's position
        torch._check(end >= 1)
        torch._check(end < self.lm.layers[self.layers[self.step.kinds[0]]].self_attn.kv_cache.max_len)
        kv = []
        for kind in self.step.kinds:
            cache = self.lm.layers[self.layers[kind]].self_attn.kv_cache
            for buf in (cache.k_cache, cache.v_cache):
                buf.index_copy_(2, position, buf.index_select(2, position))
                kv.append(buf.narrow(2, 0, end))
        return self.step(token_embed, hidden, position, kv)


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
