"""The Python API: open an exported artifact (or, for tests and checks, a checkpoint) and generate.

    import edge_gemma
    with edge_gemma.open("artifacts/e2b-int4", backend="onnx") as model:
        for text in model.generate([{"role": "user", "content": "Hello"}], max_new_tokens=64):
            print(text, end="", flush=True)
        print(model.last_stats.format())
        chat = model.chat(system="Be brief.")
        for text in chat.send("Hi"): ...

`open` never imports torch (a device has numpy and one backend wheel). `open_checkpoint` runs the eager reference
model (torch) behind the same interface.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from edge_gemma.artifact import Artifact
from edge_gemma.config import ModelConfig
from edge_gemma.processor import Processor
from edge_gemma.runtimes.base import Backend
from edge_gemma.runtimes.engine import Conversation, Engine, Generation, GenerationOptions, GenerationStats
from edge_gemma.runtimes.sampling import SamplingConfig

log = logging.getLogger(__name__)

__all__ = ["Model", "open", "open_checkpoint"]

Messages = str | Sequence[Mapping[str, Any]]


def _messages(messages: Messages, system: str | None = None) -> list[Mapping[str, Any]]:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    out = list(messages)
    if system:
        out.insert(0, {"role": "system", "content": system})
    return out


class Model:
    """An engine with its backend, processor and PLE table. Use as a context manager, or call `close()`."""

    def __init__(self, *, engine: Engine, config: ModelConfig, artifact: Artifact | None = None, closers=()):
        self.engine = engine
        self.config = config
        self.artifact = artifact
        self._closers = list(closers)

    @property
    def backend(self) -> Backend:
        return self.engine.backend

    @property
    def processor(self) -> Processor:
        return self.engine.processor

    @property
    def last_stats(self) -> GenerationStats | None:
        return self.engine.last_stats

    @staticmethod
    def options(
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        ignore_eos: bool = False,
        draft: str | int = "auto",
        stop: str | Sequence[str] = (),
    ) -> GenerationOptions:
        return GenerationOptions(
            max_new_tokens=max_new_tokens,
            sampling=SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                    repetition_penalty=repetition_penalty, seed=seed),
            ignore_eos=ignore_eos,
            draft=draft,
            stop=stop,
        )

    def generate(
        self,
        messages: Messages,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        system: str | None = None,
        enable_thinking: bool = False,
        **sampling: Any,
    ) -> Generation:
        """Stream the answer (text pieces). Keyword arguments: max_new_tokens, temperature, top_k, top_p, min_p,
        repetition_penalty, seed, ignore_eos, draft ("auto", "off" or 1..8 drafts per round), stop (a string or
        strings: the answer ends before the first of them, which is not shown). `.completion` (after the loop) has the tool calls and the stats."""
        return self.engine.generate(
            _messages(messages, system), tools=tools, options=self.options(**sampling), enable_thinking=enable_thinking
        )

    def chat(
        self, *, system: str | None = None, tools: Sequence[Mapping[str, Any]] | None = None, enable_thinking: bool = False
    ) -> Conversation:
        """A multi-turn conversation that keeps the KV cache between turns."""
        self.engine.reset()
        return self.engine.conversation(system=system, tools=tools, enable_thinking=enable_thinking)

    def close(self) -> None:
        for close in reversed(self._closers):
            try:
                close()
            except Exception:  # noqa: BLE001 - closing must not mask the caller's exception
                log.debug("error while closing", exc_info=True)
        self._closers = []

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _stop_ids(config: ModelConfig) -> tuple[int, ...]:
    return tuple(sorted({*config.eos_token_id, *config.text.eos_token_id}))


def backend_files(art: Artifact, backend: str) -> list[str]:
    """The artifact paths (files or folders) a backend reads: its folder; for LiteRT, our engine's models or
    LiteRT-LM's bundle, not both."""
    from edge_gemma.runtimes.registry import BACKENDS

    folder = BACKENDS[backend][1]
    if backend not in ("litert", "litert-lm"):
        return [folder]
    files = art.backend_entry(folder).files
    if backend == "litert-lm":
        return [files["litertlm"]]
    return [rel for key, rel in files.items() if rel and key != "litertlm"]


def open(  # noqa: A001 - `edge_gemma.open(...)` is the public name
    artifact: str | Path,
    *,
    backend: str | None = None,
    threads: int | None = None,
    prefill_chunk: int | None = None,
    max_soft_tokens: int = 280,
) -> Model:
    """Open an exported artifact with `backend` (default: the first of onnx, litert, executorch it holds and that
    imports here)."""
    from edge_gemma.ple import PleTable
    from edge_gemma.runtimes.registry import open_backend, resolve_backend

    art = Artifact(artifact)
    manifest = art.manifest
    try:
        config = ModelConfig.from_dict(manifest["model"]["config"])
        ple_entry = manifest["ple"]
        tok_dir = manifest["tokenizer"]["dir"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{art.root / 'manifest.json'}: missing field {exc}") from None
    backend = resolve_backend(art, backend)
    art.check_sha256([*backend_files(art, backend), ple_entry["file"], tok_dir])  # before anything reads them
    processor = Processor.from_dir(art.folder(tok_dir, "tokenizer.dir"), max_soft_tokens=max_soft_tokens)
    ple = PleTable(art.path(ple_entry["file"]), ple_entry)
    try:
        be = open_backend(art, backend, threads=threads)
    except BaseException:
        ple.close()
        raise
    engine = Engine(
        be, processor, ple, pad_token_id=config.text.pad_token_id, multimodal_token_ids=config.multimodal_token_ids,
        stop_token_ids=_stop_ids(config), prefill_chunk=prefill_chunk,
    )
    return Model(engine=engine, config=config, artifact=art, closers=[ple.close, be.close])


def open_checkpoint(
    checkpoint: str | Path,
    *,
    context: int = 1024,
    prefill_chunk: int = 512,
    tokenizer_dir: str | Path | None = None,
    max_soft_tokens: int = 280,
    threads: int | None = None,
    drafter: str | Path | bool | None = None,
) -> Model:
    """The eager reference model (torch) on a float or quantized checkpoint, behind the same API. `threads` sets
    torch's (process-wide) intra-op thread count. `drafter`: a Gemma 4 assistant checkpoint directory for speculative
    decoding; None: the embedded model's own drafter for `default`, none otherwise; False: none."""
    from edge_gemma.eager_backend import EagerBackend
    from edge_gemma.paths import DEFAULT_CHECKPOINT, DEFAULT_DRAFTER, resolve_checkpoint

    if threads:
        import torch

        torch.set_num_threads(int(threads))

    path = resolve_checkpoint(checkpoint)
    if drafter is None:
        drafter = DEFAULT_DRAFTER if path == DEFAULT_CHECKPOINT else False
    be = EagerBackend.from_checkpoint(path, context=context, max_prefill_chunk=prefill_chunk,
                                      drafter=None if drafter is False else drafter)
    config = be.config
    processor = Processor.from_dir(tokenizer_dir or path, max_soft_tokens=max_soft_tokens)
    engine = Engine(
        be, processor, be.ple_source(), pad_token_id=config.text.pad_token_id,
        multimodal_token_ids=config.multimodal_token_ids, stop_token_ids=_stop_ids(config),
    )
    return Model(engine=engine, config=config, closers=[be.close])
