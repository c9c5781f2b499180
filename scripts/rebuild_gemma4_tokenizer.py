#!/usr/bin/env python3
"""Rebuild tests/data/gemma4_tokenizer/ (the real Gemma 4 tokenizer) from llama.cpp's vocabulary file.

Where the files come from: the Gemma 4 tokenizer is not on PyPI as such, but llama.cpp ships a vocabulary-only GGUF
of it for its tokenizer tests, ``vendor/llama.cpp/models/ggml-vocab-gemma-4.gguf``, inside the source distribution of
``llama-cpp-python``. That GGUF holds the 262144 tokens, their types (control / user-defined / byte / normal), the
514906 BPE merges, the special-token ids, ``add_bos_token`` and the chat template. Next to it are llama.cpp's test
vectors (``.gguf.inp`` inputs, ``.gguf.out`` expected ids), which tests/test_tokenizer.py checks us against.

What this script does:

1. ``pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`` (or use ``--sdist PATH``);
2. read ``ggml-vocab-gemma-4.gguf`` with the ``gguf`` package (``pip install gguf``);
3. write ``tokenizer.json`` in the layout of the Hugging Face ``GemmaTokenizer`` (BPE with byte fallback, no
   dummy prefix, ``' '`` -> ``'▁'`` normaliser, newline runs split off, ``<bos>`` post-processor, control tokens as
   special added tokens and user-defined ones as non-special added tokens), ``tokenizer_config.json``,
   ``chat_template.jinja`` (the GGUF's ``tokenizer.chat_template``) and the two test-vector files;
4. with ``--xz``, store tokenizer.json as ``tokenizer.json.xz`` (``xz -9``), as the repository does (15 MB -> 3.3 MB).

It needs the network and is not run in CI. The files it writes are byte-identical to the ones in the repository.

    python scripts/rebuild_gemma4_tokenizer.py --out tests/data/gemma4_tokenizer --xz
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "llama-cpp-python==0.3.36"
MEMBER_DIR = "vendor/llama.cpp/models/"
GGUF_NAME = "ggml-vocab-gemma-4.gguf"

# GGUF token types (llama.cpp `llama_token_type`)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Gemma 4 E2B/E4B `max_position_embeddings` (edge_gemma/data/configs/*.config.json); the GGUF's context length
# (262144) is that of the larger model the vocabulary file was exported from.
MODEL_MAX_LENGTH = 131072


def _download_sdist(workdir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", str(workdir)]
    print("running:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    found = sorted(workdir.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise SystemExit(f"pip download left no llama_cpp_python-*.tar.gz in {workdir}")
    return found[0]


def _extract(sdist: Path, workdir: Path) -> dict[str, Path]:
    """Extract the GGUF and its test vectors from the sdist; returns {suffix: path}."""
    wanted = {GGUF_NAME: "gguf", GGUF_NAME + ".inp": "inp", GGUF_NAME + ".out": "out"}
    out: dict[str, Path] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name.split("/", 1)[-1]
            if name.startswith(MEMBER_DIR) and name[len(MEMBER_DIR):] in wanted and member.isfile():
                target = workdir / name[len(MEMBER_DIR):]
                with tar.extractfile(member) as src, open(target, "wb") as dst:
                    dst.write(src.read())
                out[wanted[name[len(MEMBER_DIR):]]] = target
    missing = set(wanted.values()) - set(out)
    if missing:
        raise SystemExit(f"{sdist}: missing {sorted(missing)} under {MEMBER_DIR}")
    return out


def _read_gguf(path: Path) -> dict:
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise SystemExit("this script needs the `gguf` package: pip install gguf") from e
    fields = GGUFReader(str(path)).fields

    def get(key):
        if key not in fields:
            raise SystemExit(f"{path}: GGUF field {key!r} missing")
        return fields[key].contents()

    model = get("tokenizer.ggml.model")
    if model != "gemma4":
        raise SystemExit(f"{path}: tokenizer.ggml.model is {model!r}, expected 'gemma4'")
    return {
        "tokens": get("tokenizer.ggml.tokens"),
        "types": get("tokenizer.ggml.token_type"),
        "merges": get("tokenizer.ggml.merges"),
        "bos": get("tokenizer.ggml.bos_token_id"),
        "eos": get("tokenizer.ggml.eos_token_id"),
        "unk": get("tokenizer.ggml.unknown_token_id"),
        "pad": get("tokenizer.ggml.padding_token_id"),
        "mask": get("tokenizer.ggml.mask_token_id"),
        "add_bos": bool(get("tokenizer.ggml.add_bos_token")),
        "add_space_prefix": bool(get("tokenizer.ggml.add_space_prefix")),
        "chat_template": get("tokenizer.chat_template"),
    }


def build_tokenizer_json(g: dict) -> dict:
    if g["add_space_prefix"]:
        raise SystemExit("GGUF says add_space_prefix=True; Gemma 4 has no dummy prefix and this script assumes none")
    tokens, types = g["tokens"], g["types"]
    added = [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": t == CONTROL}
        for i, (tok, t) in enumerate(zip(tokens, types))
        if t in (CONTROL, USER_DEFINED)
    ]
    merges = []
    for m in g["merges"]:
        left, sep, right = m.partition(" ")  # tokens never contain ' ' (it is '▁'), so the first space splits
        if not sep:
            raise SystemExit(f"merge {m!r} has no space separator")
        merges.append([left, right])
    bos = tokens[g["bos"]]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        # llama.cpp's gemma4 pre-tokeniser isolates runs of newlines (no vocabulary token mixes them with text)
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "\n+"}, "behavior": "Isolated", "invert": False},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [g["bos"]], "tokens": [bos]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": tokens[g["unk"]], "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": merges,
        },
    }


def build_tokenizer_config(g: dict) -> dict:
    t = g["tokens"]
    return {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": t[g["bos"]],
        "eos_token": t[g["eos"]],
        "unk_token": t[g["unk"]],
        "pad_token": t[g["pad"]],
        "mask_token": t[g["mask"]],
        "add_bos_token": g["add_bos"],
        "add_eos_token": False,
        "padding_side": "left",
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
    }


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", type=Path, help="llama_cpp_python-0.3.36.tar.gz (downloaded with pip if absent)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/data/gemma4_tokenizer")
    parser.add_argument("--xz", action="store_true", help="write tokenizer.json.xz (xz -9) instead of tokenizer.json")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sdist = args.sdist or _download_sdist(work)
        files = _extract(sdist, work)
        g = _read_gguf(files["gguf"])
        tokenizer_json = json.dumps(build_tokenizer_json(g), ensure_ascii=False).encode("utf-8")
        if args.xz:
            _write(args.out / "tokenizer.json.xz", lzma.compress(tokenizer_json, preset=9))
        else:
            _write(args.out / "tokenizer.json", tokenizer_json)
        config = json.dumps(build_tokenizer_config(g), indent=2, ensure_ascii=False).encode("utf-8")
        _write(args.out / "tokenizer_config.json", config)
        _write(args.out / "chat_template.jinja", g["chat_template"].encode("utf-8"))
        for kind in ("inp", "out"):
            _write(args.out / files[kind].name, files[kind].read_bytes())
    print(f"wrote {args.out} ({len(g['tokens'])} tokens, {len(g['merges'])} merges)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
