"""Static KV caches for the Gemma 4 text decoder (gpt-fast style: fixed-size buffers written at explicit positions).

Design choice, documented because exporters depend on it:

* One `KVCache` per layer that computes K/V (`TextConfig.cache_layers`, layers `0 .. first_shared_layer-1`). KV-shared
  layers own no cache: they attend over their producer's K/V exactly as the producer's `update` returned it
  (pitfall 6), so `len(decoder.kv_caches) == num_hidden_layers - num_kv_shared_layers`.
* Default: every cache, sliding or full, is `max_len` slots long and slot `j` holds position `j`. The attention mask
  is built from positions alone (sliding: key j visible to query i iff `j <= i` and `j > i - W`), so slots that were
  never written (or hold a stale future) are always masked out, and chunked prefill of any chunk size is exact.
* Option `sliding_ring=True` (`TextDecoder.setup_caches`): sliding layers get rings of `2W` slots (slot =
  position % 2W) and the decoder keeps one `sliding_slot_pos` buffer saying which position each slot holds; the
  sliding mask is built from it. Memory: E2B at 4096 context in float32, 12 MiB of sliding K/V instead of 96 MiB
  (12 sliding layers x K,V x 256 x 4096 x 4 B). The price: one forward may take at most `W + 1` tokens
  (`prefill_capacity`), so long prompts are prefilled in chunks. Same `KVCache` module, only shorter.
* Buffers are non-persistent: they are runtime state, never part of a checkpoint or a `state_dict`.
* `update` writes with `index_copy_` along the sequence dimension (ExecuTorch turns that into a mutable-buffer
  update; an ONNX exporter swaps the module for one that takes and returns the caches as graph inputs/outputs).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["KVCache"]


class KVCache(nn.Module):
    """K and V buffers `[B, n_kv_heads, max_len, head_dim]` for one cache-owning layer."""

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

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k, v` `[B, nkv, S, hd]` at slots `input_pos` `[S]` and return the whole buffers `[B, nkv, T, hd]`."""
        self.k_cache.index_copy_(2, input_pos, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, input_pos, v.to(self.v_cache.dtype))
        return self.k_cache, self.v_cache

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()

    def extra_repr(self) -> str:
        return f"shape={tuple(self.k_cache.shape)}, dtype={self.k_cache.dtype}"
