"""The backend-agnostic generation engine: prompt -> encoders -> PLE gather -> chunked prefill -> decode -> text.

Everything that is the same for ONNX Runtime, ExecuTorch, LiteRT and the eager reference lives here, in numpy:
the processors (chat template, placeholders, image and audio features), the Per-Layer-Embedding gather from the
artifact's memory-mapped `ple.bin`, the merge of image/audio soft tokens into the embeddings, positions, chunked
prefill, sampling, stop tokens, streaming detokenization, tool-call parsing and timing. A backend only runs graphs
(`runtimes/base.py`).

KV-cache reuse (prompt caching). The engine remembers, for every cache position it has filled, a key of the token
that sits there (its id; for an image or audio soft token also a digest of the media item and its index in it).
A new prompt is compared key by key with that record: the longest common prefix is kept, and only the rest is
prefilled, at its absolute positions (the backend overwrites stale slots; masks are built from positions, so what
lies beyond is never seen). At least the last prompt token is always prefilled, since its logits start decoding.
`Conversation` renders the WHOLE conversation with the chat template on every turn and relies on this: when the
template renders earlier turns exactly as they were prefilled, only the new turn is prefilled; when it does not
(the template drops a thinking block, the generated tokens re-tokenize differently), prefill restarts at the first
differing token -- never wrong, at worst slower. With the Gemma 4 template this happens once per turn: the generation
prompt ends with an empty thinking block (`<|channel>thought\n<channel|>`) that the template does not render for an
earlier answer, so each turn re-prefills the previous answer (a few dozen tokens) plus the new user turn, and
reuses everything before it.

Context policy. A prompt that does not fit the artifact's context (prompt tokens >= context) is refused with
`ContextOverflowError`, which names both numbers. In a `Conversation` the same error says to start a new
conversation, and the refused user message is removed, so the conversation stays usable: we refuse rather than
silently drop the oldest turns, because dropping turns changes what the model knows without telling the user.
Generation stops (`stop_reason="context_full"`) when the cache is full.

No torch here.
"""

from __future__ import annotations

import hashlib
import logging
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Generator, Hashable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from edge_gemma.chat import Response, ToolCallParseError, parse_response
from edge_gemma.processor import AUDIO, IMAGE, ProcessedPrompt, Processor

from .base import Backend, BackendError
from .sampling import Sampler, SamplingConfig, filtered_probs
from .speculative import DraftController, accept_sampled, parse_draft

log = logging.getLogger(__name__)

__all__ = [
    "Completion",
    "ContextOverflowError",
    "Conversation",
    "Engine",
    "EngineError",
    "Generation",
    "GenerationOptions",
    "GenerationStats",
    "peak_rss_mb",
]


BUSY = ("this engine is already generating; finish or close the previous generation first (`gen.close()`, or "
        "`with model.generate(...) as gen:`)")


class EngineError(ValueError):
    """A request the engine cannot serve (bad media counts, engine busy, ...); the message says which."""


class ContextOverflowError(EngineError):
    """The prompt (or the conversation) needs more positions than the artifact's context holds."""


class PleSource(Protocol):
    """Anything that gathers raw PLE rows: `edge_gemma.ple.PleTable`, or a model's table for the eager backend."""

    def gather(self, ids: np.ndarray) -> np.ndarray: ...  # [S] int64 -> [S, L, P] float32, unscaled


