"""Gemma 4 audio frontend in numpy: loading, resampling, log-mel features with their validity mask.

Matches ``transformers``' ``Gemma4AudioFeatureExtractor`` (feature_extraction_gemma4.py) with its defaults:
16 kHz mono; 20 ms frames (320 samples) every 10 ms (160); "semicausal" padding (160 zeros in front, windows of
321 samples of which the last is dropped); periodic Hann window; 512-point FFT; **magnitude** spectrum; 128 HTK
mel filters over 0-8000 Hz without normalisation; ``log(mel + 1e-3)``. The waveform is padded with zeros to a
multiple of 128 samples; a frame is valid only if its whole window is real audio, and invalid frames are zeroed.
The dtype path (float32 frames and window, float64 filters and log, float32 result) is the reference's, so the
features agree to float32 rounding.

Token count: the audio encoder halves the frame rate twice (two stride-2 convolutions), so a clip of F valid
frames becomes ``ceil(ceil(F / 2) / 2)`` soft tokens, 25 per second (:func:`num_audio_tokens`).

**Long-audio policy.** The encoder and the reference take at most 30 s (480 000 samples) per clip; the reference
silently truncates longer input. We never truncate: :func:`split_long_audio` cuts audio longer than 30 s into
consecutive chunks of at most 30 s. Each cut is placed at the quietest 10 ms hop (lowest energy over a 20 ms
window) within the last 2 s before the 30 s limit, so that words are rarely split; the chunks are contiguous
and their concatenation is exactly the input (no sample dropped or repeated). Each chunk becomes its own
``<|audio>`` ... ``<audio|>`` block, in order, where the conversation placed the audio item.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "AudioError",
    "AudioFeatures",
    "MAX_SAMPLES",
    "SAMPLE_RATE",
    "audio_features",
    "load_audio",
    "log_mel",
    "mel_filter_bank",
    "num_audio_tokens",
    "num_mel_frames",
    "resample",
    "split_long_audio",
]

SAMPLE_RATE = 16_000
MAX_SAMPLES = 480_000  # 30 s: the feature extractor's max_length and the encoder's audio_seq_length (750 tokens)
FRAME_LENGTH = 320  # 20 ms
HOP_LENGTH = 160  # 10 ms
FFT_LENGTH = 512
NUM_MEL = 128
MEL_FLOOR = 1e-3
PAD_TO_MULTIPLE_OF = 128
SPLIT_SEARCH_SAMPLES = 2 * SAMPLE_RATE  # look for the quietest cut point in the last 2 s of a 30 s chunk


class AudioError(ValueError):
    """Audio input is empty, not finite, of an unsupported format or shape; the message names the input."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class AudioFeatures:
    """Log-mel features of one clip of at most 30 s, ready for the audio encoder."""

    features: np.ndarray  # (T, 128) float32, invalid frames zeroed
    mask: np.ndarray  # (T,) bool, True where the frame's whole window is real audio
    num_tokens: int  # soft tokens this clip becomes (25 per second)


# ---------------------------------------------------------------------------------------------- loading
def _to_float(array: np.ndarray, name: str) -> np.ndarray:
    """Integer PCM -> float in [-1, 1); floats kept as they are."""
    if array.dtype == np.int16:
        return array.astype(np.float32) / 32768.0
    if array.dtype == np.int32:
        return (array.astype(np.float64) / 2147483648.0).astype(np.float32)
    if array.dtype == np.uint8:  # 8-bit WAV is unsigned
        return (array.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32, copy=False)
    raise AudioError(f"{name}: unsupported sample dtype {array.dtype} (expected int16, int32, uint8 or float)")


def _to_mono(array: np.ndarray, name: str) -> np.ndarray:
    """(N,), (N, C) or (C, N) with C <= 8 channels -> (N,) by averaging channels."""
    if array.ndim == 1:
        return array
    if array.ndim != 2:
        raise AudioError(f"{name}: expected 1-D mono or 2-D (samples, channels) audio, found shape {array.shape}")
    if array.shape[1] <= 8 and array.shape[0] >= array.shape[1]:
        return array.mean(axis=1, dtype=np.float32)
    if array.shape[0] <= 8:
        return array.mean(axis=0, dtype=np.float32)  # (channels, samples), e.g. from torchaudio or librosa
    raise AudioError(f"{name}: cannot tell channels from samples in shape {array.shape} (at most 8 channels)")


