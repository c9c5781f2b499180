"""The turn loop of `edge-gemma listen`: frames -> VAD -> utterance -> conversation turn -> streamed answer.

One `Conversation` lives across turns, so the model remembers what was said and the engine prefills only the new
turn (runtimes/engine.py, prompt caching). Each utterance is one user message holding the waveform as an audio
item; the audio processor cuts one longer than 30 s into consecutive 30 s chunks (edge_gemma/audio.py,
long-audio policy), each its own `<|audio>` block in that message, so nothing is truncated. An `--image` goes
with the first turn of a conversation.

When the conversation no longer fits the artifact's context, the engine refuses the turn; with no keyboard to
type `/reset`, we say so on stderr, start a new conversation (keeping the system prompt, tools and image) and
answer the utterance there. An utterance too long for even an empty context is skipped with a message.

The microphone keeps recording while the model thinks and answers (the capture thread queues it), so a question
asked during an answer is heard. With `--speak` the answer is spoken after it has streamed, and what the
microphone heard meanwhile (the model's own voice) is discarded.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TextIO

import numpy as np

from edge_gemma.audio import SAMPLE_RATE
from edge_gemma.runtimes.engine import ContextOverflowError, Conversation, GenerationOptions

from .display import StatusLine
from .latency import TurnLatency
from .tts import Speaker
from .vad import Segmenter, SpeechStart, Utterance, level_dbfs

log = logging.getLogger(__name__)

__all__ = ["ListenOptions", "ListenSession", "dump_utterance"]


@dataclass(frozen=True, kw_only=True)
class ListenOptions:
    system: str | None = None
    tools: Sequence[Mapping[str, Any]] | None = None
    image: str | None = None  # sent with the first turn of each conversation
    enable_thinking: bool = False
    max_turns: int | None = None  # stop after this many answered turns (None: until the input ends or Ctrl-C)
    budget_device: str | None = None  # judge each turn against this device's budget (e.g. "pi5")
    budget: Mapping[str, Any] | None = None  # the budget entry for the model's variant (None: not judged)


def dump_utterance(directory: str | Path, turn: int, utterance: Utterance, audio: np.ndarray) -> Path:
    """Debug hook: write the waveform handed to the engine as `turn-NNN.npy` (float32, 16 kHz) with a
    `turn-NNN.json` telling where it lies in the input stream. Atomic (temporary file, then os.replace)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base = directory / f"turn-{turn:03d}"
    tmp = base.with_suffix(".npy.tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.asarray(audio, np.float32))
    os.replace(tmp, base.with_suffix(".npy"))
    meta = {"turn": turn, "sample_rate": SAMPLE_RATE, "start_sample": utterance.start_sample,
            "speech_end_sample": utterance.speech_end_sample, "samples": int(np.asarray(audio).size),
            "voiced_ms": utterance.voiced_ms}
    tmp = base.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, base.with_suffix(".json"))
    return base.with_suffix(".npy")


class ListenSession:
    def __init__(
        self,
        model,
        *,
        options: ListenOptions,
        generation: GenerationOptions,
        segmenter: Segmenter,
        display: StatusLine,
        out: TextIO | None = None,
        speaker: Speaker | None = None,
        on_audio: Callable[[int, Utterance, np.ndarray], None] | None = None,
    ):
        self.model = model
        self.options = options
        self.generation = generation
        self.segmenter = segmenter
        self.display = display
        self.out = out or sys.stdout
        self.speaker = speaker
        self.on_audio = on_audio
        self.turns: list[TurnLatency] = []
        self.conversation: Conversation = model.chat(system=options.system, tools=options.tools,
                                                     enable_thinking=options.enable_thinking)
        self._image_sent = False
        self._hearing = False  # the segmenter was in an utterance after the previous frame

    def _done(self) -> bool:
        return self.options.max_turns is not None and len(self.turns) >= self.options.max_turns

    def run(self, source) -> list[TurnLatency]:
        """Listen to `source` (a `MicSource` or `FileSource`) until it ends, `max_turns` are answered, or Ctrl-C."""
        self.display.set_state("listening", f"({source.name})")
        for frame, t_frame in source.frames():
            self.display.level(level_dbfs(frame))
            events = self.segmenter.feed(frame)
            for event in events:
                if isinstance(event, SpeechStart):
                    self.display.set_state("listening", "(speech)")
                else:
                    self._turn(event, t_frame, source)
                    if self._done():
                        return self.turns
                    self.display.set_state("listening", "")
            if not events and self._hearing and not self.segmenter.in_speech:
                self.display.set_state("listening", "")  # a dropped blip (too little voiced time) is no speech
            self._hearing = self.segmenter.in_speech
        for event in self.segmenter.flush():
            if isinstance(event, Utterance) and not self._done():
                self._turn(event, time.monotonic(), source)
        self.display.clear()
        return self.turns

    def _content(self, audio: np.ndarray) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = []
        if self.options.image and not self._image_sent:
            content.append({"type": "image", "path": self.options.image})
        content.append({"type": "audio", "audio": audio, "sample_rate": SAMPLE_RATE})
        return content

    def _send(self, audio: np.ndarray):
        try:
            gen = self.conversation.send(self._content(audio), options=self.generation)
        except ContextOverflowError as exc:
            if not self.conversation.history:
                self.display.message(f"edge-gemma listen: this utterance does not fit the context; skipped ({exc})")
                return None
            self.display.message("(the conversation no longer fits the context: starting a new one)")
            self.conversation.reset()
            self._image_sent = False
            try:
                gen = self.conversation.send(self._content(audio), options=self.generation)
            except ContextOverflowError as exc2:
                self.display.message(f"edge-gemma listen: this utterance does not fit the context; skipped ({exc2})")
                return None
        self._image_sent = True
        return gen

    def _turn(self, utt: Utterance, t_detected: float, source) -> None:
        n = len(self.turns) + 1
        # A live source heard `trailing_ms` of silence after the speech before the VAD could end the utterance.
        endpoint_s = utt.trailing_ms / 1000.0 if source.realtime else 0.0
        t_speech_end = t_detected - endpoint_s
        audio = utt.audio
        if self.on_audio is not None:
            self.on_audio(n, utt, audio)
        self.display.set_state("thinking", f"(turn {n}, {utt.seconds:.1f} s of speech)")
        gen = self._send(audio)
        if gen is None:
            return
        first: float | None = None
        for piece in gen:
            if first is None:
                first = time.monotonic()
                self.display.answering()
            self.out.write(piece)
            self.out.flush()
        self.out.write("\n")
        self.out.flush()
        done = gen.completion
        if first is None:
            self.display.answering()  # no visible text (e.g. only a stop token): the turn still ends here
        for call in done.response.tool_calls:
            self.display.message(f"tool call: {call.name} {json.dumps(call.arguments, ensure_ascii=False)}")
        latency = TurnLatency(turn=n, speech_s=utt.seconds, endpoint_s=endpoint_s,
                              first_token_s=None if first is None else first - t_speech_end, stats=done.stats)
        self.turns.append(latency)
        budget_name = None
        if self.options.budget_device:
            budget_name = f"{self.options.budget_device} budget"
        self.display.message(latency.format(self.options.budget, budget_name))
        if self.speaker is not None:
            self.display.set_state("speaking", "")
            self.speaker.say(done.response.answer or done.text)
            source.discard_pending()
            self.segmenter.reset()
