"""The torch modules converted to LiteRT: LiteRT-LM's Gemma 4 I/O contract around our eager model's weights.

LiteRT-LM (Google's engine) runs a `.litertlm` whose models follow a fixed contract; our own LiteRT runtime uses the
very same models, so one export serves both.

* `LitertDecoder`, signatures `prefill_<N>` and `decode`:
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
import torch.nn.functional as F
from torch import nn

from edge_gemma.model.text import TextDecoder, apply_rope, rope_cos_sin

__all__ = ["LitertAudio", "LitertDecoder", "LitertEmbedder", "LitertPerLayerEmbedder", "LitertVision", "LmAudioAdapter",
           "LmAudioEncoder", "LmVisionAdapter", "LmVisionEncoder", "MASK_MIN", "cache_input_names"]

# The hidden value LiteRT-LM's CPU executor writes into float masks (-0.7 * float32 max); finite on purpose.
MASK_MIN = -0.7 * torch.finfo(torch.float32).max


def cache_input_names(n_cache_layers: int) -> list[str]:
    return [f"kv_cache_{kv}_{i}" for i in range(n_cache_layers) for kv in ("k", "v")]


def _dynamic_update_slice(cache: torch.Tensor, update: torch.Tensor, start: torch.Tensor, dim: int) -> torch.Tensor:
    """`cache` with `update` written along `dim` from index `start` (a 0-d int32): TFLite DYNAMIC_UPDATE_SLICE."""
    from litert_torch.generative.custom_ops.dynamic_update_slice import dynamic_update_slice

    zero = torch.zeros((1,), dtype=torch.int32)
    parts = [zero] * cache.dim()
    parts[dim] = start.reshape(1)
    return dynamic_update_slice(cache, update, [x for x in torch.cat(parts)])  # 0-d indices, as the op needs


class LitertDecoder(nn.Module):
    """The text decoder with LiteRT-LM's signature I/O (see the module docstring)."""

    def __init__(self, decoder: TextDecoder, context: int, *, logits: bool):
        super().__init__()
        self.decoder = decoder
        self.context = context
        self.with_logits = logits
        self.cfg = decoder.cfg

    def _attend(self, attn, x, cos, sin, mask_add, start, cache_k, cache_v, shared):
        B, S, _ = x.shape
        hd, nh, nkv = attn.head_dim, attn.n_heads, attn.n_kv_heads
        q = attn.q_norm(attn.q_proj(x).view(B, S, nh, hd))
        q = apply_rope(q, cos, sin).transpose(1, 2)  # (B, nh, S, hd)
        new = None
        if attn.computes_kv:
            k = attn.k_norm(attn.k_proj(x).view(B, S, nkv, hd))
            k = apply_rope(k, cos, sin).transpose(1, 2)  # (B, nkv, S, hd)
            v = attn.v_norm(attn.v_proj(x).view(B, S, nkv, hd)).transpose(1, 2)  # (B, nkv, S, hd)
            k_all = _dynamic_update_slice(cache_k, k, start, 2)  # (1, nkv, T, hd)
            vt_all = _dynamic_update_slice(cache_v, v.transpose(2, 3), start, 3)  # (1, nkv, hd, T)
            new = (k_all, vt_all)
        else:
            k_all, vt_all = shared
        rep = nh // nkv
        qg = q.reshape(B, nkv, rep * S, hd)  # query heads grouped by their KV head (heads are kv-major)
        scores = torch.matmul(qg, k_all.transpose(2, 3)).view(B, nkv, rep, S, -1)  # scaling 1.0 (Gemma 4)
        probs = torch.softmax(scores + mask_add.unsqueeze(1), dim=-1).view(B, nkv, rep * S, -1)
        out = torch.matmul(probs, vt_all.transpose(2, 3)).view(B, nh, S, hd)
        out = out.transpose(1, 2).reshape(B, S, nh * hd)
        return attn.o_proj(out), (new if new is not None else (k_all, vt_all))

    def forward(self, embeddings, per_layer_embeddings, input_pos, mask, **caches):
        cfg, dec = self.cfg, self.decoder
        h = embeddings  # (1, S, H)
        B, S, _ = h.shape
        proj = dec.per_layer_model_projection(h) * cfg.hidden_size**-0.5
        proj = dec.per_layer_projection_norm(proj.view(B, S, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input))
        ple = (proj + per_layer_embeddings) * 2.0**-0.5  # (1, S, L, P)

        pos = input_pos.to(torch.int64)[None, :]  # (1, S)
        q = input_pos[:, None]  # (S, 1) int32
        k = torch.arange(self.context, dtype=torch.int32)[None, :]  # (1, T)
        global_add = mask[:, 0]  # (1, S, T) additive: 0 visible, MASK_MIN hidden
        in_window = k > q - cfg.sliding_window  # (S, T)
        sliding_add = torch.where(in_window[None], global_add, torch.full_like(global_add, MASK_MIN))
        masks = {False: global_add.unsqueeze(1), True: sliding_add.unsqueeze(1)}  # (1, 1, S, T)
        rope = {False: rope_cos_sin(dec.full_inv_freq, pos, h.dtype),
                True: rope_cos_sin(dec.sliding_inv_freq, pos, h.dtype)}
        start = input_pos[0]

        out: dict[str, torch.Tensor] = {}
        kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, layer in enumerate(dec.layers):
            sliding = not cfg.is_full(i)
            cos, sin = rope[sliding]
            attn = layer.self_attn
            ck = caches.get(f"kv_cache_k_{i}") if attn.computes_kv else None
            cv = caches.get(f"kv_cache_v_{i}") if attn.computes_kv else None
            shared = kv[dec.kv_source[i]] if not attn.computes_kv else None
            a, kv[i] = self._attend(attn, layer.input_layernorm(h), cos, sin, masks[sliding][:, 0], start, ck, cv,
                                    shared)
            if attn.computes_kv:
                out[f"kv_cache_k_{i}"], out[f"kv_cache_v_{i}"] = kv[i]
            x = h + layer.post_attention_layernorm(a)
            x = x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
            g = F.gelu(layer.per_layer_input_gate(x), approximate="tanh") * ple[:, :, i]
            x = x + layer.post_per_layer_input_norm(layer.per_layer_projection(g))
            h = x * layer.layer_scalar.to(x.dtype)
        if self.with_logits:
            out["logits"] = dec.logits(dec.norm(h[:, -1:]))  # (1, 1, V)
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
