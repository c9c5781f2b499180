"""The torch modules converted to LiteRT: LiteRT-LM's Gemma 4 I/O contract around our eager model's weights.

LiteRT-LM (Google's engine) runs a `.litertlm` whose models follow a fixed contract; our own LiteRT runtime uses the
very same models, so one export serves both.

* `LitertDecoder` (the one decoder with the swaps of `swaps.py`), signatures `prefill_<N>` and `decode`:
  inputs `embeddings [1,S,H]` (scaled, merged), `per_layer_embeddings [1,S,L,P]` (PLE rows ALREADY multiplied by
  sqrt(P): the per-layer embedder's output), `input_pos [S] int32`, `mask [1,1,S,T] float32` (0 = visible, a large
  negative value = hidden: LiteRT-LM fills it causally), `kv_cache_k_<i>` `[1,nkv,T,hd]` and `kv_cache_v_<i>`
  `[1,nkv,hd,T]` for the cache-owning layers i = 0..first_shared_layer-1 (V transposed: LiteRT-LM's default layout,
  time index 3); outputs the updated caches under the same names, and `logits [1,1,V]` (decode only, soft-capped).
  LiteRT-LM pads a prefill chunk at the END and gives the padding `input_pos` 0, so the new K/V are written as one
  contiguous slice starting at `input_pos[0]` (padding lands on future slots, hidden by the mask and overwritten
  later) and padded query rows see a fully hidden, finite mask (uniform softmax, never NaN, which would poison the
  cache). Sliding layers derive their window from `input_pos` and the given causal mask.
* `LitertEmbedder`, one signature `embedder` (LiteRT-LM accepts exactly one, of one token):
  `token_ids [1,1] int32 -> embeddings [1,1,H]` = table[ids] * sqrt(H).
* `LitertPerLayerEmbedder`, one signature `per_layer_embedder`:
  `token_ids [1,1] int32 -> embeddings [1,1,L,P]` = PLE rows * sqrt(P). Its own model, so LiteRT-LM memory-maps it.
* `LitertVision` (`vision_encoder`) and `LitertAudio` (`audio_encoder`): our towers + projections at static shapes,
  for OUR runtime.
* `LmVisionEncoder` / `LmVisionAdapter` and `LmAudioEncoder` / `LmAudioAdapter`: the same towers split the way
  LiteRT-LM's multimodal executors call them (the VISION_ENCODER, VISION_ADAPTER, AUDIO_ENCODER_HW and AUDIO_ADAPTER
  sections of the .litertlm). The contract, from LiteRT-LM's source (runtime/executor/
  vision_litert_compiled_model_executor.cc, vision/vision_executor_utils.cc, audio_litert_compiled_model_executor.cc):
  - vision encoder, one signature: input 0 `images [1,Np,3p^2]` float in [0,1] (LiteRT-LM resizes, rescales by 1/255
    and patchifies in (row, col, channel) order itself, like the reference processor), `positions_xy [1,Np,2]` int32
    (x, y; LiteRT-LM fills unused rows with -1 and zero pixels); outputs `features [1,Np/k^2,Hv]` (pooled, valid cells
    first) and `mask [1,Np/k^2]` bool (LiteRT-LM counts the true entries to know how many tokens are real).
    LiteRT-LM derives tokens-per-image from the adapter's output and the shrink factor Np/tokens from input 0.
  - vision adapter, one input `features [1,Np/k^2,Hv]` -> one output `embeddings [1,Np/k^2,H]` (`embed_vision`);
    LiteRT-LM feeds it the first N valid rows and keeps the first N outputs.
  - audio encoder, one signature: `src_inputs [1,T,128]` log-mel and `mask [1,T]` bool -> exactly two outputs
    `features [1,T/4,Da]` and `mask [1,T/4]` bool (LiteRT-LM keeps up to the last true entry). T must be a multiple
    of the output length (LiteRT-LM checks `T % T_out == 0` and chunks longer audio into T-frame pieces).
  - audio adapter, one signature, exactly two inputs in the order (`mask`, `features`): LiteRT-LM binds the encoder's
    mask and features buffers to adapter inputs 0 and 1 by position; one output `embeddings [1,T/4,H]`.
"""

from __future__ import annotations

import torch
from torch import nn

from .swaps import MASK_MIN, replace_for_litert

__all__ = ["LitertAudio", "LitertDecoder", "LitertEmbedder", "LitertPerLayerEmbedder", "LitertVision", "LmAudioAdapter",
           "LmAudioEncoder", "LmVisionAdapter", "LmVisionEncoder", "MASK_MIN", "cache_input_names"]


def cache_input_names(n_cache_layers: int) -> list[str]:
    return [f"kv_cache_{kv}_{i}" for i in range(n_cache_layers) for kv in ("k", "v")]


