"""The engine end to end on the embedded model through the eager backend.

References are independent of the engine: `Gemma4Model.generate_greedy` WITHOUT caches (recomputes the whole
sequence every step, merges soft tokens with the model's own `embed`), and the processor's own token ids.
"""

from __future__ import annotations

import dataclasses

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from edge_gemma import api
from edge_gemma.chat import ToolCall
from edge_gemma.paths import DEFAULT_CHECKPOINT
from edge_gemma.runtimes.base import Backend
from edge_gemma.runtimes.engine import ContextOverflowError, EngineError, GenerationOptions

from paths import REPO  # noqa: E402
NEW = 8


@pytest.fixture(scope="session")
def model():
    with api.open_checkpoint("default", context=256, prefill_chunk=16, max_soft_tokens=70) as m:
        yield m


@pytest.fixture(scope="session")
def cache_free():
    from edge_gemma.checkpoint import load_model

    return load_model(DEFAULT_CHECKPOINT)  # no caches: every step recomputes the whole sequence


def _reference(cache_free, model, prompt, n=NEW, **mm) -> list[int]:
    ids = torch.from_numpy(prompt.input_ids).unsqueeze(0)
    return cache_free.generate_greedy(ids, n, stop_ids=tuple(model.engine.stop_ids), **mm)


def _run(model, messages, n=NEW):
    model.engine.reset()
    gen = model.engine.generate(messages, options=GenerationOptions(max_new_tokens=n))
    pieces = list(gen)
    return pieces, gen.completion


def test_text_prompt_matches_the_cache_free_model(model, cache_free):
    messages = [{"role": "user", "content": "Return the absolute value of a number."}]
    pieces, done = _run(model, messages)
    prompt = model.engine.prepare(messages)
    assert list(done.token_ids) == _reference(cache_free, model, prompt)
    assert "".join(pieces) == model.processor.tokenizer.decode(
        [t for t in done.token_ids if t not in model.engine.stop_ids])
    s = done.stats
    assert s.prompt_tokens == prompt.input_ids.size and s.prefilled_tokens == s.prompt_tokens
    assert s.ttft_s > 0 and s.prefill_tok_s > 0 and s.peak_rss_mb > 10
    assert s.new_tokens == len(done.token_ids)
    if s.stop_reason == "max_new_tokens":
        assert s.decode_steps == NEW - 1 and s.decode_tok_s > 0


def test_image_prompt_matches_the_cache_free_model(model, cache_free):
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What is it?"}]}]
    _, done = _run(model, messages, n=4)
    prompt = model.engine.prepare(messages)
    assert prompt.num_soft_tokens_per_image and prompt.num_soft_tokens_per_image[0] > 0
    ref = _reference(cache_free, model, prompt, n=4, pixel_values=torch.from_numpy(prompt.pixel_values),
                     image_position_ids=torch.from_numpy(prompt.image_position_ids))
    assert list(done.token_ids) == ref
    assert done.stats.encoder_ms > 0
    # The soft tokens matter: the same prompt with another image changes the logits (checked on the first token's
    # distribution through the backend, not only the argmax).
    img2 = Image.fromarray(np.full((48, 64, 3), 255, np.uint8))
    model.engine.reset()
    msgs2 = [{"role": "user", "content": [{"type": "image", "image": img2}, {"type": "text", "text": "What is it?"}]}]
    p2 = model.engine.prepare(msgs2)
    assert np.array_equal(p2.input_ids, prompt.input_ids)
    ref2 = _reference(cache_free, model, p2, n=1, pixel_values=torch.from_numpy(p2.pixel_values),
                      image_position_ids=torch.from_numpy(p2.image_position_ids))
    _, done2 = _run(model, msgs2, n=1)
    assert list(done2.token_ids) == ref2
    assert done2.stats.reused_tokens < int(np.argmax(prompt.mm_token_type_ids == 1)) + 1  # new image: re-prefilled


def test_audio_prompt_matches_the_cache_free_model(model, cache_free):
    t = np.arange(16000) / 16000
    wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": wave, "sample_rate": 16000},
                                             {"type": "text", "text": "Transcribe."}]}]
    _, done = _run(model, messages)
    prompt = model.engine.prepare(messages)
    assert prompt.num_soft_tokens_per_audio == (25,)
    ref = _reference(cache_free, model, prompt, audio_features=torch.from_numpy(prompt.audio_features[0])[None],
                     audio_mask=torch.from_numpy(prompt.audio_masks[0])[None])
    assert list(done.token_ids) == ref


class ForcedBackend(Backend):
    """Runs the real backend (so caches and shapes are exercised) but makes the model say a scripted answer."""

    name = "forced"

    def __init__(self, inner: Backend, script: list[int]):
        # no drafting: the script forces prefill/decode logits only
        self.inner, self.script = inner, list(script)
        self.capabilities = dataclasses.replace(inner.capabilities, drafter=False)
        self.step = 0

    def embed(self, ids):
        return self.inner.embed(ids)

    def _forced(self, logits):
        out = np.full_like(logits, -30.0)
        out[self.script[min(self.step, len(self.script) - 1)]] = 30.0
        self.step += 1
        return out

    def prefill(self, embeds, ple_rows, positions):
        logits = self.inner.prefill(embeds, ple_rows, positions)
        return self._forced(logits) if positions[-1] >= self.prompt_end - 1 else logits

    def encode_image(self, *a):
        return self.inner.encode_image(*a)

    def encode_audio(self, *a):
        return self.inner.encode_audio(*a)

    def reset(self):
        self.inner.reset()


