"""Tokenizer: special ids from the real Gemma 4 tokenizer.json, encode/decode parity with transformers, one <bos>,
streaming detokenization, any tokenizer.json that carries the Gemma 4 special tokens, SentencePiece models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_gemma.tokenizer import SPECIAL_TOKEN_STRINGS, Tokenizer, TokenizerError

DATA = Path(__file__).parent / "data" / "gemma4_tokenizer"




@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(DATA)


@pytest.fixture(scope="module")
def hf_tok(gemma4_tokenizer_json_dir):
    transformers = pytest.importorskip("transformers")
    out = gemma4_tokenizer_json_dir
    return transformers.AutoTokenizer.from_pretrained(str(out))


# gemma4-architecture.md section 7. The real tokenizer.json agrees with every one of them.
EXPECTED_IDS = {
    "pad": 0, "eos": 1, "bos": 2, "boi": 255999, "boa": 256000, "image": 258880, "audio": 258881, "eoi": 258882,
    "eoa": 258883, "video": 258884, "turn_end": 106, "turn_start": 105, "tool_start": 46, "tool_end": 47,
    "tool_call_start": 48, "tool_call_end": 49, "tool_response_start": 50, "tool_response_end": 51, "escape": 52,
    "think": 98, "channel_start": 100, "channel_end": 101,
}


def test_special_ids_of_real_tokenizer(tok, hf_tok):
    for field, expected in EXPECTED_IDS.items():
        assert getattr(tok.special, field) == expected, field
        assert hf_tok.convert_tokens_to_ids(SPECIAL_TOKEN_STRINGS[field]) == expected, field
    assert tok.vocab_size == 262144
    assert tok.special.stop_ids == (1, 106, 50)
    assert tok.chat_template is not None and "<|turn>" in tok.chat_template


TEXTS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "multiple\n\nnewlines\n\n\nand\ttabs\t\t",
    "Ünïcödé naïve café — “quotes” …",
    "日本語のテキストと中文文本와 한국어",
    "emoji 🦙🔥👩‍👩‍👧 and rare 𓀀𝔘 chars",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "<bos><|turn>user\nHi<turn|>\n<|turn>model\n",
    'call:f{a:<|"|>x<|"|>}<|tool_call><tool_call|><|image|><|audio|><|video|>',
    "<start_of_turn> is not a Gemma 4 token; <unk> and <mask> are",
    "numbers 1234567890 3.14159 -42 1e-9",
    "",
    " ",
    "\n",
    "a" * 300,
    "Mixed  \u00a0 nbsp and\u200bzero width",
]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)


def test_long_text_matches_transformers(tok, hf_tok):
    text = (DATA / "chat_template.jinja").read_text() + Path(__file__).read_text()
    assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)


def test_bos_handling(tok, hf_tok):
    assert tok.encode("Hi") == hf_tok("Hi")["input_ids"][1:]  # the HF tokenizer adds <bos> to plain text
    assert tok.encode("Hi", add_bos=True) == hf_tok("Hi")["input_ids"]
    assert tok.encode_prompt("<bos>Hi").count(2) == 1
    assert tok.encode_prompt("Hi") == [2, *tok.encode("Hi")]


@pytest.mark.parametrize("text", ["emoji 🦙🔥👩‍👩‍👧 and rare 𓀀𝔘 chars", "日本語 𠀋𠂉 ok", "plain ascii", "<|turn>x<turn|>é"])
def test_stream_decoder_never_breaks_utf8(tok, text):
    ids = tok.encode(text)
    pieces = list(tok.stream_decoder().feed_many(ids))
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_holds_partial_bytes(tok):
    ids = tok.encode("𓀀")  # not in the vocabulary: four byte-fallback tokens
    assert len(ids) == 4 and all(tok.id_to_token(i).startswith("<0x") for i in ids)
    dec = tok.stream_decoder()
    assert [dec.feed(i) for i in ids] == ["", "", "", "𓀀"]
    dec.feed(ids[0])
    assert dec.flush() == "\ufffd"  # an incomplete character at the very end is reported, not lost


def _tiny_tokenizer_json(path: Path, specials: dict[str, int]) -> Path:
    """A small BPE tokenizer.json that carries the Gemma 4 special tokens at ids unlike the real ones."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers

    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    for ch in "abcdefghijklmnopqrstuvwxyz▁\n":
        vocab.setdefault(ch, len(vocab))
    for token, token_id in specials.items():
        vocab[token] = token_id
    t = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    t.normalizer = normalizers.Replace(" ", "▁")
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    t.add_special_tokens(list(specials))
    t.save(str(path))
    return path


