"""Audio frontend: log-mel parity with transformers' Gemma4AudioFeatureExtractor, token counts, loading of arrays and
files, resampling, the long-audio policy and bad input."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

from edge_gemma import audio
from edge_gemma.audio import AudioError

SR = audio.SAMPLE_RATE


@pytest.fixture(scope="module")
def fe():
    pytest.importorskip("transformers")
    from transformers.models.gemma4 import Gemma4AudioFeatureExtractor

    return Gemma4AudioFeatureExtractor()


def _speechlike(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    tone = 0.4 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (tone + 0.05 * rng.standard_normal(n)).astype(np.float32)


def _reference(fe, wave):
    out = fe([wave], return_tensors="np")
    return out["input_features"][0], out["input_features_mask"][0]


@pytest.mark.parametrize("seconds", [0.1, 0.25, 0.5, 1.0, 1.2345, 2.5, 7.77, 30.0])
def test_log_mel_matches_reference(fe, seconds):
    wave = _speechlike(int(round(seconds * SR)), seed=int(seconds * 100))
    ref_feats, ref_mask = _reference(fe, wave)
    feats, mask = audio.log_mel(wave)
    assert feats.dtype == np.float32 and feats.shape == ref_feats.shape == (mask.shape[0], 128)
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_allclose(feats, ref_feats, atol=1e-4, rtol=0)
    assert not feats[~mask].any()  # invalid frames zeroed


@pytest.mark.parametrize("n", [1, 100, 161, 320, 321, 481, 16000 + 77])
def test_odd_lengths_match_reference(fe, n):
    wave = _speechlike(n, seed=n)
    ref_feats, ref_mask = _reference(fe, wave)
    feats, mask = audio.log_mel(wave)
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_allclose(feats, ref_feats, atol=1e-4, rtol=0)


@pytest.mark.parametrize("rate", [8000, 44100, 48000])
def test_other_sample_rates(fe, rate):
    """load_audio resamples with soxr; the features equal the reference's on the same 16 kHz waveform."""
    soxr = pytest.importorskip("soxr")
    n = int(1.7 * rate)
    t = np.arange(n) / rate
    src = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 1234 * t)).astype(np.float32)
    wave = audio.load_audio(src, sample_rate=rate)
    assert wave.dtype == np.float32 and abs(wave.shape[0] - int(1.7 * SR)) <= 1
    expected16k = soxr.resample(src, rate, SR, quality="HQ").astype(np.float32)
    ref_feats, ref_mask = _reference(fe, expected16k)
    feats, mask = audio.log_mel(wave)
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_allclose(feats, ref_feats, atol=1e-4, rtol=0)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampling_preserves_a_tone(rate):
    """Mathematics, not our own output: a 1 kHz sine at any rate becomes a 1 kHz sine at 16 kHz."""
    n = 2 * rate
    src = np.sin(2 * np.pi * 1000 * np.arange(n) / rate).astype(np.float32)
    wave = audio.load_audio(src, sample_rate=rate)
    ideal = np.sin(2 * np.pi * 1000 * np.arange(wave.shape[0]) / SR)
    interior = slice(SR // 10, -SR // 10)
    np.testing.assert_allclose(wave[interior], ideal[interior], atol=2e-3)


def test_mel_filter_bank_matches_reference(fe):
    np.testing.assert_allclose(audio.mel_filter_bank(), fe.mel_filters, rtol=1e-12, atol=1e-15)


def test_num_audio_tokens():
    # measured with the reference audio tower (gemma4-architecture.md section 5)
    for seconds, tokens in [(0.5, 13), (1, 25), (2, 50), (10, 250), (30, 750)]:
        assert audio.num_audio_tokens(int(seconds * SR)) == tokens


def test_num_audio_tokens_match_processor_arithmetic(fe):
    """Against Gemma4Processor's count (its `_compute_audio_num_tokens` and its mask-subsampling count)."""
    from transformers.models.gemma4 import Gemma4Processor

    fake = types.SimpleNamespace(feature_extractor=fe, audio_seq_length=750)
    for n in [1, 160, 161, 320, 321, 480, 481, 800, 1600, 16000, 16001, 23457, 160000, 479999, 480000]:
        assert audio.num_audio_tokens(n) == Gemma4Processor._compute_audio_num_tokens(fake, np.zeros(n), SR), n
    for n in [1600, 8000, 12345, 48000]:
        mask = audio.log_mel(_speechlike(n, n))[1]
        replaced = Gemma4Processor.replace_audio_token(
            types.SimpleNamespace(boa_token="A", eoa_token="B", audio_token="x"),
            {"input_features_mask": [mask]}, 0)
        assert replaced.count("x") == audio.num_audio_tokens(n)


def test_int16_and_stereo_arrays():
    mono = _speechlike(8000, 1)
    pcm = np.round(mono * 32767).astype(np.int16)
    np.testing.assert_array_equal(audio.load_audio(pcm), pcm.astype(np.float32) / 32768)
    stereo = np.stack([mono, np.zeros_like(mono)], axis=1)  # (samples, channels)
    np.testing.assert_allclose(audio.load_audio(stereo), mono / 2, atol=1e-7)
    np.testing.assert_allclose(audio.load_audio(stereo.T), mono / 2, atol=1e-7)  # (channels, samples)
    pcm32 = (mono.astype(np.float64) * 2**31).clip(-(2**31), 2**31 - 1).astype(np.int32)
    np.testing.assert_allclose(audio.load_audio(pcm32), mono, atol=1e-6)


@pytest.mark.parametrize("fmt, subtype, atol", [("WAV", "PCM_16", 0), ("FLAC", "PCM_16", 0), ("OGG", "VORBIS", None)])
def test_audio_files(tmp_path, fmt, subtype, atol):
    sf = pytest.importorskip("soundfile")
    mono = _speechlike(SR, 3)
    stereo = np.stack([mono, mono], axis=1)
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(str(path), stereo, SR, format=fmt, subtype=subtype)
    wave = audio.load_audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    if atol is None:  # lossy: same length and strongly correlated
        assert abs(wave.shape[0] - SR) < 100
        assert np.corrcoef(wave[:SR - 100], mono[:SR - 100])[0, 1] > 0.95
    else:
        expected = np.round(mono.astype(np.float64) * 32767) / 32768  # what a 16-bit file can hold
        np.testing.assert_allclose(wave, expected, atol=1 / 32768)


def test_file_at_44k1_is_resampled(tmp_path):
    sf = pytest.importorskip("soundfile")
    rate = 44100
    src = np.sin(2 * np.pi * 500 * np.arange(rate) / rate).astype(np.float32)
    sf.write(str(tmp_path / "a.wav"), src, rate, subtype="FLOAT")
    wave = audio.load_audio(tmp_path / "a.wav")
    assert abs(wave.shape[0] - SR) <= 1


# ---------------------------------------------------------------------------------------------- long audio
def test_short_audio_is_one_chunk():
    wave = _speechlike(audio.MAX_SAMPLES, 0)
    chunks = audio.split_long_audio(wave)
    assert len(chunks) == 1 and chunks[0].shape[0] == audio.MAX_SAMPLES


def test_long_audio_split_is_lossless_and_bounded():
    wave = _speechlike(75 * SR + 123, 9)
    chunks = audio.split_long_audio(wave)
    assert len(chunks) == 3
    assert all(0 < c.shape[0] <= audio.MAX_SAMPLES for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks), wave)
    feats = audio.audio_features(wave)
    assert [f.num_tokens for f in feats] == [audio.num_audio_tokens(c.shape[0]) for c in chunks]
    assert sum(f.num_tokens for f in feats) > 25 * 74  # nothing truncated


