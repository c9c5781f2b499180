"""One object that turns a conversation into model inputs: token ids, image patches, audio features and masks.

``Processor`` is the numpy counterpart of ``transformers``' ``Gemma4Processor.apply_chat_template(tokenize=True)``:
render the checkpoint's chat template (:mod:`edge_gemma.chat`), tokenize it with exactly one ``<bos>``
(:mod:`edge_gemma.tokenizer`), then expand every placeholder the template wrote, in order:

* ``<|image|>`` -> ``<|image>`` + N x ``<|image|>`` + ``<image|>``, N from the image size and the token budget
  (:mod:`edge_gemma.image`);
* ``<|audio|>`` -> ``<|audio>`` + N x ``<|audio|>`` + ``<audio|>`` per 30 s chunk, N = 25 per second
  (:mod:`edge_gemma.audio`; audio longer than 30 s becomes several consecutive blocks, see its long-audio policy).

Expansion works on ids, which is equivalent to the reference's text replacement because every placeholder is a
single special token. Media come from the content items: an image item's ``image``/``path`` (Pillow image, path or
bytes), an audio item's ``audio``/``path`` (path, or array with an optional ``sample_rate``). URLs are refused:
the device has no network.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_gemma import audio as audio_mod
from edge_gemma import chat
from edge_gemma import image as image_mod
from edge_gemma.tokenizer import SpecialTokens, Tokenizer

logger = logging.getLogger(__name__)

__all__ = ["ProcessedPrompt", "Processor", "ProcessorError", "expand_media_tokens", "stack_audio"]

# mm_token_type_ids values of the reference processor
TEXT, IMAGE, VIDEO, AUDIO = 0, 1, 2, 3


class ProcessorError(ValueError):
    """Media items and placeholders do not match, or a media item is malformed."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProcessedPrompt:
    """Everything the model needs for one conversation."""

    text: str  # the rendered prompt, placeholders not yet expanded
    input_ids: np.ndarray  # (S,) int64, one leading <bos>
    mm_token_type_ids: np.ndarray  # (S,) int64: 0 text, 1 image soft token, 3 audio soft token
    pixel_values: np.ndarray  # (num_images, max_patches, 768) float32 (num_images may be 0)
    image_position_ids: np.ndarray  # (num_images, max_patches, 2) int64, (-1, -1) on padding
    num_soft_tokens_per_image: tuple[int, ...]
    audio_features: tuple[np.ndarray, ...]  # one (T_i, 128) float32 per 30 s chunk, in prompt order
    audio_masks: tuple[np.ndarray, ...]  # one (T_i,) bool per chunk
    num_soft_tokens_per_audio: tuple[int, ...]  # per chunk


def expand_media_tokens(
    ids: Sequence[int],
    special: SpecialTokens,
    image_tokens: Sequence[int],
    audio_tokens: Sequence[Sequence[int]],
) -> tuple[list[int], list[int]]:
    """Expand each ``<|image|>`` / ``<|audio|>`` placeholder id in order.

    ``image_tokens[i]`` is the soft-token count of the i-th image; ``audio_tokens[j]`` lists the counts of the j-th
    audio item's chunks. Returns the expanded ids and their ``mm_token_type_ids``.
    """
    n_img = sum(1 for i in ids if i == special.image)
    n_aud = sum(1 for i in ids if i == special.audio)
    if n_img != len(image_tokens):
        raise ProcessorError(f"prompt has {n_img} image placeholder(s) but {len(image_tokens)} image(s) were given")
    if n_aud != len(audio_tokens):
        raise ProcessorError(f"prompt has {n_aud} audio placeholder(s) but {len(audio_tokens)} audio clip(s) were given")
    out: list[int] = []
    kinds: list[int] = []
    images, audios = iter(image_tokens), iter(audio_tokens)
    for token in ids:
        if token == special.image:
            n = int(next(images))
            out += [special.boi, *([special.image] * n), special.eoi]
            kinds += [TEXT, *([IMAGE] * n), TEXT]
        elif token == special.audio:
            for n in next(audios):
                out += [special.boa, *([special.audio] * int(n)), special.eoa]
                kinds += [TEXT, *([AUDIO] * int(n)), TEXT]
        else:
            out.append(int(token))
            kinds.append(TEXT)
    return out, kinds


