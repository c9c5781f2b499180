"""Gemma 4 tokenizer without torch: ``tokenizers`` (tokenizer.json) or ``sentencepiece`` (tokenizer.model).

Why this module exists: the device runtime has numpy and one backend wheel, not transformers. Token ids must be
exactly what ``transformers``' ``GemmaTokenizer`` produces, so the model sees the inputs it was trained on.

Two rules that keep us in step with the reference:

* **Special-token ids are looked up by string** in the loaded vocabulary (``<bos>``, ``<|turn>``, ``<|image|>`` ...),
  never written as numbers here, so any tokenizer.json that carries the Gemma 4 special tokens works (the real
  262144-token vocabulary and the small vocabulary of the embedded default model alike). The names ``bos_token``,
  ``eos_token``, ``pad_token`` and ``unk_token`` and an ``extra_special_tokens`` mapping in tokenizer_config.json
  override the default strings.
* **Exactly one ``<bos>`` per prompt.** tokenizer_config.json says ``add_bos_token: true`` and the post-processor of
  tokenizer.json prepends ``<bos>``, but the chat template also emits ``<bos>``. ``transformers``'
  ``apply_chat_template(tokenize=True)`` encodes the rendered prompt without special tokens, and
  ``Gemma4Processor.apply_chat_template`` turns ``add_special_tokens`` off when the prompt starts with ``<bos>``; the
  reference therefore yields one ``<bos>``. :meth:`Tokenizer.encode` never adds special tokens unless asked
  (``add_bos=True``), and :meth:`Tokenizer.encode_prompt` adds one only when the text does not already start with it.

The tokenizer.json may also be stored xz-compressed (``tokenizer.json.xz``, as in the test data), and is then
decompressed in memory with Python's ``lzma``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import lzma
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "SPECIAL_TOKEN_STRINGS",
    "SpecialTokens",
    "StreamDecoder",
    "Tokenizer",
    "TokenizerError",
]


class TokenizerError(ValueError):
    """A tokenizer directory or file is missing, unreadable or lacks a required Gemma 4 special token."""


# Field of SpecialTokens -> the token string of the Gemma 4 format (chat_template.jinja and the HF converter's
# ``extra_special_tokens``). Names in brackets are the tokenizer_config.json keys that may override a string.
SPECIAL_TOKEN_STRINGS: dict[str, str] = {
    "pad": "<pad>",  # [pad_token]
    "eos": "<eos>",  # [eos_token]
    "bos": "<bos>",  # [bos_token]
    "unk": "<unk>",  # [unk_token]
    "turn_start": "<|turn>",  # [sot_token]
    "turn_end": "<turn|>",  # [eot_token]
    "boi": "<|image>",  # [boi_token]  begin of image block
    "image": "<|image|>",  # [image_token]  one image soft token (also the template's placeholder)
    "eoi": "<image|>",  # [eoi_token]
    "boa": "<|audio>",  # [boa_token]
    "audio": "<|audio|>",  # [audio_token]
    "eoa": "<audio|>",  # [eoa_token]
    "video": "<|video|>",  # registered by Gemma4Processor
    "tool_start": "<|tool>",  # [std_token]  tool declaration
    "tool_end": "<tool|>",  # [etd_token]
    "tool_call_start": "<|tool_call>",  # [stc_token]
    "tool_call_end": "<tool_call|>",  # [etc_token]
    "tool_response_start": "<|tool_response>",  # [str_token]
    "tool_response_end": "<tool_response|>",  # [etr_token]
    "escape": '<|"|>',  # [escape_token]  string quote inside tool declarations/calls
    "think": "<|think|>",  # [think_token]
    "channel_start": "<|channel>",  # [soc_token]
    "channel_end": "<channel|>",  # [eoc_token]
}

# tokenizer_config.json keys (top level or inside ``extra_special_tokens``) that name one of the strings above.
_CONFIG_KEYS: dict[str, str] = {
    "pad_token": "pad",
    "eos_token": "eos",
    "bos_token": "bos",
    "unk_token": "unk",
    "sot_token": "turn_start",
    "eot_token": "turn_end",
    "boi_token": "boi",
    "image_token": "image",
    "eoi_token": "eoi",
    "boa_token": "boa",
    "audio_token": "audio",
    "eoa_token": "eoa",
    "video_token": "video",
    "std_token": "tool_start",
    "etd_token": "tool_end",
    "stc_token": "tool_call_start",
    "etc_token": "tool_call_end",
    "str_token": "tool_response_start",
    "etr_token": "tool_response_end",
    "escape_token": "escape",
    "think_token": "think",
    "soc_token": "channel_start",
    "eoc_token": "channel_end",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpecialTokens:
    """Ids of the Gemma 4 special tokens, each looked up by its string in the loaded vocabulary."""

    pad: int
    eos: int
    bos: int
    unk: int
    turn_start: int
    turn_end: int
    boi: int
    image: int
    eoi: int
    boa: int
    audio: int
    eoa: int
    video: int
    tool_start: int
    tool_end: int
    tool_call_start: int
    tool_call_end: int
    tool_response_start: int
    tool_response_end: int
    escape: int
    think: int
    channel_start: int
    channel_end: int

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Generation stops on these (the HF converter's generation_config: ``<eos>``, ``<turn|>``, ``<|tool_response>``).

        ``<|tool_response>`` is a stop token because after a tool call the caller, not the model, writes the response.
        """
        return (self.eos, self.turn_end, self.tool_response_start)


