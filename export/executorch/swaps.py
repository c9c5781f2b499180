"""The ExecuTorch backend's swaps: key-major one-token attention and the quantized head.

The caches stay the eager `KVCache` (static buffers written with `index_copy_`, which ExecuTorch turns into mutable
buffers shared by the methods) and the masks the eager `CacheMasks`. What changes:

* `KeyMajorSDPA`: a one-token step (decode, and the KV-shared layers of prefill, which run on the last position
  only) computes its scores key-major, `K @ q^T` `(T, rep)` per KV head, so only the small query is transposed, and
  turns the mask into an additive bias of `T` values. Lowered to XNNPACK, SDPA's decomposition instead transposes,
  scales and expands the whole K cache per layer and per token (XNNPACK's batch matmul takes no transposed operand).
  Longer chunks keep `GroupedSDPA`.
* `LinearHead`: the tied head as a dynamically quantized linear over the table's integers.
"""

from __future__ import annotations

import torch
from torch import nn

from edge_gemma.model.attention import GroupedSDPA

from ..common import LinearHead, replace_modules

__all__ = ["KeyMajorSDPA", "replace_for_executorch"]


class KeyMajorSDPA(GroupedSDPA):
    """`GroupedSDPA` whose one-query steps (one mask row shared by the batch) attend key-major (module docstring)."""

    def forward(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        B, nh, S, hd = q.shape
        if not (isinstance(S, int) and S == 1 and mask.shape[0] == 1):
            return super().forward(q, kv, mask)
        k, v = (t.to(q.dtype) for t in kv)
        nkv, T = k.shape[1], k.shape[2]
        rep = nh // nkv
        qt = q.reshape(B * nkv, rep, hd).transpose(1, 2)  # (B*nkv, hd, rep); head j*rep + r reads KV head j
        scores = torch.bmm(k.reshape(B * nkv, T, hd), qt)  # (B*nkv, T, rep)
        bias = torch.where(mask, 0.0, float("-inf")).to(scores.dtype).reshape(1, T, 1)  # mask (1, 1, 1, T)
        p = torch.softmax(scores + bias, dim=1)
        out = torch.bmm(p.transpose(1, 2), v.reshape(B * nkv, T, hd))  # (B*nkv, rep, hd)
        return out.reshape(B, 1, nh * hd)


def replace_for_executorch(decoder: nn.Module, head: nn.Module | None = None) -> nn.Module:
    """Swap `decoder`'s attention kernels for `KeyMajorSDPA` and, given `head`, its tied head for it; returns it."""
    replace_modules(decoder, GroupedSDPA, lambda _: KeyMajorSDPA())
    if head is not None:
        decoder.lm_head = LinearHead(head)
    return decoder
