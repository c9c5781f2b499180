"""The Gemma 4 text decoder: Per-Layer Embeddings, hybrid sliding/global attention, proportional RoPE, KV sharing.

Parameter names are transformers' `Gemma4TextModel` names (`embed_tokens`, `layers.{i}.self_attn.q_proj`, ...), so the
checkpoint name table is a prefix map. What differs from the reference, on purpose, for export:

* The decoder does not look token ids up. `forward` takes the merged input embeddings `[B,S,H]` (see
  `TextDecoder.embed` and `Gemma4Model.embed`) and the RAW rows of the PLE table `[B,S,L,P]` (`TextDecoder.ple_rows`),
  so an exported artifact can keep the 2.35 G-parameter PLE table in a memory-mapped file outside the graph. The
  decoder applies the `sqrt(P)` scale itself.
* Static KV caches (`cache.py`) indexed by explicit positions; masks are built from positions, never from a
  cache length (`attention.py`); no `.item()` and no data-dependent Python branches in `forward`.
* KV-shared layers read `kv_source[i]`'s K/V as returned by that layer's cache update (not recomputed from their own
  input, and not re-read from the cache buffer); only the layers before `first_shared_layer` own caches.

This is the only definition of the decoder: each exporter swaps parts of it (caches, attention kernel, masks, norms,
head) and never rewrites the layer loop; see `docs/architecture.md`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from .attention import CacheMasks, ChunkMasks, GroupedSDPA, RingCacheMasks, last_query, select_queries
from .cache import KVCache, NoCache, RingKVCache
from .layers import RMSNorm, rotate_half

__all__ = ["PleScale", "TextAttention", "TextDecoder", "TextDecoderLayer", "TextMLP", "TiedHead", "apply_rope",
           "rope_cos_sin", "rope_inv_freq", "softcap"]


# --------------------------------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float, partial_rotary_factor: float | None = None) -> torch.Tensor:
    """Inverse frequencies `[head_dim // 2]` (float32).

    `partial_rotary_factor=None` is default RoPE (sliding layers). A factor gives Gemma 4's *proportional* RoPE (global
    layers): the first `int(factor * head_dim // 2)` pairs rotate with the exponent taken over the FULL head dim, the
    remaining pairs get frequency 0 (identity), so with the rotate-half layout only dims `[0:64]` and `[256:320]` of a
    512-dim head rotate. Computed exactly as the reference does, for bit parity.
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

    A KV-producing layer has `k_proj`, `v_proj`, `k_norm`, `v_norm` and a `kv_cache` (`cache.py`); a KV-shared layer
    has only `q_proj`, `q_norm`, `o_proj` and attends over the K/V its producer's cache returned. `sdpa` is the
    attention kernel (`attention.GroupedSDPA`; backends swap it together with the caches and masks).
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
            self.kv_cache: nn.Module | None = NoCache()
        else:
            self.kv_cache = None
        self.o_proj = nn.Linear(self.n_heads * hd, h, bias=False)
        self.sdpa: nn.Module = GroupedSDPA()

    def forward(
        self,
        x: torch.Tensor,  # (B, S, H)
        cos: torch.Tensor,  # (b, S, hd)
        sin: torch.Tensor,  # (b, S, hd)
        mask,  # what the masks module built for this layer kind
        input_pos: torch.Tensor,  # (S,) positions of the chunk
        shared_kv=None,  # the producer's cached K/V, for a KV-shared layer
    ):
        B, S, _ = x.shape
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, S, self.n_heads, self.head_dim)), cos, sin).transpose(1, 2)
        if shared_kv is None:
            assert self.computes_kv, f"layer {self.layer} shares K/V but none was given"
            k = self.k_norm(self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim))
            k = apply_rope(k, cos, sin).transpose(1, 2)  # (B, nkv, S, hd)
            v = self.v_norm(self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim)).transpose(1, 2)
            kv = self.kv_cache.update(input_pos, k, v)
        else:
            kv = shared_kv
        return self.o_proj(self.sdpa(q, kv, mask)), kv  # q (B, nh, S, hd) -> (B, S, nh*hd) -> (B, S, H)


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


