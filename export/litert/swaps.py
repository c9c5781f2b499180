"""The LiteRT backend's swaps: LiteRT-LM's cache layout and mask input, PLE rows already scaled.

`replace_for_litert(decoder, context)` turns the eager `TextDecoder` into what `decoder.tflite`'s signatures compute
(the I/O contract is in `graphs.py`):

* `DynamicUpdateSliceCache` per cache-owning layer: the whole cache `[1, nkv, T, hd]` (K) / `[1, nkv, hd, T]` (V
  transposed, LiteRT-LM's default layout) is a signature input; the chunk's K/V are written with TFLite's
  `DYNAMIC_UPDATE_SLICE` as one contiguous slice starting at `input_pos[0]` (LiteRT-LM pads a prefill chunk at the
  end, so padding lands on future slots, hidden by the mask and overwritten later) and the updated caches are
  signature outputs.
* `InputMasks`: the additive causal mask `[1, 1, S, T]` is a signature input (LiteRT-LM fills it); sliding layers add
  the window (`visible(..., causal=False)`), hiding with LiteRT-LM's own finite value `MASK_MIN`, so a fully hidden
  padding row gives a uniform softmax, never NaN.
* `TransposedVSDPA`: attention over the additive mask and the transposed V.
* `ple_scale` becomes the identity: LiteRT-LM's per-layer embedder already returns rows * sqrt(P).
"""

from __future__ import annotations

import torch
from torch import nn

from edge_gemma.model.attention import GroupedSDPA, visible

from ..common import replace_modules

__all__ = ["MASK_MIN", "DynamicUpdateSliceCache", "InputMasks", "TransposedVSDPA", "replace_for_litert"]

# The hidden value LiteRT-LM's CPU executor writes into float masks (-0.7 * float32 max); finite on purpose.
MASK_MIN = -0.7 * torch.finfo(torch.float32).max


def _dynamic_update_slice(cache: torch.Tensor, update: torch.Tensor, start: torch.Tensor, dim: int) -> torch.Tensor:
    """`cache` with `update` written along `dim` from index `start` (a 0-d int32): TFLite DYNAMIC_UPDATE_SLICE."""
    from litert_torch.generative.custom_ops.dynamic_update_slice import dynamic_update_slice

    zero = torch.zeros((1,), dtype=torch.int32)
    parts = [zero] * cache.dim()
    parts[dim] = start.reshape(1)
    return dynamic_update_slice(cache, update, [x for x in torch.cat(parts)])  # 0-d indices, as the op needs


class DynamicUpdateSliceCache(nn.Module):
    """K `[1, nkv, T, hd]` and transposed V `[1, nkv, hd, T]` given as inputs (`bind`), returned updated (`new`)."""

    def bind(self, k_cache: torch.Tensor, vt_cache: torch.Tensor) -> None:
        self.caches, self.new = (k_cache, vt_cache), None

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        start = input_pos[0]
        k_all = _dynamic_update_slice(self.caches[0], k, start, 2)  # (1, nkv, T, hd)
        vt_all = _dynamic_update_slice(self.caches[1], v.transpose(2, 3), start, 3)  # (1, nkv, hd, T)
        self.new = (k_all, vt_all)
        return self.new


class InputMasks(nn.Module):
    """`{sliding: additive mask (1, S, T)}` from the bound input mask `[1, 1, S, T]` (0 visible, MASK_MIN hidden)."""

    def __init__(self, window: int, context: int):
        super().__init__()
        self.window, self.context = window, context

    def bind(self, mask: torch.Tensor) -> None:
        self.bound = (mask,)  # in a tuple: a tensor attribute assigned while tracing makes torch.export warn

    def forward(self, positions: torch.Tensor, input_pos: torch.Tensor) -> dict[bool, torch.Tensor]:
        q = input_pos[:, None]  # (S, 1) int32
        k = torch.arange(self.context, dtype=torch.int32)[None, :]  # (1, T)
        given = self.bound[0][:, 0]  # (1, S, T)
        in_window = visible(q, k, self.window, causal=False)[None]  # (1, S, T)
        return {False: given, True: torch.where(in_window, given, torch.full_like(given, MASK_MIN))}


class TransposedVSDPA(nn.Module):
    """`q (B, nh, S, hd)` over `(k (1, nkv, T, hd), vt (1, nkv, hd, T))` with an additive `mask (1, S, T)`."""

    def forward(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        k_all, vt_all = kv
        B, nh, S, hd = q.shape
        nkv = k_all.shape[1]
        qg = q.reshape(B, nkv, nh // nkv * S, hd)  # query heads grouped by their KV head (heads are kv-major)
        scores = torch.matmul(qg, k_all.transpose(2, 3)).view(B, nkv, nh // nkv, S, -1)  # scaling 1.0 (Gemma 4)
        probs = torch.softmax(scores + mask.unsqueeze(1), dim=-1).view(B, nkv, nh // nkv * S, -1)
        out = torch.matmul(probs, vt_all.transpose(2, 3)).view(B, nh, S, hd)
        return out.transpose(1, 2).reshape(B, S, nh * hd)


def replace_for_litert(decoder: nn.Module, context: int) -> nn.Module:
    """Swap `decoder`'s caches, kernels, masks and PLE scale for LiteRT (see the module docstring). Idempotent: the
    prefill and decode signatures wrap the same decoder."""
    for i in decoder.cfg.cache_layers:
        attn = decoder.layers[i].self_attn
        if not isinstance(attn.kv_cache, DynamicUpdateSliceCache):
            attn.kv_cache = DynamicUpdateSliceCache()
    replace_modules(decoder, GroupedSDPA, lambda _: TransposedVSDPA())
    if not isinstance(decoder.masks, InputMasks):
        decoder.masks = InputMasks(decoder.cfg.sliding_window, context)
    decoder.ple_scale = nn.Identity()
    return decoder
