#!/usr/bin/env python
"""Train edge-gemma's embedded default model: a tiny, *trained* Gemma 4 written by transformers itself.

Why a trained model: the README's main command, the runtimes' output and the quantization quality figures
(perplexity before/after int4) only mean something when the weights are not noise. A random model has the
perplexity of a uniform distribution, so quantizing it loses nothing measurable.

What it is: `Gemma4ForConditionalGeneration` from transformers (the reference implementation), with every Gemma 4
feature the E2B/E4B checkpoints use -- Per-Layer Embeddings, hybrid sliding/full attention with proportional RoPE on
the full layers, KV sharing (both layer types produced before the shared layers), double-wide MLP on the shared
layers, final logit softcap 30 -- plus tiny vision and audio towers with clipped linears. The towers are NOT trained:
they keep transformers' seeded random initialization (images and audio go through the right graph, the text model
just has not learned what they mean). Every linear input size is a multiple of 128 so int4 groups of 128 fit.

Data: text present on every machine -- the docstrings of the running Python's standard library, read from the .py
files under `sysconfig.get_paths()["stdlib"]` with `ast`, in sorted path order. Every 20th module is held out for
evaluation. Half of the docstrings are wrapped in the Gemma 4 chat format (as the chat template renders them), so
the README's chat path produces docstring-like answers.

Tokenizer: a byte-fallback BPE like Gemma's (normalizer ' ' -> '▁', lines split on '\\n', <bos> added by the post
processor), 2048 pieces, trained with `tokenizers` on the training docstrings. It carries all 24 added tokens of the
real Gemma 4 tokenizer with the same strings and `special` flags, at ids of our own (<pad> 0, <eos> 1, <bos> 2).

Determinism: fixed seeds, `torch.use_deterministic_algorithms(True)`, one thread, deterministic data order. On the
same torch version and CPU a rerun writes the same safetensors bytes. `training_report.json` records the losses of
the first steps; `--check-first-steps N` reruns them from the saved tokenizer and prints them (the CI test calls
`first_step_losses`, the same code path).

Usage:
    python scripts/train_default_model.py                      # trains (5-10 min on one core), writes edge_gemma/data/default
    python scripts/train_default_model.py --check-first-steps 20
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

logger = logging.getLogger("train_default_model")

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "edge_gemma" / "data" / "default"
# The real Gemma 4 chat template, kept verbatim in the repository (copied from the real tokenizer).
CHAT_TEMPLATE_SOURCE = REPO / "tests" / "data" / "gemma4_tokenizer" / "chat_template.jinja"
MAX_FOLDER_BYTES = 10 * 1024 * 1024
CHECK_STEPS = 20  # losses of the first steps recorded for the CI rerun


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """Everything that determines the trained weights (recorded in training_report.json)."""

    seed: int = 1234
    vocab_size: int = 2048
    heldout_every: int = 20  # module i (in sorted path order) is held out when i % heldout_every == heldout_every - 1
    seq_len: int = 256
    batch_size: int = 4
    steps: int = 480
    lr: float = 4e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    threads: int = 1
    attn_implementation: str = "sdpa"
    storage_dtype: str = "bfloat16"


SETTINGS = TrainSettings()

# ----------------------------------------------------------------------------------------------------------------
# Special tokens: the 24 added tokens of the real Gemma 4 tokenizer.json (same strings, same `special` flags), in our
# own id order. Real ids in the comments.
# ----------------------------------------------------------------------------------------------------------------
SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<pad>", True),  # 0
    ("<eos>", True),  # 1
    ("<bos>", True),  # 2
    ("<unk>", True),  # 3
    ("<mask>", True),  # 4
    ("<|tool>", True),  # 46
    ("<tool|>", True),  # 47
    ("<|tool_call>", False),  # 48
    ("<tool_call|>", False),  # 49
    ("<|tool_response>", False),  # 50
    ("<tool_response|>", False),  # 51
    ('<|"|>', False),  # 52
    ("<|think|>", True),  # 98
    ("<|channel>", False),  # 100
    ("<channel|>", False),  # 101
    ("<|turn>", True),  # 105
    ("<turn|>", True),  # 106
    ("<|image>", True),  # 255999  boi
    ("<|audio>", True),  # 256000  boa
    ("<|image|>", True),  # 258880 image soft token
    ("<|audio|>", True),  # 258881 audio soft token
    ("<image|>", True),  # 258882  eoi
    ("<audio|>", True),  # 258883  eoa
    ("<|video|>", True),  # 258884 video soft token
)
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))


def token_id(tokenizer, token: str) -> int:
    """Id of a token that must exist as a single piece (errors name the token)."""
    idx = tokenizer.token_to_id(token)
    if idx is None:
        raise ValueError(f"tokenizer: special token {token!r} is missing")
    return idx


# ----------------------------------------------------------------------------------------------------------------
# Corpus: standard-library docstrings
# ----------------------------------------------------------------------------------------------------------------
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The stdlib's .py files in sorted relative-path order (test suites and site-packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("lib2to3"))
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def module_docstrings(path: Path, module: str) -> list[tuple[str, str]]:
    """(qualified name, cleaned docstring) for the module and every class/function in it, in source order."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError) as exc:  # a stdlib file this Python cannot parse: skip it, deterministically
        logger.warning("skipping %s: %s", path, exc)
        return []
    out: list[tuple[str, str]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    out.append((name, doc))
                visit(child, name)

    doc = ast.get_docstring(tree)
    if doc:
        out.append((module, doc))
    visit(tree, module)
    return out


@dataclass(frozen=True, kw_only=True)
class Corpus:
    train: tuple[tuple[str, str], ...]  # (qualified name, docstring)
    heldout: tuple[tuple[str, str], ...]
    train_modules: int
    heldout_modules: int
    sha256: str  # of the extracted text, so a different stdlib is visible in the report


def load_corpus(settings: TrainSettings = SETTINGS) -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    train: list[tuple[str, str]] = []
    heldout: list[tuple[str, str]] = []
    counts = [0, 0]
    digest = hashlib.sha256()
    for i, path in enumerate(stdlib_files(root)):
        rel = path.relative_to(root).with_suffix("")
        module = ".".join(p for p in rel.parts if p != "__init__") or rel.parts[0]
        docs = module_docstrings(path, module)
        held = i % settings.heldout_every == settings.heldout_every - 1
        (heldout if held else train).extend(docs)
        counts[held] += 1
        for name, doc in docs:
            digest.update(f"{int(held)}\x00{name}\x00{doc}\x00".encode())
    return Corpus(
        train=tuple(train), heldout=tuple(heldout), train_modules=counts[0], heldout_modules=counts[1],
        sha256=digest.hexdigest(),
    )


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int):
    """A Gemma-style byte-fallback BPE. Training splits on newlines and before every '▁' (so no merge ever spans a
    word boundary); the saved tokenizer uses Gemma's own pre-tokenizer (newlines only), which gives the same pieces
    because no learned merge can cross a boundary the training split would have made."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n+"), behavior="isolated"),
        pre_tokenizers.Split("▁", behavior="merged_with_next"),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[t for t, _ in SPECIAL_TOKENS] + list(BYTE_TOKENS),
        limit_alphabet=192,
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("\n+"), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)]
    )
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    # The byte pieces are ordinary vocabulary entries in Gemma (not added tokens), and added tokens keep the real
    # tokenizer's `special` flags (tool-call and channel markers are not special there, so decode keeps them).
    data = json.loads(tok.to_str())
    flags = dict(SPECIAL_TOKENS)
    data["added_tokens"] = [
        {**a, "special": flags[a["content"]], "normalized": False}
        for a in data["added_tokens"] if a["content"] in flags
    ]
    final = Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
    if final.get_vocab_size() > vocab_size:
        raise ValueError(f"tokenizer: vocabulary of {final.get_vocab_size()} pieces exceeds {vocab_size}")
    for i, (token, _) in enumerate(SPECIAL_TOKENS):
        if final.token_to_id(token) != i:
            raise ValueError(f"tokenizer: {token!r} has id {final.token_to_id(token)}, expected {i}")
    return final


TOKENIZER_CONFIG = {
    # As the real Gemma 4 tokenizer_config.json (same class, special tokens, padding side).
    "tokenizer_class": "GemmaTokenizer",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "mask_token": "<mask>",
    "add_bos_token": True,
    "add_eos_token": False,
    "padding_side": "left",
    "model_max_length": 4096,
    "clean_up_tokenization_spaces": False,
}


def write_tokenizer_files(tokenizer, out: Path) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8")
    shutil.copyfile(CHAT_TEMPLATE_SOURCE, out / "chat_template.jinja")


# ----------------------------------------------------------------------------------------------------------------
# Training text: plain docstrings and chat turns
# ----------------------------------------------------------------------------------------------------------------
_QUESTIONS = (
    "What does {name} do?",
    "Explain {name}.",
    "Describe {name} in Python.",
    "What is {name} for?",
)


def chat_affixes(model_dir: Path) -> tuple[str, str]:
    """(text before the user message, text between the user message and the answer) exactly as the chat template
    renders a one-message conversation with `add_generation_prompt=True` (for Gemma 4 that is
    '<bos><|turn>user\\n' and '<turn|>\\n<|turn>model\\n<|channel>thought\\n<channel|>')."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(model_dir))
    marker = "\x00MESSAGE\x00"
    text = hf.apply_chat_template([{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True)
    before, after = text.split(marker)
    return before, after


def documents(docs: tuple[tuple[str, str], ...], affixes: tuple[str, str]) -> list[str]:
    """Even-numbered docstrings become a chat turn (question about the name, first paragraph as the answer, ended by
    <turn|> like the real model's turns); odd ones stay plain text between <bos> and <eos>."""
    before, after = affixes
    out = []
    for i, (name, doc) in enumerate(docs):
        if i % 2 == 0:
            question = _QUESTIONS[(i // 2) % len(_QUESTIONS)].format(name=name)
            answer = doc.split("\n\n")[0].strip()
            out.append(f"{before}{question}{after}{answer}<turn|>\n")
        else:
            out.append(f"<bos>{doc}<eos>")
    return out


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents' ids, concatenated in order ([N] int64). Special-token strings in the text become their ids."""
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    ids = [i for enc in encodings for i in enc.ids]
    return torch.tensor(ids, dtype=torch.long)


def blocks(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of seq_len + 1 tokens ([n, seq_len + 1]): inputs [:-1], targets [1:]."""
    n = (stream.numel() - 1) // seq_len
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
    return stream[idx]


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
def model_config(tokenizer, settings: TrainSettings = SETTINGS):
    """A tiny Gemma 4 with the E2B features. Token ids come from the tokenizer, by token string."""
    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4TextConfig, Gemma4VisionConfig

    ids = {t: token_id(tokenizer, t) for t, _ in SPECIAL_TOKENS}
    vocab = tokenizer.get_vocab_size()
    S, F = "sliding_attention", "full_attention"
    text = Gemma4TextConfig(
        vocab_size=vocab, vocab_size_per_layer_input=vocab,
        hidden_size=128, intermediate_size=256, hidden_size_per_layer_input=128,
        num_hidden_layers=6, layer_types=[S, S, F, S, S, F],
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, global_head_dim=128,
        # layers 3-5 reuse K/V: layer 1 produces the sliding K/V, layer 2 the full K/V (as E2B's 13 and 14)
        num_kv_shared_layers=3, use_double_wide_mlp=True,
        sliding_window=128, final_logit_softcapping=30.0, max_position_embeddings=4096,
        pad_token_id=ids["<pad>"], eos_token_id=ids["<eos>"], bos_token_id=ids["<bos>"],
    )
    vision = Gemma4VisionConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        head_dim=64, patch_size=16, pooling_kernel_size=3, position_embedding_size=256, use_clipped_linears=True,
    )
    audio = Gemma4AudioConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=2, subsampling_conv_channels=[128, 8],
        conv_kernel_size=5, output_proj_dims=128, attention_chunk_size=12, attention_context_left=13,
        attention_context_right=0, use_clipped_linears=True,
    )
    return Gemma4Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), audio_config=audio.to_dict(),
        image_token_id=ids["<|image|>"], audio_token_id=ids["<|audio|>"], video_token_id=ids["<|video|>"],
        boi_token_id=ids["<|image>"], eoi_token_id=ids["<image|>"], boa_token_id=ids["<|audio>"],
        eoa_token_index=ids["<audio|>"], eos_token_id=[ids["<eos>"], ids["<turn|>"]],
        pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"],
    )


def generation_config(tokenizer):
    """As the Gemma 4 converter writes it: stop on <eos>, <turn|> and <|tool_response>; sample top-k 64, top-p 0.95."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=token_id(tokenizer, "<bos>"), pad_token_id=token_id(tokenizer, "<pad>"),
        eos_token_id=[token_id(tokenizer, t) for t in ("<eos>", "<turn|>", "<|tool_response>")],
        do_sample=True, temperature=1.0, top_k=64, top_p=0.95,
    )


def setup_determinism(settings: TrainSettings) -> None:
    torch.manual_seed(settings.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(settings.threads)


def build_model(tokenizer, settings: TrainSettings = SETTINGS):
    from transformers import Gemma4ForConditionalGeneration

    setup_determinism(settings)
    model = Gemma4ForConditionalGeneration(model_config(tokenizer, settings))
    set_text_attention(model, settings.attn_implementation)
    model.generation_config = generation_config(tokenizer)
    return model.float()


def set_text_attention(model, implementation: str) -> None:
    """Choose the text decoder's attention kernel (the audio tower is eager-only in transformers)."""
    model.config.text_config._attn_implementation = implementation
    model.model.language_model.config._attn_implementation = implementation


def lr_at(step: int, settings: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr at the last step."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    t = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.lr * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of a [B, T+1] batch, through the full multimodal model class (text only)."""
    logits = model(input_ids=batch[:, :-1], use_cache=False).logits  # [B, T, V], softcapped at 30
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


def train(model, train_blocks: torch.Tensor, settings: TrainSettings, *, stop_after: int | None = None) -> list[float]:
    """AdamW over the text model. The vision/audio towers get no gradient (no images or audio in the data) and stay
    at their initialization. Returns the loss of every step (fp32 Python floats)."""
    from tqdm import tqdm

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "language_model" in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 and "language_model" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(settings.seed)
    n_blocks = train_blocks.shape[0]
    per_epoch = n_blocks // settings.batch_size
    steps = settings.steps if stop_after is None else min(stop_after, settings.steps)
    losses: list[float] = []
    order = None
    model.train()
    for step in tqdm(range(steps), desc="training", unit="step", disable=stop_after is not None and steps <= 50):
        if step % per_epoch == 0:
            order = torch.randperm(n_blocks, generator=gen)
        j = step % per_epoch
        batch = train_blocks[order[j * settings.batch_size:(j + 1) * settings.batch_size]]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, settings)
        loss = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decay + no_decay, settings.grad_clip)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def heldout_nll(model, heldout_blocks: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token negative log-likelihood (nats) over every target of the held-out blocks."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, heldout_blocks.shape[0], batch_size):
        batch = heldout_blocks[i:i + batch_size]
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    return total / count


def unigram_nll(train_stream: torch.Tensor, heldout_blocks: torch.Tensor, vocab_size: int) -> float:
    """Add-one-smoothed unigram model fitted on the training tokens, scored on the same held-out targets."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()
    return float(-logp[heldout_blocks[:, 1:].flatten()].mean())


# ----------------------------------------------------------------------------------------------------------------
# The pieces shared by training and the CI rerun
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Data:
    corpus: Corpus
    train_stream: torch.Tensor  # [N]
    train_blocks: torch.Tensor  # [n, T+1]
    heldout_blocks: torch.Tensor  # [m, T+1]


def prepare_data(tokenizer, tokenizer_dir: Path, corpus: Corpus, settings: TrainSettings = SETTINGS) -> Data:
    affixes = chat_affixes(tokenizer_dir)
    train_stream = token_stream(tokenizer, documents(corpus.train, affixes))
    heldout_stream = token_stream(tokenizer, documents(corpus.heldout, affixes))
    return Data(
        corpus=corpus, train_stream=train_stream, train_blocks=blocks(train_stream, settings.seq_len),
        heldout_blocks=blocks(heldout_stream, settings.seq_len),
    )


def load_saved_tokenizer(model_dir: Path = OUT_DIR):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def first_step_losses(
    n: int = CHECK_STEPS, model_dir: Path = OUT_DIR, settings: TrainSettings = SETTINGS, *, data: Data | None = None
) -> list[float]:
    """Rerun the first `n` training steps from the saved tokenizer (same code path as training); nothing is written.
    `data` is what `prepare_data` returns for the saved tokenizer (built here when not given)."""
    tokenizer = load_saved_tokenizer(model_dir)
    if data is None:
        data = prepare_data(tokenizer, model_dir, load_corpus(settings), settings)
    model = build_model(tokenizer, settings)
    return train(model, data.train_blocks, settings, stop_after=n)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def write_report(out: Path, report: dict) -> None:
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    r = report
    lines = [
        "# The embedded default model",
        "",
        "A tiny Gemma 4 (`Gemma4ForConditionalGeneration`, written by transformers' `save_pretrained`) trained by",
        "`scripts/train_default_model.py` on the docstrings of the Python standard library. Generated file: do not edit.",
        "",
        "| | |",
        "|---|---|",
        f"| text model | {r['model']['text_params']:,} parameters, {r['model']['num_hidden_layers']} layers "
        f"({r['model']['layer_types']}), hidden {r['model']['hidden_size']}, PLE {r['model']['hidden_size_per_layer_input']}, "
        f"{r['model']['num_kv_shared_layers']} KV-shared layers, softcap 30 |",
        f"| vision / audio towers | {r['model']['vision_params']:,} / {r['model']['audio_params']:,} parameters, "
        "**random (not trained)** |",
        f"| tokenizer | byte-fallback BPE, {r['tokenizer']['vocab_size']} pieces incl. the 24 Gemma 4 added tokens |",
        f"| storage | {r['model']['storage_dtype']}, folder {r['folder_bytes'] / 2**20:.2f} MiB |",
        f"| data | {r['data']['train_modules']} stdlib modules for training ({r['data']['train_tokens']:,} tokens), "
        f"{r['data']['heldout_modules']} held out (every {r['settings']['heldout_every']}th; "
        f"{r['data']['heldout_tokens']:,} scored tokens); Python {r['python']} |",
        f"| training | {r['settings']['steps']} steps x {r['settings']['batch_size']} x {r['settings']['seq_len']} tokens, "
        f"AdamW lr {r['settings']['lr']}, {r['train_seconds']:.0f} s on {r['settings']['threads']} CPU thread(s), "
        f"torch {r['torch']} |",
        "",
        "Held-out perplexity (next-token, over the same held-out targets, of the checkpoint as stored):",
        "",
        "| model | perplexity | nats/token |",
        "|---|---:|---:|",
        f"| this model | **{r['heldout']['model_ppl']:.2f}** | {r['heldout']['model_nll']:.4f} |",
        f"| unigram (add-one, fitted on the training tokens) | {r['heldout']['unigram_ppl']:.2f} | "
        f"{r['heldout']['unigram_nll']:.4f} |",
        f"| uniform over the vocabulary | {r['tokenizer']['vocab_size']} | {math.log(r['tokenizer']['vocab_size']):.4f} |",
        "",
        f"Final training loss (mean of the last 20 steps): {r['final_train_loss']:.4f} nats.",
        "",
        "The vision and audio towers keep transformers' seeded random initialization: images and audio run through",
        "the real Gemma 4 graphs, but the model has not learned what they mean.",
        "",
        f"Sample (greedy, chat template, prompt `{r['sample']['prompt']}`):",
        "",
        "```",
        r["sample"]["output"],
        "```",
        "",
    ]
    (out / "TRAINING.md").write_text("\n".join(lines), encoding="utf-8")


@torch.no_grad()
def greedy_sample(model_dir: Path, prompt: str, max_new_tokens: int = 48) -> str:
    from transformers import AutoTokenizer, Gemma4ForConditionalGeneration

    hf = AutoTokenizer.from_pretrained(str(model_dir))
    model = Gemma4ForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = hf.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return hf.decode(out[0, ids.shape[1]:], skip_special_tokens=False)


def count(model, prefix: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


def main_train(out_dir: Path, settings: TrainSettings = SETTINGS) -> dict:
    from transformers import Gemma4ForConditionalGeneration

    t0 = time.time()
    corpus = load_corpus(settings)
    logger.info("corpus: %d train / %d held-out docstrings (%d / %d modules)", len(corpus.train),
                len(corpus.heldout), corpus.train_modules, corpus.heldout_modules)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".default-", dir=out_dir.parent))
    try:
        tokenizer = train_tokenizer([doc for _, doc in corpus.train], settings.vocab_size)
        write_tokenizer_files(tokenizer, tmp)
        data = prepare_data(tokenizer, tmp, corpus, settings)
        logger.info("tokens: %d train, %d held-out blocks of %d", data.train_stream.numel(),
                    data.heldout_blocks.shape[0], settings.seq_len)
        model = build_model(tokenizer, settings)
        t1 = time.time()
        losses = train(model, data.train_blocks, settings)
        train_seconds = time.time() - t1
        model.to(getattr(torch, settings.storage_dtype)).save_pretrained(tmp)
        # Score the checkpoint as stored, loaded back by transformers.
        stored = Gemma4ForConditionalGeneration.from_pretrained(str(tmp), dtype=torch.float32).eval()
        set_text_attention(stored, settings.attn_implementation)
        nll = heldout_nll(stored, data.heldout_blocks)
        uni = unigram_nll(data.train_stream, data.heldout_blocks, tokenizer.get_vocab_size())
        prompt = "What does json.dumps do?"
        text_cfg = model.config.text_config
        report = {
            "settings": asdict(settings),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "stdlib_docstrings_sha256": corpus.sha256,
            "data": {
                "train_modules": corpus.train_modules, "heldout_modules": corpus.heldout_modules,
                "train_docstrings": len(corpus.train), "heldout_docstrings": len(corpus.heldout),
                "train_tokens": int(data.train_stream.numel()),
                "heldout_tokens": int(data.heldout_blocks[:, 1:].numel()),
            },
            "tokenizer": {"vocab_size": tokenizer.get_vocab_size(), "type": "BPE, byte_fallback"},
            "model": {
                "text_params": count(model, "model.language_model"),
                "vision_params": count(model, "model.vision_tower") + count(model, "model.embed_vision"),
                "audio_params": count(model, "model.audio_tower") + count(model, "model.embed_audio"),
                "towers_trained": False,
                "num_hidden_layers": text_cfg.num_hidden_layers,
                "layer_types": "".join("F" if t == "full_attention" else "S" for t in text_cfg.layer_types),
                "hidden_size": text_cfg.hidden_size,
                "hidden_size_per_layer_input": text_cfg.hidden_size_per_layer_input,
                "num_kv_shared_layers": text_cfg.num_kv_shared_layers,
                "storage_dtype": settings.storage_dtype,
            },
            "heldout": {
                "model_nll": nll, "model_ppl": math.exp(nll), "unigram_nll": uni, "unigram_ppl": math.exp(uni),
            },
            "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
            "first_step_losses": losses[:CHECK_STEPS],
            "losses_every_10_steps": losses[::10],
            "train_seconds": train_seconds,
            "total_seconds": 0.0,
            "sample": {"prompt": prompt, "output": greedy_sample(tmp, prompt)},
            "folder_bytes": 0,
        }
        report["total_seconds"] = time.time() - t0
        write_report(tmp, report)
        report["folder_bytes"] = folder_bytes(tmp)
        write_report(tmp, report)  # again, now with the size (the size line has a fixed width in practice)
        install_folder(tmp, out_dir, MAX_FOLDER_BYTES)
        return report
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def install_folder(tmp: Path, out_dir: Path, max_bytes: int) -> None:
    """Put the freshly written folder `tmp` in place of `out_dir`: refused above `max_bytes`, made readable by
    everyone (mkdtemp makes a private folder; package data must not be), then swapped in: old -> backup, new ->
    place, drop backup."""
    if folder_bytes(tmp) > max_bytes:
        raise ValueError(f"{out_dir}: {folder_bytes(tmp)} bytes exceeds the {max_bytes}-byte budget")
    os.chmod(tmp, 0o755)
    for f in tmp.iterdir():
        os.chmod(f, 0o644)
    backup = None
    if out_dir.exists():
        backup = out_dir.parent / f".{out_dir.name}-old-{os.getpid()}"
        os.replace(out_dir, backup)
    os.replace(tmp, out_dir)
    if backup is not None:
        shutil.rmtree(backup)


def print_first_steps(losses: list[float], report: Path) -> None:
    """The rerun losses beside those `report` (a training_report.json) recorded."""
    recorded = json.loads(report.read_text())["first_step_losses"]
    for i, loss in enumerate(losses):
        ref = recorded[i] if i < len(recorded) else float("nan")
        print(f"step {i:3d}  loss {loss:.7f}  recorded {ref:.7f}  rel.diff {abs(loss - ref) / abs(ref):.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="checkpoint folder to (re)write")
    parser.add_argument("--check-first-steps", type=int, metavar="N", default=None,
                        help="rerun the first N steps from the saved tokenizer, print their losses and compare them "
                             "with training_report.json; write nothing")
    parser.add_argument("--steps", type=int, default=None, help="override the number of training steps (for trials)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = SETTINGS if args.steps is None else TrainSettings(**{**asdict(SETTINGS), "steps": args.steps})
    if args.check_first_steps is not None:
        print_first_steps(first_step_losses(args.check_first_steps, args.out, settings),
                          args.out / "training_report.json")
        return 0
    report = main_train(args.out, settings)
    h = report["heldout"]
    print(f"wrote {args.out} ({report['folder_bytes'] / 2**20:.2f} MiB) in {report['total_seconds']:.0f} s; "
          f"held-out perplexity {h['model_ppl']:.2f} vs unigram {h['unigram_ppl']:.2f}")
    print(f"sample: {report['sample']['output']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
