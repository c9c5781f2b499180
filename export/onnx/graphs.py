"""The module that becomes `decoder.onnx`: the one decoder, swapped for ONNX (`swaps.py`), with graph I/O.

`CachedDecoder.forward(inputs_embeds [1,S,H], ple_rows [1,S,L,P], positions [S], past)` ->
`(logits [1,V], *new_kv)`: `past` / `new_kv` are `k_i, v_i` for each cache layer i, `[1,nkv,T,hd]` / `[1,nkv,S,hd]`.
Logits come out for the LAST position only and the KV-shared layers run on the last token only (the decoder's
`last_only`). The towers' graphs are `export/common.VisionGraph` / `AudioGraph`.
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
                past: list[torch.Tensor]):
        for n, cache in enumerate(self.caches):
            cache.bind(past[2 * n], past[2 * n + 1])
        self.decoder.masks.bind(past[0].shape[2])
        logits = self.decoder(inputs_embeds, ple_rows, positions, last_only=True)[:, -1]  # (1, V)
        return (logits, *(t for cache in self.caches for t in cache.new))
