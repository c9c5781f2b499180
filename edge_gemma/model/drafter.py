"""The Gemma 4 assistant (MTP drafter): a small decoder that reads the target's KV caches and drafts tokens.

transformers' `Gemma4AssistantForCausalLM` (`models/gemma4_assistant`), with the same state-dict keys, so a Hugging
Face assistant checkpoint loads with `load_state_dict(strict=True)` (`edge_gemma/drafter.py`). One draft step at
position p (the position of the last token, which the target has not run yet):

    x      = pre_projection(cat(target.embed(token) * sqrt(H_t), h))   # h: the target's final normed hidden state at
                                                                        # p - 1, or the previous step's `projected`
    h'     = layers(x at position p, attending over the TARGET's K/V)   # every layer is KV-shared, no K/V projections
    logits = lm_head(norm(h'))            or the centroid head (`use_ordered_embeddings`, `CentroidHead`)
    projected = post_projection(norm(h')) # width H_t, the next step's h

Each layer attends over the K/V of the target's last cache-owning layer of its own type (`kv` by sliding flag), with
the masks of `drafter_masks`: keys at positions p - 1 - W .. p - 1 on sliding layers (W = the window), 0 .. p - 1 on
full layers. That is what the reference's bidirectional masks over `shared_kv_states` select after a prefill (the last
W + 1 entries, flipped), and what every later round selects with the rejected drafts' K/V dropped. No soft cap on
the logits (the reference applies none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import GroupedSDPA
from .layers import RMSNorm
from .text import TextMLP, apply_rope, rope_cos_sin, rope_inv_freq

__all__ = ["CentroidHead", "DraftStep", "Drafter", "DrafterConfig", "assisted_greedy", "drafter_cache_layers",
           "drafter_kinds", "drafter_masks"]


@dataclass(frozen=True, kw_only=True)
class DrafterConfig:
    """`Gemma4AssistantConfig` (model_type `gemma4_assistant`) and the fields of its `text_config` the drafter uses."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # sliding layers
    global_head_dim: int  # full-attention layers
    layer_types: tuple[str, ...]
    sliding_window: int
    backbone_hidden_size: int
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    rms_norm_eps: float = 1e-6
    rope_theta_sliding: float = 10_000.0
    rope_theta_full: float = 1_000_000.0
    partial_rotary_factor_full: float = 0.25

    def is_full(self, layer: int) -> bool:
        return self.layer_types[layer] == "full_attention"

    def head_dim_for(self, layer: int) -> int:
        return self.global_head_dim if self.is_full(layer) else self.head_dim


def drafter_masks(position: torch.Tensor, key_positions: dict[bool, torch.Tensor], window: int
                  ) -> dict[bool, torch.Tensor]:
    """`position (b, 1)` long, `{sliding: key positions (T,)}` (the position each cache slot holds, -1 for none) ->
    `{sliding: bool (b, 1, 1, T)}`: full layers see keys `0 <= k < p`, sliding layers `p - 1 - window <= k < p`
    (window + 1 keys: the reference's bidirectional sliding mask `|i - j| <= window` from the newest key)."""
    q = position[:, None, :, None]  # (b, 1, 1, 1)
    masks = {}
    for sliding, positions in key_positions.items():
        k = positions[None, None, None, :]  # (1, 1, 1, T)
        seen = (k >= 0) & (k < q)
        masks[sliding] = seen & (k >= q - 1 - window) if sliding else seen
    return masks


class DrafterAttention(nn.Module):
    """A KV-shared Gemma 4 attention: `q_proj`, `q_norm`, RoPE on q, GQA over given K/V at scale 1, `o_proj`."""

    def __init__(self, cfg: DrafterConfig, layer: int):
        super().__init__()
        self.head_dim = cfg.head_dim_for(layer)
        self.n_heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.sdpa: nn.Module = GroupedSDPA()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, S, self.n_heads, self.head_dim)), cos, sin).transpose(1, 2)
        return self.o_proj(self.sdpa(q, kv, mask))


class DrafterLayer(nn.Module):
    """The Gemma 4 decoder layer without PLE: sandwich-norm attention and MLP, then `* layer_scalar`."""

    def __init__(self, cfg: DrafterConfig, layer: int):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = DrafterAttention(cfg, layer)
        self.mlp = TextMLP(h, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.register_buffer("layer_scalar", torch.ones(1))  # persistent: it is in the checkpoint

    def forward(self, x, cos, sin, kv, mask):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, kv, mask))
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x * self.layer_scalar.to(x.dtype)


