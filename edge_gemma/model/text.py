"""The Gemma 4 text decoder: Per-Layer Embeddings, hybrid sliding/global attention, proportional RoPE, KV sharing.

Parameter names are transformers' `Gemma4TextModel` names (`embed_tokens`, `layers.{i}.self_attn.q_proj`, ...), so the
checkpoint name table is a prefix map. What differs from the reference, on purpose, for export:

* The decoder does not look token ids up. `forward` takes the merged input embeddings `[B,S,H]` (see
  `TextDecoder.embed` and `Gemma4Model.embed`) and the RAW rows of the PLE table `[B,S,L,P]` (`TextDecoder.ple_rows`),
  so an exported artifact can keep the 2.35 G-parameter PLE table in a memory-mapped file outside the graph. The
  decoder applies the `sqrt(P)` scale itself.
* Static KV caches (`cache.KVCache`) indexed by explicit positions; masks are built from positions, never from a
  cache length; no `.item()` and no data-dependent Python branches in `forward`.
* KV-shared layers read `kv_source[i]`'s K/V as returned by that layer's cache update (pitfall 6); only the layers
  before `first_shared_layer` own caches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from .cache import KVCache
from .layers import RMSNorm, rotate_half

__all__ = ["TextAttention", "TextDecoder", "TextDecoderLayer", "TextMLP", "apply_rope", "rope_inv_freq"]


# --------------------------------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float, partial_rotary_factor: float | None = None) -> torch.Tensor:
    """Inverse frequencies `[head_dim // 2]` (float32).

    `partial_rotary_factor=None` is default RoPE (sliding layers). A factor gives Gemma 4's *proportional* RoPE (global
    layers): the first `int(factor * head_dim // 2)` pairs rotate with the exponent taken over the FULL head dim, the
    remaining pairs get frequency 0 (identity), so with the rotate-half layout only dims `[0:64]` and `[256:320]` of a
    512-dim head rotate (pitfall 3). Computed exactly as the reference does, for bit parity.
    """
    if partial_rotary_factor is None:
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    angles = int(partial_rotary_factor * head_dim // 2)
    rotated = 1.0 / (theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / head_dim))
    return torch.cat([rotated, torch.zeros(head_dim // 2 - angles, dtype=torch.float)])


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions `[b, S]` -> cos, sin `[b, S, head_dim]` in `dtype` (computed in float32)."""
    freqs = positions[..., None].float() * inv_freq.float()  # (b, S, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (b, S, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[B, S, n, hd]`, cos/sin `[b, S, hd]` -> rotated x (rotate-half layout, not interleaved)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------------------------