def test_long_audio_cuts_at_the_quiet_point():
    wave = _speechlike(40 * SR, 4)
    quiet = slice(int(29.0 * SR), int(29.3 * SR))
    wave[quiet] = 0.0
    first = audio.split_long_audio(wave)[0]
    assert quiet.start < first.shape[0] < quiet.stop


def test_long_audio_in_a_prompt_becomes_several_blocks():
    from edge_gemma.processor import Processor

    proc = Processor.from_dir(Path(__file__).parent / "data" / "gemma4_tokenizer")
    wave = _speechlike(65 * SR, 2)
    out = proc([{"role": "user", "content": [{"type": "audio", "audio": wave}, {"type": "text", "text": "Sum up."}]}])
    s = proc.tokenizer.special
    ids = out.input_ids.tolist()
    assert ids.count(s.boa) == ids.count(s.eoa) == 3 == len(out.audio_features)
    assert ids.count(s.audio) == sum(out.num_soft_tokens_per_audio) == sum(int(m.sum() + 3) // 4 for m in out.audio_masks)
    assert all(f.shape[0] <= 3000 for f in out.audio_features)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_audio_input(tmp_path):
    with pytest.raises(AudioError, match="empty"):
        audio.load_audio(np.zeros(0, np.float32))
    with pytest.raises(AudioError, match="all samples are NaN"):
        audio.load_audio(np.full(1600, np.nan, np.float32))
    with pytest.raises(AudioError, match="1 of 1600 samples are NaN"):
        bad = np.zeros(1600, np.float32)
        bad[7] = np.inf
        audio.load_audio(bad)
    with pytest.raises(AudioError, match="shape"):
        audio.load_audio(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(AudioError, match="unsupported sample dtype"):
        audio.load_audio(np.zeros(10, np.complex64))
    with pytest.raises(AudioError, match="no such audio file"):
        audio.load_audio(tmp_path / "missing.wav")
    fake = tmp_path / "notes.mp4"
    fake.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not audio libsndfile reads")
    with pytest.raises(AudioError, match=r"notes\.mp4: unsupported or corrupt audio file.*WAV"):
        audio.load_audio(fake)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match="empty.wav"):
        audio.load_audio(empty)
    with pytest.raises(AudioError, match="exceed 30 s"):
        audio.log_mel(np.zeros(audio.MAX_SAMPLES + 1, np.float32))
    with pytest.raises(AudioError, match="empty"):
        audio.log_mel(np.zeros(0, np.float32))