def resample(wave: np.ndarray, orig_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling with soxr (high quality), float32 in and out."""
    if orig_rate == target_rate:
        return wave
    import soxr

    return soxr.resample(wave, orig_rate, target_rate, quality="HQ").astype(np.float32, copy=False)


def load_audio(source, sample_rate: int | None = None) -> np.ndarray:
    """Audio as 16 kHz mono float32 samples.

    ``source`` is a file path (WAV, FLAC, OGG ... whatever libsndfile reads; its own sample rate is used) or an
    array (int16/int32/uint8 PCM or float; mono, ``(samples, channels)`` or ``(channels, samples)``) recorded at
    ``sample_rate`` Hz (``None`` means it is already 16 kHz).
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise AudioError(f"{name}: no such audio file")
        import soundfile

        try:
            data, file_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
            raise AudioError(
                f"{name}: unsupported or corrupt audio file ({e}); readable formats: "
                f"{', '.join(sorted(soundfile.available_formats()))}"
            ) from e
        if sample_rate is not None and sample_rate != file_rate:
            logger.warning("%s: file says %d Hz, ignoring sample_rate=%d", name, file_rate, sample_rate)
        rate = int(file_rate)
        wave = data.mean(axis=1, dtype=np.float32)
    else:
        name = "audio array"
        array = np.asarray(source)
        if array.dtype == object:
            raise AudioError(f"{name}: expected a numeric array, found dtype object")
        rate = SAMPLE_RATE if sample_rate is None else int(sample_rate)
        wave = _to_mono(_to_float(array, name), name)
    if rate <= 0:
        raise AudioError(f"{name}: sample rate must be positive, found {rate}")
    if wave.size == 0:
        raise AudioError(f"{name}: audio is empty (0 samples)")
    finite = np.isfinite(wave)
    if not finite.all():
        bad = "all samples are" if not finite.any() else f"{int((~finite).sum())} of {wave.size} samples are"
        raise AudioError(f"{name}: {bad} NaN or infinite")
    wave = resample(np.ascontiguousarray(wave, dtype=np.float32), rate)
    return np.ascontiguousarray(wave, dtype=np.float32)


# ---------------------------------------------------------------------------------------------- features
def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + f / 700.0)


def _mel_to_hz(m):
    return 700.0 * (np.power(10, m / 2595.0) - 1.0)


@functools.lru_cache(maxsize=1)
def mel_filter_bank() -> np.ndarray:
    """(257, 128) float64 triangular HTK filters, 0-8000 Hz, no normalisation (transformers' mel_filter_bank)."""
    mel_freqs = np.linspace(_hz_to_mel(0.0), _hz_to_mel(8000.0), NUM_MEL + 2)
    filter_freqs = _mel_to_hz(mel_freqs)  # (130,)
    fft_freqs = np.linspace(0, SAMPLE_RATE // 2, FFT_LENGTH // 2 + 1)  # (257,)
    diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]  # (257, 130)
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    bank = np.maximum(0.0, np.minimum(down, up))
    bank.setflags(write=False)
    return bank


@functools.lru_cache(maxsize=1)
def _window() -> np.ndarray:
    w = np.hanning(FRAME_LENGTH + 1)[:-1].astype(np.float32)  # periodic Hann
    w.setflags(write=False)
    return w