def test_tool_call_is_parsed_and_kept_in_the_conversation(model):
    from edge_gemma.runtimes.engine import Engine

    tok = model.processor.tokenizer
    answer = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|><|tool_response>'
    script = tok.encode(answer)
    assert script[-1] == tok.special.tool_response_start
    forced = ForcedBackend(model.backend, script)
    engine = Engine(forced, model.processor, model.engine.ple, pad_token_id=model.config.text.pad_token_id,
                    multimodal_token_ids=model.config.multimodal_token_ids)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                              "days": {"type": "integer"}}}}}]
    engine.reset()
    conv = engine.conversation(tools=tools)
    forced.prompt_end = engine.prepare([{"role": "user", "content": "Weather in Paris?"}], tools=tools).input_ids.size
    gen = conv.send("Weather in Paris?", options=GenerationOptions(max_new_tokens=64))
    text = "".join(gen)
    done = gen.completion
    assert done.stats.stop_reason == "stop_token"
    assert list(done.token_ids) == script
    assert "<|tool_call>call:get_weather" in text
    assert done.response.tool_calls == (ToolCall(name="get_weather", arguments={"city": "Paris", "days": 3}),)
    last = conv.messages[-1]
    assert last["role"] == "assistant"
    assert last["tool_calls"] == [{"type": "function", "function": {"name": "get_weather",
                                                                    "arguments": {"city": "Paris", "days": 3}}}]
    conv.add_tool_responses([{"name": "get_weather", "response": {"temperature": 21}}])
    rendered = engine.processor.render(conv.messages, tools=tools)
    assert "call:get_weather" in rendered and "temperature" in rendered


class CountingBackend(Backend):
    """Records every position the engine prefills or decodes."""

    name = "counting"

    def __init__(self, inner: Backend):
        self.inner, self.capabilities = inner, dataclasses.replace(inner.capabilities, drafter=False)  # counts prefill/decode
        self.prefilled: list[int] = []

    def embed(self, ids):
        return self.inner.embed(ids)

    def prefill(self, embeds, ple_rows, positions):
        self.prefilled.extend(int(p) for p in positions)
        return self.inner.prefill(embeds, ple_rows, positions)

    def decode(self, embeds, ple_rows, positions):
        return self.inner.prefill(embeds, ple_rows, positions)

    def reset(self):
        self.inner.reset()