class DrafterBody(nn.Module):
    """`model.*` of the checkpoint: the embedding table (only the tied head reads it), the layers, the final norm."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DrafterLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CentroidHead(nn.Module):
    """`Gemma4AssistantMaskedEmbedder`: score `num_centroids` centroids, keep the top `k`, compute the logits of their
    tokens only (`token_ordering` lists each centroid's `vocab / num_centroids` tokens) and give every other token
    the smallest computed logit minus 1."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        if cfg.vocab_size % cfg.num_centroids:
            raise ValueError(f"vocab_size {cfg.vocab_size} is not a multiple of num_centroids {cfg.num_centroids}")
        self.top_k, self.num_centroids = cfg.centroid_intermediate_top_k, cfg.num_centroids
        self.centroids = nn.Linear(cfg.hidden_size, cfg.num_centroids, bias=False)
        self.register_buffer("token_ordering", torch.zeros(cfg.vocab_size, dtype=torch.long))

    def forward(self, h: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        B, S, _ = h.shape
        top = torch.topk(self.centroids(h), k=self.top_k, dim=-1).indices  # (B, S, k)
        tokens = self.token_ordering.long().view(self.num_centroids, -1)[top].reshape(B, S, -1)  # (B, S, k * per)
        selected = (h.unsqueeze(-2) @ F.embedding(tokens, table).to(h.dtype).transpose(-1, -2)).squeeze(-2)
        return (selected.min() - 1.0).expand(B, S, table.shape[0]).scatter(-1, tokens, selected)


class Drafter(nn.Module):
    """`Gemma4AssistantForCausalLM` (module docstring). `forward(token_embeds, hidden, position, kv, masks)` ->
    `(logits (B, 1, V), projected (B, 1, H_t))`."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DrafterBody(cfg)
        self.pre_projection = nn.Linear(2 * cfg.backbone_hidden_size, cfg.hidden_size, bias=False)
        self.post_projection = nn.Linear(cfg.hidden_size, cfg.backbone_hidden_size, bias=False)
        self.masked_embedding = CentroidHead(cfg) if cfg.use_ordered_embeddings else None
        self.register_buffer("sliding_inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta_sliding), persistent=False)
        self.register_buffer("full_inv_freq", rope_inv_freq(cfg.global_head_dim, cfg.rope_theta_full,
                                                            cfg.partial_rotary_factor_full), persistent=False)

    def forward(
        self,
        token_embeds: torch.Tensor,  # (B, 1, H_t) the target's scaled embedding of the last token
        hidden: torch.Tensor,  # (B, 1, H_t) the target's final normed hidden state, or the last `projected`
        position: torch.Tensor,  # (b, 1) long: the last token's position
        kv: dict[bool, tuple[torch.Tensor, torch.Tensor]],  # sliding flag -> the target's K/V (B, nkv, T, hd)
        masks: dict[bool, torch.Tensor],  # sliding flag -> bool (b, 1, 1, T), `drafter_masks`
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        x = self.pre_projection(torch.cat([token_embeds, hidden], dim=-1))
        rope = {False: rope_cos_sin(self.full_inv_freq, position, x.dtype),
                True: rope_cos_sin(self.sliding_inv_freq, position, x.dtype)}
        for i, layer in enumerate(self.model.layers):
            sliding = not cfg.is_full(i)
            x = layer(x, *rope[sliding], kv[sliding], masks[sliding])
        h = self.model.norm(x)
        if self.masked_embedding is not None:
            logits = self.masked_embedding(h, self.model.embed_tokens.weight)
        else:
            w = self.model.embed_tokens.weight
            logits = F.linear(h, w if w.dtype == h.dtype else w.to(h.dtype))
        return logits, self.post_projection(h)


def drafter_kinds(drafter: nn.Module) -> list[bool]:
    """The layer kinds (sliding flag) the drafter reads target caches of, sliding first."""
    sliding = {not drafter.cfg.is_full(i) for i in range(drafter.cfg.num_hidden_layers)}
    return [kind for kind in (True, False) if kind in sliding]


def drafter_cache_layers(text, kinds: list[bool]) -> dict[bool, int]:
    """`{sliding flag: the target's last cache-owning layer of that kind}`: the caches a drafter step reads."""
    return {kind: max(i for i in text.cache_layers if text.is_full(i) != kind) for kind in kinds}


class DraftStep(nn.Module):
    """One draft step for export: `(token_embed [1,1,Ht], hidden [1,1,Ht], position [1], kv)` -> `(logits [1,V],
    projected [1,Ht])` of `Drafter` over the target's caches. `kv` is the K and V `[1,nkv,T,hd]` of the target's last
    cache layer of each kind the drafter has (`drafter_kinds` order, sliding first), any T: slot j holds position j,
    and the masks keep the keys before `position` (`drafter_masks`). The ONNX exporter's `drafter.onnx` and the
    ExecuTorch program's `draft` method are this module."""

    def __init__(self, drafter: Drafter):
        super().__init__()
        self.drafter = drafter
        self.kinds = drafter_kinds(drafter)

    def forward(self, token_embed: torch.Tensor, hidden: torch.Tensor, position: torch.Tensor, kv: list[torch.Tensor]):
        pos = position.view(1, 1)
        caches = {kind: (kv[2 * n], kv[2 * n + 1]) for n, kind in enumerate(self.kinds)}
        slots = {kind: torch.arange(k.shape[2], device=k.device) for kind, (k, _) in caches.items()}
        masks = drafter_masks(pos, slots, self.drafter.cfg.sliding_window)
        logits, projected = self.drafter(token_embed, hidden, pos, caches, masks)
        return logits[:, 0], projected[:, 0]


@torch.no_grad()
def assisted_greedy(model: nn.Module, drafter: Drafter, input_ids: torch.Tensor, max_new_tokens: int, *,
                    draft_len: int, stop_ids: tuple[int, ...] = (), stats: dict | None = None) -> list[int]:
    """Greedy speculative decoding with the eager models (`Gemma4Model` with static caches, text prompt): the
    reference loop of transformers' `SinglePositionMultiTokenCandidateGenerator` + `_assisted_decoding`.

    Prefill; then per round draft `draft_len` tokens at the position of the last token (the drafter reads the target's
    caches as they are), run the target once over [last token, drafts], keep the drafts up to the first one the
    target disagrees with plus the target's own next token. Rejected drafts leave stale cache slots in the future of
    every later query (masked by position) until the next round overwrites them. The result equals plain greedy
    decoding. `stats` (a dict), if given, receives `rounds`, `drafted` and `accepted`."""
    lm = model.language_model
    if lm.max_len is None:
        raise ValueError("assisted decoding needs the target's static caches (load it with max_len)")
    if draft_len < 1:
        raise ValueError(f"draft_len must be at least 1, found {draft_len}")
    model.check_token_ids(input_ids)
    S = input_ids.shape[1]
    if S + max_new_tokens + draft_len > lm.max_len:
        raise ValueError(f"prompt ({S}) + new tokens ({max_new_tokens}) + draft ({draft_len}) exceed the cache "
                         f"length {lm.max_len}")
    window = drafter.cfg.sliding_window
    counts = {"rounds": 0, "drafted": 0, "accepted": 0}
    lm.reset_caches()
    embeds, ple_ids = model.embed(input_ids)
    h = lm.hidden_states(embeds, lm.ple_rows(ple_ids), torch.arange(S), last_only=True)
    out = [int(lm.logits(h)[0, -1].argmax())]
    hidden, pos = h[:, -1:], S  # the target's hidden state at pos - 1; the last token (out[-1]) sits at pos
    while len(out) < max_new_tokens and out[-1] not in stop_ids:
        k = min(draft_len, max_new_tokens - len(out) - 1)
        drafts, tok, state = [], out[-1], hidden
        if k:
            kv, key_positions = lm.draft_kv()
            position = torch.tensor([[pos]])
            masks = drafter_masks(position, key_positions, window)
            for _ in range(k):
                logits, state = drafter(lm.embed(torch.tensor([[tok]])), state, position, kv, masks)
                tok = int(logits[0, -1].argmax())
                drafts.append(tok)
        chunk = torch.tensor([[out[-1], *drafts]])
        model.check_token_ids(chunk)
        e, p = model.embed(chunk)
        h = lm.hidden_states(e, lm.ple_rows(p), torch.arange(pos, pos + len(drafts) + 1))
        target = lm.logits(h)[0].argmax(-1).tolist()
        n = 0
        while n < len(drafts) and drafts[n] == target[n]:
            n += 1
        new = drafts[:n] + [target[n]]
        counts["rounds"] += 1
        counts["drafted"] += len(drafts)
        counts["accepted"] += n
        for t in new:
            if len(out) < max_new_tokens and out[-1] not in stop_ids:
                out.append(t)
        hidden, pos = h[:, n:n + 1], pos + n + 1
    if stats is not None:
        stats.update(counts)
    return out
