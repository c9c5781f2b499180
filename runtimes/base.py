"""The backend interface: what the engine asks of ONNX Runtime, ExecuTorch, LiteRT and LiteRT-LM alike.

A backend owns its graphs and its KV cache (ONNX passes caches in and out of the session, ExecuTorch keeps them in
mutable buffers, LiteRT-LM keeps its own); the engine never touches a cache tensor. The engine owns everything that
is the same for every backend: the processors (prompt format, placeholders, features), the PLE gather from the
artifact's memory-mapped `ple.bin`, the merge of image/audio soft tokens into the embeddings, positions, sampling,
stop tokens and streaming.

Contract, all numpy, batch size 1 (shapes without the batch dimension):

* `embed(ids [S] int64) -> [S, H] float32`: the main embedding, already multiplied by sqrt(H) (Gemma's
  `embed_scale`), before any soft token is merged in.
* `prefill(embeds [S, H] float32, ple_rows [S, L, P] float32, positions [S] int64) -> logits [V] float32`:
  runs S tokens at the given absolute positions (S <= `capabilities.max_prefill_chunk`), writes their K/V into the
  cache-owning layers' caches, returns the final-softcapped logits of the LAST position. `ple_rows` are the raw rows
  of the PLE table for the tokens (placeholder ids replaced by pad), NOT yet multiplied by sqrt(P): the graph does
  that, as the reference model does.
* `decode(embeds [1, H], ple_rows [1, L, P], positions [1]) -> logits [V]`: one token. A backend may implement it
  as `prefill` of one token; it exists separately because static-shape backends have a dedicated signature.
* `encode_image(pixel_values [Np, 3*p*p] float32, position_ids [Np, 2] int64) -> [N, H] float32`: soft tokens
  after `embed_vision`, only the valid ones (N = number of image placeholder tokens the processor emitted).
* `encode_audio(features [T, 128] float32, mask [T] bool) -> [N, H] float32`: soft tokens after `embed_audio`,
  only the valid frames (N = number of audio placeholder tokens).
* `reset()`: forget every cached position (a new conversation). Positions already written may be overwritten by a
  later `prefill`/`decode` at the same positions (the engine rewinds a conversation that way).

Speculative decoding (the engine's loop is in `engine.py`; `draft` needs `capabilities.drafter`, the other two are
target calls that a backend may offer without a drafter):

* `last_hidden() -> [H] float32`: the target's final normed hidden state at the last position of the most recent
  `prefill`/`decode` call (what the drafter's first step reads).
* `verify(embeds [n, H], ple_rows [n, L, P], positions [n]) -> (logits [n, V], hidden [n, H])`: `prefill`, but the
  logits and final normed hidden states of EVERY position (n is small: the last token and the drafts).
* `draft(token_embed [H], hidden [H], position) -> (logits [V], projected [H])`: one step of the artifact's drafter
  at `position` (the position of `token`, which the target has not run yet), reading the target's caches at the
  positions before it; `hidden` is `last_hidden()`, a row of `verify`'s hidden, or the previous step's `projected`.
  Cache slots at or beyond `position` may hold rejected drafts: they are never read (the masks are by position).

No torch here: a Raspberry Pi runs this with numpy and one backend wheel.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

__all__ = ["Backend", "BackendError", "Capabilities", "check_step_inputs"]


class BackendError(RuntimeError):
    """A backend cannot run this artifact (missing wheel, missing graph, wrong shapes); the message says which."""


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    context: int  # positions the caches hold (the artifact's context length)
    max_prefill_chunk: int  # most tokens one `prefill` call accepts
    hidden_size: int
    vocab_size: int
    vision: bool
    audio: bool
    drafter: bool = False  # `last_hidden`, `verify` and `draft` work (the artifact has a drafter)


class Backend(abc.ABC):
    """One runtime's view of an artifact. Use as a context manager, or call `close()`."""

    name: ClassVar[str]

    capabilities: Capabilities

    @abc.abstractmethod
    def embed(self, ids: np.ndarray) -> np.ndarray: ...

    @abc.abstractmethod
    def prefill(self, embeds: np.ndarray, ple_rows: np.ndarray, positions: np.ndarray) -> np.ndarray: ...

    def decode(self, embeds: np.ndarray, ple_rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self.prefill(embeds, ple_rows, positions)

    def encode_image(self, pixel_values: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        raise BackendError(f"the {self.name} backend of this artifact has no vision encoder")

    def encode_audio(self, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
        raise BackendError(f"the {self.name} backend of this artifact has no audio encoder")

    @abc.abstractmethod
    def reset(self) -> None: ...

    def last_hidden(self) -> np.ndarray:
        raise BackendError(f"the {self.name} backend of this artifact has no drafter")

    def verify(self, embeds: np.ndarray, ple_rows: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise BackendError(f"the {self.name} backend of this artifact has no drafter")

    def draft(self, token_embed: np.ndarray, hidden: np.ndarray, position: int) -> tuple[np.ndarray, np.ndarray]:
        raise BackendError(f"the {self.name} backend of this artifact has no drafter")

    def close(self) -> None:
        """Release sessions and memory maps."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_step_inputs(
    what: str, caps: Capabilities, ple_shape: tuple[int, int], embeds: np.ndarray, ple_rows: np.ndarray,
    positions: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and normalise one `prefill`/`decode` call for a backend whose graphs take a run of consecutive
    positions: -> contiguous (embeds [S, H] float32, ple_rows [S, L, P] float32, positions [S] int64)."""
    H = caps.hidden_size
    L, P = ple_shape
    embeds = np.ascontiguousarray(embeds, dtype=np.float32)
    ple_rows = np.ascontiguousarray(ple_rows, dtype=np.float32)
    positions = np.ascontiguousarray(positions, dtype=np.int64).reshape(-1)
    S = positions.size
    if embeds.shape != (S, H) or ple_rows.shape != (S, L, P):
        raise ValueError(f"{what}: embeds {embeds.shape} / ple_rows {ple_rows.shape} for {S} positions; "
                         f"expected ({S}, {H}) and ({S}, {L}, {P})")
    if not 1 <= S <= caps.max_prefill_chunk:
        raise ValueError(f"{what}: {S} tokens; this artifact takes 1..{caps.max_prefill_chunk} "
                         "per call (split the prompt into chunks)")
    p0 = int(positions[0])
    if p0 < 0 or p0 + S > caps.context or np.any(positions != np.arange(p0, p0 + S)):
        raise ValueError(f"{what}: positions must be consecutive and inside the context [0, {caps.context}); "
                         f"found {positions[:4].tolist()}{'...' if S > 4 else ''} (S={S})")
    return embeds, ple_rows, positions
