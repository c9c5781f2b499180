"""Tiny Gemma 4 checkpoints written by the reference implementation itself (transformers' `save_pretrained`).

Two text configs that differ in layer pattern, KV heads (1 and 2), number of KV-shared layers, double-wide MLP and
sliding window (both shorter than the test prompts), plus a perturbed copy with non-unit norm weights, a non-trivial
`layer_scalar` and finite clip bounds. Every linear input size is a multiple of 128, so int4 groups of 32/64/128 fit.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 512
# Multimodal token ids live at the top of the tiny vocabulary.
TOKEN_IDS = dict(
    video_token_id=505, image_token_id=506, audio_token_id=507, boi_token_id=508, eoi_token_id=509,
    boa_token_id=510, eoa_token_index=511,
)

TEXT_VARIANTS = {
    # hybrid 2:1, one KV head, two shared layers, double-wide MLP on the shared layers, window 4
    "a": dict(
        num_hidden_layers=6, layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, global_head_dim=64,
        num_kv_shared_layers=2, use_double_wide_mlp=True, sliding_window=4,
    ),
    # hybrid 3:1, two KV heads, three shared layers, plain MLP, window 6
    "b": dict(
        num_hidden_layers=8, layer_types=["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 3 + ["full_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, global_head_dim=64,
        num_kv_shared_layers=3, use_double_wide_mlp=False, sliding_window=6,
    ),
}


def hf_config(variant: str = "a", *, vision: bool = True, audio: bool = True, text_only: bool = False):
    """A transformers `Gemma4Config` (or `Gemma4TextConfig` when `text_only`) for a tiny test model."""
    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4TextConfig, Gemma4VisionConfig

    text = Gemma4TextConfig(
        vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, hidden_size=128, hidden_size_per_layer_input=128,
        intermediate_size=256, final_logit_softcapping=30.0, max_position_embeddings=1024,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, **TEXT_VARIANTS[variant],
    )
    if text_only:
        return text
    vision_cfg = Gemma4VisionConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        head_dim=64, patch_size=16, pooling_kernel_size=3, position_embedding_size=64, use_clipped_linears=True,
    ) if vision else None
    audio_cfg = Gemma4AudioConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=2, subsampling_conv_channels=[128, 8],
        conv_kernel_size=5, output_proj_dims=128, attention_chunk_size=12, attention_context_left=13,
        attention_context_right=0,
    ) if audio else None
    return Gemma4Config(
        text_config=text.to_dict(),
        vision_config=vision_cfg.to_dict() if vision_cfg is not None else None,
        audio_config=audio_cfg.to_dict() if audio_cfg is not None else None,
        eos_token_id=[1, 106 % VOCAB],
        **TOKEN_IDS,
    )


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 1) -> None:
    """Make every parameter that initialises to a constant matter: norm weights around 1, `layer_scalar` 0.7, finite
    clip bounds, a non-zero audio `per_dim_scale`, random position tables."""
    g = torch.Generator().manual_seed(seed)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("layer_scalar"):
            tensor.fill_(0.7)
        elif name.endswith(("input_min", "output_min")):
            tensor.fill_(-0.5 if "input" in name else -0.8)
        elif name.endswith(("input_max", "output_max")):
            tensor.fill_(0.5 if "input" in name else 0.8)
        elif name.endswith("norm.weight") or "layernorm" in name or name.endswith("norm_out.weight"):
            tensor.copy_(1.0 + 0.3 * torch.randn(tensor.shape, generator=g))
        elif name.endswith("per_dim_scale"):
            tensor.copy_(0.5 * torch.randn(tensor.shape, generator=g))
        elif name.endswith("position_embedding_table"):
            tensor.copy_(0.1 * torch.randn(tensor.shape, generator=g))


def write_checkpoint(
    out: Path,
    variant: str = "a",
    *,
    seed: int = 0,
    perturbed: bool = False,
    dtype: torch.dtype = torch.float32,
    text_only: bool = False,
    vision: bool = True,
    audio: bool = True,
) -> Path:
    """Build the tiny reference model with a fixed seed and `save_pretrained` it to `out`."""
    from transformers import Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    config = hf_config(variant, vision=vision, audio=audio, text_only=text_only)
    cls = Gemma4ForCausalLM if text_only else Gemma4ForConditionalGeneration
    model = cls(config).eval()
    # Hugging Face initialises embeddings with std 0.02 and the rest small: scale weights up a little so the
    # logits are far from uniform and greedy decoding is a meaningful check.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 100)
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5))
    if perturbed:
        perturb_(model, seed + 1)
    model = model.to(dtype)
    model.save_pretrained(out)
    return out


def assistant_config(variant: str = "a", *, ordered: bool = False, layers: int = 2):
    """A tiny `Gemma4AssistantConfig` for the target of `variant`: `layers` KV-shared layers alternating sliding and
    full (the target's head sizes and KV heads), hidden 64; with `ordered`, a centroid head of 16 centroids, top 4."""
    from transformers import Gemma4AssistantConfig, Gemma4TextConfig

    tv = TEXT_VARIANTS[variant]
    text = Gemma4TextConfig(
        vocab_size=VOCAB, vocab_size_per_layer_input=0, hidden_size=64, hidden_size_per_layer_input=0,
        intermediate_size=128, num_hidden_layers=layers,
        layer_types=(["sliding_attention", "full_attention"] * layers)[:layers],
        num_attention_heads=4, num_key_value_heads=tv["num_key_value_heads"], head_dim=tv["head_dim"],
        global_head_dim=tv["global_head_dim"], num_kv_shared_layers=layers, sliding_window=tv["sliding_window"],
        final_logit_softcapping=30.0, max_position_embeddings=1024, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return Gemma4AssistantConfig(text_config=text.to_dict(), backbone_hidden_size=128, use_ordered_embeddings=ordered,
                                 num_centroids=16, centroid_intermediate_top_k=4)


def write_assistant(out: Path, variant: str = "a", *, seed: int = 0, ordered: bool = False) -> Path:
    """Build a tiny reference assistant (random weights, a random token ordering) and `save_pretrained` it."""
    from transformers import Gemma4AssistantForCausalLM

    torch.manual_seed(seed)
    model = Gemma4AssistantForCausalLM(assistant_config(variant, ordered=ordered)).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 100)
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5))
            else:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        if ordered:
            model.masked_embedding.token_ordering.copy_(torch.randperm(VOCAB, generator=g))
    model.save_pretrained(out)
    return out