def stack_audio(features: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Pad per-chunk features to the longest: ``(N, T, 128)`` float32 and ``(N, T)`` bool, zeros/False behind.

    Identical to the reference processor's batch, which pads the waveforms to the longest before framing
    (padding frames are invalid and zeroed there too).
    """
    if not features:
        return np.zeros((0, 0, audio_mod.NUM_MEL), np.float32), np.zeros((0, 0), bool)
    t = max(f.shape[0] for f in features)
    feats = np.zeros((len(features), t, audio_mod.NUM_MEL), np.float32)
    mask = np.zeros((len(features), t), bool)
    for i, (f, m) in enumerate(zip(features, masks)):
        feats[i, : f.shape[0]] = f
        mask[i, : m.shape[0]] = m
    return feats, mask


def _media_source(item: Mapping[str, Any], keys: Sequence[str], where: str):
    for key in keys:
        if key in item and item[key] is not None:
            value = item[key]
            if isinstance(value, str) and value.startswith(("http://", "https://")):
                raise ProcessorError(f"{where}.{key}: URLs are not fetched on device ({value!r}); pass a file or data")
            return value
    if "url" in item:
        raise ProcessorError(f"{where}.url: URLs are not fetched on device; pass a file path or the data")
    raise ProcessorError(f"{where}: expected one of the keys {list(keys)} holding the media")


USER_TEXT_MARKS = ("\ue000", "\ue001")  # private-use characters around a random nonce: never in a real prompt


class Processor:
    """Tokenizer + chat template + image and audio preprocessing for one checkpoint or artifact directory."""

    def __init__(self, tokenizer: Tokenizer, *, chat_template: str | None = None, max_soft_tokens: int = 280):
        template = chat_template if chat_template is not None else tokenizer.chat_template
        if not template:
            raise ProcessorError(f"{tokenizer.source}: no chat template (chat_template.jinja) found")
        image_mod.target_size(1, 1, max_soft_tokens)  # validates the budget
        self.tokenizer = tokenizer
        self.chat_template = template
        self.max_soft_tokens = max_soft_tokens

    @classmethod
    def from_dir(cls, path: str | os.PathLike, *, max_soft_tokens: int = 280) -> Processor:
        return cls(Tokenizer.from_dir(Path(path)), max_soft_tokens=max_soft_tokens)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
        mark_user_text: tuple[str, str] | None = None,
    ) -> str:
        return chat.render(
            messages,
            self.chat_template,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            bos_token=self.tokenizer.bos_token,
            special_tokens=self.tokenizer.special_tokens_map,
            mark_user_text=mark_user_text,
        )

    def __call__(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
    ) -> ProcessedPrompt:
        # User text is text: the template's output marks where each user/system text lies, and the tokenizer encodes
        # those spans with special-token strings spelled out (a typed "<|turn>" or "<|image|>" is not a control token)
        marks = (USER_TEXT_MARKS[0] + secrets.token_hex(4), secrets.token_hex(4) + USER_TEXT_MARKS[1])
        marked = self.render(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                             enable_thinking=enable_thinking, mark_user_text=marks)
        text = marked.replace(marks[0], "").replace(marks[1], "")
        images: list[image_mod.ImagePatches] = []
        audio_chunks: list[list[audio_mod.AudioFeatures]] = []
        for i, message in enumerate(messages):
            content = message.get("content")
            if isinstance(content, str) or not content:
                continue
            for j, item in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                kind = item.get("type")
                if kind == "image":
                    source = _media_source(item, ("image", "path"), where)
                    try:
                        images.append(image_mod.preprocess(source, self.max_soft_tokens))
                    except image_mod.ImageError as e:
                        raise image_mod.ImageError(f"{where}: {e}") from e
                elif kind == "audio":
                    source = _media_source(item, ("audio", "path"), where)
                    try:
                        wave = audio_mod.load_audio(source, item.get("sample_rate"))
                    except audio_mod.AudioError as e:
                        raise audio_mod.AudioError(f"{where}: {e}") from e
                    audio_chunks.append(audio_mod.audio_features(wave))
                elif kind == "video":
                    raise ProcessorError(f"{where}: video input is not supported by this runtime")
        ids = self.tokenizer.encode_prompt(marked, marks)
        ids, kinds = expand_media_tokens(
            ids,
            self.tokenizer.special,
            [p.num_soft_tokens for p in images],
            [[c.num_tokens for c in chunks] for chunks in audio_chunks],
        )
        max_patches = self.max_soft_tokens * image_mod.POOLING_KERNEL**2
        patch_dim = image_mod.PATCH_SIZE**2 * 3
        chunks = [c for item in audio_chunks for c in item]
        return ProcessedPrompt(
            text=text,
            input_ids=np.asarray(ids, np.int64),
            mm_token_type_ids=np.asarray(kinds, np.int64),
            pixel_values=(
                np.stack([p.pixel_values for p in images]) if images else np.zeros((0, max_patches, patch_dim), np.float32)
            ),
            image_position_ids=(
                np.stack([p.position_ids for p in images]) if images else np.zeros((0, max_patches, 2), np.int64)
            ),
            num_soft_tokens_per_image=tuple(p.num_soft_tokens for p in images),
            audio_features=tuple(c.features for c in chunks),
            audio_masks=tuple(c.mask for c in chunks),
            num_soft_tokens_per_audio=tuple(c.num_tokens for c in chunks),
        )
