"""The modules that become the ONNX graphs: a decoder whose KV caches are graph inputs, and the two towers.

These are module swaps applied just before export (HOUSE_STYLE): they reuse the eager model's submodules and
parameters unchanged and only change how the caches are passed and how the towers return their variable-length output.

`CachedDecoder` (decoder.onnx). The caches live in the runtime as numpy arrays `[1, nkv, T, hd]`, one K and one V per
cache-owning layer; T is dynamic (1..context): the runtime passes the slots in use, rounded up to a bucket, so
attention costs O(position), not O(context). Every call takes them as READ-ONLY inputs and returns only the K/V of the new chunk
`[1, nkv, S, hd]`; the runtime writes those into its arrays at `positions` (a numpy slice assignment). Nothing in the
graph concatenates, scatters or copies a whole cache, so a decode step costs O(T) reads, not O(T) writes.
Attention per layer is two score blocks and one softmax:

    scores_old = q @ K_old^T   [.., S, T]   key slot j visible iff j < positions[0]           (and j > p - W if sliding)
    scores_new = q @ K_new^T   [.., S, S]   causal inside the chunk                           (and within the window)
    p = softmax([scores_old | scores_new]);  out = p_old @ V_old + p_new @ V_new

which equals the eager model's attention over its updated static cache, as long as the chunk's positions are
consecutive (`positions = p0 .. p0+S-1`; the runtime checks) and every slot below p0 holds that position's K/V. Slots
>= p0 in the old cache (stale, after a rewind) are never read. GQA groups the query heads by KV head
(`[1, nkv, rep*S, hd]`) instead of repeating the cache. KV-shared layers read their producer's old cache and its new
K/V of this step. With `S` tokens in, logits come out for the LAST position only, `[1, V]`, and the KV-shared layers
run on the last token only (they write no cache), as the eager `last_only` path does.

`VisionGraph` / `AudioGraph` (vision.onnx / audio.onnx): encoder + `embed_*` projection, batch 1 added inside; they
return every cell/frame plus a `valid` mask (the valid ones are first; boolean indexing would make the output shape
data-dependent), and the runtime keeps the valid rows.

RMSNorms of the decoder go through `_rms` (the `edge_gemma::rms_norm` op, same math): one SimplifiedLayerNormalization
node each instead of the five nodes eager's `pow(ms + eps, -0.5)` becomes, which ONNX Runtime does not fuse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edge_gemma.model.layers import RMSNorm
from edge_gemma.model.text import TextDecoder, apply_rope, rope_cos_sin

from . import onnx_ops  # noqa: F401  (registers torch.ops.edge_gemma.rms_norm)

__all__ = ["AudioGraph", "CachedDecoder", "VisionGraph", "cache_names"]


def _rms(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` for an eager `RMSNorm`, as the `edge_gemma::rms_norm` op (one SimplifiedLayerNormalization node in
    ONNX; same math in eager). Any other module is called as is."""
    if not isinstance(norm, RMSNorm):
        return norm(x)
    weight = norm.weight if norm.with_scale else torch.ones(norm.dim, dtype=torch.float32, device=x.device)
    return torch.ops.edge_gemma.rms_norm(x, weight, float(norm.eps))


def cache_names(cache_layers: tuple[int, ...]) -> tuple[list[str], list[str]]:
    """Graph input names of the old caches and output names of the new K/V, in order (K then V per layer)."""
    past = [f"past_{kv}_{i}" for i in cache_layers for kv in ("key", "value")]
    new = [f"new_{kv}_{i}" for i in cache_layers for kv in ("key", "value")]
    return past, new