class TextMLP(nn.Module):
    """`down(gelu_tanh(gate(x)) * up(x))`, no biases. E2B doubles the width on KV-shared layers."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class TextAttention(nn.Module):
    """Gemma 4 attention: q/k RMSNorm, weightless v_norm, RoPE on q and k (not v), scaling 1.0, GQA.

    A KV-producing layer has `k_proj`, `v_proj`, `k_norm`, `v_norm` and (once caches are set up) a `kv_cache`. A
    KV-shared layer has only `q_proj`, `q_norm`, `o_proj` and attends over the K/V handed to it.
    """

    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.head_dim = cfg.head_dim_for(layer)
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.computes_kv = layer < cfg.first_shared_layer
        h, hd, eps = cfg.hidden_size, self.head_dim, cfg.rms_norm_eps
        self.q_proj = nn.Linear(h, self.n_heads * hd, bias=False)
        self.q_norm = RMSNorm(hd, eps)
        if self.computes_kv:
            self.k_proj = nn.Linear(h, self.n_kv_heads * hd, bias=False)
            self.v_proj = nn.Linear(h, self.n_kv_heads * hd, bias=False)
            self.k_norm = RMSNorm(hd, eps)
            self.v_norm = RMSNorm(hd, eps, with_scale=False)
        self.o_proj = nn.Linear(self.n_heads * hd, h, bias=False)
        self.kv_cache: KVCache | None = None

    # On for the ExecuTorch export (`TextDecoder.attend_one_query_key_major`): one-query steps use `_attend_one_query`.
    one_query_by_key_rows = False

    def forward(
        self,
        x: torch.Tensor,  # (B, S, H)
        cos: torch.Tensor,  # (b, S, hd)
        sin: torch.Tensor,  # (b, S, hd)
        mask: torch.Tensor,  # (b, 1, S, T) bool, True = visible
        input_pos: torch.Tensor,  # (S,) cache slots
        shared_kv: tuple[torch.Tensor, torch.Tensor] | None = None,  # producer's (k, v), each (B, nkv, T, hd)
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, S, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, S, self.n_heads, self.head_dim))
        q = apply_rope(q, cos, sin).transpose(1, 2)  # (B, nh, S, hd)
        if self.computes_kv:
            k = self.k_norm(self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim))
            k = apply_rope(k, cos, sin).transpose(1, 2)  # (B, nkv, S, hd)
            v = self.v_norm(self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim)).transpose(1, 2)
            if self.kv_cache is not None:
                k, v = self.kv_cache.update(input_pos, k, v)  # (B, nkv, T, hd)
        else:
            assert shared_kv is not None, f"layer {self.layer} shares K/V but none was given"
            k, v = shared_kv
        if self.one_query_by_key_rows and isinstance(S, int) and S == 1 and mask.shape[0] == 1:
            return self.o_proj(self._attend_one_query(q, k.to(q.dtype), v.to(q.dtype), mask)), (k, v)
        # Grouped-query attention without copying K/V once per query head (`repeat_interleave`): the `rep` query
        # heads that read KV head j (heads j*rep .. j*rep + rep-1, the repeat_interleave layout) become rows of one
        # batch entry. Same math per head; in an exported program the copies were most of a decode step (ExecuTorch,
        # full-size E2B: 8 x 4096 x 256 floats of K and of V per layer per token).
        rep = self.n_heads // self.n_kv_heads
        qg = q.reshape(B, self.n_kv_heads, rep * S, self.head_dim)
        if rep > 1:
            b, _, _, T = mask.shape
            mask = mask.unsqueeze(2).expand(b, 1, rep, S, T).reshape(b, 1, rep * S, T)
        out = F.scaled_dot_product_attention(qg, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=1.0)
        # (B, nkv, rep*S, hd) -> (B, S, nh*hd) through an explicit 5-D view: reshaping to (B, nh, S, hd) directly asks
        # torch.export to split rep*S for a dynamic S and fails (E4B, 2 KV heads: "Constraints violated (seq)").
        # The explicit contiguous copy: with S = 1 the permuted tensor happens to be viewable in the strides eager
        # attention returns, so `reshape` would be recorded as a `view`, which fails when ExecuTorch's passes re-run
        # the graph with the flash-attention layout (B, L, nkv, hd) (E4B decode: "Cannot view a tensor ...").
        out = out.view(B, self.n_kv_heads, rep, S, self.head_dim).permute(0, 3, 1, 2, 4)
        out = out.clone(memory_format=torch.contiguous_format).view(B, S, self.n_heads * self.head_dim)
        return self.o_proj(out), (k, v)

    def _attend_one_query(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention of ONE position, `q (B, nh, 1, hd)` over `k, v (B, nkv, T, hd)` -> `(B, 1, nh * hd)`; the same
        math as the SDPA path, for an exported one-token step whose cache is a static `T`-slot buffer.

        Scores are computed key-major, `K @ q^T` `(T, rep)` per KV head: only the small query is transposed. Lowered
        to ExecuTorch/XNNPACK, SDPA's decomposition instead transposed the whole K cache (XNNPACK's batch matmul takes
        no transposed operand), scaled K by sqrt(scale) (a portable multiply over the cache even at scale 1), and
        expanded and reshaped K and V to three dimensions (copies), per layer and per token: on a 6-layer E2B-width
        model at 4096 slots, 117 -> 48 ms per decode step. The mask (one row shared by the batch) becomes an additive
        bias of `T` values."""
        B, nkv, T, hd = k.shape
        rep = self.n_heads // nkv
        qt = q.reshape(B * nkv, rep, hd).transpose(1, 2)  # (B*nkv, hd, rep); head j*rep + r reads KV head j
        scores = torch.bmm(k.reshape(B * nkv, T, hd), qt)  # (B*nkv, T, rep)
        bias = torch.where(mask, 0.0, float("-inf")).to(scores.dtype).reshape(1, T, 1)  # mask (1, 1, 1, T)
        p = torch.softmax(scores + bias, dim=1)
        out = torch.bmm(p.transpose(1, 2), v.reshape(B * nkv, T, hd))  # (B*nkv, rep, hd)
        return out.reshape(B, 1, self.n_heads * hd)