def test_ids_are_looked_up_by_string(tmp_path):
    specials = {s: 1000 + i for i, s in enumerate(SPECIAL_TOKEN_STRINGS.values())}
    _tiny_tokenizer_json(tmp_path / "tokenizer.json", specials)
    t = Tokenizer.from_dir(tmp_path)
    for field, token in SPECIAL_TOKEN_STRINGS.items():
        assert getattr(t.special, field) == specials[token]
    assert t.encode("ab<|image|>") == [t.token_to_id("a"), t.token_to_id("b"), specials["<|image|>"]]
    assert t.encode_prompt("<bos>x")[0] == specials["<bos>"]


def test_config_names_override_token_strings(tmp_path):
    specials = {s: 1000 + i for i, s in enumerate(SPECIAL_TOKEN_STRINGS.values())}
    specials["[BOS]"] = 2000
    _tiny_tokenizer_json(tmp_path / "tokenizer.json", specials)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "[BOS]"}}))
    t = Tokenizer.from_dir(tmp_path)
    assert t.special.bos == 2000 and t.bos_token == "[BOS]"


def test_missing_special_token_is_named(tmp_path):
    specials = {s: 1000 + i for i, s in enumerate(SPECIAL_TOKEN_STRINGS.values()) if s != "<|audio|>"}
    _tiny_tokenizer_json(tmp_path / "tokenizer.json", specials)
    with pytest.raises(TokenizerError, match=r"audio='<\|audio\|>'"):
        Tokenizer.from_dir(tmp_path)


def test_bad_directories(tmp_path):
    with pytest.raises(TokenizerError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="found none of tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json: cannot load tokenizer"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.json.xz").write_bytes(b"not xz")
    with pytest.raises(TokenizerError, match="tokenizer.json.xz: cannot load tokenizer"):
        Tokenizer.from_dir(tmp_path)


def test_sentencepiece_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["hello world", "the quick brown fox jumps", "gemma runs on a pi", "héllo café"] * 50))
    control = ["<pad>", "<eos>", "<bos>", "<unk>"]
    user = [s for s in SPECIAL_TOKEN_STRINGS.values() if s not in control]
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=340, hard_vocab_limit=False, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=user, byte_fallback=True,
        add_dummy_prefix=False, minloglevel=2,  # Gemma's SentencePiece models add no dummy prefix
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    t = Tokenizer.from_dir(tmp_path)
    assert (t.special.pad, t.special.eos, t.special.bos, t.special.unk) == (0, 1, 2, 3)
    assert t.special.image == sp.piece_to_id("<|image|>")
    text = "hello world<|image|>the fox"
    assert sp.piece_to_id("<|image|>") in sp.encode(text)  # SentencePiece matches user-defined pieces itself
    assert t.encode(text) == sp.encode(text)
    # control pieces are never produced by SentencePiece from text; we split them out
    assert t.encode("<bos>hello<eos>") == [2, *sp.encode("hello"), 1]
    assert t.decode(t.encode("<bos>hello")) == "<bos>hello"
    assert t.decode(t.encode("<bos>hello"), skip_special_tokens=True) == "hello"
    assert t.decode(t.encode("héllo 🦙")) == "héllo 🦙"  # byte fallback round trip


def test_llama_cpp_test_vectors(tok):
    """llama.cpp's own expected ids for its Gemma 4 vocabulary (ggml-vocab-gemma-4.gguf.inp/.out, shipped next to
    the GGUF our tokenizer.json is rebuilt from; see scripts/rebuild_gemma4_tokenizer.py)."""
    inputs = (DATA / "ggml-vocab-gemma-4.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = (DATA / "ggml-vocab-gemma-4.gguf.out").read_text(encoding="utf-8").split("\n")
    assert len(inputs) == 46 and outputs[46:] == [""]
    for text, expected in zip(inputs, outputs):
        assert tok.encode(text) == [int(x) for x in expected.split()], repr(text)