class LitertDecoder(nn.Module):
    """The one decoder, swapped for LiteRT (`swaps.replace_for_litert`), with LiteRT-LM's signature I/O (see the
    module docstring). `logits=False` (prefill) returns the updated caches only."""

    def __init__(self, decoder: nn.Module, context: int, *, logits: bool):
        super().__init__()
        self.decoder = replace_for_litert(decoder, context)
        self.with_logits = logits

    def forward(self, embeddings, per_layer_embeddings, input_pos, mask, **caches):
        dec = self.decoder
        layers = dec.cfg.cache_layers
        for i in layers:
            dec.layers[i].self_attn.kv_cache.bind(caches[f"kv_cache_k_{i}"], caches[f"kv_cache_v_{i}"])
        dec.masks.bind(mask)
        if self.with_logits:
            logits = dec(embeddings, per_layer_embeddings, input_pos, last_only=True)  # (1, 1, V)
        else:
            dec.hidden_states(embeddings, per_layer_embeddings, input_pos, last_only=True)
        out: dict[str, torch.Tensor] = {}
        for i in layers:
            out[f"kv_cache_k_{i}"], out[f"kv_cache_v_{i}"] = dec.layers[i].self_attn.kv_cache.new
        if self.with_logits:
            out["logits"] = logits
        return out


class LitertEmbedder(nn.Module):
    """`token_ids [1,S] int32 -> embeddings [1,S,H]` = table[ids] * sqrt(H) (the scale rounded to float32)."""

    def __init__(self, table: nn.Embedding, hidden_size: int):
        super().__init__()
        self.table = table
        self.register_buffer("scale", torch.tensor(hidden_size**0.5, dtype=torch.float32), persistent=False)

    def forward(self, token_ids):
        return {"embeddings": self.table(token_ids.to(torch.int64)) * self.scale}


class LitertPerLayerEmbedder(nn.Module):
    """`token_ids [1,S] int32 -> embeddings [1,S,L,P]` = PLE rows * sqrt(P), as the decoder's PLE combine expects."""

    def __init__(self, table: nn.Embedding, num_layers: int, dim: int):
        super().__init__()
        self.table, self.L, self.P = table, num_layers, dim
        self.register_buffer("scale", torch.tensor(dim**0.5, dtype=torch.float32), persistent=False)

    def forward(self, token_ids):
        rows = self.table(token_ids.to(torch.int64))  # (1, S, L*P)
        return {"embeddings": rows.view(*token_ids.shape, self.L, self.P) * self.scale}


class LitertVision(nn.Module):
    """`(pixel_values [Np, 3p^2], position_ids [Np, 2] int32, -1 on padding) -> soft_tokens [Np/k^2, H], valid`.

    Static Np (LiteRT signatures have fixed shapes): the processor already pads every image to
    `max_soft_tokens * k^2` patches with position -1, which the encoder masks, so one signature serves them all."""

    def __init__(self, tower: nn.Module, embed: nn.Module):
        super().__init__()
        self.tower, self.embed = tower, embed

    def forward(self, pixel_values, position_ids):
        soft, valid = self.tower(pixel_values.unsqueeze(0), position_ids.to(torch.int64).unsqueeze(0))
        return {"soft_tokens": self.embed(soft)[0], "valid": valid[0].to(torch.int32)}


class LitertAudio(nn.Module):
    """`(features [T, 128], mask [T] int32 1 = valid) -> soft_tokens [T', H], valid [T']` at a static T (30 s of
    frames): padding frames are masked, and the valid outputs do not depend on them (checked in the tests)."""

    def __init__(self, tower: nn.Module, embed: nn.Module):
        super().__init__()
        self.tower, self.embed = tower, embed

    def forward(self, features, mask):
        hidden, valid = self.tower(features.unsqueeze(0), (mask != 0).unsqueeze(0))
        return {"soft_tokens": self.embed(hidden)[0], "valid": valid[0].to(torch.int32)}


class LmVisionEncoder(nn.Module):
    """LiteRT-LM's VISION_ENCODER: `(images [1,Np,3p^2], positions_xy [1,Np,2] int32) -> features, mask`."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, images, positions_xy):
        soft, valid = self.tower(images, positions_xy.to(torch.int64))  # (1, Np/k^2, Hv), (1, Np/k^2)
        return {"features": soft, "mask": valid}


class LmVisionAdapter(nn.Module):
    """LiteRT-LM's VISION_ADAPTER: `features [1,N,Hv] -> embeddings [1,N,H]` (`embed_vision`: norm + projection)."""

    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, features):
        return {"embeddings": self.embed(features)}


class LmAudioEncoder(nn.Module):
    """LiteRT-LM's AUDIO_ENCODER_HW: `(src_inputs [1,T,128] log-mel, mask [1,T] bool) -> features, mask`."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, src_inputs, mask):
        hidden, valid = self.tower(src_inputs, mask)  # (1, T/4, Da), (1, T/4)
        return {"features": hidden, "mask": valid}


class LmAudioAdapter(nn.Module):
    """LiteRT-LM's AUDIO_ADAPTER: `(mask [1,N] bool, features [1,N,Da]) -> embeddings [1,N,H]` (`embed_audio`).

    The mask zeroes the invalid rows (LiteRT-LM drops them anyway); it is used so that the converter keeps it as the
    adapter's first input, where LiteRT-LM binds the encoder's mask by position."""

    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, mask, features):
        out = self.embed(features)  # (1, N, H)
        return {"embeddings": out * mask.unsqueeze(-1).to(out.dtype)}
