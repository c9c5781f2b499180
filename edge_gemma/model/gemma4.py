"""The whole Gemma 4 model: text decoder, optional vision and audio towers, and the merge of their soft tokens.

Submodule names are transformers' `Gemma4Model` names (`language_model`, `vision_tower`, `audio_tower`,
`embed_vision`, `embed_audio`), so a multimodal checkpoint maps by dropping the `model.` prefix.

The pieces an exporter needs are separate methods, each its own graph:
`embed` (ids -> scaled, merged embeddings and PLE ids), `language_model.ple_rows` (the memory-mappable table lookup),
`language_model.forward` (the decoder), `encode_image`, `encode_audio` (towers + projection), `merge_soft_tokens`.
`generate_greedy` is the eager decode loop over OUR static caches, used by `verify` and the tests.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .layers import MultimodalEmbedder
from .text import TextDecoder

__all__ = ["Gemma4Model", "merge_soft_tokens"]


def merge_soft_tokens(inputs_embeds: torch.Tensor, mask: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Put `soft` `[N, H]` rows, in order, at the `True` positions of `mask` `[B, S]` (row-major), like the reference's
    `masked_scatter`, but as a gather: no data-dependent shapes, so it exports. `N` must equal `mask.sum()`."""
    B, S, H = inputs_embeds.shape
    flat = mask.reshape(-1)
    idx = (torch.cumsum(flat.to(torch.long), 0) - 1).clamp(min=0)  # (B*S,) index of the soft row for each slot
    gathered = soft.to(inputs_embeds.dtype).index_select(0, idx).view(B, S, H)
    return torch.where(mask.unsqueeze(-1), gathered, inputs_embeds)


