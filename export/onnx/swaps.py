"""The ONNX backend's swaps: caches as graph inputs, two-block attention, the `rms_norm` op, the quantized head.

`replace_for_onnx(decoder, head)` turns the eager `TextDecoder` into what `decoder.onnx` computes:

* `InputKVCache` per cache-owning layer: the old cache `[1, nkv, T, hd]` is a READ-ONLY graph input (T dynamic: the
  runtime passes the slots in use, rounded up to a bucket) and the chunk's new K/V `[1, nkv, S, hd]` a graph output;
  the runtime writes them into its arrays. Nothing in the graph concatenates or copies a whole cache.
* `TwoBlockSDPA`: scores over the old block and the new block, one softmax, `p_old @ V_old + p_new @ V_new`; equal to
  attention over the updated cache as long as the chunk's positions are consecutive and every slot below the first
  holds that position's K/V (the runtime guarantees both). Slots at or past the chunk's first position (stale, after
  a rewind) are never read.
* `TwoBlockMasks`: the two blocks' masks, from positions (`visible`), once per step and layer kind.
* `OnnxRMSNorm`: the same norm as one `SimplifiedLayerNormalization` node (`edge_gemma::rms_norm`), which ONNX
  Runtime runs as one kernel where the eager formula would be five.
* `SlicedHead`: a quantized head of more than `HEAD_SLICE_ROWS` rows as one MatMulNBits per block of rows, then one
  Concat: the same logits bit for bit. ONNX Runtime prepacks each MatMulNBits into a copy of its own and then unmaps
  the original; one 262144-row node kept the whole table's original pages resident beside its packed copy while
  loading, which was the load's (and so the run's) peak RSS. Blocks of rows bound that to one block's pages; decode
  speed does not change (figures: benchmarks/README.md).
"""

from __future__ import annotations

import torch
from torch import nn

from edge_gemma.model.attention import GroupedSDPA, visible
from edge_gemma.model.layers import RMSNorm

from ..common import LinearHead, replace_modules
from .ops import QuantLinear  # also registers torch.ops.edge_gemma.rms_norm / matmul_nbits

__all__ = ["HEAD_SLICE_ROWS", "InputKVCache", "OnnxRMSNorm", "SlicedHead", "TwoBlockMasks", "TwoBlockSDPA",
           "replace_for_onnx"]

HEAD_SLICE_ROWS = 32768  # rows per MatMulNBits of a sliced head (the full-size vocabulary: 8 nodes)


class OnnxRMSNorm(nn.Module):
    """`RMSNorm` (same weight, same math) as the `edge_gemma::rms_norm` op."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.dim, self.eps, self.with_scale = norm.dim, norm.eps, norm.with_scale
        if norm.with_scale:
            self.weight = norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.with_scale else torch.ones(self.dim, dtype=torch.float32, device=x.device)
        return torch.ops.edge_gemma.rms_norm(x, weight, float(self.eps))


class InputKVCache(nn.Module):
    """A cache whose old K/V are graph inputs (`bind`) and whose new K/V are graph outputs (`new`)."""

    def bind(self, past_k: torch.Tensor, past_v: torch.Tensor) -> None:
        self.past, self.new = (past_k, past_v), None

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.new = (k, v)
        return (self.past[0], k), (self.past[1], v)  # ((k_old, k_new), (v_old, v_new))


class TwoBlockMasks(nn.Module):
    """`{sliding: (ok_old (S, T), ok_new (S, S))}`: old slot j is visible iff it was written before this chunk
    (`j < positions[0]`) and `visible`; the chunk's own keys by `visible`. `bind(T)` gives the old block's length."""

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def bind(self, num_slots) -> None:
        self.num_slots = num_slots

    def forward(self, positions: torch.Tensor, input_pos: torch.Tensor):
        slots = torch.arange(self.num_slots, device=input_pos.device)[None, :]  # (1, T)
        q, k_new = input_pos[:, None], input_pos[None, :]  # (S, 1), (1, S)
        written = slots < input_pos[0]
        return {False: (written & visible(q, slots), visible(q, k_new)),
                True: (written & visible(q, slots, self.window), visible(q, k_new, self.window))}


class TwoBlockSDPA(nn.Module):
    """`q (1, nh, s, hd)` over `((k_old, k_new), (v_old, v_new))` with `(ok_old, ok_new)` -> `(1, s, nh * hd)`."""

    def forward(self, q: torch.Tensor, kv, mask) -> torch.Tensor:
        (k_old, k_new), (v_old, v_new) = kv
        ok_old, ok_new = mask
        _, nh, s, hd = q.shape
        nkv = k_old.shape[1]
        rep = nh // nkv
        qg = q.reshape(1, nkv, rep * s, hd)  # head h = j*rep + r reads KV head j (repeat_interleave layout)
        scores = torch.cat([qg @ k_old.transpose(-1, -2), qg @ k_new.transpose(-1, -2)], dim=-1)  # (1, nkv, rep*s, T+S)
        ok = torch.cat([ok_old, ok_new], dim=-1).repeat(rep, 1)  # (rep*s, T+S)
        p = torch.softmax(scores.masked_fill(~ok, torch.finfo(scores.dtype).min), dim=-1)
        T = k_old.shape[2]
        out = p[..., :T] @ v_old + p[..., T:] @ v_new  # (1, nkv, rep*s, hd)
        return out.reshape(1, nh, s, hd).transpose(1, 2).reshape(1, s, nh * hd)


class SlicedHead(nn.Module):
    """`QuantLinear` head -> the same linear as consecutive row blocks of `rows` rows, outputs concatenated."""

    def __init__(self, head: QuantLinear, rows: int = HEAD_SLICE_ROWS):
        super().__init__()
        n = head.out_features
        self.parts = nn.ModuleList(head.rows(a, min(a + rows, n)) for a in range(0, n, rows))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(h) for part in self.parts], dim=-1)


def sliced_head(head: nn.Module, rows: int = HEAD_SLICE_ROWS) -> nn.Module:
    """`SlicedHead(head, rows)` for a quantized head of more than `rows` rows; any other head as it is."""
    return SlicedHead(head, rows) if isinstance(head, QuantLinear) and head.out_features > rows else head


def replace_for_onnx(decoder: nn.Module, head: nn.Module) -> list[InputKVCache]:
    """Swap `decoder`'s caches, attention kernels, masks, norms and head for the ONNX graph (see the module
    docstring); returns the caches in `cache_layers` order, to bind the graph's inputs into."""
    caches = []
    for i in decoder.cfg.cache_layers:
        decoder.layers[i].self_attn.kv_cache = InputKVCache()
        caches.append(decoder.layers[i].self_attn.kv_cache)
    replace_modules(decoder, GroupedSDPA, lambda _: TwoBlockSDPA())
    replace_modules(decoder, RMSNorm, OnnxRMSNorm)
    decoder.masks = TwoBlockMasks(decoder.cfg.sliding_window)
    decoder.lm_head = LinearHead(sliced_head(head))
    return caches