def _token_strings(config: dict) -> dict[str, str]:
    """The string of every special token: defaults, overridden by tokenizer_config.json names."""
    strings = dict(SPECIAL_TOKEN_STRINGS)
    sources = [config, config.get("extra_special_tokens") or {}]
    for source in sources:
        if not isinstance(source, dict):
            continue
        for key, field in _CONFIG_KEYS.items():
            value = source.get(key)
            if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
                value = value.get("content")
            if isinstance(value, str) and value:
                strings[field] = value
    return strings


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


class _HFBackend:
    """``tokenizers.Tokenizer`` loaded from tokenizer.json (optionally .xz)."""

    def __init__(self, path: Path):
        import tokenizers

        try:
            if path.name.endswith(".xz"):
                with lzma.open(path, "rt", encoding="utf-8") as f:
                    self._tok = tokenizers.Tokenizer.from_str(f.read())
            else:
                self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # lzma.LZMAError, OSError, or the plain Exception tokenizers raises on bad JSON
            raise TokenizerError(f"{path}: cannot load tokenizer ({type(e).__name__}: {e})") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, plain: bool = False) -> list[int]:
        # add_special_tokens=False: the post-processor would prepend <bos>; see the module docstring. `plain`: special
        # token strings are encoded as the text they spell (transformers' `split_special_tokens=True`).
        _check_unicode(text)
        if not plain:
            return self._tok.encode(text, add_special_tokens=False).ids
        self._tok.encode_special_tokens = True
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = False

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def special_ids(self) -> set[int]:
        return {tok_id for tok_id, tok in self._tok.get_added_tokens_decoder().items() if tok.special}