class CachedDecoder(nn.Module):
    """`forward(inputs_embeds [1,S,H], ple_rows [1,S,L,P], positions [S], past)` ->
    `(logits [1,V], *new_kv)`; `past` / `new_kv` are `k_i, v_i` for each cache layer i, `[1,nkv,T,hd]` / `[1,nkv,S,hd]`.

    `head` maps the final normed hidden state `[1, H]` to raw logits `[1, V]` (a float Linear over `embed_tokens`, or a
    `QuantLinear` over the same integers as the embedder's table)."""

    def __init__(self, decoder: TextDecoder, head: nn.Module, context: int):
        super().__init__()
        self.decoder, self.head, self.context = decoder, head, context
        self.cfg = decoder.cfg

    def _attend(self, attn, q, k_old, v_old, k_new, v_new, ok_old, ok_new):
        # q (1, nh, s, hd); k/v_old (1, nkv, T, hd); k/v_new (1, nkv, S, hd); ok_old (s, T); ok_new (s, S)
        _, nh, s, hd = q.shape
        nkv = k_old.shape[1]
        rep = nh // nkv
        qg = q.reshape(1, nkv, rep * s, hd)  # head h = j*rep + r reads KV head j (repeat_interleave layout)
        scores = torch.cat([qg @ k_old.transpose(-1, -2), qg @ k_new.transpose(-1, -2)], dim=-1)  # (1, nkv, rep*s, T+S)
        ok = torch.cat([ok_old, ok_new], dim=-1).repeat(rep, 1)  # (rep*s, T+S)
        scores = scores.masked_fill(~ok, torch.finfo(scores.dtype).min)  # scaling 1.0 (q/k norms)
        p = torch.softmax(scores, dim=-1)
        T = k_old.shape[2]
        out = p[..., :T] @ v_old + p[..., T:] @ v_new  # (1, nkv, rep*s, hd)
        out = out.reshape(1, nh, s, hd).transpose(1, 2).reshape(1, s, nh * hd)
        return attn.o_proj(out)

    def forward(self, inputs_embeds: torch.Tensor, ple_rows: torch.Tensor, positions: torch.Tensor,
                past: list[torch.Tensor]):
        cfg, dec = self.cfg, self.decoder
        dtype = inputs_embeds.dtype
        ple = dec.per_layer_inputs(inputs_embeds, ple_rows)  # (1, S, L, P)
        pos2d = positions.unsqueeze(0)  # (1, S)
        slots = torch.arange(past[0].shape[2], device=positions.device)  # (T,) T = the slots passed in, <= context
        qp = positions[:, None]  # (S, 1)
        old = slots[None, :] < positions[0]  # (S, T) slots written before this chunk
        new = positions[None, :] <= qp  # (S, S) causal inside the chunk
        window = cfg.sliding_window
        masks = {
            False: (old & torch.ones_like(qp, dtype=torch.bool), new),
            True: (old & (slots[None, :] > qp - window), new & (positions[None, :] > qp - window)),
        }
        rope = {False: rope_cos_sin(dec.full_inv_freq, pos2d, dtype), True: rope_cos_sin(dec.sliding_inv_freq, pos2d, dtype)}
        caches = {layer: (past[2 * n], past[2 * n + 1]) for n, layer in enumerate(cfg.cache_layers)}
        new_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        h = inputs_embeds
        for i, layer in enumerate(dec.layers):
            if i == cfg.first_shared_layer:  # shared layers write no cache: only the last token matters from here
                h, ple = h[:, -1:], ple[:, -1:]
                masks = {s: (o[-1:], n[-1:]) for s, (o, n) in masks.items()}
                rope = {s: (c[:, -1:], n[:, -1:]) for s, (c, n) in rope.items()}
            sliding = not cfg.is_full(i)
            cos, sin = rope[sliding]
            attn = layer.self_attn
            x = _rms(layer.input_layernorm, h)
            B, s, _ = x.shape
            q = _rms(attn.q_norm, attn.q_proj(x).view(B, s, attn.n_heads, attn.head_dim))
            q = apply_rope(q, cos, sin).transpose(1, 2)  # (1, nh, s, hd)
            if attn.computes_kv:
                k = _rms(attn.k_norm, attn.k_proj(x).view(B, s, attn.n_kv_heads, attn.head_dim))
                k = apply_rope(k, cos, sin).transpose(1, 2)  # (1, nkv, S, hd)
                v = _rms(attn.v_norm, attn.v_proj(x).view(B, s, attn.n_kv_heads, attn.head_dim)).transpose(1, 2)
                new_kv[i] = (k, v)
            src = dec.kv_source[i]
            k_old, v_old = caches[src]
            k_new, v_new = new_kv[src]
            a = self._attend(attn, q, k_old, v_old, k_new, v_new, *masks[sliding])
            h = h + _rms(layer.post_attention_layernorm, a)
            h = h + _rms(layer.post_feedforward_layernorm, layer.mlp(_rms(layer.pre_feedforward_layernorm, h)))
            g = F.gelu(layer.per_layer_input_gate(h), approximate="tanh") * ple[:, :, i]
            h = h + _rms(layer.post_per_layer_input_norm, layer.per_layer_projection(g))
            h = h * layer.layer_scalar.to(h.dtype)
        h = _rms(dec.norm, h[:, -1])  # (1, H)
        logits = self.head(h)  # (1, V)
        cap = cfg.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        outs = [logits]
        for layer in cfg.cache_layers:
            outs.extend(new_kv[layer])
        return tuple(outs)


class VisionGraph(nn.Module):
    """`(pixel_values [Np, 3p^2], position_ids [Np, 2]) -> (soft_tokens [Np/k^2, H], valid [Np/k^2])`."""

    def __init__(self, tower: nn.Module, embed: nn.Module):
        super().__init__()
        self.tower, self.embed = tower, embed

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor):
        soft, valid = self.tower(pixel_values.unsqueeze(0), position_ids.unsqueeze(0))
        return self.embed(soft)[0], valid[0]


class AudioGraph(nn.Module):
    """`(features [T, 128], mask [T] bool) -> (soft_tokens [T', H], valid [T'])`, T' = ceil(ceil(T/2)/2)."""

    def __init__(self, tower: nn.Module, embed: nn.Module):
        super().__init__()
        self.tower, self.embed = tower, embed

    def forward(self, features: torch.Tensor, mask: torch.Tensor):
        hidden, valid = self.tower(features.unsqueeze(0), mask.unsqueeze(0))
        return self.embed(hidden)[0], valid[0]
