"""Attention kernels and masks of the Gemma 4 text decoder: the parts a backend swaps.

A layer's attention computes q, k, v, hands k and v to its cache (`cache.py`) and its q, the cache's answer and the
mask to its kernel (`sdpa`). What the cache returns and the mask looks like is the cache kind's business; the kernel of
the same backend knows how to read them. The eager model uses `GroupedSDPA` over whole static caches and masks built
by `CacheMasks` / `ChunkMasks`; each exporter (`export/<backend>/swaps.py`) replaces these modules by type.

`visible` is the one definition of who sees whom: a key at position k is visible to a query at position q iff
`k <= q` (causal) and, on sliding layers, `k > q - window`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CacheMasks", "ChunkMasks", "GroupedSDPA", "RingCacheMasks", "last_query", "select_queries", "visible"]


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None, *, causal: bool = True) -> torch.Tensor:
    """Bool mask, broadcast of `q_pos` against `k_pos`: True where the key may be attended. `causal=False` keeps only
    the window condition (for a backend whose causal mask is an input)."""
    ok = k_pos <= q_pos if causal else None
    if window is not None:
        in_window = k_pos > q_pos - window
        ok = in_window if ok is None else ok & in_window
    return ok


def last_query(mask):
    """The mask's last query row (query positions are dimension -2; a tuple of blocks is cut block by block)."""
    if isinstance(mask, tuple):
        return tuple(last_query(m) for m in mask)
    return mask[..., -1:, :]


def select_queries(mask, keep: torch.Tensor):
    """The mask's query rows `keep` (indices into dimension -2; a tuple of blocks is cut block by block)."""
    if isinstance(mask, tuple):
        return tuple(select_queries(m, keep) for m in mask)
    return mask.index_select(mask.dim() - 2, keep)


class GroupedSDPA(nn.Module):
    """`q (B, nh, S, hd)`, `kv = (k, v)` each `(B, nkv, T, hd)`, bool `mask (b, 1, S, T)` -> `(B, S, nh * hd)`.

    Grouped-query attention at scale 1.0 (q and k are RMS-normed): the `rep` query heads of KV head j (heads
    j*rep .. j*rep+rep-1) become rows of one batch entry, so K/V are never repeated per query head."""

    def forward(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        k, v = kv
        B, nh, S, hd = q.shape
        nkv = k.shape[1]
        rep = nh // nkv
        qg = q.reshape(B, nkv, rep * S, hd)
        if rep > 1:
            b, _, _, T = mask.shape
            mask = mask.unsqueeze(2).expand(b, 1, rep, S, T).reshape(b, 1, rep * S, T)
        out = F.scaled_dot_product_attention(qg, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=1.0)
        # (B, nkv, rep*S, hd) -> (B, S, nh*hd) through an explicit 5-D view, so torch.export keeps a dynamic S
        # separable from rep, and a contiguous copy, so an S = 1 reshape is never recorded as a view.
        out = out.view(B, nkv, rep, S, hd).permute(0, 3, 1, 2, 4)
        return out.clone(memory_format=torch.contiguous_format).view(B, S, nh * hd)


class ChunkMasks(nn.Module):
    """No caches: each query sees the chunk's own keys. `forward(positions (b, S), input_pos (S,))` ->
    `{sliding: bool (b, 1, S, S)}`."""

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def forward(self, positions: torch.Tensor, input_pos: torch.Tensor) -> dict[bool, torch.Tensor]:
        q, k = positions[:, None, :, None], positions[:, None, None, :]
        return {False: visible(q, k), True: visible(q, k, self.window)}


class CacheMasks(nn.Module):
    """Static caches of `max_len` slots, slot j holding position j: `{sliding: bool (b, 1, S, max_len)}`. Slots never
    written (or holding a stale future after a rewind) are in the future of every query, hence hidden."""

    def __init__(self, window: int, max_len: int):
        super().__init__()
        self.window, self.max_len = window, max_len

    def forward(self, positions: torch.Tensor, input_pos: torch.Tensor) -> dict[bool, torch.Tensor]:
        q = positions[:, None, :, None]  # (b, 1, S, 1)
        k = torch.arange(self.max_len, device=positions.device)[None, None, None, :]  # (1, 1, 1, T)
        return {False: visible(q, k), True: visible(q, k, self.window)}


class RingCacheMasks(CacheMasks):
    """Full layers as `CacheMasks`; sliding layers over a ring of `ring_len` slots (`cache.RingKVCache`).

    `slot_pos` records the position each ring slot holds (-1: empty) and is updated before the masks are built, so a
    chunk may hold at most `capacity = ring_len - window + 1` tokens: its own writes then never evict a key one of
    its queries still needs."""

    def __init__(self, window: int, max_len: int, ring_len: int, *, device: torch.device | str | None = None):
        super().__init__(window, max_len)
        self.ring_len = ring_len
        self.register_buffer("slot_pos", torch.full((ring_len,), -1, dtype=torch.long, device=device), persistent=False)

    @property
    def capacity(self) -> int:
        return self.ring_len - self.window + 1

    def reset(self) -> None:
        self.slot_pos.fill_(-1)

    def forward(self, positions: torch.Tensor, input_pos: torch.Tensor) -> dict[bool, torch.Tensor]:
        if input_pos.shape[0] > self.capacity:
            raise ValueError(f"a chunk of {input_pos.shape[0]} tokens exceeds the sliding ring's capacity "
                             f"{self.capacity}; prefill in chunks")
        masks = super().forward(positions, input_pos)
        self.slot_pos.index_copy_(0, input_pos % self.ring_len, input_pos)
        k = self.slot_pos[None, None, None, :]  # (1, 1, 1, R)
        masks[True] = (k >= 0) & visible(positions[:, None, :, None], k, self.window)
        return masks