@dataclass(frozen=True, kw_only=True)
class GenerationOptions:
    max_new_tokens: int = 256
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    ignore_eos: bool = False  # keep going past stop tokens (benchmarks measure a fixed number of tokens)
    # speculative decoding: "auto" (the controller decides, when the backend has a drafter), "off", or 1..8 drafts
    # per round (an error without a drafter); greedy or sampled (speculative sampling keeps the target's distribution)
    draft: str | int = "auto"
    # stop strings: the answer ends before the first occurrence of any of them in the generated text, which is not
    # shown (streamed text holds back what could be the start of one)
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "draft", parse_draft(self.draft))
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not isinstance(x, str) or not x for x in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stop)!r}")
        object.__setattr__(self, "stop", stop)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (`getrusage`: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


@dataclass(frozen=True, kw_only=True)
class GenerationStats:
    """Timings of one generate call. Prefill speed counts only the tokens actually prefilled (not reused)."""

    prompt_tokens: int
    reused_tokens: int  # positions kept from the previous call (prompt caching)
    prefilled_tokens: int
    new_tokens: int
    encoder_ms: float  # vision + audio encoders
    ttft_s: float  # from the call to the first sampled token (processing, encoders and prefill included)
    prefill_s: float
    decode_s: float
    decode_steps: int
    peak_rss_mb: float
    stop_reason: str  # "stop_token" | "stop_string" | "max_new_tokens" | "context_full" | "interrupted"
    # speculative decoding (None when no round drafted): accepted / drafted, accepted drafts per round, drafts per round
    draft_acceptance: float | None = None
    mean_accepted_tokens: float | None = None
    draft_len: float | None = None

    @property
    def prefill_tok_s(self) -> float | None:
        return self.prefilled_tokens / self.prefill_s if self.prefill_s > 0 else None

    @property
    def decode_tok_s(self) -> float | None:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(prefill_tok_s=self.prefill_tok_s, decode_tok_s=self.decode_tok_s)
        return d

    def format(self) -> str:
        def rate(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.1f} tok/s"

        drafts = ("" if self.draft_acceptance is None else
                  f" | drafts {self.draft_len:.1f}/round, {self.draft_acceptance:.0%} accepted")
        return (
            f"prompt {self.prompt_tokens} tok ({self.reused_tokens} reused, {self.prefilled_tokens} prefilled), "
            f"{self.new_tokens} new | ttft {self.ttft_s * 1000:.0f} ms | prefill {rate(self.prefill_tok_s)} | "
            f"decode {rate(self.decode_tok_s)}{drafts} | encoders {self.encoder_ms:.0f} ms | peak RSS "
            f"{self.peak_rss_mb:.0f} MB | stop: {self.stop_reason}"
        )


@dataclass(frozen=True, kw_only=True)
class Completion:
    """A finished generation: the decoded text (special tokens kept, as `parse_response` needs), the parsed
    response (answer, thinking, tool calls), the generated ids (stop token included) and the timings."""

    text: str
    response: Response
    token_ids: tuple[int, ...]
    stats: GenerationStats


class Generation:
    """The text pieces of one generation, streamed as they are decoded. After the loop (or `result()`),
    `completion` holds the whole answer, its parsed tool calls and the timings.

    The engine runs one generation at a time. A loop that stops early leaves this one holding the engine until it
    is closed: `close()`, leaving a `with` block (`with model.generate(...) as gen: ...`), or the object being
    garbage collected. A closed, unfinished generation has no completion; `result()` then raises."""

    def __init__(self, gen: Generator[str, None, Completion]):
        self._gen = gen
        self._closed = False
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self.completion is not None or self._closed:  # finished or closed: the generator must not run again
            raise StopIteration
        try:
            return next(self._gen)
        except StopIteration as stop:
            self.completion = stop.value
            raise

    def __enter__(self) -> "Generation":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def result(self) -> Completion:
        """Run to the end (if not done yet) and return the completion."""
        for _ in self:
            pass
        if self.completion is None:
            raise EngineError("this generation was closed before it finished; it has no completion")
        return self.completion

    def close(self) -> None:
        """Stop the generation (if it is still running) and release the engine for the next one."""
        self._closed = True
        self._gen.close()


def _media_spans(kinds: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of image/audio soft tokens as (kind, start, stop), in prompt order. Consecutive items never touch:
    each is wrapped in its begin/end tokens."""
    spans, i, n = [], 0, len(kinds)
    while i < n:
        k = int(kinds[i])
        if k in (IMAGE, AUDIO):
            j = i
            while j < n and int(kinds[j]) == k:
                j += 1
            spans.append((k, i, j))
            i = j
        else:
            i += 1
    return spans


class _StopStrings:
    """Streamed text through stop strings: `feed(piece)` returns what can be shown now, holding back the longest end
    of the text that could begin a stop string; once one occurs (`hit`), the text before it is all that is shown.
    `text`: everything shown (kept only when there are stop strings)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.held, self.text, self.hit = stops, "", "", False

    def feed(self, piece: str) -> str:
        if not self.stops:
            return piece  # nothing to hold back; `text` is only read when there are stop strings
        if self.hit:
            return ""
        buf = self.held + piece
        found = [i for i in (buf.find(x) for x in self.stops) if i >= 0]
        if found:
            self.hit, self.held = True, ""
            shown = buf[: min(found)]
        else:
            keep = max((n for x in self.stops for n in range(min(len(x) - 1, len(buf)), 0, -1)
                        if buf.endswith(x[:n])), default=0)
            shown, self.held = buf[: len(buf) - keep], buf[len(buf) - keep:]
        self.text += shown
        return shown

    def flush(self) -> str:
        shown, self.held = self.held, ""
        self.text += shown
        return shown


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha1()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _parse(text: str) -> Response:
    """`parse_response`, but a malformed tool call (a model's mistake) leaves the text as the answer."""
    try:
        return parse_response(text)
    except ToolCallParseError as exc:
        log.warning("the answer holds a tool call that cannot be parsed (%s); returned as text", exc)
        return Response(answer=text.strip())


class Engine:
    """Generation over one backend. Not thread-safe: one generation at a time (the KV cache is shared state)."""

    def __init__(
        self,
        backend: Backend,
        processor: Processor,
        ple: PleSource,
        *,
        pad_token_id: int,
        multimodal_token_ids: Sequence[int],
        stop_token_ids: Sequence[int] = (),
        prefill_chunk: int | None = None,
    ):
        self.backend = backend
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.ple = ple
        caps = backend.capabilities
        self.context = int(caps.context)
        self.prefill_chunk = int(min(prefill_chunk or caps.max_prefill_chunk, caps.max_prefill_chunk))
        if self.prefill_chunk < 1:
            raise BackendError(f"{backend.name}: max_prefill_chunk must be >= 1, got {caps.max_prefill_chunk}")
        self.pad_token_id = int(pad_token_id)
        self.multimodal_ids = np.asarray(sorted(set(int(i) for i in multimodal_token_ids)), np.int64)
        # <eos>, <turn|>, <|tool_response> (tokenizer) and the config's eos ids
        self.stop_ids = frozenset(int(i) for i in (*self.tokenizer.special.stop_ids, *stop_token_ids))
        self._cache_keys: list[Hashable] = []  # key of the token at each filled cache position
        self._busy = False
        self.last_stats: GenerationStats | None = None

    # ------------------------------------------------------------------------------------------ building blocks
    def ple_ids(self, ids: np.ndarray) -> np.ndarray:
        """Multimodal placeholders -> pad (their PLE token part is the pad row, as in the reference)."""
        ids = np.asarray(ids, np.int64)
        return np.where(np.isin(ids, self.multimodal_ids), self.pad_token_id, ids)

    def reset(self) -> None:
        """Forget the cache (a new conversation)."""
        self.backend.reset()
        self._cache_keys = []

    @property
    def cached_tokens(self) -> int:
        return len(self._cache_keys)

    def prepare(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        enable_thinking: bool = False,
    ) -> ProcessedPrompt:
        return self.processor(messages, tools=tools, enable_thinking=enable_thinking)

    def _keys(self, prompt: ProcessedPrompt, spans: list[tuple[int, int, int]]) -> list[Hashable]:
        keys: list[Hashable] = [int(i) for i in prompt.input_ids]
        img = aud = 0
        for kind, start, stop in spans:
            if kind == IMAGE:
                d = _digest(prompt.pixel_values[img], prompt.image_position_ids[img])
                img += 1
            else:
                d = _digest(prompt.audio_features[aud], prompt.audio_masks[aud])
                aud += 1
            for j in range(start, stop):
                keys[j] = (keys[j], d, j - start)
        return keys

    def _encode(self, prompt: ProcessedPrompt, spans, first: int) -> tuple[dict[int, np.ndarray], float]:
        """Soft tokens of every media item that reaches position `first` or beyond: {start: [N, H]}."""
        t0 = time.perf_counter()
        out: dict[int, np.ndarray] = {}
        img = aud = 0
        for kind, start, stop in spans:
            index = img if kind == IMAGE else aud
            if kind == IMAGE:
                img += 1
            else:
                aud += 1
            if stop <= first:
                continue
            if kind == IMAGE:
                if index >= len(prompt.num_soft_tokens_per_image):
                    raise EngineError(f"the prompt has more image token runs than images ({index + 1})")
                soft = self.backend.encode_image(prompt.pixel_values[index], prompt.image_position_ids[index])
                what = f"image {index}"
            else:
                if index >= len(prompt.audio_features):
                    raise EngineError(f"the prompt has more audio token runs than audio chunks ({index + 1})")
                soft = self.backend.encode_audio(prompt.audio_features[index], prompt.audio_masks[index])
                what = f"audio chunk {index}"
            soft = np.asarray(soft, np.float32)
            if soft.ndim != 2 or soft.shape[0] != stop - start:
                raise BackendError(
                    f"{self.backend.name}: the encoder returned {tuple(soft.shape)} soft tokens for {what}, "
                    f"the prompt has {stop - start} placeholders"
                )
            out[start] = soft
        return out, (time.perf_counter() - t0) * 1000.0

    # ------------------------------------------------------------------------------------------ generation
    def generate(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        options: GenerationOptions | None = None,
        enable_thinking: bool = False,
    ) -> Generation:
        """Stream the answer to `messages`. The cache is reused when this conversation extends the previous one."""
        t0 = time.perf_counter()
        prompt = self.prepare(messages, tools=tools, enable_thinking=enable_thinking)
        return Generation(self._run(prompt, options or GenerationOptions(), t0))

    def generate_ids(self, ids: Sequence[int], *, options: GenerationOptions | None = None) -> Generation:
        """Generate from raw token ids (benchmarks: a prompt of an exact length). No media."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        prompt = ProcessedPrompt(
            text="", input_ids=ids, mm_token_type_ids=np.zeros_like(ids), pixel_values=np.zeros((0, 0, 0), np.float32),
            image_position_ids=np.zeros((0, 0, 2), np.int64), num_soft_tokens_per_image=(), audio_features=(),
            audio_masks=(), num_soft_tokens_per_audio=(),
        )
        return Generation(self._run(prompt, options or GenerationOptions(), time.perf_counter()))

    def _check_fits(self, n: int) -> None:
        if n >= self.context:
            raise ContextOverflowError(
                f"the prompt has {n} tokens but the artifact's context is {self.context} positions (one more is "
                f"needed to generate); shorten the prompt or re-export with a larger --context"
            )

    def _run(self, prompt: ProcessedPrompt, options: GenerationOptions, t0: float) -> Generator[str, None, Completion]:
        """Validate now (so errors surface at the call, not at the first token), then return the generator."""
        ids = np.asarray(prompt.input_ids, np.int64)
        S = int(ids.size)
        if S == 0:
            raise EngineError("the prompt is empty")
        # media the backend cannot encode is refused before the length check: the message then says what is wrong
        caps = self.backend.capabilities
        if len(prompt.num_soft_tokens_per_image) and not caps.vision:
            raise BackendError(f"the {self.backend.name} backend of this artifact has no vision encoder "
                               "(exported --text-only?); it cannot take images")
        if len(prompt.num_soft_tokens_per_audio) and not caps.audio:
            raise BackendError(f"the {self.backend.name} backend of this artifact has no audio encoder "
                               "(exported --text-only?); it cannot take audio")
        self._check_fits(S)
        if isinstance(options.draft, int) and not caps.drafter:
            raise EngineError(f"draft={options.draft}: the {self.backend.name} backend of this artifact has no "
                              "drafter (export it with one, or use draft 'auto' / 'off')")
        if self._busy:
            raise EngineError(BUSY)
        return self._locked(prompt, ids, S, options, t0)

    def _locked(self, prompt, ids, S, options, t0) -> Generator[str, None, Completion]:
        if self._busy:  # two generations made before either started: the second to start is refused
            raise EngineError(BUSY)
        self._busy = True
        try:
            return (yield from self._run_locked(prompt, ids, S, options, t0))
        finally:
            self._busy = False

    def _run_locked(self, prompt, ids, S, options, t0) -> Generator[str, None, Completion]:
        spans = _media_spans(np.asarray(prompt.mm_token_type_ids))
        keys = self._keys(prompt, spans)
        reuse = 0
        for a, b in zip(self._cache_keys, keys[: S - 1]):  # the last prompt token is always prefilled
            if a != b:
                break
            reuse += 1
        soft, encoder_ms = self._encode(prompt, spans, reuse)

        # -- prefill positions reuse..S-1, in chunks
        t_prefill = time.perf_counter()
        ple_ids = self.ple_ids(ids)
        self._cache_keys = self._cache_keys[:reuse]
        logits = None
        for start in range(reuse, S, self.prefill_chunk):
            stop = min(start + self.prefill_chunk, S)
            emb = np.asarray(self.backend.embed(ple_ids[start:stop]), np.float32)  # (s, H)
            for s0, rows in soft.items():  # merge soft tokens that fall in this chunk
                a, b = max(start, s0), min(stop, s0 + rows.shape[0])
                if a < b:
                    emb = emb.copy() if not emb.flags.writeable else emb
                    emb[a - start : b - start] = rows[a - s0 : b - s0]
            rows_ple = self.ple.gather(ple_ids[start:stop])  # (s, L, P)
            logits = self.backend.prefill(emb, rows_ple, np.arange(start, stop, dtype=np.int64))
            self._cache_keys.extend(keys[start:stop])
        prefill_s = time.perf_counter() - t_prefill
        log.debug("prefilled %d of %d prompt tokens (%d reused)", S - reuse, S, reuse)

        # -- decode: the first token from the prefill's logits, then plain steps or speculative rounds
        sampler = Sampler(options.sampling)
        history = [int(i) for i in ids]
        decoder = self.tokenizer.stream_decoder(skip_special_tokens=False)
        limit = min(options.max_new_tokens, self.context - S)
        controller = self._controller(options)
        hidden = self.backend.last_hidden() if controller is not None else None
        out: list[int] = []
        ttft = 0.0
        decode_s = 0.0
        steps = 0
        drafted = accepted = rounds = 0
        reason = "interrupted"
        stops = _StopStrings(options.stop)
        new = [sampler(np.asarray(logits).reshape(-1), history)]
        try:
            while True:
                done = False
                for tok in new:
                    if not out:
                        ttft = time.perf_counter() - t0
                    else:
                        steps += 1
                    out.append(tok)
                    history.append(tok)
                    if tok in self.stop_ids and not options.ignore_eos:
                        reason, done = "stop_token", True
                        break
                    piece = stops.feed(decoder.feed(tok))
                    if piece:
                        yield piece
                    if stops.hit:
                        reason, done = "stop_string", True
                        break
                    if len(out) >= limit:
                        reason = "max_new_tokens" if len(out) >= options.max_new_tokens else "context_full"
                        if reason == "context_full":
                            log.warning("the context (%d positions) is full; generation stopped", self.context)
                        done = True
                        break
                if done:
                    break
                pos = S + len(out) - 1  # the last token's position: not in the cache yet
                t = time.perf_counter()
                # drafts may not run past the limit (the round adds them plus one) nor past the context
                room = min(limit - len(out) - 1, self.context - pos - 1,
                           self.backend.capabilities.max_prefill_chunk - 1)  # a verify call is one chunk
                k = controller.next_len(room) if controller else 0
                if k == 0:
                    logits = self.backend.decode(*self._token_inputs([out[-1]]), np.asarray([pos], np.int64))
                    self._cache_keys.append(out[-1])
                    new = [sampler(np.asarray(logits).reshape(-1), history)]
                    if controller is not None:
                        hidden = self.backend.last_hidden()
                        controller.record_plain(time.perf_counter() - t)
                else:
                    new, hidden, n = self._speculative_round(out[-1], hidden, pos, k, sampler, history, controller)
                    drafted, accepted, rounds = drafted + k, accepted + n, rounds + 1
                decode_s += time.perf_counter() - t
            if not stops.hit:
                tail = stops.feed(decoder.flush()) + ("" if stops.hit else stops.flush())
                if tail:
                    yield tail
                if stops.hit:
                    reason = "stop_string"
        finally:
            stats = GenerationStats(
                prompt_tokens=S, reused_tokens=reuse, prefilled_tokens=S - reuse, new_tokens=len(out),
                encoder_ms=encoder_ms, ttft_s=ttft, prefill_s=prefill_s, decode_s=decode_s, decode_steps=steps,
                peak_rss_mb=peak_rss_mb(), stop_reason=reason,
                draft_acceptance=accepted / drafted if drafted else None,
                mean_accepted_tokens=accepted / rounds if rounds else None,
                draft_len=drafted / rounds if rounds else None,
            )
            self.last_stats = stats
        text = stops.text if options.stop else self.tokenizer.decode(out)
        return Completion(text=text, response=_parse(text), token_ids=tuple(out), stats=stats)

    def _token_inputs(self, ids: Sequence[int], *, ple: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """A backend step's inputs for text tokens: embeddings `[n, H]` and raw PLE rows `[n, L, P]` (None when
        `ple` is false: a draft step reads no PLE)."""
        pid = self.ple_ids(np.asarray(ids, np.int64))
        return np.asarray(self.backend.embed(pid), np.float32), (self.ple.gather(pid) if ple else None)

    def _controller(self, options: GenerationOptions) -> DraftController | None:
        """The draft-length controller of this generation, or None for plain decoding."""
        if options.draft == "off" or not self.backend.capabilities.drafter:
            return None
        return DraftController(fixed=options.draft if isinstance(options.draft, int) else None)

    def _speculative_round(self, last: int, hidden: np.ndarray, pos: int, k: int, sampler: Sampler,
                           history: list[int], controller: DraftController) -> tuple[list[int], np.ndarray, int]:
        """Draft k tokens after `last` (at `pos`, not cached yet), verify them in one target call, and return the
        tokens to emit (the accepted drafts and the target's next token), the hidden state the next round starts
        from, and the number of accepted drafts. The cache keeps positions pos .. pos + accepted; the slots of the
        rejected drafts lie beyond them, in the future of every later query, and are overwritten later."""
        t = time.perf_counter()
        greedy = sampler.cfg.greedy
        drafts: list[int] = []
        q: list[np.ndarray] = []  # the drafter's filtered distributions (sampling)
        tok, state = last, hidden
        for _ in range(k):
            draft_logits, state = self.backend.draft(self._token_inputs([tok], ple=False)[0][0], state, pos)
            if greedy:
                tok = int(np.argmax(draft_logits))
            else:
                q.append(filtered_probs(np.asarray(draft_logits).reshape(-1), sampler.cfg, history + drafts))
                tok = int(sampler.rng.choice(q[-1].size, p=q[-1]))
            drafts.append(tok)
        t_verify = time.perf_counter()
        chunk = [last, *drafts]
        logits, hid = self.backend.verify(*self._token_inputs(chunk), np.arange(pos, pos + k + 1, dtype=np.int64))
        if greedy:
            new: list[int] = []
            for j in range(k + 1):  # the target's greedy choice after the tokens kept so far
                choice = sampler(np.asarray(logits[j]).reshape(-1), history + new)
                new.append(choice)
                if j == k or choice != drafts[j]:
                    break
        else:
            new = accept_sampled(drafts, q, lambda j, kept: filtered_probs(np.asarray(logits[j]).reshape(-1),
                                                                           sampler.cfg, history + kept), sampler.rng)
        n = len(new) - 1
        self._cache_keys.extend(chunk[: n + 1])
        # the verify side's cost: the target call and the acceptance (sampling over k + 1 rows of logits)
        controller.record_round(k, n, t_verify - t, time.perf_counter() - t_verify)
        return new, np.asarray(hid[n]), n

    # ------------------------------------------------------------------------------------------ conversations
    def conversation(
        self,
        *,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        enable_thinking: bool = False,
    ) -> "Conversation":
        return Conversation(self, system=system, tools=tools, enable_thinking=enable_thinking)


class Conversation:
    """A multi-turn chat that keeps the KV cache across turns (only each new turn is prefilled; see the module
    docstring for the reuse and context policies)."""

    def __init__(
        self,
        engine: Engine,
        *,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        enable_thinking: bool = False,
    ):
        self.engine = engine
        self.tools = list(tools) if tools else None
        self.enable_thinking = enable_thinking
        self.system = system
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        self.history: list[Completion] = []

    def reset(self) -> None:
        """Start over: forget the turns (keeps the system prompt and tools) and the cache."""
        self.messages = self.messages[:1] if self.system else []
        self.history = []
        self.engine.reset()

    def send(self, content: Any, *, options: GenerationOptions | None = None) -> Generation:
        """Add a user turn (text, or a list of content items) and stream the model's answer. When the stream ends,
        the answer (with its tool calls) is appended to the conversation."""
        t0 = time.perf_counter()
        self.messages.append({"role": "user", "content": content})
        try:
            prompt = self.engine.prepare(self.messages, tools=self.tools, enable_thinking=self.enable_thinking)
            try:
                self.engine._check_fits(int(prompt.input_ids.size))
            except ContextOverflowError:
                raise ContextOverflowError(
                    f"the conversation needs {prompt.input_ids.size} tokens but the context holds "
                    f"{self.engine.context}; start a new conversation (/reset in `edge-gemma chat`)"
                ) from None
            inner = self.engine._run(prompt, options or GenerationOptions(), t0)
        except Exception:
            self.messages.pop()
            raise
        return Generation(self._turn(inner))

    def _turn(self, inner: Generator[str, None, Completion]) -> Generator[str, None, Completion]:
        completion = yield from inner
        message: dict[str, Any] = {"role": "assistant", "content": completion.response.answer}
        if completion.response.tool_calls:
            message["tool_calls"] = [
                {"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in completion.response.tool_calls
            ]
        self.messages.append(message)
        self.history.append(completion)
        return completion

    def add_tool_responses(self, responses: Sequence[Mapping[str, Any]]) -> None:
        """Attach tool results (`[{"name": ..., "response": ...}]`) to the last assistant turn."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise EngineError("tool responses follow an assistant turn with tool calls; there is none")
        self.messages[-1]["tool_responses"] = list(responses)