class Gemma4Model(nn.Module):
    """`Gemma4ForConditionalGeneration` (or `Gemma4ForCausalLM` with `cfg.vision = cfg.audio = None`)."""

    def __init__(self, cfg: ModelConfig, *, max_len: int | None = None, batch_size: int = 1,
                 cache_dtype: torch.dtype = torch.float32, sliding_ring: bool = False):
        super().__init__()
        self.cfg = cfg
        text = cfg.text
        self.language_model = TextDecoder(
            text, max_len=max_len, batch_size=batch_size, cache_dtype=cache_dtype, sliding_ring=sliding_ring
        )
        self.vision_tower = self.embed_vision = None
        self.audio_tower = self.embed_audio = None
        if cfg.vision is not None:
            from .vision import VisionEncoder

            self.vision_tower = VisionEncoder(cfg.vision)
            self.embed_vision = MultimodalEmbedder(cfg.vision.hidden_size, text.hidden_size, cfg.vision.rms_norm_eps)
        if cfg.audio is not None:
            from .audio import AudioEncoder

            self.audio_tower = AudioEncoder(cfg.audio)
            self.embed_audio = MultimodalEmbedder(cfg.audio.output_proj_dims, text.hidden_size, cfg.audio.rms_norm_eps)
        self.register_buffer(
            "multimodal_token_ids", torch.tensor(cfg.multimodal_token_ids, dtype=torch.long), persistent=False
        )

    # -- towers --------------------------------------------------------------------------------------------------

    def encode_image(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """pixel_values `[B, Np, 3*p*p]`, position_ids `[B, Np, 2]` -> soft tokens `[N_valid, H]` in text space,
        images in order (padding patches dropped as the reference does)."""
        if self.vision_tower is None:
            raise ValueError("this model has no vision tower (text-only config or text_only loading)")
        soft, valid = self.vision_tower(pixel_values, position_ids)  # (B, n, Hv), (B, n)
        return self.embed_vision(soft)[valid]

    def encode_audio(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features `[B, T, 128]`, mask `[B, T]` (True = valid) -> soft tokens `[N_valid, H]` in text space."""
        if self.audio_tower is None:
            raise ValueError("this model has no audio tower (text-only config or text_only loading)")
        hidden, valid = self.audio_tower(features, mask)  # (B, T/4, out), (B, T/4)
        return self.embed_audio(hidden)[valid]

    # -- embedding ---------------------------------------------------------------------------------------------------

    def ple_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Multimodal placeholders -> pad (their PLE token part is the pad row, and they may lie beyond the PLE
        vocabulary); every other id is kept."""
        is_mm = torch.isin(input_ids, self.multimodal_token_ids)
        return torch.where(is_mm, torch.full_like(input_ids, self.cfg.text.pad_token_id), input_ids)

    def check_token_ids(self, input_ids: torch.Tensor) -> None:
        """Eager-only validation (reads values): ids must be in the vocabulary, and outside the multimodal placeholders
        in the PLE vocabulary. transformers fails with an IndexError on ids >= `vocab_size_per_layer_input`; we refuse
        them with a clear message instead of reading a wrong row."""
        text = self.cfg.text
        if input_ids.numel() == 0:
            return
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= text.vocab_size:
            raise ValueError(f"token ids must be in [0, {text.vocab_size}), found [{lo}, {hi}]")
        ple_hi = int(self.ple_ids(input_ids).max())
        if ple_hi >= text.vocab_size_per_layer_input:
            raise ValueError(
                f"token id {ple_hi} has no Per-Layer-Embedding row: vocab_size_per_layer_input is "
                f"{text.vocab_size_per_layer_input} (tokens added beyond the PLE vocabulary are not supported; "
                "transformers rejects them too)"
            )

    def embed(
        self,
        input_ids: torch.Tensor,  # (B, S)
        pixel_values: torch.Tensor | None = None,
        image_position_ids: torch.Tensor | None = None,
        audio_features: torch.Tensor | None = None,
        audio_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (inputs_embeds `[B,S,H]` with soft tokens merged, ple_ids `[B,S]`). Eager: counts are checked."""
        ple_ids = self.ple_ids(input_ids)
        embeds = self.language_model.embed(ple_ids)
        for kind, token_id, args in (
            ("image", self.cfg.image_token_id, (pixel_values, image_position_ids)),
            ("audio", self.cfg.audio_token_id, (audio_features, audio_mask)),
        ):
            if args[0] is None:
                continue
            if args[1] is None:
                raise ValueError(f"{kind} input given without its {'position ids' if kind == 'image' else 'mask'}")
            soft = self.encode_image(*args) if kind == "image" else self.encode_audio(*args)
            slots = input_ids == token_id
            if int(slots.sum()) != soft.shape[0]:
                raise ValueError(
                    f"{kind}: the prompt has {int(slots.sum())} placeholder tokens (id {token_id}) but the encoder "
                    f"produced {soft.shape[0]} soft tokens"
                )
            embeds = merge_soft_tokens(embeds, slots, soft)
        return embeds, ple_ids

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, *, last_only: bool = False,
                **multimodal: torch.Tensor | None) -> torch.Tensor:
        """Eager convenience: embed, look the PLE rows up, run the decoder -> logits."""
        embeds, ple_ids = self.embed(input_ids, **multimodal)
        return self.language_model(embeds, self.language_model.ple_rows(ple_ids), positions, last_only=last_only)

    # -- decoding ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_greedy(
        self,
        input_ids: torch.Tensor,  # (1, S)
        max_new_tokens: int,
        *,
        prefill_chunk: int | None = None,
        stop_ids: tuple[int, ...] = (),
        **multimodal: torch.Tensor | None,
    ) -> list[int]:
        """Greedy decoding. With static caches (`max_len` set): prefill (in chunks of `prefill_chunk` if given), then one
        token per step at explicit positions. Without caches: recompute the whole sequence every step (slow, the
        reference point for the cached path)."""
        self.check_token_ids(input_ids)
        lm = self.language_model
        S = input_ids.shape[1]
        out: list[int] = []
        if lm.max_len is None:
            ids = input_ids
            for _ in range(max_new_tokens):
                logits = self(ids, torch.arange(ids.shape[1]), last_only=True, **multimodal)
                tok = int(logits[0, -1].argmax())
                out.append(tok)
                if tok in stop_ids:
                    break
                ids = torch.cat([ids, torch.tensor([[tok]], dtype=ids.dtype)], dim=1)
            return out
        if S + max_new_tokens > lm.max_len:
            raise ValueError(f"prompt ({S}) + new tokens ({max_new_tokens}) exceed the cache length {lm.max_len}")
        lm.reset_caches()
        embeds, ple_ids = self.embed(input_ids, **multimodal)
        rows = lm.ple_rows(ple_ids)
        step = min(prefill_chunk or S, lm.prefill_capacity or S)
        for start in range(0, S, step):
            end = min(start + step, S)
            logits = lm(embeds[:, start:end], rows[:, start:end], torch.arange(start, end), last_only=True)
        pos = S
        for _ in range(max_new_tokens):
            tok = int(logits[0, -1].argmax())
            out.append(tok)
            if tok in stop_ids or len(out) == max_new_tokens:
                break
            ids = torch.tensor([[tok]], dtype=input_ids.dtype)
            self.check_token_ids(ids)
            e, p = self.embed(ids)
            logits = lm(e, lm.ple_rows(p), torch.tensor([pos]), last_only=True)
            pos += 1
        return out