def _lcp(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def test_three_turn_chat_prefills_only_what_changed(model):
    from edge_gemma.runtimes.engine import Engine

    counting = CountingBackend(model.backend)
    eng = Engine(counting, model.processor, model.engine.ple, pad_token_id=model.config.text.pad_token_id,
                 multimodal_token_ids=model.config.multimodal_token_ids)
    eng.reset()
    conv = eng.conversation(system="Answer briefly.")
    opts = GenerationOptions(max_new_tokens=6)
    previous: list[int] | None = None
    previous_prompt = 0
    with api.open_checkpoint("default", context=256, prefill_chunk=16) as fresh:
        for turn, question in enumerate(["Read a file.", "Close the socket.", "Open a new connection."]):
            counting.prefilled = []
            messages = list(conv.messages) + [{"role": "user", "content": question}]
            done = conv.send(question, options=opts).result()
            prompt = eng.prepare(messages).input_ids.tolist()
            expected_reuse = 0 if previous is None else min(_lcp(previous, prompt), len(prompt) - 1)
            assert done.stats.reused_tokens == expected_reuse
            assert counting.prefilled == list(range(expected_reuse, len(prompt)))  # only the new part, in order
            if turn:
                # the earlier turns were kept (the template renders the previous answer without the generation
                # prompt's empty thinking block, so prefill restarts inside the last turn at the latest)
                assert expected_reuse >= previous_prompt - 8
            # the reused cache gives exactly what a fresh prefill of the whole conversation gives
            again = fresh.engine.generate(messages, options=opts).result()
            assert again.token_ids == done.token_ids
            fresh.engine.reset()
            previous = prompt + list(done.token_ids[:-1])  # the last sampled token is never fed
            previous_prompt = len(prompt)
    assert [m["role"] for m in conv.messages] == ["system"] + ["user", "assistant"] * 3


def test_a_prompt_longer_than_the_context_is_refused():
    small = api.open_checkpoint("default", context=32)
    try:
        with pytest.raises(ContextOverflowError, match=r"has \d+ tokens but the artifact's context is 32"):
            small.generate("word " * 40)
        conv = small.chat()
        conv.send("Hi", options=GenerationOptions(max_new_tokens=2)).result()
        before = list(conv.messages)
        with pytest.raises(ContextOverflowError, match="start a new conversation"):
            conv.send("word " * 30)
        assert conv.messages == before  # the refused message is not kept
    finally:
        small.close()


def test_generation_stops_when_the_context_is_full():
    with api.open_checkpoint("default", context=40) as m:
        prompt = m.engine.prepare([{"role": "user", "content": "Hi"}]).input_ids.size
        done = m.engine.generate_ids(list(range(3, 3 + 30)), options=GenerationOptions(
            max_new_tokens=100, ignore_eos=True)).result()
        assert done.stats.stop_reason == "context_full"
        assert done.stats.new_tokens == 40 - 30
        assert prompt > 0


def test_runtime_modules_do_not_import_torch():
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise ImportError(name + ' is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import edge_gemma\n"
        "edge_gemma.open\n"
        "from edge_gemma.runtimes import engine, registry, sampling, budget\n"
        "from edge_gemma.export import fidelity\n"
        "from edge_gemma.commands import run, chat, inspect, bench\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_result_after_streaming_returns_the_same_completion():
    with api.open_checkpoint("default", context=64) as m:
        gen = m.engine.generate([{"role": "user", "content": "Hi"}], options=GenerationOptions(max_new_tokens=4))
        pieces = list(gen)
        first = gen.completion
        assert first is not None
        assert gen.result() is first  # iterating an exhausted generation must not lose the completion
        assert list(gen) == []
        assert "".join(pieces) == first.text


def test_a_generation_left_early_holds_the_engine_until_closed(model):
    """One generation at a time: a loop that breaks keeps the engine until `close()` or the end of a `with` block;
    a closed, unfinished generation has no completion; of two generations made before either started, the second
    to start is refused."""
    eng = model.engine
    eng.reset()
    opts = GenerationOptions(max_new_tokens=8)
    messages = [{"role": "user", "content": "Read a file."}]
    gen = eng.generate(messages, options=opts)
    next(gen)
    with pytest.raises(EngineError, match="already generating"):
        eng.generate(messages, options=opts)
    gen.close()
    with pytest.raises(EngineError, match="closed before it finished"):
        gen.result()
    assert list(gen) == []  # a closed generation yields nothing more
    with eng.generate(messages, options=opts) as inner:
        for _ in inner:
            break
    assert eng.generate(messages, options=opts).result().stats.new_tokens >= 1  # released by the `with`

    first, second = eng.generate(messages, options=opts), eng.generate(messages, options=opts)
    next(first)
    with pytest.raises(EngineError, match="already generating"):
        next(second)
    first.close()
    assert eng.generate(messages, options=opts).result().stats.new_tokens >= 1


@pytest.mark.unit
def test_stop_strings_show_exactly_the_text_before_the_first_one():
    """Against the definition (the text up to the first occurrence of any stop string), for every way of cutting the
    text into streamed pieces, stop strings split across pieces included."""
    import itertools
    import random

    from edge_gemma.runtimes.engine import _StopStrings

    rng = random.Random(0)
    cases = [("Hello END world", ("END",)), ("abcabd", ("abd",)), ("aaab", ("aab",)), ("no stop here", ("xyz",)),
             ("x</s>y<|end|>z", ("<|end|>", "</s>")), ("STOP", ("STOP",)), ("ab", ("abc",)), ("2+2=4\n\nQ:", ("\n\n",))]
    for text, stops in cases:
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        want = text[: min(found)] if found else text
        cuts_all = [c for r in range(len(text)) for c in itertools.combinations(range(1, len(text)), r)]
        for cuts in rng.sample(cuts_all, min(60, len(cuts_all))):
            bounds = (0, *cuts, len(text))
            pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
            s = _StopStrings(stops)
            shown = ""
            for piece in pieces:
                shown += s.feed(piece)
                assert not any(x in shown for x in stops)
                if s.hit:
                    break
            if not s.hit:
                shown += s.flush()
            assert shown == want and s.text == want and s.hit == bool(found), (text, stops, pieces)


def test_generation_ends_before_a_stop_string(model):
    from edge_gemma.runtimes.engine import Engine

    tok = model.processor.tokenizer
    script = tok.encode("def f(x):\n    return x\n\n\nprint(f(2))")
    forced = ForcedBackend(model.backend, script + [tok.special.stop_ids[0]])
    engine = Engine(forced, model.processor, model.engine.ple, pad_token_id=model.config.text.pad_token_id,
                    multimodal_token_ids=model.config.multimodal_token_ids)
    messages = [{"role": "user", "content": "Write f."}]
    forced.prompt_end = engine.prepare(messages).input_ids.size
    gen = engine.generate(messages, options=GenerationOptions(max_new_tokens=64, stop=("\n\n",)))
    pieces = list(gen)
    assert "".join(pieces) == "def f(x):\n    return x"
    assert gen.completion.text == "def f(x):\n    return x"
    assert gen.completion.stats.stop_reason == "stop_string"
    assert len(gen.completion.token_ids) < len(script)  # it stopped there, not at the end of the script
    with pytest.raises(ValueError, match="non-empty"):
        GenerationOptions(stop=("",))
