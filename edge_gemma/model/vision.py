"""Gemma 4 vision encoder: a ViT with learned 2-D position tables, 2-D axial RoPE and k x k pooling by position.

Submodule and parameter names follow transformers' `Gemma4VisionModel`, so the checkpoint's `model.vision_tower.*`
tensors load with `load_state_dict(strict=True)` (prefix stripped). The differences from the reference are about
export, not math: no boolean indexing (the pooler returns a fixed `[B, Np/k^2]` grid plus a `valid` mask instead of
stripping padding cells), no `.item()`/`.tolist()`, and the RoPE frequencies are computed in `forward` from
constants so a model built on the meta device needs no buffer re-initialisation.

Reference: transformers' `models/gemma4/modeling_gemma4.py` (`Gemma4VisionModel`). Each of these is easy to miss
and changes the output: the clip bounds of the linears (on-device tower), the `2 * (x - 0.5)` input scaling, the
summed x/y position tables, the 2-D RoPE halves (x first), no final norm, pooling by position and the sqrt(Hv) scale
in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edge_gemma.config import VisionConfig
from edge_gemma.model.layers import ClippableLinear, RMSNorm, activation, rotate_half

__all__ = ["VisionEncoder"]


class VisionPatchEmbedder(nn.Module):
    """`input_proj(2 * (pixels - 0.5)) + T[0][x] + T[1][y]`, the position term zeroed on padding patches."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * cfg.patch_size**2, cfg.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(torch.ones(2, cfg.position_embedding_size, cfg.hidden_size))

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        # pixel_values (B, Np, 3*p*p) in [0, 1]; position_ids (B, Np, 2) as (x, y), -1 on padding; padding (B, Np)
        # Gemma 4 images are not mean/std normalised: the model maps [0, 1] to [-1, 1] itself.
        pixel_values = (2 * (pixel_values - 0.5)).to(self.input_proj.weight.dtype)
        h = self.input_proj(pixel_values)  # (B, Np, Hv)
        pos = position_ids.clamp(min=0)
        pos_emb = F.embedding(pos[..., 0], self.position_embedding_table[0]) + F.embedding(
            pos[..., 1], self.position_embedding_table[1]
        )
        pos_emb = torch.where(padding.unsqueeze(-1), 0.0, pos_emb)
        return h + pos_emb


class VisionMLP(nn.Module):
    """Gated MLP: `down(act(gate(x)) * up(x))`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        clipped = cfg.use_clipped_linears
        self.gate_proj = ClippableLinear(cfg.hidden_size, cfg.intermediate_size, clipped=clipped)
        self.up_proj = ClippableLinear(cfg.hidden_size, cfg.intermediate_size, clipped=clipped)
        self.down_proj = ClippableLinear(cfg.intermediate_size, cfg.hidden_size, clipped=clipped)
        self.act_fn = activation(cfg.hidden_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def axial_rope(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables `(B, Np, head_dim)` for 2-D axial RoPE, laid out x-x-y-y.

    The head is split in two halves; the first is rotated (rotate-half style) by the x position, the second by the y
    position, each with `inv_freq[j] = theta^(-2j / (head_dim/2))`. Padding positions (-1) get angles too; their keys
    are masked, so it does not matter.
    """
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float, device=position_ids.device) / spatial))
    freqs = position_ids[..., None].float() * inv_freq  # (B, Np, 2, head_dim/4)
    fx, fy = freqs[:, :, 0], freqs[:, :, 1]
    angles = torch.cat([fx, fx, fy, fy], dim=-1)  # (B, Np, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_axial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, Np, heads, hd); cos/sin (B, Np, hd). Each half of the head is an independent rotate-half RoPE."""
    half = x.shape[-1] // 2
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    parts = []
    for lo in (0, half):
        xp, c, s = x[..., lo : lo + half], cos[..., lo : lo + half], sin[..., lo : lo + half]
        parts.append(xp * c + rotate_half(xp) * s)
    return torch.cat(parts, dim=-1)