class _SentencePieceBackend:
    """``sentencepiece`` model. SentencePiece matches user-defined pieces in text itself but never emits control
    pieces (``<bos>`` ...) from text, so those are split out first, as ``transformers`` does."""

    def __init__(self, path: Path):
        try:
            import sentencepiece as spm
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise TokenizerError(f"{path}: reading a SentencePiece model needs the `sentencepiece` package") from e
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: cannot load SentencePiece model ({e})") from e
        self.vocab_size = self._sp.GetPieceSize()
        self._control = {i for i in range(self.vocab_size) if self._sp.IsControl(i) or self._sp.IsUnknown(i)}
        self.skip_ids: set[int] = set(self._control)  # Tokenizer adds the Gemma special ids
        pieces = sorted((self._sp.IdToPiece(i) for i in self._control), key=len, reverse=True)
        pieces = [p for p in pieces if p]
        self._split = re.compile("(" + "|".join(re.escape(p) for p in pieces) + ")") if pieces else None

    def token_to_id(self, token: str) -> int | None:
        token_id = self._sp.PieceToId(token)
        if token_id == self._sp.unk_id() and token != self._sp.IdToPiece(token_id):
            return None
        return token_id

    def id_to_token(self, token_id: int) -> str | None:
        return self._sp.IdToPiece(token_id) if 0 <= token_id < self.vocab_size else None

    def encode(self, text: str, plain: bool = False) -> list[int]:
        if plain:  # SentencePiece never emits a control piece from text
            return list(self._sp.EncodeAsIds(text))
        parts = self._split.split(text) if self._split else [text]
        ids: list[int] = []
        for i, part in enumerate(parts):
            if not part:
                continue
            if i % 2 == 1:  # a matched control piece
                ids.append(self._sp.PieceToId(part))
            else:
                ids.extend(self._sp.EncodeAsIds(part))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        # DecodeIds drops control pieces; keep them as text unless asked to skip, as tokenizers does.
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._control or (skip_special_tokens and i in self.skip_ids):
                if run:
                    out.append(self._sp.DecodeIds(run))
                    run = []
                if not (skip_special_tokens and i in self.skip_ids):
                    out.append(self._sp.IdToPiece(i))
            else:
                run.append(int(i))
        if run:
            out.append(self._sp.DecodeIds(run))
        return "".join(out)

    def special_ids(self) -> set[int]:
        return set(self._control)


