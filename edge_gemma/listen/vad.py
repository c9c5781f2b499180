"""Voice activity detection and endpointing: 30 ms frames in, utterances out. webrtcvad (C, no torch, no model
file, no network), which runs in well under a millisecond per frame on a Raspberry Pi 5.

An utterance starts when `start_ms` of the last `preroll_ms` are voiced, and keeps that pre-roll so the first
syllable is not clipped; it ends after `end_silence_ms` of continuous silence, and keeps `tail_ms` of that silence
(so the last syllable is not clipped either). Utterances with less than `min_speech_ms` of voiced frames (a cough,
a door) are dropped. An utterance never ends for being long: one that reaches `max_utterance_s` is emitted and the
next one starts at once (the audio processor cuts anything over 30 s into 30 s chunks for the encoder, so long
speech reaches the model whole).

Sample offsets count from the first frame fed, so a caller can say which part of a recording became which turn.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from edge_gemma.audio import SAMPLE_RATE

from .capture import FRAME_MS, FRAME_SAMPLES

log = logging.getLogger(__name__)

__all__ = ["SpeechStart", "Segmenter", "Utterance", "VadConfig", "level_dbfs", "to_pcm16"]


@dataclass(frozen=True, kw_only=True)
class VadConfig:
    aggressiveness: int = 2  # webrtcvad 0 (keeps most) .. 3 (drops most non-speech)
    preroll_ms: int = 300  # window looked at to start an utterance, and kept in front of it
    start_ms: int = 150  # voiced time within the window that starts an utterance
    end_silence_ms: int = 700  # continuous silence that ends an utterance
    tail_ms: int = 240  # of that silence, kept at the end of the utterance
    min_speech_ms: int = 240  # shorter voiced time: not speech, dropped
    max_utterance_s: float = 120.0

    def __post_init__(self) -> None:
        if self.aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"VAD aggressiveness must be 0..3, got {self.aggressiveness}")
        for name in ("preroll_ms", "start_ms", "end_silence_ms", "min_speech_ms"):
            if getattr(self, name) < FRAME_MS:
                raise ValueError(f"{name} must be at least one frame ({FRAME_MS} ms), got {getattr(self, name)}")
        if self.start_ms > self.preroll_ms:
            raise ValueError(f"start_ms ({self.start_ms}) cannot exceed preroll_ms ({self.preroll_ms})")
        if not 0 <= self.tail_ms <= self.end_silence_ms:
            raise ValueError(f"tail_ms must be within 0..end_silence_ms ({self.end_silence_ms}), got {self.tail_ms}")
        if self.max_utterance_s * 1000 < self.preroll_ms + self.end_silence_ms:
            raise ValueError(f"max_utterance_s is too short: {self.max_utterance_s}")


@dataclass(frozen=True, kw_only=True)
class SpeechStart:
    start_sample: int


@dataclass(frozen=True, kw_only=True)
class Utterance:
    audio: np.ndarray  # (N,) float32 at 16 kHz: pre-roll + speech + tail
    start_sample: int  # offset of audio[0] in the stream
    speech_end_sample: int  # end of the last voiced frame
    voiced_ms: int
    trailing_ms: int  # silence heard after the speech end before the utterance was emitted (endpointing delay)

    @property
    def seconds(self) -> float:
        return self.audio.size / SAMPLE_RATE


def to_pcm16(frame: np.ndarray) -> bytes:
    """float [-1, 1) -> little-endian int16 bytes (what webrtcvad reads)."""
    return np.clip(np.round(np.asarray(frame, np.float64) * 32768.0), -32768, 32767).astype("<i2").tobytes()


def level_dbfs(frame: np.ndarray) -> float:
    """RMS level of a frame in dB relative to full scale (-100 for digital silence)."""
    rms = float(np.sqrt(np.mean(np.square(frame, dtype=np.float64)))) if frame.size else 0.0
    return max(-100.0, 20.0 * np.log10(rms)) if rms > 0 else -100.0


class Segmenter:
    """Feed 30 ms frames, get `SpeechStart` and `Utterance` events."""

    def __init__(self, config: VadConfig | None = None, *, vad=None):
        self.config = config or VadConfig()
        if vad is None:
            try:
                import webrtcvad
            except ImportError:
                raise RuntimeError(
                    "voice activity detection needs webrtcvad: pip install 'edge-gemma[listen]' (webrtcvad-wheels)"
                ) from None
            vad = webrtcvad.Vad(self.config.aggressiveness)
        self._vad = vad
        c = self.config
        self._preroll_frames = c.preroll_ms // FRAME_MS
        self._start_frames = c.start_ms // FRAME_MS
        self._end_frames = -(-c.end_silence_ms // FRAME_MS)  # at least end_silence_ms
        self._tail_frames = c.tail_ms // FRAME_MS
        self._min_voiced = c.min_speech_ms // FRAME_MS
        self._max_frames = int(c.max_utterance_s * 1000 // FRAME_MS)
        self.samples_seen = 0
        self.reset()

    def reset(self) -> None:
        """Forget any speech in progress (after the model spoke, what the microphone heard is its own voice)."""
        self._ring: collections.deque = collections.deque(maxlen=self._preroll_frames)  # (frame, voiced)
        self._frames: list[np.ndarray] = []
        self._in_speech = False
        self._start = 0
        self._voiced = 0
        self._silence_run = 0
        self._last_voiced = 0  # index into _frames of the frame after the last voiced one

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    def is_speech(self, frame: np.ndarray) -> bool:
        return bool(self._vad.is_speech(to_pcm16(frame), SAMPLE_RATE))

    def feed(self, frame: np.ndarray) -> list[SpeechStart | Utterance]:
        frame = np.asarray(frame, np.float32)
        if frame.shape != (FRAME_SAMPLES,):
            raise ValueError(f"the segmenter takes frames of {FRAME_SAMPLES} samples, got shape {frame.shape}")
        voiced = self.is_speech(frame)
        self.samples_seen += FRAME_SAMPLES
        events: list[SpeechStart | Utterance] = []
        if not self._in_speech:
            self._ring.append((frame, voiced))
            if sum(v for _, v in self._ring) >= self._start_frames:
                self._in_speech = True
                self._frames = [f for f, _ in self._ring]
                self._voiced = sum(v for _, v in self._ring)
                self._start = self.samples_seen - len(self._frames) * FRAME_SAMPLES
                self._last_voiced = len(self._frames)
                self._silence_run = 0
                self._ring.clear()
                events.append(SpeechStart(start_sample=self._start))
            return events
        self._frames.append(frame)
        if voiced:
            self._voiced += 1
            self._silence_run = 0
            self._last_voiced = len(self._frames)
        else:
            self._silence_run += 1
        if self._silence_run >= self._end_frames:
            events.extend(self._finish())
        elif len(self._frames) >= self._max_frames:
            log.info("utterance reached %.0f s; cutting it here and continuing", self.config.max_utterance_s)
            events.extend(self._finish(keep_going=True))
        return events

    def feed_all(self, frames: Iterable[np.ndarray]) -> list[SpeechStart | Utterance]:
        events = []
        for f in frames:
            events.extend(self.feed(f))
        return events + self.flush()

    def flush(self) -> list[SpeechStart | Utterance]:
        """End of input: the utterance in progress, if any, ends here."""
        return self._finish() if self._in_speech else []

    def _finish(self, *, keep_going: bool = False) -> list[Utterance]:
        keep = len(self._frames) if keep_going else min(len(self._frames), self._last_voiced + self._tail_frames)
        frames = self._frames[:keep]
        trailing = (len(self._frames) - self._last_voiced) * FRAME_MS
        out = []
        if self._voiced >= self._min_voiced:
            out.append(Utterance(
                audio=np.concatenate(frames).astype(np.float32, copy=False), start_sample=self._start,
                speech_end_sample=self._start + self._last_voiced * FRAME_SAMPLES, voiced_ms=self._voiced * FRAME_MS,
                trailing_ms=trailing,
            ))
        else:
            log.debug("dropped %d ms of sound with only %d ms voiced", len(self._frames) * FRAME_MS,
                      self._voiced * FRAME_MS)
        if keep_going:
            self._start += len(self._frames) * FRAME_SAMPLES
            self._frames, self._voiced, self._last_voiced, self._silence_run = [], 0, 0, 0
        else:
            self.reset()
        return out