class VisionAttention(nn.Module):
    """Bidirectional attention over all patches, padding keys masked. QK-norm (scaled), V-norm (weightless), 2-D RoPE,
    and a softmax scaling of 1.0 (the q/k norms take the place of 1/sqrt(hd))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = hd = cfg.head_dim
        clipped = cfg.use_clipped_linears
        self.q_proj = ClippableLinear(cfg.hidden_size, self.num_heads * hd, clipped=clipped)
        self.k_proj = ClippableLinear(cfg.hidden_size, self.num_kv_heads * hd, clipped=clipped)
        self.v_proj = ClippableLinear(cfg.hidden_size, self.num_kv_heads * hd, clipped=clipped)
        self.o_proj = ClippableLinear(self.num_heads * hd, cfg.hidden_size, clipped=clipped)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.v_norm = RMSNorm(hd, cfg.rms_norm_eps, with_scale=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # x (B, Np, Hv); cos/sin (B, Np, hd); bias (B, 1, 1, Np) additive: 0 valid key, dtype-min padding key
        b, n, _ = x.shape
        q = apply_axial_rope(self.q_norm(self.q_proj(x).view(b, n, -1, self.head_dim)), cos, sin).transpose(1, 2)
        k = apply_axial_rope(self.k_norm(self.k_proj(x).view(b, n, -1, self.head_dim)), cos, sin).transpose(1, 2)
        v = self.v_norm(self.v_proj(x).view(b, n, -1, self.head_dim)).transpose(1, 2)  # (B, kvh, Np, hd)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) + bias  # (B, nh, Np, Np), scaling 1.0
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, n, -1)  # (B, Np, nh*hd)
        return self.o_proj(out)


class VisionEncoderLayer(nn.Module):
    """Sandwich-norm pre/post block, as in the text decoder but without PLE or `layer_scalar`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.self_attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, bias))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class VisionTransformer(nn.Module):
    """The layer stack (transformers' `Gemma4VisionEncoder`, state-dict prefix `encoder.`). No final norm."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.head_dim, self.rope_theta = cfg.head_dim, cfg.rope_theta
        self.layers = nn.ModuleList([VisionEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])

    def forward(self, h: torch.Tensor, position_ids: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        cos, sin = axial_rope(position_ids, self.head_dim, self.rope_theta, h.dtype)
        bias = torch.where(padding, torch.finfo(h.dtype).min, 0.0).to(h.dtype)[:, None, None, :]  # (B, 1, 1, Np)
        for layer in self.layers:
            h = layer(h, cos, sin, bias)
        return h


class VisionEncoder(nn.Module):
    """pixels -> soft tokens (before `embed_vision`).

    `forward(pixel_values (B, Np, 3*p*p) in [0, 1], position_ids (B, Np, 2) long (x, y), -1 on padding)` returns
    `(soft_tokens (B, Np/k^2, Hv), valid (B, Np/k^2) bool)`. Pooling averages each k x k block of patches (by their
    x/y position, so any aspect ratio works) into cell `x//k + (W/k) * (y//k)`, then scales by sqrt(Hv) in float32,
    then standardizes when the config says so. The valid cells of an image are always the first N =
    patches/k^2; the rest (from padding patches) hold nothing and must be dropped by the caller.
    The soft tokens come back in the weights' dtype, as in the reference (which scales in float32, then casts).
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedder = VisionPatchEmbedder(cfg)
        self.encoder = VisionTransformer(cfg)
        if cfg.standardize:
            self.register_buffer("std_bias", torch.zeros(cfg.hidden_size))
            self.register_buffer("std_scale", torch.ones(cfg.hidden_size))

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        k = cfg.pooling_kernel_size
        batch, num_patches, patch_dim = pixel_values.shape
        if patch_dim != 3 * cfg.patch_size**2 or position_ids.shape != (batch, num_patches, 2):
            raise ValueError(
                f"VisionEncoder: pixel_values {tuple(pixel_values.shape)} / position_ids {tuple(position_ids.shape)}; "
                f"expected (B, Np, {3 * cfg.patch_size**2}) and (B, Np, 2)"
            )
        if num_patches % (k * k):
            raise ValueError(f"VisionEncoder: {num_patches} patches is not a multiple of pooling_kernel_size^2={k * k}")
        cells = num_patches // (k * k)

        padding = (position_ids == -1).all(dim=-1)  # (B, Np)
        h = self.patch_embedder(pixel_values, position_ids, padding)
        h = self.encoder(h, position_ids, padding)  # (B, Np, Hv)

        # Pooler: one-hot cell membership (B, Np, cells) built by comparison (exports everywhere), then a matmul.
        h = h.masked_fill(padding.unsqueeze(-1), 0.0)
        pos = position_ids.clamp(min=0)
        width = pos[..., 0].amax(dim=-1, keepdim=True) + 1  # (B, 1) patches per row
        cell_xy = torch.div(pos, k, rounding_mode="floor")
        cell = cell_xy[..., 0] + torch.div(width, k, rounding_mode="floor") * cell_xy[..., 1]  # (B, Np)
        member = cell.unsqueeze(-1) == torch.arange(cells, device=cell.device)  # (B, Np, cells)
        weights = member.float() / (k * k)
        pooled = weights.transpose(1, 2) @ h.float()  # (B, cells, Hv) float32
        valid = member.any(dim=1)  # (B, cells)
        # sqrt(Hv) scaling and standardisation in float32: the scaled values can exceed the float16 range.
        pooled = pooled.to(h.dtype).float() * cfg.hidden_size**0.5
        if cfg.standardize:
            pooled = (pooled - self.std_bias.float()) * self.std_scale.float()
        return pooled.to(h.dtype), valid
