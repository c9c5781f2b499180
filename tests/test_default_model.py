"""The embedded default model (edge_gemma/data/default): a real, trained, reproducible tiny Gemma 4.

Checks: transformers loads it strictly and our parser accepts its config; it has the E2B features (PLE, hybrid
attention with proportional RoPE, KV sharing, softcap 30, clipped-linear towers); it fits the 10 MB budget; its
tokenizer carries every Gemma 4 added token as one piece at the ids the config names; its held-out perplexity,
recomputed here with transformers, is far below an add-one unigram model's; and rerunning the first 20 training
steps reproduces the losses the training script recorded.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys

import pytest
import torch

from paths import DEFAULT, REPO  # noqa: E402
SCRIPT = REPO / "scripts" / "train_default_model.py"
FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "chat_template.jinja", "TRAINING.md", "training_report.json")

# The 24 added tokens of the real Gemma 4 tokenizer.json (tests/data/gemma4_tokenizer), with their `special` flag.
GEMMA4_ADDED = {
    "<pad>": True, "<eos>": True, "<bos>": True, "<unk>": True, "<mask>": True, "<|tool>": True, "<tool|>": True,
    "<|tool_call>": False, "<tool_call|>": False, "<|tool_response>": False, "<tool_response|>": False,
    '<|"|>': False, "<|think|>": True, "<|channel>": False, "<channel|>": False, "<|turn>": True, "<turn|>": True,
    "<|image>": True, "<|audio>": True, "<|image|>": True, "<|audio|>": True, "<image|>": True, "<audio|>": True,
    "<|video|>": True,
}


@pytest.fixture(scope="module")
def trainer():
    """The training script as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("train_default_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


# the training code sets global torch state; tests/conftest.py restores it after this module
pytestmark = pytest.mark.usefixtures("restore_torch_state")


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads((DEFAULT / "training_report.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def corpus(trainer, report):
    corpus = trainer.load_corpus()
    assert corpus.sha256 == report["stdlib_docstrings_sha256"], (
        "the docstrings of this Python's standard library differ from those the default model was trained on "
        f"(Python {report['python']}); rerun scripts/train_default_model.py"
    )
    return corpus


@pytest.fixture(scope="module")
def raw_tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(DEFAULT / "tokenizer.json"))


@pytest.fixture(scope="module")
def data(trainer, corpus, raw_tokenizer):
    """Training and held-out token blocks, built from the saved tokenizer exactly as the training script does."""
    return trainer.prepare_data(raw_tokenizer, DEFAULT, corpus)


def test_folder_is_complete_and_within_budget():
    names = {p.name for p in DEFAULT.iterdir()}
    assert set(FILES) <= names, f"missing {sorted(set(FILES) - names)}"
    total = sum(p.stat().st_size for p in DEFAULT.iterdir() if p.is_file())
    assert total <= 10_000_000, f"{DEFAULT}: {total} bytes, budget 10 MB"


def test_checkpoint_loads_strictly_and_config_parses():
    from transformers import Gemma4ForConditionalGeneration

    from edge_gemma.config import load_config

    cfg = load_config(DEFAULT)
    model, info = Gemma4ForConditionalGeneration.from_pretrained(
        str(DEFAULT), dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), f"loading {DEFAULT}: {info}"
    text = model.config.text_config
    assert cfg.text.num_hidden_layers == text.num_hidden_layers and cfg.text.vocab_size == text.vocab_size
    # E2B features: PLE, hybrid sliding/full with proportional RoPE, KV sharing, softcap 30.
    assert text.hidden_size_per_layer_input > 0 and text.vocab_size_per_layer_input == text.vocab_size
    assert text.final_logit_softcapping == 30.0
    assert text.rope_parameters["full_attention"]["rope_type"] == "proportional"
    assert {"sliding_attention", "full_attention"} == set(text.layer_types)
    first_shared = text.num_hidden_layers - text.num_kv_shared_layers
    assert text.num_kv_shared_layers > 0
    assert {"sliding_attention", "full_attention"} == set(text.layer_types[:first_shared])
    assert {"sliding_attention", "full_attention"} == set(text.layer_types[first_shared:])
    assert model.config.vision_config.use_clipped_linears and model.config.audio_config.use_clipped_linears
    assert cfg.vision is not None and cfg.audio is not None
    # Every linear's input size (text, PLE, vision, audio, embedders) is a multiple of 128: int4 groups of 128 fit.
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert module.in_features % 128 == 0, f"{name}: in_features {module.in_features}"
    # Stored as bf16 (fp32 does not fit the budget); lm_head is tied.
    from safetensors import safe_open

    with safe_open(str(DEFAULT / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert "lm_head.weight" not in set(f.keys())
    assert dtypes == {"BF16"}, dtypes


def test_special_tokens_single_pieces_match_config(raw_tokenizer):
    from edge_gemma.config import load_config

    data = json.loads((DEFAULT / "tokenizer.json").read_text(encoding="utf-8"))
    added = {a["content"]: a for a in data["added_tokens"]}
    assert set(added) == set(GEMMA4_ADDED)
    for token, special in GEMMA4_ADDED.items():
        assert added[token]["special"] is special, token
        assert raw_tokenizer.encode(token, add_special_tokens=False).ids == [added[token]["id"]], token
    assert raw_tokenizer.get_vocab_size() <= 8192
    # Every special-looking marker the chat template emits is one of them.
    template = (DEFAULT / "chat_template.jinja").read_text(encoding="utf-8")
    assert template == (REPO / "tests" / "data" / "gemma4_tokenizer" / "chat_template.jinja").read_text(encoding="utf-8")
    used = set(re.findall(r"<\|?[a-z_\"]+\|?>", template)) - {"<str>"}
    assert used and used <= set(GEMMA4_ADDED), sorted(used - set(GEMMA4_ADDED))
    ids = {t: added[t]["id"] for t in GEMMA4_ADDED}
    assert (ids["<pad>"], ids["<eos>"], ids["<bos>"]) == (0, 1, 2)
    raw = json.loads((DEFAULT / "config.json").read_text(encoding="utf-8"))
    expected = {
        "image_token_id": ids["<|image|>"], "audio_token_id": ids["<|audio|>"], "video_token_id": ids["<|video|>"],
        "boi_token_id": ids["<|image>"], "eoi_token_id": ids["<image|>"], "boa_token_id": ids["<|audio>"],
        "eoa_token_index": ids["<audio|>"], "eos_token_id": [ids["<eos>"], ids["<turn|>"]],
    }
    assert {k: raw[k] for k in expected} == expected
    text = raw["text_config"]
    assert (text["pad_token_id"], text["bos_token_id"], text["eos_token_id"]) == (ids["<pad>"], ids["<bos>"], ids["<eos>"])
    cfg = load_config(DEFAULT)
    assert cfg.eos_token_id == (ids["<eos>"], ids["<turn|>"])
    assert cfg.image_token_id == ids["<|image|>"] and cfg.eoa_token_id == ids["<audio|>"]
    gen = json.loads((DEFAULT / "generation_config.json").read_text(encoding="utf-8"))
    assert gen["eos_token_id"] == [ids["<eos>"], ids["<turn|>"], ids["<|tool_response>"]]


def test_tokenizer_loads_in_transformers_and_round_trips(raw_tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(DEFAULT))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.padding_side) == (2, 1, 0, "left")
    texts = [
        "Return a new dict with the keys of the mapping.\n\n    >>> sorted({'b': 1, 'a': 2})\n    ['a', 'b']",
        "Tabs\tand  double  spaces, unicode: é ü 漢字 🙂 — and a trailing newline\n",
        "def f(x):\n    return x ** 2  # square",
    ]
    for text in texts:
        ids = hf(text).input_ids
        assert ids[0] == hf.bos_token_id
        # transformers rebuilds the pre-tokenizer; the pieces must not change.
        assert ids == raw_tokenizer.encode(text).ids
        assert hf.decode(ids, skip_special_tokens=True) == text
        assert raw_tokenizer.decode(raw_tokenizer.encode(text, add_special_tokens=False).ids) == text
    prompt = hf.apply_chat_template([{"role": "user", "content": "What does json.dumps do?"}], tokenize=False,
                                    add_generation_prompt=True)
    assert prompt == ("<bos><|turn>user\nWhat does json.dumps do?<turn|>\n<|turn>model\n"
                      "<|channel>thought\n<channel|>")
    ids = raw_tokenizer.encode(prompt, add_special_tokens=False).ids
    tid = raw_tokenizer.token_to_id
    assert ids[:2] == [tid("<bos>"), tid("<|turn>")]
    assert ids[-2:] == [tid("\n"), tid("<channel|>")] and tid("<|channel>") in ids and tid("<turn|>") in ids
    assert raw_tokenizer.decode(ids, skip_special_tokens=False) == prompt


def test_heldout_perplexity_far_below_unigram(trainer, report, corpus, data, raw_tokenizer):
    """Recompute the held-out perplexity with transformers on the stored checkpoint."""
    from transformers import Gemma4ForConditionalGeneration

    # Every 20th module (in sorted path order) is held out.
    assert corpus.heldout_modules == (corpus.train_modules + corpus.heldout_modules) // 20 > 0
    model = Gemma4ForConditionalGeneration.from_pretrained(str(DEFAULT), dtype=torch.float32).eval()
    trainer.set_text_attention(model, trainer.SETTINGS.attn_implementation)
    torch.set_num_threads(trainer.SETTINGS.threads)
    nll = trainer.heldout_nll(model, data.heldout_blocks)
    uni = trainer.unigram_nll(data.train_stream, data.heldout_blocks, raw_tokenizer.get_vocab_size())
    assert math.isclose(uni, report["heldout"]["unigram_nll"], rel_tol=1e-9)
    assert math.isclose(nll, report["heldout"]["model_nll"], rel_tol=1e-4), (nll, report["heldout"]["model_nll"])
    # "far below": at most half the unigram perplexity (in practice much less).
    assert math.exp(nll) < 0.5 * math.exp(uni), (math.exp(nll), math.exp(uni))


@pytest.mark.slow
def test_first_twenty_steps_reproduce_recorded_losses(trainer, report, data):
    recorded = report["first_step_losses"]
    assert len(recorded) == 20
    losses = trainer.first_step_losses(20, DEFAULT, data=data)
    # The recorded losses come from one x86 CPU (an Intel Xeon VM); on another (an AMD EPYC VM, both with AVX-512)
    # torch's kernels sum in another order. Measured there: steps 0 and 1 agree to 3e-6, then Adam, which normalises the gradients,
    # amplifies the ulp differences: 1.5e-4 at step 2, at most 0.54 % by step 19. So steps 0-1 are checked tightly
    # (a change of data, tokenizer, initialisation, model or learning rate moves them by far more than 1e-5: one
    # Adam step moves the loss by 6e-4 relative) and the later steps within 2 %.
    for step, (got, want) in enumerate(zip(losses, recorded)):
        tol = 1e-5 if step < 2 else 2e-2
        assert math.isclose(got, want, rel_tol=tol), f"step {step}: loss {got} != recorded {want} (rel_tol {tol})"
    assert losses[-1] < losses[0]  # it learns


def test_chat_answer_is_text_ended_by_turn_marker():
    """Trained on chat-formatted docstrings, the model answers in the Gemma 4 format: words, then <turn|>."""
    from transformers import AutoTokenizer, Gemma4ForConditionalGeneration

    hf = AutoTokenizer.from_pretrained(str(DEFAULT))
    model = Gemma4ForConditionalGeneration.from_pretrained(str(DEFAULT), dtype=torch.float32).eval()
    prompt = hf.apply_chat_template([{"role": "user", "content": "What does os.path.join do?"}],
                                    add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=64, do_sample=False)[0, prompt.shape[1]:].tolist()
    turn_end = hf.convert_tokens_to_ids("<turn|>")
    assert turn_end in out, hf.decode(out)
    answer = hf.decode(out[:out.index(turn_end)])
    words = re.findall(r"[A-Za-z]{2,}", answer)
    assert len(words) >= 3 and "<" not in answer, answer