def _check_unicode(text: str) -> None:
    """Refuse a string that is not valid Unicode text (lone surrogates: undecodable bytes read with surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TokenizerError(f"the text is not valid Unicode (character {exc.start} is a lone surrogate: bytes that "
                             "were not UTF-8?)") from None


def split_marked(text: str, marks: tuple[str, str]) -> list[str]:
    """``text`` split at balanced ``marks``: [outside, inside, outside, inside, ..., outside]."""
    start, end = marks
    parts, pos = [], 0
    while True:
        a = text.find(start, pos)
        if a < 0:
            parts.append(text[pos:])
            return parts
        b = text.find(end, a + len(start))
        if b < 0:
            raise TokenizerError("a rendered prompt has an unclosed user-text mark (the chat template cut it)")
        parts += [text[pos:a], text[a + len(start):b]]
        pos = b + len(end)


class Tokenizer:
    """Text <-> token ids for Gemma 4, plus the chat template that came with the checkpoint."""

    def __init__(self, backend, *, config: dict, chat_template: str | None, source: str):
        self._backend = backend
        self.config = config
        self.chat_template = chat_template
        self.source = source
        self.token_strings = _token_strings(config)
        ids: dict[str, int] = {}
        missing = []
        for field, token in self.token_strings.items():
            token_id = backend.token_to_id(token)
            if token_id is None:
                missing.append(f"{field}={token!r}")
            else:
                ids[field] = token_id
        if missing:
            raise TokenizerError(
                f"{source}: the vocabulary lacks Gemma 4 special token(s) {', '.join(missing)}; "
                "a Gemma 4 tokenizer must define all of them"
            )
        self.special = SpecialTokens(**ids)
        self._special_ids = backend.special_ids() | set(ids.values())
        if isinstance(backend, _SentencePieceBackend):
            backend.skip_ids |= set(ids.values())

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load ``tokenizer.json`` (or ``tokenizer.json.xz``, or ``tokenizer.model``) with
        ``tokenizer_config.json`` and ``chat_template.jinja`` when present (the template may also be the
        ``chat_template`` string of tokenizer_config.json)."""
        root = Path(path)
        if not root.is_dir():
            raise TokenizerError(f"{root}: not a directory (expected tokenizer.json or tokenizer.model inside)")
        config_path = root / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.exists() else {}
        for name, kind in (("tokenizer.json", "hf"), ("tokenizer.json.xz", "hf"), ("tokenizer.model", "sp")):
            file = root / name
            if file.exists():
                backend = _HFBackend(file) if kind == "hf" else _SentencePieceBackend(file)
                break
        else:
            raise TokenizerError(f"{root}: found none of tokenizer.json, tokenizer.json.xz, tokenizer.model")
        template_path = root / "chat_template.jinja"
        template = None
        if template_path.exists():
            template = template_path.read_text(encoding="utf-8")
        elif isinstance(config.get("chat_template"), str):
            template = config["chat_template"]
        logger.debug("loaded tokenizer from %s (%d tokens)", file, backend.vocab_size)
        return cls(backend, config=config, chat_template=template, source=str(file))

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, *, config: dict | None = None, chat_template: str | None = None
    ) -> Tokenizer:
        """Load one tokenizer file (``.json``, ``.json.xz`` or SentencePiece ``.model``)."""
        file = Path(path)
        if not file.is_file():
            raise TokenizerError(f"{file}: no such tokenizer file")
        backend = _SentencePieceBackend(file) if file.suffix == ".model" else _HFBackend(file)
        return cls(backend, config=dict(config or {}), chat_template=chat_template, source=str(file))

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    @property
    def bos_token(self) -> str:
        return self.token_strings["bos"]

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """What ``transformers`` passes to a chat template (``bos_token``, ``eos_token``, ...)."""
        keys = {"bos": "bos_token", "eos": "eos_token", "pad": "pad_token", "unk": "unk_token"}
        out = {name: self.token_strings[field] for field, name in keys.items()}
        out.update({k: self.token_strings[f] for k, f in _CONFIG_KEYS.items() if k not in out})
        return out

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``. Special-token strings in the text become their ids. No ``<bos>`` unless asked."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects str, got {type(text).__name__}")
        ids = self._backend.encode(text)
        return [self.special.bos, *ids] if add_bos else ids

    def encode_prompt(self, text: str, marks: tuple[str, str] | None = None) -> list[int]:
        """Ids of a rendered prompt with exactly one leading ``<bos>`` (added only if the text lacks it). With
        ``marks`` (``chat.render(mark_user_text=...)``), what lies between a pair of marks is user text, encoded as
        plain text (a special token typed by a user stays text) and the marks themselves are dropped."""
        if marks is None:
            ids = self._backend.encode(text)
        else:
            ids = []
            for i, part in enumerate(split_marked(text, marks)):
                if part:
                    ids.extend(self._backend.encode(part, plain=i % 2 == 1))
        if ids and ids[0] == self.special.bos:
            return ids
        return [self.special.bos, *ids]

    def encode_plain(self, text: str) -> list[int]:
        """Ids of ``text`` with every special-token string encoded as the text it spells."""
        return self._backend.encode(text, plain=True)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def stream_decoder(self, *, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get text pieces that are never a broken UTF-8 sequence.

    Gemma's byte-fallback tokens (``<0xE2>``...) each carry one byte of a UTF-8 character; decoding a partial
    sequence yields U+FFFD. The decoder holds such tokens back until the character completes (at most 4 bytes),
    then emits it. The decoder of the Gemma tokenizer (replace ``▁``, byte fallback, fuse) is otherwise
    concatenative, so the pieces joined equal ``decode(all_ids)``.
    """

    _MAX_PENDING = 4  # a UTF-8 character has at most 4 bytes, one byte-fallback token each

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._pending: list[int] = []

    def feed(self, token_id: int) -> str:
        """Add one id; return the text that is now complete ("" while a character is incomplete)."""
        self._pending.append(int(token_id))
        text = self._tok.decode(self._pending, skip_special_tokens=self._skip)
        if text.endswith("\ufffd") and len(self._pending) < self._MAX_PENDING:
            return ""
        self._pending = []
        return text

    def feed_many(self, ids: Iterable[int]) -> Iterator[str]:
        for i in ids:
            piece = self.feed(i)
            if piece:
                yield piece

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the end of generation decodes to U+FFFD)."""
        if not self._pending:
            return ""
        text = self._tok.decode(self._pending, skip_special_tokens=self._skip)
        self._pending = []
        return text
