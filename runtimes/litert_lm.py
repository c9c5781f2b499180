"""A thin adapter that runs the artifact's `litert/model.litertlm` in Google's LiteRT-LM engine (`litert_lm`).

LiteRT-LM owns the whole pipeline (tokenizer, chat template, embedding lookups, KV cache, sampling), so it cannot
serve our engine's `Backend` contract (which hands the backend embeddings and PLE rows): `open_backend` says so, and
`edge-gemma run --backend litert-lm` drives `LitertLmEngine` directly. It is the proof that an edge-gemma artifact
runs unchanged where Android apps run Gemma 4. No torch.

Images and audio: when the bundle carries LiteRT-LM's encoder sections (see export/litert/bundle.py), the engine is
opened with CPU vision/audio backends and `chat` accepts content parts in our chat format (`{"type": "image", "path":
...}`, `{"type": "audio", "path": ...}`, `{"type": "text", "text": ...}`); LiteRT-LM decodes, resizes, patchifies the
image and computes the audio log-mel itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from edge_gemma.artifact import Artifact, ArtifactError

from .base import BackendError

log = logging.getLogger(__name__)

__all__ = ["LitertLmEngine", "open_backend", "open_engine"]


def _litert_lm():
    try:
        import litert_lm
    except ImportError:
        raise BackendError("the litert-lm backend needs Google's LiteRT-LM wheel: pip install litert-lm-api") from None
    return litert_lm


def _cache_dir(bundle: Path) -> Path:
    """Where LiteRT-LM keeps its XNNPACK weight cache for `bundle`: a per-user cache (`$EDGE_GEMMA_CACHE`, else
    `$XDG_CACHE_HOME/edge-gemma`, then `litert-lm/`), keyed by the bundle's path, size and mtime; never the artifact's
    own folder, whose files its manifest lists and checksums."""
    st = bundle.stat()
    key = hashlib.sha256(f"{bundle.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    base = os.environ.get("EDGE_GEMMA_CACHE") or \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-gemma"
    root = Path(base) / "litert-lm" / key
    root.mkdir(parents=True, exist_ok=True)
    return root


class LitertLmEngine:
    """`LitertLmEngine(artifact, threads=None)`: the bundle in `litert_lm.Engine` on the CPU backend."""

    name = "litert-lm"

    def __init__(self, artifact: Artifact, threads: int | None = None):
        lm = _litert_lm()
        entry = artifact.backend_entry("litert", absent=BackendError)
        rel = entry.files.get("litertlm")
        if not rel:
            raise ArtifactError(f"{artifact.root}: backends.litert.files has no 'litertlm' bundle")
        self.path = artifact.path(rel)
        self.context = entry.context
        self._lm = lm
        sections = set((entry.get("litertlm") or {}).get("sections") or ())
        self.vision = "vision_encoder" in sections
        self.audio = "audio_encoder" in sections
        n = int(threads or 2)
        try:
            self.engine = lm.Engine(str(self.path), lm.Backend.CPU(thread_count=n),
                                    cache_dir=str(_cache_dir(self.path)),
                                    vision_backend=lm.Backend.CPU() if self.vision else None,
                                    audio_backend=lm.Backend.CPU(thread_count=n) if self.audio else None)
        except RuntimeError as exc:
            raise BackendError(f"{self.path}: LiteRT-LM refused the bundle ({exc}); its log above says why") from None

    def _sampler(self, greedy: bool, temperature: float | None, top_k: int | None, top_p: float | None,
                 seed: int | None):
        if greedy:
            return self._lm.SamplerConfig(top_k=1, temperature=0.0)
        return self._lm.SamplerConfig(top_k=top_k, top_p=top_p, temperature=temperature, seed=seed)

    def tokenize(self, text: str) -> list[int]:
        return list(self.engine.tokenize(text))

    def detokenize(self, ids: list[int]) -> str:
        return self.engine.detokenize(list(ids))

    def complete(self, text: str, *, max_new_tokens: int, greedy: bool = True, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> str:
        """Raw continuation of `text` (no chat template; LiteRT-LM prepends the bundle's start token)."""
        session = self.engine.create_session(apply_prompt_template=False, max_output_tokens=max_new_tokens,
                                             sampler_config=self._sampler(greedy, temperature, top_k, top_p, seed))
        try:
            session.run_prefill([text])
            texts = session.run_decode().texts
        finally:
            session.close()
        return texts[0] if texts else ""

    def _content(self, prompt: str | Sequence[Mapping[str, Any]]) -> str | dict[str, Any]:
        """A user message for LiteRT-LM: a plain string, or our content parts with media paths made absolute."""
        if isinstance(prompt, str):
            return prompt
        parts = []
        for i, item in enumerate(prompt):
            kind = item.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": str(item.get("text", ""))})
            elif kind in ("image", "audio"):
                if kind == "image" and not self.vision or kind == "audio" and not self.audio:
                    raise BackendError(f"{self.path}: content[{i}] is {kind}, but this .litertlm has no {kind} "
                                       "encoder sections (re-export it with this version of edge-gemma)")
                src = item.get("path") or item.get(kind)
                if not isinstance(src, (str, Path)) or not Path(src).is_file():
                    raise ValueError(f"content[{i}] ({kind}): LiteRT-LM reads media from a file path; got {src!r}")
                parts.append({"type": kind, "path": str(Path(src).resolve())})
            else:
                raise ValueError(f"content[{i}]: type {kind!r}; expected 'text', 'image' or 'audio'")
        return {"role": "user", "content": parts}

    def chat(self, prompt: str | Sequence[Mapping[str, Any]], *, system: str | None = None,
             max_new_tokens: int = 256, greedy: bool = False, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             chat_template: str | None = None) -> Iterator[str]:
        """The answer to one user message (text, or content parts with images/audio), streamed, formatted by the
        bundle's chat template (or `chat_template`, a Jinja string, instead)."""
        request = self._content(prompt)
        kwargs = {"chat_template": chat_template} if chat_template else {}
        conv = self.engine.create_conversation(system_message=system, max_output_tokens=max_new_tokens,
                                               sampler_config=self._sampler(greedy, temperature, top_k, top_p, seed),
                                               **kwargs)
        try:
            for message in conv.send_message_async(request):
                for part in message.get("content", []) if isinstance(message, dict) else []:
                    if part.get("type") == "text":
                        yield part.get("text", "")
        finally:
            conv.close()

    def close(self) -> None:
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.close()

    def __enter__(self) -> "LitertLmEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_engine(artifact: Artifact, *, threads: int | None = None) -> LitertLmEngine:
    return LitertLmEngine(artifact, threads=threads)


def open_backend(artifact: Artifact, *, threads: int | None = None):
    """The registry's hook: LiteRT-LM is a whole engine, not a `Backend`; explain how to run it instead."""
    _litert_lm()
    raise BackendError(
        f"{artifact.root}: litert-lm runs the whole .litertlm bundle itself (tokenizer, template, cache, sampling) "
        "and cannot serve edge-gemma's engine; use `edge-gemma run ARTIFACT --backend litert-lm` or "
        "edge_gemma.runtimes.litert_lm.open_engine(artifact)")