class PleScale(nn.Module):
    """Raw PLE table rows -> rows * sqrt(P), the scale rounded to the rows' dtype (the reference's order)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return rows * torch.tensor(self.dim**0.5, dtype=rows.dtype)


class TiedHead(nn.Module):
    """The LM head tied to the embedding table: `h @ table^T` (backends swap in a quantized linear over the same
    integers, `export/common.LinearHead`)."""

    def forward(self, h: torch.Tensor, table: nn.Embedding) -> torch.Tensor:
        w = table.weight
        return F.linear(h, w if w.dtype == h.dtype else w.to(h.dtype))  # (B, S, V)


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma's final logit soft cap `tanh(x / c) * c` (c = 30 for E2B/E4B); None leaves the logits as they are."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


class TextDecoder(nn.Module):
    """The text decoder, `Gemma4TextModel` plus the tied, soft-capped LM head.

    `max_len` (the context length, an export setting, not architecture) gives every KV-producing layer a static
    `KVCache`; `None` leaves them `NoCache`, and `forward` attends within the given chunk only. `sliding_ring=True`
    gives the sliding layers ring buffers of `2 * sliding_window` slots instead (see `setup_caches`).

    Swappable parts (module attributes, replaced by type in `export/<backend>/swaps.py`): each layer's
    `self_attn.kv_cache` and `self_attn.sdpa`, the decoder's `masks` (built once per step for each layer kind), the
    norms, `ple_scale` and `lm_head`.
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
        self.ple_scale: nn.Module = PleScale(P)
        self.layers = nn.ModuleList(TextDecoderLayer(cfg, i) for i in range(L))
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        self.lm_head: nn.Module = TiedHead()
        # Which layer's K/V each layer attends over (itself for producers). A plain list: tests break it on purpose.
        self.kv_source = [cfg.kv_producer(i) for i in range(L)]
        self.register_buffer("sliding_inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta_sliding), persistent=False)
        self.register_buffer(
            "full_inv_freq",
            rope_inv_freq(cfg.global_head_dim, cfg.rope_theta_full, cfg.partial_rotary_factor_full),
            persistent=False,
        )
        self.max_len: int | None = None
        self.masks: nn.Module = ChunkMasks(cfg.sliding_window)
        if max_len is not None:
            self.setup_caches(max_len, batch_size=batch_size, dtype=cache_dtype, sliding_ring=sliding_ring)

    # -- caches --------------------------------------------------------------------------------------------------

    def setup_caches(self, max_len: int, *, batch_size: int = 1, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None, sliding_ring: bool = False) -> None:
        """(Re)allocate zeroed static caches on every KV-producing layer.

        Full layers get `max_len` slots (slot = position). With `sliding_ring` and `max_len > 2W`, sliding layers get
        a ring of `R = 2W` slots (`RingKVCache`, masks from `RingCacheMasks`); one forward may then take at most
        `W + 1` tokens (`prefill_capacity`), so long prompts are prefilled in chunks."""
        W = self.cfg.sliding_window
        ring_len = 2 * W if sliding_ring and max_len > 2 * W else None
        for i in self.cfg.cache_layers:
            attn = self.layers[i].self_attn
            if ring_len is not None and not self.cfg.is_full(i):
                attn.kv_cache = RingKVCache(batch_size, attn.n_kv_heads, ring_len, attn.head_dim, dtype=dtype,
                                            device=device)
            else:
                attn.kv_cache = KVCache(batch_size, attn.n_kv_heads, max_len, attn.head_dim, dtype=dtype,
                                        device=device)
        self.masks = (CacheMasks(W, max_len) if ring_len is None
                      else RingCacheMasks(W, max_len, ring_len, device=device))
        self.max_len = max_len

    @property
    def prefill_capacity(self) -> int | None:
        """The longest chunk one `forward` may take (None: no limit but `max_len`)."""
        return getattr(self.masks, "capacity", None)

    def drop_caches(self) -> None:
        for i in self.cfg.cache_layers:
            self.layers[i].self_attn.kv_cache = NoCache()
        self.masks = ChunkMasks(self.cfg.sliding_window)
        self.max_len = None

    def reset_caches(self) -> None:
        for cache in self.kv_caches:
            cache.reset()
        if hasattr(self.masks, "reset"):
            self.masks.reset()

    def draft_kv(self) -> tuple[dict[bool, tuple[torch.Tensor, torch.Tensor]], dict[bool, torch.Tensor]]:
        """What a drafter reads (`model/drafter.py`): `({sliding: (k, v)}, {sliding: key positions (T,)})`, the cache
        buffers of the last cache-owning layer of each kind (the layers the KV-shared layers read) and the position
        each of their slots holds (-1: none yet; a static cache's slot j holds position j)."""
        kv, positions = {}, {}
        for sliding in (True, False):
            layers = [i for i in self.cfg.cache_layers if self.cfg.is_full(i) != sliding]
            if not layers:
                continue
            cache = self.layers[layers[-1]].self_attn.kv_cache
            if not hasattr(cache, "k_cache"):
                raise ValueError("a drafter reads the target's static caches: call setup_caches first")
            kv[sliding] = (cache.k_cache, cache.v_cache)
            ring = sliding and hasattr(self.masks, "slot_pos")
            positions[sliding] = self.masks.slot_pos if ring else torch.arange(cache.k_cache.shape[2])
        return kv, positions

    @property
    def kv_caches(self) -> list[nn.Module]:
        """The caches that hold state (one per KV-producing layer once `setup_caches` ran)."""
        caches = (self.layers[i].self_attn.kv_cache for i in self.cfg.cache_layers)
        return [c for c in caches if hasattr(c, "reset")]

    # -- embedding steps (outside the decoder graph) ----------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the norms (the embedding tables may stay memory-mapped in the file's dtype)."""
        return self.norm.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids `[B,S]` -> `embed_tokens[ids] * sqrt(H)` `[B,S,H]`, the scale rounded to the compute dtype."""
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

        The projection sees the MERGED embeddings, so image/audio soft tokens feed in."""
        cfg = self.cfg
        B, S, _ = inputs_embeds.shape
        proj = self.per_layer_model_projection(inputs_embeds) * cfg.hidden_size**-0.5  # (B, S, L*P)
        proj = self.per_layer_projection_norm(proj.view(B, S, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input))
        return (proj + self.ple_scale(ple_rows.to(inputs_embeds.dtype))) * 2.0**-0.5

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
        return self.logits(self.hidden_states(inputs_embeds, ple_rows, positions, last_only=last_only))

    def hidden_states(self, inputs_embeds: torch.Tensor, ple_rows: torch.Tensor, positions: torch.Tensor, *,
                      last_only: bool = False, keep: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` without the head: the final normed hidden states `[B, S, H]` (`[B, 1, H]` with `last_only`).

        `keep` (indices into the chunk, `[n]` long): only those positions' states `[B, n, H]`; like `last_only`, the
        KV-shared layers then run on those positions only (`last_only` is `keep = [S - 1]` without a gather)."""
        cfg = self.cfg
        pos2d = positions if positions.dim() == 2 else positions.unsqueeze(0)  # (b, S)
        input_pos = positions if positions.dim() == 1 else positions[0]  # (S,)
        ple = self.per_layer_inputs(inputs_embeds, ple_rows)
        masks = self.masks(pos2d, input_pos)  # {sliding: mask}
        rope = {False: rope_cos_sin(self.full_inv_freq, pos2d, inputs_embeds.dtype),
                True: rope_cos_sin(self.sliding_inv_freq, pos2d, inputs_embeds.dtype)}
        h = inputs_embeds
        kv: dict[int, object] = {}
        for i, layer in enumerate(self.layers):
            if last_only and i == cfg.first_shared_layer:
                h, ple = h[:, -1:], ple[:, -1:]
                masks = {s: last_query(m) for s, m in masks.items()}
                rope = {s: (c[:, -1:], n[:, -1:]) for s, (c, n) in rope.items()}
            elif keep is not None and i == cfg.first_shared_layer:
                h, ple = h.index_select(1, keep), ple.index_select(1, keep)
                masks = {s: select_queries(m, keep) for s, m in masks.items()}
                rope = {s: (c.index_select(1, keep), n.index_select(1, keep)) for s, (c, n) in rope.items()}
            sliding = not cfg.is_full(i)
            cos, sin = rope[sliding]
            shared = kv[self.kv_source[i]] if i >= cfg.first_shared_layer else None
            h, kv[i] = layer(h, ple[:, :, i], cos, sin, masks[sliding], input_pos, shared)
        if last_only:
            h = h[:, -1:]
        elif keep is not None and cfg.first_shared_layer >= len(self.layers):
            h = h.index_select(1, keep)
        return self.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The tied LM head and the final soft cap."""
        return softcap(self.lm_head(h, self.embed_tokens), self.cfg.final_logit_softcapping)