class TextDecoderLayer(nn.Module):
    """Sandwich-norm attention and MLP, then the PLE branch, then `* layer_scalar` on the whole residual stream."""

    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        h, p, eps = cfg.hidden_size, cfg.hidden_size_per_layer_input, cfg.rms_norm_eps
        self.self_attn = TextAttention(cfg, layer)
        self.mlp = TextMLP(h, cfg.intermediate_size_for(layer))
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.per_layer_input_gate = nn.Linear(h, p, bias=False)
        self.per_layer_projection = nn.Linear(p, h, bias=False)
        self.post_per_layer_input_norm = RMSNorm(h, eps)
        self.register_buffer("layer_scalar", torch.ones(1))  # persistent: it is in the checkpoint

    def forward(
        self,
        x: torch.Tensor,  # (B, S, H)
        ple: torch.Tensor,  # (B, S, P) this layer's slice of the per-layer inputs
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        input_pos: torch.Tensor,
        shared_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, shared_kv)
        x = x + self.post_attention_layernorm(a)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        g = F.gelu(self.per_layer_input_gate(x), approximate="tanh") * ple  # (B, S, P)
        x = x + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return x * self.layer_scalar.to(x.dtype), kv


# --------------------------------------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------------------------------------


class TextDecoder(nn.Module):
    """The text decoder, `Gemma4TextModel` plus the tied, soft-capped LM head.

    `max_len` (the context length, an export setting, not architecture) allocates one static `KVCache` per
    KV-producing layer; `None` builds a cache-free decoder whose `forward` attends within the given chunk only.
    `sliding_ring=True` gives the sliding layers ring buffers of `2 * sliding_window` slots instead of `max_len`
    (see `setup_caches`).
    """

    def __init__(self, cfg: TextConfig, *, max_len: int | None = None, batch_size: int = 1,
                 cache_dtype: torch.dtype = torch.float32, sliding_ring: bool = False):
        super().__init__()
        self.cfg = cfg
        L, P, H = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input, cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, H)
        self.embed_tokens_per_layer = nn.Embedding(cfg.vocab_size_per_layer_input, L * P)
        self.per_layer_model_projection = nn.Linear(H, L * P, bias=False)
        self.per_layer_projection_norm = RMSNorm(P, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(TextDecoderLayer(cfg, i) for i in range(L))
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        # Which layer's K/V each layer attends over (itself for producers). A plain list: tests break it on purpose.
        self.kv_source = [cfg.kv_producer(i) for i in range(L)]
        self.register_buffer("sliding_inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta_sliding), persistent=False)
        self.register_buffer(
            "full_inv_freq",
            rope_inv_freq(cfg.global_head_dim, cfg.rope_theta_full, cfg.partial_rotary_factor_full),
            persistent=False,
        )
        self.max_len: int | None = None
        self.ring_len: int | None = None  # slots of the sliding ring buffers, None when they are max_len long
        self.register_buffer("sliding_slot_pos", None, persistent=False)  # (R,) long with a sliding ring
        if max_len is not None:
            self.setup_caches(max_len, batch_size=batch_size, dtype=cache_dtype, sliding_ring=sliding_ring)

    # -- caches --------------------------------------------------------------------------------------------------

    def setup_caches(self, max_len: int, *, batch_size: int = 1, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None, sliding_ring: bool = False) -> None:
        """(Re)allocate zeroed static caches on every KV-producing layer.

        Full layers get `max_len` slots (slot = position). With `sliding_ring` and `max_len > 2W`, sliding layers get
        a ring of `R = 2W` slots (slot = position % R) and `sliding_slot_pos` records which position each slot holds
        (-1: empty); masks come from those positions. A chunk may then hold at most `R - W + 1 = W + 1` tokens, so
        that its own writes never evict a key one of its queries still needs (`prefill_capacity`). E2B at 4096
        context in float32: 12 MiB of sliding K/V instead of 96 MiB."""
        W = self.cfg.sliding_window
        ring = sliding_ring and max_len > 2 * W
        self.ring_len = 2 * W if ring else None
        for i in self.cfg.cache_layers:
            attn = self.layers[i].self_attn
            length = self.ring_len if ring and not self.cfg.is_full(i) else max_len
            attn.kv_cache = KVCache(batch_size, attn.n_kv_heads, length, attn.head_dim, dtype=dtype, device=device)
        slot_pos = torch.full((self.ring_len,), -1, dtype=torch.long, device=device) if ring else None
        self.register_buffer("sliding_slot_pos", slot_pos, persistent=False)
        self.max_len = max_len

    def attend_one_query_key_major(self) -> None:
        """Every layer's one-token steps attend by `TextAttention._attend_one_query` (same math; what an exported
        one-token program should run, see there). Longer chunks keep SDPA."""
        for layer in self.layers:
            layer.self_attn.one_query_by_key_rows = True

    @property
    def prefill_capacity(self) -> int | None:
        """The longest chunk one `forward` may take (None: no limit but `max_len`)."""
        return None if self.ring_len is None else self.ring_len - self.cfg.sliding_window + 1

    def drop_caches(self) -> None:
        for layer in self.layers:
            layer.self_attn.kv_cache = None
        self.max_len = self.ring_len = None
        self.register_buffer("sliding_slot_pos", None, persistent=False)

    def reset_caches(self) -> None:
        for cache in self.kv_caches:
            cache.reset()
        if self.sliding_slot_pos is not None:
            self.sliding_slot_pos.fill_(-1)

    @property
    def kv_caches(self) -> list[KVCache]:
        return [l.self_attn.kv_cache for l in self.layers if l.self_attn.kv_cache is not None]

    # -- embedding steps (outside the decoder graph) ----------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the norms (the embedding tables may stay memory-mapped in the file's dtype)."""
        return self.norm.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids `[B,S]` -> `embed_tokens[ids] * sqrt(H)` `[B,S,H]`, the scale rounded to the compute dtype (pitfall 4)."""
        dtype = self.dtype
        rows = F.embedding(ids, self.embed_tokens.weight).to(dtype)
        return rows * torch.tensor(self.cfg.hidden_size**0.5, dtype=dtype)

    def ple_rows(self, ple_ids: torch.Tensor) -> torch.Tensor:
        """ple_ids `[B,S]` -> raw rows of `embed_tokens_per_layer` `[B,S,L,P]` (unscaled, in the table's dtype).

        `ple_ids` must already have multimodal placeholders replaced by pad (`Gemma4Model.embed` does it) and be below
        `vocab_size_per_layer_input`."""
        rows = F.embedding(ple_ids, self.embed_tokens_per_layer.weight)
        return rows.view(*ple_ids.shape, self.cfg.num_hidden_layers, self.cfg.hidden_size_per_layer_input)

    # -- the graph ---------------------------------------------------------------------------------------------------

    def per_layer_inputs(self, inputs_embeds: torch.Tensor, ple_rows: torch.Tensor) -> torch.Tensor:
        """PLE combine: `(RMSNorm_P(E @ W_proj^T * H^-0.5) + rows * sqrt(P)) * 2^-0.5` -> `[B,S,L,P]`.

        The projection sees the MERGED embeddings, so image/audio soft tokens feed in (pitfall 5)."""
        cfg, dtype = self.cfg, inputs_embeds.dtype
        B, S, _ = inputs_embeds.shape
        proj = self.per_layer_model_projection(inputs_embeds) * cfg.hidden_size**-0.5  # (B, S, L*P)
        proj = self.per_layer_projection_norm(proj.view(B, S, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input))
        tok = ple_rows.to(dtype) * torch.tensor(cfg.hidden_size_per_layer_input**0.5, dtype=dtype)
        return (proj + tok) * 2.0**-0.5

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # (B, S, H), already scaled and merged
        ple_rows: torch.Tensor,  # (B, S, L, P), raw PLE table rows
        positions: torch.Tensor,  # (S,) or (B, S) long; with caches, also the cache slots (rows share them)
        *,
        last_only: bool = False,
    ) -> torch.Tensor:
        """-> logits `[B, S, V]`, or `[B, 1, V]` with `last_only` (then the KV-shared layers run on the last token only:
        they write no cache, so the other positions are not needed, as in the reference's `generate`)."""
        cfg = self.cfg
        dtype = inputs_embeds.dtype
        pos2d = positions if positions.dim() == 2 else positions.unsqueeze(0)  # (b, S)
        input_pos = positions if positions.dim() == 1 else positions[0]  # (S,)
        ple = self.per_layer_inputs(inputs_embeds, ple_rows)

        q = pos2d[:, None, :, None]  # (b, 1, S, 1)
        if self.max_len is not None:
            k = torch.arange(self.max_len, device=positions.device)[None, None, None, :]  # (1, 1, 1, T)
        else:
            k = pos2d[:, None, None, :]  # attend within this chunk
        masks = {False: k <= q}  # keyed by "is sliding"
        slots = {False: input_pos, True: input_pos}
        if self.ring_len is not None:
            if input_pos.shape[0] > self.prefill_capacity:
                raise ValueError(
                    f"a chunk of {input_pos.shape[0]} tokens exceeds the sliding ring's capacity "
                    f"{self.prefill_capacity}; prefill in chunks"
                )
            slots[True] = input_pos % self.ring_len
            self.sliding_slot_pos.index_copy_(0, slots[True], input_pos)
            k = self.sliding_slot_pos[None, None, None, :]  # (1, 1, 1, R) position held by each slot, -1 if none
            masks[True] = (k >= 0) & (k <= q) & (k > q - cfg.sliding_window)
        else:
            masks[True] = (k <= q) & (k > q - cfg.sliding_window)
        rope = {
            False: rope_cos_sin(self.full_inv_freq, pos2d, dtype),
            True: rope_cos_sin(self.sliding_inv_freq, pos2d, dtype),
        }

        h = inputs_embeds
        kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, layer in enumerate(self.layers):
            if last_only and i == cfg.first_shared_layer:
                h, ple = h[:, -1:], ple[:, -1:]
                masks = {s: m[:, :, -1:] for s, m in masks.items()}
                rope = {s: (c[:, -1:], n[:, -1:]) for s, (c, n) in rope.items()}
            sliding = not cfg.is_full(i)
            cos, sin = rope[sliding]
            shared = kv[self.kv_source[i]] if i >= cfg.first_shared_layer else None
            h, kv[i] = layer(h, ple[:, :, i], cos, sin, masks[sliding], slots[sliding], shared)
        if last_only:
            h = h[:, -1:]
        return self.logits(self.norm(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Tied LM head and the final soft cap `tanh(x / c) * c` (c = 30 for E2B/E4B; pitfall 8)."""
        w = self.embed_tokens.weight
        logits = F.linear(h, w if w.dtype == h.dtype else w.to(h.dtype))  # (B, S, V)
        cap = self.cfg.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