def num_mel_frames(num_samples: int) -> int:
    """Frames whose whole 321-sample window is real audio (the valid frames of the mask)."""
    return max(0, (num_samples + FRAME_LENGTH // 2 - (FRAME_LENGTH + 1)) // HOP_LENGTH + 1)


def num_audio_tokens(num_samples: int) -> int:
    """Soft tokens for a clip of ``num_samples`` 16 kHz samples (<= 30 s): valid frames halved twice, rounding up.

    Equals ``Gemma4Processor``'s count (mask subsampled like the two stride-2 convolutions): 1 s -> 25, 30 s -> 750.
    """
    if num_samples > MAX_SAMPLES:
        raise AudioError(f"audio of {num_samples} samples exceeds 30 s ({MAX_SAMPLES}); split it with split_long_audio")
    t = num_mel_frames(num_samples)
    for _ in range(2):
        t = (t + 1) // 2
    return t


def log_mel(wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel features of one 16 kHz mono clip of at most 30 s.

    Returns ``features`` (T, 128) float32 with invalid frames zeroed and ``mask`` (T,) bool, where T counts the
    frames of the waveform padded to a multiple of 128 samples (as the reference does for a batch of one).
    """
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise AudioError(f"log_mel: expected a 1-D 16 kHz waveform, found shape {wave.shape} (use load_audio)")
    n = wave.shape[0]
    if n == 0:
        raise AudioError("log_mel: audio is empty (0 samples)")
    if n > MAX_SAMPLES:
        raise AudioError(f"log_mel: {n} samples exceed 30 s ({MAX_SAMPLES}); split it with split_long_audio")
    if not np.isfinite(wave).all():
        raise AudioError("log_mel: waveform contains NaN or infinite samples")
    wave = wave.astype(np.float32, copy=False)
    padded_len = -(-n // PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF
    pad_left = FRAME_LENGTH // 2
    x = np.zeros(pad_left + padded_len, dtype=np.float32)  # semicausal: 160 zeros in front, zeros behind
    x[pad_left : pad_left + n] = wave
    real = np.zeros(pad_left + padded_len, dtype=bool)
    real[pad_left : pad_left + n] = True

    size = FRAME_LENGTH + 1
    num_frames = (x.shape[0] - size) // HOP_LENGTH + 1
    if num_frames <= 0:
        return np.zeros((0, NUM_MEL), np.float32), np.zeros((0,), bool)
    frames = np.lib.stride_tricks.as_strided(
        x, shape=(num_frames, size), strides=(x.strides[0] * HOP_LENGTH, x.strides[0])
    )[:, :-1]  # (T, 320): the 321st sample only decides validity
    spec = np.abs(np.fft.rfft(frames * _window(), n=FFT_LENGTH, axis=-1))  # (T, 257)
    mel = np.matmul(spec, mel_filter_bank())  # (T, 128) float64
    features = np.log(mel + np.float64(MEL_FLOOR)).astype(np.float32)
    mask = real[np.arange(num_frames) * HOP_LENGTH + size - 1]  # last sample of each window is real audio
    features = features * mask[:, None]
    return features.astype(np.float32, copy=False), mask


def split_long_audio(wave: np.ndarray, *, max_samples: int = MAX_SAMPLES) -> list[np.ndarray]:
    """Cut a 16 kHz waveform into consecutive chunks of at most ``max_samples`` (see the module docstring).

    Audio of at most ``max_samples`` comes back as one chunk. The chunks are views of ``wave`` and
    ``np.concatenate(chunks)`` equals ``wave``.
    """
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise AudioError(f"split_long_audio: expected a 1-D waveform, found shape {wave.shape}")
    if max_samples < 2 * FRAME_LENGTH:
        raise AudioError(f"split_long_audio: max_samples={max_samples} is too small")
    search = min(SPLIT_SEARCH_SAMPLES, max_samples // 2)
    chunks = []
    start = 0
    n = wave.shape[0]
    while n - start > max_samples:
        lo = start + max_samples - search
        region = wave[lo : start + max_samples].astype(np.float64)
        # energy of 20 ms windows starting every 10 ms; cut at the centre of the quietest one
        energy = np.convolve(region**2, np.ones(FRAME_LENGTH), mode="valid")[::HOP_LENGTH]
        cut = lo + int(np.argmin(energy)) * HOP_LENGTH + FRAME_LENGTH // 2
        cut = min(max(cut, start + 1), start + max_samples)
        chunks.append(wave[start:cut])
        start = cut
    chunks.append(wave[start:])
    if len(chunks) > 1:
        logger.info("split %.1f s of audio into %d chunks of at most %.0f s", n / SAMPLE_RATE, len(chunks),
                    max_samples / SAMPLE_RATE)
    return chunks


def audio_features(wave: np.ndarray) -> list[AudioFeatures]:
    """Features of a 16 kHz waveform of any length: one :class:`AudioFeatures` per chunk of the long-audio policy."""
    wave = np.asarray(wave)
    if wave.size == 0:
        raise AudioError("audio_features: audio is empty (0 samples)")
    out = []
    for chunk in split_long_audio(wave):
        features, mask = log_mel(chunk)
        out.append(AudioFeatures(features=features, mask=mask, num_tokens=num_audio_tokens(chunk.shape[0])))
    return out
