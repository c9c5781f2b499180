"""Images and audio through the `.litertlm` bundle in Google's LiteRT-LM engine (`litert_lm`), against our eager model.

The bundle carries LiteRT-LM's own encoder sections (VISION_ENCODER + VISION_ADAPTER, AUDIO_ENCODER_HW +
AUDIO_ADAPTER, see export/litert/graphs.py). LiteRT-LM does its own preprocessing: it decodes the PNG/WAV file,
resizes and patchifies the image (stb, Catmull-Rom) and computes the audio log-mel (its Gemma 4 preprocessor); our
eager model gets the same files through OUR processor (PIL bicubic, numpy log-mel). The images here are sized so that
neither side resizes (768x768 and 912x672 are fixed points of the 280-token budget), so the pixels are identical; the
audio goes through the two log-mel implementations as they are. The greedy tokens must be the same.

The embedded default model was trained on text only and answers every chat-formatted prompt with the same sentence,
so the comparison uses a raw template (`<bos>` + the parts, no turn markup), given to both engines, where the
continuation depends on the media: each test first checks that our eager model's answers differ between two images
(two audio clips), so a bundle that ignored its encoders could not pass.
"""

from __future__ import annotations

import shutil
import wave
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")
pytest.importorskip("litert_lm")

from PIL import Image  # noqa: E402

from edge_gemma.api import open_checkpoint  # noqa: E402
from edge_gemma.artifact import Artifact  # noqa: E402
from edge_gemma.runtimes.engine import GenerationOptions  # noqa: E402
from edge_gemma.runtimes.litert_lm import LitertLmEngine  # noqa: E402

from paths import DEFAULT  # noqa: E402
from conftest import LITERT_CHUNK as CHUNK, LITERT_CONTEXT as CONTEXT  # noqa: E402  (512: a 768x768 image is 256 soft tokens)
NEW = 24
STOPS = ("<eos>", "<turn|>")

RAW_TEMPLATE = """{{- bos_token -}}
{%- for message in messages -%}
{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}
{%- for item in message['content'] -%}
{%- if item['type'] == 'text' -%}{{- item['text'] -}}
{%- elif item['type'] == 'image' -%}{{- '<|image|>' -}}
{%- elif item['type'] == 'audio' -%}{{- '<|audio|>' -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endfor -%}
"""


def _wav(path: Path, samples: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype(np.int16).tobytes())
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("litert_mm_media")
    rng = np.random.default_rng(2)
    grad = np.linspace(0, 255, 768).astype(np.uint8)
    out = {"black": d / "black.png", "grad": d / "grad.png", "noise": d / "noise.png"}
    Image.fromarray(np.zeros((768, 768, 3), np.uint8)).save(out["black"])
    Image.fromarray(np.stack([np.tile(grad, (768, 1)), np.tile(grad[:, None], (1, 768)),
                              np.full((768, 768), 128, np.uint8)], -1)).save(out["grad"])
    Image.fromarray((rng.random((672, 912, 3)) * 255).astype(np.uint8)).save(out["noise"])
    t = np.arange(32000) / 16000  # 2 s
    out["tone"] = _wav(d / "tone.wav", 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size))
    t = np.arange(24000) / 16000  # 1.5 s, not a whole number of 40 ms audio tokens
    out["chirp"] = _wav(d / "chirp.wav", 0.3 * np.sin(2 * np.pi * 880 * t) * np.linspace(0, 1, t.size)
                        + 0.1 * rng.standard_normal(t.size))
    out["hiss"] = _wav(d / "hiss.wav", 0.5 * np.random.default_rng(5).standard_normal(24000))
    return out


@pytest.fixture(scope="module")
def mm_artifact(embedded_litert_fp32_artifact) -> Artifact:
    """The embedded model's fp32 LiteRT artifact (conftest; context 512, shared with test_litert.py)."""
    return Artifact(embedded_litert_fp32_artifact)


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    """Our eager model with the raw template (the default model's tokenizer files, template replaced)."""
    tok = tmp_path_factory.mktemp("litert_mm_tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT / name, tok / name)
    (tok / "chat_template.jinja").write_text(RAW_TEMPLATE)
    model = open_checkpoint(DEFAULT, context=CONTEXT, prefill_chunk=CHUNK, tokenizer_dir=tok)
    yield model
    model.close()


@pytest.fixture(scope="module")
def litertlm(mm_artifact):
    with LitertLmEngine(mm_artifact, threads=2) as engine:
        yield engine


def _eager_answer(model, content) -> str:
    done = model.engine.generate([{"role": "user", "content": content}],
                                 options=GenerationOptions(max_new_tokens=NEW)).result()
    assert len(done.token_ids) == NEW or done.text.endswith(STOPS), done.text
    return done.text


def _visible(text: str) -> str:
    """The answer as LiteRT-LM returns it: without the stop token that ended it."""
    for stop in STOPS:
        if text.endswith(stop):
            return text[: -len(stop)]
    return text


def _litertlm_answer(engine: LitertLmEngine, content) -> str:
    return "".join(engine.chat(content, max_new_tokens=NEW, greedy=True, chat_template=RAW_TEMPLATE))


def test_bundle_has_the_encoder_sections(mm_artifact, litertlm):
    entry = mm_artifact.backends["litert"]["litertlm"]
    assert {"vision_encoder", "vision_adapter", "audio_encoder", "audio_adapter"} <= set(entry["sections"])
    assert entry["vision_max_num_patches"] == mm_artifact.backends["litert"]["vision_patches"] == 280 * 9
    assert litertlm.vision and litertlm.audio


def test_litertlm_image_greedy_tokens_equal_eager(eager, litertlm, media):
    prompt = {"type": "text", "text": "This module provides"}
    answers = {name: _eager_answer(eager, [{"type": "image", "path": str(media[name])}, prompt])
               for name in ("black", "grad", "noise")}
    assert answers["black"] != answers["grad"], "the eager answer must depend on the image for this test to bite"
    for name, expected in answers.items():
        got = _litertlm_answer(litertlm, [{"type": "image", "path": str(media[name])}, prompt])
        assert got == _visible(expected), f"{name}: LiteRT-LM {got!r} != eager {expected!r}"


def test_litertlm_audio_greedy_tokens_equal_eager(eager, litertlm, media):
    """The audio's influence on this tiny model is weaker than the image's: three clips, at least two answers."""
    prompt = {"type": "text", "text": "This module provides"}
    answers = {name: _eager_answer(eager, [{"type": "audio", "path": str(media[name])}, prompt])
               for name in ("tone", "chirp", "hiss")}
    assert len({_visible(a) for a in answers.values()}) >= 2, "the eager answer must depend on the audio"
    for name, expected in answers.items():
        got = _litertlm_answer(litertlm, [{"type": "audio", "path": str(media[name])}, prompt])
        assert got == _visible(expected), f"{name}: LiteRT-LM {got!r} != eager {expected!r}"


def test_litertlm_rejects_bad_content(litertlm, media):
    with pytest.raises(ValueError, match="content\\[0\\]"):
        list(litertlm.chat([{"type": "video", "path": str(media["black"])}], max_new_tokens=1, greedy=True))
    with pytest.raises(ValueError, match="file path"):
        list(litertlm.chat([{"type": "image", "path": str(media["black"]) + ".missing"}], max_new_tokens=1,
                           greedy=True))
