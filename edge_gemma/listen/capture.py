"""Where the listen loop's audio comes from: a microphone (sounddevice/PortAudio) or a recorded file.

Both sources yield 16 kHz mono float32 frames of exactly `FRAME_SAMPLES` samples (30 ms, the frame size webrtcvad
takes), each with the monotonic time at which it was captured.

The microphone is read by a background thread with blocking reads into a bounded queue, not by a PortAudio
callback: the main thread is busy for seconds while the model answers, and the queue keeps what the user says
meanwhile (the next question), up to `QUEUE_SECONDS`. A blocking read also gives back-pressure, which matters for
virtual microphones that are not paced in real time (the ALSA `file` plugin used by the tests delivers a whole
file at once): the reader waits for the consumer instead of dropping audio.

Every failure a user can meet here becomes a `CaptureError` whose message says what to do: PortAudio missing
(`libportaudio2`), no input device at all, a `--device` that matches none (the message lists the input devices),
a device that refuses 16 kHz (we then open it at its own rate and resample with soxr), a device that disappears
mid-turn (the read fails, or no audio arrives for `STALL_SECONDS`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edge_gemma.audio import SAMPLE_RATE, load_audio

log = logging.getLogger(__name__)

__all__ = [
    "CaptureError",
    "FRAME_SAMPLES",
    "FileSource",
    "InputDevice",
    "MicSource",
    "list_input_devices",
    "load_sounddevice",
    "resolve_device",
]

FRAME_MS = 30
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000  # 480
QUEUE_SECONDS = 120.0  # audio kept while the model answers
STALL_SECONDS = 3.0  # no frame for this long from a running stream: the device is gone


class CaptureError(RuntimeError):
    """The microphone cannot be opened or stopped delivering audio; the message says why and what to do."""


@dataclass(frozen=True, kw_only=True)
class InputDevice:
    index: int
    name: str
    channels: int  # max input channels
    default_samplerate: float
    hostapi: str
    is_default: bool


def load_sounddevice():
    """Import sounddevice, turning a missing module or PortAudio library into a `CaptureError` that says what to
    install (the import itself raises OSError when libportaudio2 is missing)."""
    try:
        import sounddevice
    except ImportError:
        raise CaptureError(
            "the Python package sounddevice is not installed: pip install 'edge-gemma[listen]' "
            "(or use --input FILE to listen to a recording)"
        ) from None
    except OSError as exc:
        raise CaptureError(
            f"PortAudio is missing ({exc}): install the system library, e.g. `sudo apt install libportaudio2` on "
            "Raspberry Pi OS / Debian (or use --input FILE to listen to a recording)"
        ) from None
    return sounddevice


def list_input_devices(sd: Any = None) -> list[InputDevice]:
    """Every device with at least one input channel, as PortAudio numbers them."""
    sd = sd or load_sounddevice()
    try:
        devices = sd.query_devices()
        hostapis = sd.query_hostapis()
        default_in = sd.default.device[0]
    except sd.PortAudioError as exc:
        raise CaptureError(f"PortAudio cannot list the audio devices: {exc}") from None
    out = []
    for index, dev in enumerate(devices):
        if int(dev["max_input_channels"]) < 1:
            continue
        api = hostapis[dev["hostapi"]]["name"] if 0 <= dev["hostapi"] < len(hostapis) else "?"
        out.append(InputDevice(index=index, name=str(dev["name"]), channels=int(dev["max_input_channels"]),
                               default_samplerate=float(dev["default_samplerate"]), hostapi=str(api),
                               is_default=index == default_in))
    return out


def _describe(devices: list[InputDevice]) -> str:
    return "; ".join(f"[{d.index}] {d.name}" for d in devices)


def resolve_device(spec: str | int | None, devices: list[InputDevice]) -> InputDevice:
    """`--device` (an index, or a case-insensitive part of a name; None = the system default) -> a device."""
    if not devices:
        raise CaptureError(
            "no audio input device found: is a microphone connected? (`arecord -l` lists ALSA capture devices; "
            "`edge-gemma listen --list-devices` lists what PortAudio sees; --input FILE listens to a recording)"
        )
    if spec is None or spec == "":
        for d in devices:
            if d.is_default:
                return d
        log.info("no default input device; using the first one, %s", devices[0].name)
        return devices[0]
    text = str(spec).strip()
    if text.lstrip("-").isdigit():
        for d in devices:
            if d.index == int(text):
                return d
        raise CaptureError(f"--device {text}: no input device has this index; input devices: {_describe(devices)}")
    exact = [d for d in devices if d.name.lower() == text.lower()]
    found = exact or [d for d in devices if text.lower() in d.name.lower()]
    if not found:
        raise CaptureError(f"--device {text!r}: no input device matches this name; input devices: "
                           f"{_describe(devices)}")
    if len(found) > 1:
        raise CaptureError(f"--device {text!r} matches several input devices ({_describe(found)}); pass the index")
    return found[0]


class _Framer:
    """Cuts blocks of any length into frames of exactly FRAME_SAMPLES (the remainder waits for the next block)."""

    def __init__(self) -> None:
        self._rest = np.zeros(0, np.float32)

    def push(self, block: np.ndarray) -> list[np.ndarray]:
        data = np.concatenate([self._rest, block]) if self._rest.size else block
        n = data.size // FRAME_SAMPLES
        frames = [data[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES].copy() for i in range(n)]
        self._rest = data[n * FRAME_SAMPLES :].copy()
        return frames


class FileSource:
    """A recorded file (anything `edge_gemma.audio.load_audio` reads), as frames; not paced in real time.

    The end of the file ends the utterance in progress (the session flushes the segmenter)."""

    realtime = False

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.wave = load_audio(self.path)  # (N,) float32 at 16 kHz
        self.name = str(self.path)

    def frames(self) -> Iterator[tuple[np.ndarray, float]]:
        n = self.wave.size // FRAME_SAMPLES
        for i in range(n):
            yield self.wave[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES], time.monotonic()
        rest = self.wave[n * FRAME_SAMPLES :]
        if rest.size:
            yield np.concatenate([rest, np.zeros(FRAME_SAMPLES - rest.size, np.float32)]), time.monotonic()

    def discard_pending(self) -> None:
        """Nothing is captured while the model speaks from a file."""

    def close(self) -> None:
        pass

    def __enter__(self) -> "FileSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class MicSource:
    """A live input device, read by a background thread (see the module docstring)."""

    realtime = True

    def __init__(self, device: str | int | None = None, *, sd: Any = None, stall_seconds: float = STALL_SECONDS):
        self._sd = sd or load_sounddevice()
        self.device = resolve_device(device, list_input_devices(self._sd))
        self.name = self.device.name
        self.stall_seconds = stall_seconds
        self._queue: queue.Queue = queue.Queue(maxsize=int(QUEUE_SECONDS * 1000 / FRAME_MS))
        self._stop = threading.Event()
        self._stream, self.rate = self._open()
        self._thread = threading.Thread(target=self._reader, name="edge-gemma-mic", daemon=True)
        self._thread.start()

    def _open(self):
        sd = self._sd
        kwargs = dict(device=self.device.index, channels=1, dtype="int16")
        last: Exception | None = None
        # 16 kHz first (no resampling); a USB microphone often supports only 44.1/48 kHz: then its own rate.
        for rate in dict.fromkeys([SAMPLE_RATE, int(self.device.default_samplerate), 48_000, 44_100]):
            try:
                stream = sd.InputStream(samplerate=rate, blocksize=rate * FRAME_MS // 1000, **kwargs)
            except sd.PortAudioError as exc:
                last = exc
                continue
            try:
                stream.start()
                if rate != SAMPLE_RATE:
                    log.info("%s does not take %d Hz; recording at %d Hz and resampling", self.name, SAMPLE_RATE, rate)
                return stream, rate
            except sd.PortAudioError as exc:
                last = exc
                stream.close()
        raise CaptureError(f"cannot open the input device [{self.device.index}] {self.name}: {last}")

    def _reader(self) -> None:
        resampler = None
        if self.rate != SAMPLE_RATE:
            import soxr

            resampler = soxr.ResampleStream(self.rate, SAMPLE_RATE, 1, dtype="float32")
        framer = _Framer()
        block = self.rate * FRAME_MS // 1000
        try:
            while not self._stop.is_set():
                data, overflowed = self._stream.read(block)  # (block, 1) int16
                if overflowed:
                    log.warning("%s: input overflow, some audio was lost", self.name)
                wave = np.asarray(data, np.int16).reshape(-1).astype(np.float32) / 32768.0
                if resampler is not None:
                    wave = resampler.resample_chunk(wave)
                now = time.monotonic()
                for frame in framer.push(wave):
                    while not self._stop.is_set():
                        try:
                            self._queue.put((frame, now), timeout=0.1)
                            break
                        except queue.Full:
                            continue
        except Exception as exc:  # noqa: BLE001 - handed to the main thread, which raises CaptureError
            while not self._stop.is_set():
                try:
                    self._queue.put(exc, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def frames(self) -> Iterator[tuple[np.ndarray, float]]:
        last = time.monotonic()
        while True:
            try:
                item = self._queue.get(timeout=0.1)  # short waits: Ctrl-C is handled promptly
            except queue.Empty:
                if not self._thread.is_alive() or time.monotonic() - last > self.stall_seconds:
                    raise CaptureError(
                        f"the input device [{self.device.index}] {self.name} stopped delivering audio (unplugged?)"
                    ) from None
                continue
            if isinstance(item, Exception):
                raise CaptureError(
                    f"the input device [{self.device.index}] {self.name} failed: {item} (unplugged?)"
                ) from None
            yield item
            last = time.monotonic()  # the consumer's own pauses (the model answering) are not stalls

    def discard_pending(self) -> None:
        """Drop what was captured so far (the model's own voice while it spoke)."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        try:
            self._stream.abort()
            self._stream.close()
        except Exception:  # noqa: BLE001 - the device may already be gone; closing must not raise
            log.debug("error while closing the input stream", exc_info=True)

    def __enter__(self) -> "MicSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
