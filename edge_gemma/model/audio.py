"""Gemma 4 audio encoder: a USM-style conformer behind a 4x subsampling conv front (SSCP).

Submodule and parameter names follow transformers' `Gemma4AudioModel` (`subsample_conv_projection.*`,
`layers.{i}.*`, `output_proj`), so the checkpoint's `model.audio_tower.*` tensors load with
`load_state_dict(strict=True)`. The math is the reference's; the formulation is chosen for export:

* no data-dependent Python control flow and no `.item()`: every shape follows from `T` alone;
* the chunked local attention gathers each block's key context with a precomputed index tensor and builds its mask
  from static window geometry plus the key-validity vector, instead of materialising a `[T, T]` mask and unfolding it;
* the sinusoidal relative-position table is computed in `forward` from constants (no non-persistent buffers), so a
  model built on the meta device and loaded with `assign=True` is complete.

Reference: transformers' `models/gemma4/modeling_gemma4.py` (`Gemma4AudioModel`). Each of these is easy to miss and
changes the output: the clip bounds of every linear (`ClippableLinear`), the zeroing of masked frames, the causal
chunk window and its relative positions, the attention logit cap and the q/k scaling constants.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edge_gemma.config import AudioConfig
from edge_gemma.model.layers import ClippableLinear, RMSNorm, activation

__all__ = ["AudioEncoder", "block_attention_mask", "output_length", "relative_position_table"]


def output_length(num_frames: int) -> int:
    """Frames after the SSCP: two stride-2 convs (padding 1, kernel 3), i.e. ceil(ceil(T/2)/2). 25 per second."""
    return -(-(-(-num_frames // 2)) // 2)


# --------------------------------------------------------------------------------------------------------------------
# Subsampling conv projection (SSCP)
# --------------------------------------------------------------------------------------------------------------------


class SubSampleConvLayer(nn.Module):
    """`x *= mask; Conv2d(3x3, stride 2, pad 1, no bias); LayerNorm over channels (no bias); ReLU`."""

    def __init__(self, in_channels: int, out_channels: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=(3, 3), stride=(2, 2), padding=1, bias=False)
        self.norm = nn.LayerNorm(out_channels, eps=eps, elementwise_affine=True, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x (B, C, T, F); mask (B, T) bool -> (B, C', ceil(T/2), ceil(F/2)), mask (B, ceil(T/2))
        x = x * mask[:, None, :, None]
        x = self.conv(x.to(self.conv.weight.dtype))
        # contiguous(): the next conv then sees the same memory layout as in the reference (bit-exact parity)
        x = F.relu(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous())
        return x, mask[:, ::2]


class SubSampleConvProjection(nn.Module):
    """Two `SubSampleConvLayer`s (time and mel both /4), then channels x mel-bins flattened and projected to H."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        c0, c1 = cfg.subsampling_conv_channels
        self.layer0 = SubSampleConvLayer(1, c0, cfg.rms_norm_eps)
        self.layer1 = SubSampleConvLayer(c0, c1, cfg.rms_norm_eps)
        # The reference sizes this as (c0 // 4) * c1, i.e. it assumes 128 mel bins == c0 (true for every Gemma 4).
        self.input_proj_linear = nn.Linear((c0 // 4) * c1, cfg.hidden_size, bias=False)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # features (B, T, 128); mask (B, T) bool
        x, mask = self.layer0(features.unsqueeze(1), mask)
        x, mask = self.layer1(x, mask)  # (B, c1, T', 32)
        b, _, t, _ = x.shape
        x = x.permute(0, 2, 3, 1).reshape(b, t, -1)  # (B, T', 32 * c1), mel-major then channel
        return self.input_proj_linear(x), mask


# --------------------------------------------------------------------------------------------------------------------
# Conformer blocks
# --------------------------------------------------------------------------------------------------------------------


def _clip(x: torch.Tensor, limit: float) -> torch.Tensor:
    """The reference's `clamp(±gradient_clipping)` (1e10, a no-op in practice), bounded by the dtype's max."""
    limit = min(limit, torch.finfo(x.dtype).max)
    return torch.clamp(x, -limit, limit)


class AudioFeedForward(nn.Module):
    """Macaron half-step FFN: `h + residual_weight * RMS(ffw_2(act(ffw_1(RMS(h)))))`."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        clipped = cfg.use_clipped_linears
        self.ffw_layer_1 = ClippableLinear(cfg.hidden_size, cfg.hidden_size * 4, clipped=clipped)
        self.ffw_layer_2 = ClippableLinear(cfg.hidden_size * 4, cfg.hidden_size, clipped=clipped)
        self.pre_layer_norm = RMSNorm(cfg.hidden_size)
        self.post_layer_norm = RMSNorm(cfg.hidden_size)
        self.act_fn = activation(cfg.hidden_act)
        self.gradient_clipping, self.residual_weight = cfg.gradient_clipping, cfg.residual_weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.pre_layer_norm(_clip(h, self.gradient_clipping))
        x = self.ffw_layer_2(self.act_fn(self.ffw_layer_1(x)))
        x = self.post_layer_norm(_clip(x, self.gradient_clipping))
        return x * self.residual_weight + h


class CausalDepthwiseConv1d(nn.Conv1d):
    """Depthwise Conv1d padded on the left by `kernel - 1`, so frame t sees only frames <= t (streamable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (B, C, T) -> (B, C, T)
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


class AudioLightConv1d(nn.Module):
    """`h + linear_end(act(RMS(dwconv(GLU(linear_start(RMS(h)))))))` with a causal depthwise conv."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        clipped, hidden = cfg.use_clipped_linears, cfg.hidden_size
        self.linear_start = ClippableLinear(hidden, hidden * 2, clipped=clipped)
        self.linear_end = ClippableLinear(hidden, hidden, clipped=clipped)
        self.depthwise_conv1d = CausalDepthwiseConv1d(
            hidden, hidden, kernel_size=cfg.conv_kernel_size, groups=hidden, bias=False
        )
        self.pre_layer_norm = RMSNorm(hidden, cfg.rms_norm_eps)
        self.conv_norm = RMSNorm(hidden, cfg.rms_norm_eps)
        self.act_fn = activation(cfg.hidden_act)
        self.gradient_clipping = cfg.gradient_clipping

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = F.glu(self.linear_start(self.pre_layer_norm(h)), dim=-1)  # (B, T, H): a * sigmoid(b)
        x = self.depthwise_conv1d(x.transpose(1, 2)).transpose(1, 2)
        x = self.conv_norm(_clip(x, self.gradient_clipping))
        return self.linear_end(self.act_fn(x)) + h


def relative_position_table(cfg: AudioConfig, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """Sinusoidal embeddings `(context//2 + 1, H)` for distances context//2, ..., 1, 0 (in that order), laid out as
    `[sin(d * inv_ts), cos(d * inv_ts)]` with `inv_ts[i] = exp(-i * ln(1e4) / (H/2 - 1))`."""
    context = cfg.attention_chunk_size + cfg.attention_context_left - 1 + cfg.attention_context_right
    half = cfg.hidden_size // 2
    increment = math.log(10000.0) / max(half - 1, 1)
    inv_timescales = torch.exp(torch.arange(half, device=device) * -increment)  # (H/2,) float32
    distance = torch.arange(context // 2, -1, -1, device=device)[:, None]  # (P, 1)
    scaled = distance * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=-1).to(dtype)


def _context_index(cfg: AudioConfig, num_blocks: int, device: torch.device | None) -> torch.Tensor:
    """(num_blocks, context) index of each block's key frames into the sequence padded by `left - 1` on the left."""
    context = cfg.attention_chunk_size + cfg.attention_context_left - 1 + cfg.attention_context_right
    starts = torch.arange(num_blocks, device=device) * cfg.attention_chunk_size
    return starts[:, None] + torch.arange(context, device=device)[None, :]


def block_attention_mask(cfg: AudioConfig, valid: torch.Tensor) -> torch.Tensor:
    """(B, T) bool valid frames -> (B, num_blocks, chunk, context) bool: may query frame i attend to key slot c.

    Allowed when the key frame j is inside [0, T), valid, and `0 <= i - j < left - 1` (or `0 < j - i < right`), and the
    query is a real frame. Everything but `valid` is static geometry given T, so it folds to constants on export.
    Computed once per forward and shared by all layers.
    """
    chunk, past, future = cfg.attention_chunk_size, cfg.attention_context_left - 1, cfg.attention_context_right
    batch, seq_len = valid.shape
    num_blocks = (seq_len + chunk - 1) // chunk
    index = _context_index(cfg, num_blocks, valid.device)  # (nb, ctx)
    query = torch.arange(num_blocks * chunk, device=valid.device).view(num_blocks, chunk, 1)  # (nb, C, 1) frame i
    key = (index - past)[:, None, :]  # (nb, 1, ctx) frame j
    dist = query - key
    local = ((dist >= 0) & (dist < past)) | ((dist < 0) & (-dist < future))
    static = local & (key >= 0) & (key < seq_len) & (query < seq_len)  # (nb, C, ctx)
    right = num_blocks * chunk + future - seq_len
    valid_keys = F.pad(valid, (past, right))[:, index]  # (B, nb, ctx)
    return static[None] & valid_keys[:, :, None, :]


class AudioAttention(nn.Module):
    """Chunked local self-attention with Transformer-XL relative positions (no u/v biases) and a tanh logit cap.

    Queries are cut into blocks of `chunk` frames; block `n` attends over the `context = chunk + left - 1 + right`
    frames starting at `n * chunk - (left - 1)`, gathered with a static index. `block_attention_mask` says which
    (query, key slot) pairs count: with the E2B/E4B config, the frame itself plus 11 previous valid frames.
    """

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        clipped, hidden = cfg.use_clipped_linears, cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = hidden // cfg.num_attention_heads
        self.chunk = cfg.attention_chunk_size
        self.past = cfg.attention_context_left - 1
        self.future = cfg.attention_context_right
        self.context = self.chunk + self.past + self.future
        self.logit_cap = cfg.attention_logit_cap
        self.invalid_logit = cfg.attention_invalid_logits_value
        self.q_scale = (self.head_dim**-0.5) / math.log(2)
        self.k_scale = math.log(1 + math.e) / math.log(2)

        self.q_proj = ClippableLinear(hidden, self.num_heads * self.head_dim, clipped=clipped)
        self.k_proj = ClippableLinear(hidden, self.num_heads * self.head_dim, clipped=clipped)
        self.v_proj = ClippableLinear(hidden, self.num_heads * self.head_dim, clipped=clipped)
        self.post = ClippableLinear(hidden, hidden, clipped=clipped)
        self.relative_k_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.per_dim_scale = nn.Parameter(torch.zeros(self.head_dim))
        self.cfg = cfg

    def _rel_shift(self, x: torch.Tensor) -> torch.Tensor:
        """(B, nh, nb, C, P) logits per relative distance -> (B, nh, nb, C, context) per key slot (Transformer-XL
        appendix B): pad each row to context + 1, reflow, drop the tail."""
        b, nh, nb, c, p = x.shape
        x = F.pad(x, (0, self.context + 1 - p))
        x = x.reshape(b, nh, nb, c * (self.context + 1))[..., : c * self.context]
        return x.reshape(b, nh, nb, c, self.context)

    def forward(self, h: torch.Tensor, rel_pos: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        # h (B, T, H); rel_pos (P, H); allowed (B, nb, C, ctx) bool from `block_attention_mask`
        b, t, _ = h.shape
        nh, hd, chunk = self.num_heads, self.head_dim, self.chunk
        nb = (t + chunk - 1) // chunk
        q = self.q_proj(h).float().view(b, t, nh, hd)
        k = self.k_proj(h).float().view(b, t, nh, hd)
        v = self.v_proj(h).float().view(b, t, nh, hd)
        q = q * self.q_scale * F.softplus(self.per_dim_scale)
        k = k * self.k_scale

        q = F.pad(q, (0, 0, 0, 0, 0, nb * chunk - t)).reshape(b, nb, chunk, nh, hd)  # (B, nb, C, nh, hd)
        # Key/value context per block: pad `past` frames on the left and enough on the right, then gather.
        index = _context_index(self.cfg, nb, h.device)  # (nb, ctx)
        right = nb * chunk + self.future - t
        k = F.pad(k, (0, 0, 0, 0, self.past, right))[:, index]  # (B, nb, ctx, nh, hd)
        v = F.pad(v, (0, 0, 0, 0, self.past, right))[:, index]

        queries = q.permute(0, 3, 1, 2, 4)  # (B, nh, nb, C, hd)
        logits_content = queries @ k.permute(0, 3, 1, 4, 2)  # (B, nh, nb, C, ctx)
        rel_k = self.relative_k_proj(rel_pos).view(-1, nh, hd).to(q.dtype)  # (P, nh, hd)
        logits_pos = queries.reshape(b, nh, nb * chunk, hd) @ rel_k.permute(1, 2, 0)  # (B, nh, nb*C, P)
        logits_pos = self._rel_shift(logits_pos.reshape(b, nh, nb, chunk, -1))  # (B, nh, nb, C, ctx)

        logits = torch.tanh((logits_content + logits_pos) / self.logit_cap) * self.logit_cap
        logits = logits.masked_fill(~allowed[:, None], self.invalid_logit)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32).to(v.dtype)
        out = probs @ v.permute(0, 3, 1, 2, 4)  # (B, nh, nb, C, hd)
        out = out.permute(0, 2, 3, 1, 4).reshape(b, nb * chunk, nh * hd)[:, :t]
        return self.post(out.to(h.dtype))


class AudioLayer(nn.Module):
    """Conformer block: FFN/2, attention, light conv, FFN/2, final norm (the reference's `Gemma4AudioLayer`)."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.feed_forward1 = AudioFeedForward(cfg)
        self.feed_forward2 = AudioFeedForward(cfg)
        self.self_attn = AudioAttention(cfg)
        self.lconv1d = AudioLightConv1d(cfg)
        self.norm_pre_attn = RMSNorm(cfg.hidden_size)
        self.norm_post_attn = RMSNorm(cfg.hidden_size)
        self.norm_out = RMSNorm(cfg.hidden_size)
        self.gradient_clipping = cfg.gradient_clipping

    def forward(self, h: torch.Tensor, rel_pos: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        h = self.feed_forward1(h)
        x = self.self_attn(self.norm_pre_attn(_clip(h, self.gradient_clipping)), rel_pos, allowed)
        h = self.norm_post_attn(_clip(x, self.gradient_clipping)) + h
        h = self.feed_forward2(self.lconv1d(h))
        return self.norm_out(_clip(h, self.gradient_clipping))


class AudioEncoder(nn.Module):
    """log-mel features -> audio soft tokens (before `embed_audio`).

    `forward(features (B, T, 128) float, mask (B, T) bool, True = valid frame)` returns
    `(hidden (B, T', output_proj_dims), mask (B, T') bool)` with `T' = ceil(ceil(T/2)/2)` (25 frames per second of
    16 kHz audio). Frames whose mask is False are padding: the caller drops them. Outputs at valid frames do not
    depend on how much padding follows (the conformer is causal; the SSCP sees one zeroed frame ahead).
    """

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        self.subsample_conv_projection = SubSampleConvProjection(cfg)
        self.layers = nn.ModuleList([AudioLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.output_proj = nn.Linear(cfg.hidden_size, cfg.output_proj_dims, bias=True)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if features.ndim != 3 or mask.shape != features.shape[:2]:
            raise ValueError(
                f"AudioEncoder: features {tuple(features.shape)} / mask {tuple(mask.shape)}; expected (B, T, 128) "
                "and (B, T)"
            )
        mask = mask.bool()
        h, mask = self.subsample_conv_projection(features, mask)  # (B, T', H), (B, T')
        rel_pos = relative_position_table(self.cfg, h.dtype, h.device)  # (P, H)
        allowed = block_attention_mask(self.cfg, mask)  # (B, nb, C, ctx)
        for layer in self.layers:
            h = layer(h, rel_pos, allowed)
        return self.output_proj(h), mask
