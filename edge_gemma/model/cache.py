"""KV caches of the Gemma 4 text decoder: one object per cache-owning layer, gpt-fast style static buffers.

Only the layers that compute K/V (`TextConfig.cache_layers`, `0 .. first_shared_layer - 1`) own a cache; a KV-shared
layer attends over what its producer's `update` returned. Every cache has `update(input_pos, k, v)`, which stores the
new `k, v (B, nkv, S, hd)` and returns what the layer's attention kernel reads:

* `NoCache`: nothing stored; the chunk's own K/V (a cache-free decoder attends within the chunk).
* `KVCache`: `max_len` slots, slot j = position j, written with `index_copy_` (ExecuTorch turns it into a mutable
  buffer update); returns the whole buffers, masked by position (`attention.CacheMasks`).
* `RingKVCache`: a sliding layer's ring of `2 * window` slots, slot = position % ring length
  (`attention.RingCacheMasks` tracks which position each slot holds).

Backends with other layouts add their own cache classes (`export/onnx/swaps.py`: caches as graph inputs;
`export/litert/swaps.py`: `dynamic_update_slice` with V transposed). Buffers are non-persistent: runtime state,
never part of a checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["KVCache", "NoCache", "RingKVCache"]


class NoCache(nn.Module):
    """The cache of a decoder without caches: `update` returns the chunk's `(k, v)` unchanged."""

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, v


class KVCache(nn.Module):
    """K and V buffers `[B, n_kv_heads, max_len, head_dim]` for one cache-owning layer; slot = position."""

    def __init__(
        self, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int, *, dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if max_len <= 0:
            raise ValueError(f"KVCache: max_len must be positive, found {max_len}")
        self.max_len = max_len
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def slots(self, input_pos: torch.Tensor) -> torch.Tensor:
        return input_pos

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k, v` `[B, nkv, S, hd]` at the slots of `input_pos` `[S]`; return the whole buffers `[B, nkv, T, hd]`."""
        slots = self.slots(input_pos)
        self.k_cache.index_copy_(2, slots, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, slots, v.to(self.v_cache.dtype))
        return self.k_cache, self.v_cache

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()

    def extra_repr(self) -> str:
        return f"shape={tuple(self.k_cache.shape)}, dtype={self.k_cache.dtype}"


class RingKVCache(KVCache):
    """A `KVCache` of `max_len` ring slots: position p goes to slot `p % max_len`."""

    def slots(self, input_pos: torch.Tensor) -> torch.Tensor:
        return input_pos % self.max_len
