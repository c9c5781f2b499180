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

__all__ = ["CachedDecoder", "DrafterGraph", "cache_names", "drafter_kinds"]


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


def drafter_kinds(drafter: nn.Module) -> list[bool]:
    """The layer kinds (sliding flag) the drafter reads target caches of, sliding first."""
    sliding = {not drafter.cfg.is_full(i) for i in range(drafter.cfg.num_hidden_layers)}
    return [kind for kind in (True, False) if kind in sliding]


class DrafterGraph(nn.Module):
    """`drafter.onnx`: `(token_embed [1,1,Ht], hidden [1,1,Ht], position [1], *kv)` -> `(logits [1,V],
    projected [1,Ht])`, one draft step of `edge_gemma.model.drafter.Drafter` over the target's caches: `kv` is the K
    and V `[1,nkv,T,hd]` of the target's last cache layer of each kind the drafter has (sliding first), T dynamic
    (the runtime binds its cache arrays as they are; slot j holds position j, and the masks keep keys before
    `position`: `drafter_masks`)."""

    def __init__(self, drafter: nn.Module):
        super().__init__()
        self.drafter = drafter
        self.kinds = drafter_kinds(drafter)

    def forward(self, token_embed: torch.Tensor, hidden: torch.Tensor, position: torch.Tensor, kv: list[torch.Tensor]):
        from edge_gemma.model.drafter import drafter_masks

        pos = position.view(1, 1)
        caches = {kind: (kv[2 * n], kv[2 * n + 1]) for n, kind in enumerate(self.kinds)}
        slots = {kind: torch.arange(k.shape[2], device=k.device) for kind, (k, _) in caches.items()}
        masks = drafter_masks(pos, slots, self.drafter.cfg.sliding_window)
        logits, projected = self.drafter(token_embed, hidden, pos, caches, masks)
        return logits[:, 0], projected[:, 0]
