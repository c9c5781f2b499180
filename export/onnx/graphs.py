"""The module that becomes `decoder.onnx`: the one decoder, swapped for ONNX (`swaps.py`), with graph I/O.

`CachedDecoder.forward(inputs_embeds [1,S,H], ple_rows [1,S,L,P], positions [S], keep [n], past)` ->
`(logits [1,n,V], hidden [1,n,H], *new_kv)`: `past` / `new_kv` are `k_i, v_i` for each cache layer i,
`[1,nkv,T,hd]` / `[1,nkv,S,hd]`. Logits and final normed hidden states come out for the chunk positions `keep` only,
and the KV-shared layers run on those only (the decoder's `keep`): a prefill asks for its last position (`[S - 1]`),
a speculative verify call for all of them. The towers' graphs are `export/common.VisionGraph` / `AudioGraph`.
"""

from __future__ import annotations

import torch
from torch import nn

from .swaps import replace_for_onnx

__all__ = ["CachedDecoder", "cache_names"]


def cache_names(cache_layers: tuple[int, ...]) -> tuple[list[str], list[str]]:
    """Graph input names of the old caches and output names of the new K/V, in order (K then V per layer)."""
    past = [f"past_{kv}_{i}" for i in cache_layers for kv in ("key", "value")]
    new = [f"new_{kv}_{i}" for i in cache_layers for kv in ("key", "value")]
    return past, new


class CachedDecoder(nn.Module):
    """The decoder with its caches as graph inputs and outputs (see the module docstring). `head` maps the final
    normed hidden state to raw logits (a float linear over the table, or a `QuantLinear` over its integers)."""

    def __init__(self, decoder: nn.Module, head: nn.Module):
        super().__init__()
        self.decoder = decoder
        self.caches = replace_for_onnx(decoder, head)

    def forward(self, inputs_embeds: torch.Tensor, ple_rows: torch.Tensor, positions: torch.Tensor,
                keep: torch.Tensor, past: list[torch.Tensor]):
        for n, cache in enumerate(self.caches):
            cache.bind(past[2 * n], past[2 * n + 1])
        self.decoder.masks.bind(past[0].shape[2])
        hidden = self.decoder.hidden_states(inputs_embeds, ple_rows, positions, keep=keep)  # (1, n, H)
        return (self.decoder.logits(hidden), hidden, *(t for cache in self.caches for t in cache.new))
