"""The ExecuTorch backend's swaps: attention over the slots in use, key-major one-token attention, the quantized head.

The caches stay the eager `KVCache` (static buffers written with `index_copy_`, which ExecuTorch turns into mutable
buffers shared by the methods). What changes:

* `UsedSlotsMasks`: the eager `CacheMasks` cut to the slots `0 .. end - 1`, `end` = the chunk's last position + 1
  (one data-dependent size, `.item()` once per call, bounded by the cache length): every slot past it is in the
  future of every query of the chunk, so it is masked anyway. The attention kernels below cut K/V to the mask's
  width, so a prompt of 512 tokens reads 512 slots per layer instead of the whole 4096-slot cache.

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

from edge_gemma.model.attention import CacheMasks, GroupedSDPA, visible

from ..common import LinearHead, replace_modules

__all__ = ["KeyMajorSDPA", "UsedSlotsMasks", "replace_for_executorch"]


class UsedSlotsMasks(CacheMasks):
    """`CacheMasks` over the slots `0 .. end - 1` only, `end = input_pos[-1] + 1` (module docstring)."""

    def forward(self, positions: torch.Tensor, input_pos: torch.Tensor) -> dict[bool, torch.Tensor]:
        # `.item()` itself does not survive ExecuTorch's decompositions ("Cannot cast FakeTensor to number")
        end = torch.ops.aten._local_scalar_dense(input_pos[-1]) + 1
        torch._check(end >= 1)
        torch._check(end <= self.max_len)
        q = positions[:, None, :, None]  # (b, 1, S, 1)
        k = torch.arange(end, device=positions.device)[None, None, None, :]  # (1, 1, 1, end)
        return {False: visible(q, k), True: visible(q, k, self.window)}


def _used(kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache slots the mask covers (`UsedSlotsMasks` cuts the mask; the buffers hold every slot)."""
    end = mask.shape[-1]
    return kv[0].narrow(2, 0, end), kv[1].narrow(2, 0, end)


class KeyMajorSDPA(GroupedSDPA):
    """`GroupedSDPA` over the slots the mask covers, whose one-query steps (one mask row shared by the batch) attend
    key-major (module docstring)."""

    def forward(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        kv = _used(kv, mask)
        B, nh, S, hd = q.shape
        if not (isinstance(S, int) and S == 1 and mask.shape[0] == 1):
            return self._chunk(q, kv, mask)
        k, v = (t.to(q.dtype) for t in kv)
        nkv, T = k.shape[1], k.shape[2]
        rep = nh // nkv
        qt = q.reshape(B * nkv, rep, hd).transpose(1, 2)  # (B*nkv, hd, rep); head j*rep + r reads KV head j
        scores = torch.bmm(k.reshape(B * nkv, T, hd), qt)  # (B*nkv, T, rep)
        bias = torch.where(mask, 0.0, float("-inf")).to(scores.dtype).reshape(1, T, 1)  # mask (1, 1, 1, T)
        p = torch.softmax(scores + bias, dim=1)
        out = torch.bmm(p.transpose(1, 2), v.reshape(B * nkv, T, hd))  # (B*nkv, rep, hd)
        return out.reshape(B, 1, nh * hd)


    @staticmethod
    def _chunk(q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Several queries: `GroupedSDPA`'s attention written out (scores, an additive mask, softmax, values).
        `scaled_dot_product_attention` decomposes into `_safe_softmax`, whose check for fully hidden rows (`eq`,
        `any`, `logical_not`, `where` over every score of every layer) ran on portable kernels; a causal mask
        always shows a query its own position, so no row is fully hidden."""
        k, v = (t.to(q.dtype) for t in kv)
        B, nh, S, hd = q.shape
        nkv = k.shape[1]
        rep = nh // nkv
        b, _, _, T = mask.shape
        bias = torch.where(mask, 0.0, float("-inf")).to(q.dtype)  # (b, 1, S, T), before the heads' expansion
        if rep > 1:
            bias = bias.unsqueeze(2).expand(b, 1, rep, S, T).reshape(b, 1, rep * S, T)
        scores = torch.matmul(q.reshape(B, nkv, rep * S, hd), k.transpose(2, 3))  # scale 1.0
        out = torch.matmul(torch.softmax(scores + bias, dim=-1), v)  # (B, nkv, rep*S, hd)
        out = out.view(B, nkv, rep, S, hd).permute(0, 3, 1, 2, 4)
        return out.clone(memory_format=torch.contiguous_format).view(B, S, nh * hd)


def replace_for_executorch(decoder: nn.Module, head: nn.Module | None = None) -> nn.Module:
    """Swap `decoder`'s masks for `UsedSlotsMasks` (when it has static caches), its attention kernels for
    `KeyMajorSDPA` and, given `head`, its tied head for it; returns it."""
    if type(decoder.masks) is CacheMasks:
        decoder.masks = UsedSlotsMasks(decoder.masks.window, decoder.masks.max_len)
    replace_modules(decoder, GroupedSDPA, lambda _: KeyMajorSDPA())
    if head is not None:
        decoder.lm_head = LinearHead(head)
    return decoder
