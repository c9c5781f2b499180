"""`edge-gemma verify CHECKPOINT`: our eager model against the transformers reference, in float32.

Checks (llm.c `test_gpt2.c` style, a port compared with its reference):
* `max_abs_logit_diff`: full-sequence logits over a fixed prompt of `2 * sliding_window + 8` tokens (so every sliding
  layer wraps its window), our one-shot prefill vs the reference forward.
* `greedy_tokens_equal` / `greedy_tokens_total`: 32 greedy tokens, OUR static-cache decode loop (chunked prefill)
  vs the reference's `generate`; equal counts the common prefix. EOS does not stop either side.
  `reference_margin_at_mismatch` / `reference_min_margin`: the reference's top-1 minus top-2 logit at the first
  mismatching step and the smallest over all steps (a random-weight model can sit at a near-tie, where a 1e-4 logit
  difference legitimately flips the argmax); `reference_max_abs_logit` gives the scale of `max_abs_logit_diff`.
* `vision_max_abs_diff`, `audio_max_abs_diff`: soft tokens in text space (tower + `embed_*` projection) on a fixed
  synthetic image / noise features; `None` when the checkpoint has no such tower.
* With a drafter (`--drafter DIR`, a Gemma 4 assistant): `drafter_max_abs_logit_diff` (and
  `drafter_max_abs_state_diff`, the projected state): `DRAFT_LEN` draft steps after the prompt's prefill, our
  `Drafter` on our caches vs `Gemma4AssistantForCausalLM` on the reference's `shared_kv_states` (full vocabulary
  logits; with the centroid head, the same selected tokens and fill value); `assisted_tokens_equal` /
  `assisted_tokens_total`: 32 tokens of OUR assisted greedy loop (`model/drafter.assisted_greedy`, `DRAFT_LEN` drafts
  per round) vs the reference's `generate(assistant_model=...)`, common prefix counted as for greedy.

Memory (full-size checkpoints must fit 24 GB): the reference runs first, its logits, tokens and soft tokens are kept,
the reference is freed, then our model loads with its embedding tables memory-mapped from the files.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_model
from .config import ModelConfig, load_config

__all__ = ["add_arguments", "run", "verify_checkpoint", "fixed_prompt"]

log = logging.getLogger(__name__)

NEW_TOKENS = 32
DRAFT_LEN = 4


def fixed_prompt(cfg: ModelConfig, length: int) -> torch.Tensor:
    """A deterministic text prompt `[1, length]`: BOS, then ids drawn with a fixed seed from the PLE vocabulary,
    avoiding special low ids and the multimodal placeholders."""
    text = cfg.text
    high = min(text.vocab_size, text.vocab_size_per_layer_input)
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, high, (1, length), generator=g)
    ids[0, 0] = text.bos_token_id
    placeholder = torch.isin(ids, torch.tensor(cfg.multimodal_token_ids))
    return torch.where(placeholder, torch.full_like(ids, 3), ids)


def _synthetic_image(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2k x 3k patch image (k = pooling kernel) of seeded noise, padded with one extra block of (-1, -1) patches."""
    v = cfg.vision
    k, p = v.pooling_kernel_size, v.patch_size
    rows, cols = 2 * k, 3 * k
    g = torch.Generator().manual_seed(7)
    n = rows * cols
    pixels = torch.zeros(1, n + k * k, 3 * p * p)
    pixels[0, :n] = torch.rand(n, 3 * p * p, generator=g)
    pos = torch.full((1, n + k * k, 2), -1, dtype=torch.long)
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    pos[0, :n, 0], pos[0, :n, 1] = xs.reshape(-1), ys.reshape(-1)
    return pixels, pos


def _synthetic_audio() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    feats = torch.randn(1, 64, 128, generator=g)
    mask = torch.ones(1, 64, dtype=torch.bool)
    mask[0, 61:] = False
    return feats, mask


def _reference_model(path: Path, cfg: ModelConfig, *, with_towers: bool, low_memory: bool):
    """The transformers model, computing in float32.

    `low_memory` (full-size checkpoints): load in the file's dtype, upcast everything EXCEPT the two big embedding
    tables to float32, and make the embedding lookups and the tied head cast the rows/weights they read. That computes
    exactly what a float32 load computes (upcasting a bf16 row after the lookup is the same as before it), without a
    float32 copy of 3.5 G embedding parameters, so E4B's reference fits 24 GB."""
    try:
        import transformers
    except ImportError:
        raise RuntimeError(
            "verify needs the transformers reference implementation: pip install 'edge-gemma[reference]'"
        ) from None
    import torch.nn.functional as F

    text_layout = cfg.model_type == "gemma4_text"
    cls = transformers.Gemma4ForCausalLM if text_layout else transformers.Gemma4ForConditionalGeneration
    config = transformers.AutoConfig.from_pretrained(path)
    if not text_layout and not with_towers:
        config.vision_config = None
        config.audio_config = None
    dtype = _table_dtype(path, cfg) if low_memory else torch.float32
    log.info("loading the transformers reference (%s, low_memory=%s) from %s", dtype, low_memory, path)
    hf_logging = transformers.utils.logging
    level = hf_logging.get_verbosity()
    if not with_towers:
        hf_logging.set_verbosity_error()  # the tower tensors are unexpected by design; no 100-line load report
    try:
        ref = cls.from_pretrained(path, config=config, dtype=dtype).eval()
    finally:
        hf_logging.set_verbosity(level)
    if not low_memory or dtype == torch.float32:
        return ref
    lm = ref.model if text_layout else ref.model.language_model
    tables = {id(lm.embed_tokens.weight), id(lm.embed_tokens_per_layer.weight)}
    for module in ref.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) not in tables and p.is_floating_point():
                module._parameters[name] = torch.nn.Parameter(p.data.float(), requires_grad=False)
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_floating_point():
                module._buffers[name] = b.float()

    def lookup(self, ids):  # Gemma4TextScaledWordEmbedding in float32: rows * sqrt(dim) with a float32 scale
        return F.embedding(ids, self.weight).float() * torch.tensor(self.scalar_embed_scale, dtype=torch.float32)

    for emb in (lm.embed_tokens, lm.embed_tokens_per_layer):
        emb.forward = lookup.__get__(emb)
    head = ref.lm_head
    head.forward = (lambda self, h: F.linear(h, self.weight.float())).__get__(head)
    return ref


def _reference_drafts(ref, drafter_path: Path, ids: torch.Tensor, pad: int) -> dict[str, Any]:
    """The reference assistant's `DRAFT_LEN` steps after the prefill of `ids` (as transformers' candidate generator
    runs them) and the reference's assisted greedy generation."""
    import transformers

    drafter = transformers.Gemma4AssistantForCausalLM.from_pretrained(drafter_path, dtype=torch.float32).eval()
    L = ids.shape[1]
    out = ref(input_ids=ids, output_hidden_states=True, return_shared_kv_states=True)
    tok, hidden = out.logits[:, -1:].argmax(-1), out.hidden_states[-1][:, -1:].float()
    kv = {k: (v[0][:, :, :L + 1].float(), v[1][:, :, :L + 1].float()) for k, v in out.shared_kv_states.items()}
    embed, steps = ref.get_input_embeddings(), []
    for _ in range(DRAFT_LEN):
        o = drafter(inputs_embeds=torch.cat([embed(tok).float(), hidden], -1), attention_mask=torch.ones(1, L + 1),
                    position_ids=torch.tensor([[L]]), shared_kv_states=kv)
        steps.append((o.logits.float(), o.last_hidden_state.float()))
        tok, hidden = o.logits.argmax(-1), o.last_hidden_state
    del out, kv
    drafter.generation_config.num_assistant_tokens = DRAFT_LEN
    drafter.generation_config.num_assistant_tokens_schedule = "constant"
    gen = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                       min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=pad,
                       assistant_model=drafter)
    return {"draft_steps": steps, "assisted_tokens": gen[0, L:].tolist()}


def _reference(path: Path, cfg: ModelConfig, ids: torch.Tensor, with_towers: bool, low_memory: bool,
               drafter: Path | None = None) -> dict[str, Any]:
    ref = _reference_model(path, cfg, with_towers=with_towers, low_memory=low_memory)
    out: dict[str, Any] = {}
    with torch.no_grad():
        out["logits"] = ref(input_ids=ids).logits[0].float()
        ref.generation_config.eos_token_id = None
        gen = ref.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False, eos_token_id=None, pad_token_id=cfg.text.pad_token_id, output_logits=True,
            return_dict_in_generate=True,
        )
        out["tokens"] = gen.sequences[0, ids.shape[1]:].tolist()
        out["margins"] = [_top2_margin(step[0]) for step in gen.logits]
        inner = ref.model
        if with_towers and cfg.vision is not None:
            pixels, pos = _synthetic_image(cfg)
            feats = inner.get_image_features(pixels, pos, return_dict=True).pooler_output
            out["vision"] = torch.cat(list(feats), dim=0).float()
        if with_towers and cfg.audio is not None:
            feats, mask = _synthetic_audio()
            a = inner.get_audio_features(feats, mask, return_dict=True)
            out["audio"] = a.pooler_output[a.attention_mask].float()
        if drafter is not None:
            out.update(_reference_drafts(ref, drafter, ids, cfg.text.pad_token_id))
    del ref
    gc.collect()
    return out


LOW_MEMORY_PARAMS = 1_000_000_000
"""Above this many parameters (full-size E2B/E4B) verify compares the text path only, with tables kept narrow."""


def _table_dtype(path: Path, cfg: ModelConfig) -> torch.dtype:
    """The file dtype of the main embedding table (what the low-memory reference loads in)."""
    from .checkpoint import LAYOUTS, checkpoint_tensors

    name = LAYOUTS[cfg.model_type][0][1] + "embed_tokens.weight"
    info = checkpoint_tensors(path).get(name)
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(info.dtype if info else "F32", torch.float32)


def _param_count(path: Path) -> int:
    from .checkpoint import checkpoint_tensors

    return sum(math.prod(info.shape) for info in checkpoint_tensors(path).values())


def verify_checkpoint(
    path: str | Path,
    atol: float = 1e-4,
    *,
    prompt_len: int | None = None,
    towers: bool | None = None,
    low_memory: bool | None = None,
    drafter: str | Path | None = None,
) -> dict[str, Any]:
    """Compare our model with transformers on `path` (and the assistant checkpoint `drafter`, if given); returns the
    report dict (see the module docstring) with `ok`.

    towers / low_memory: `None` decides from the checkpoint's size: full-size checkpoints (> 1 G parameters) compare
    the text path only, with the reference's embedding tables kept in the file's dtype (see `_reference_model`)."""
    path = Path(path)
    cfg = load_config(path)
    big = _param_count(path) > LOW_MEMORY_PARAMS if towers is None or low_memory is None else False
    towers = (not big) if towers is None else towers
    low_memory = big if low_memory is None else low_memory
    S = prompt_len or 2 * cfg.text.sliding_window + 8
    ids = fixed_prompt(cfg, S)
    ours_drafter = None
    if drafter is not None:
        from .drafter import load_drafter

        ours_drafter = load_drafter(drafter, cfg.text)  # refuse a bad drafter before the long reference run
    ref = _reference(path, cfg, ids, towers, low_memory, Path(drafter) if drafter is not None else None)

    log.info("loading our model from %s (embedding tables memory-mapped)", path)
    ours = load_model(path, mmap_embeddings=True, max_len=S + NEW_TOKENS + DRAFT_LEN, text_only=not towers)
    report: dict[str, Any] = {"checkpoint": str(path), "prompt_tokens": S, "atol": atol}
    with torch.no_grad():
        ours.language_model.reset_caches()
        logits = ours(ids, torch.arange(S))[0].float()
        report["max_abs_logit_diff"] = float((logits - ref["logits"]).abs().max())
        report["reference_max_abs_logit"] = float(ref["logits"].abs().max())  # scale of the diff above
        del logits
        tokens = ours.generate_greedy(ids, NEW_TOKENS, prefill_chunk=max(1, cfg.text.sliding_window + 3))
        equal = 0
        for a, b in zip(tokens, ref["tokens"]):
            if a != b:
                break
            equal += 1
        report["greedy_tokens_equal"] = equal
        report["greedy_tokens_total"] = len(ref["tokens"])
        # A greedy mismatch only means something when the reference's own choice was not a near-tie: report the
        # reference's top-1 minus top-2 logit at the first mismatch (None when all tokens agree) and the smallest one.
        margins = ref["margins"]
        report["reference_margin_at_mismatch"] = margins[equal] if equal < len(margins) else None
        report["reference_min_margin"] = min(margins) if margins else None
        if report["reference_margin_at_mismatch"] is not None:
            log.warning("greedy tokens differ from step %d; the reference's top-1 minus top-2 logit there is %.3g "
                        "(smallest over all steps %.3g)", equal, report["reference_margin_at_mismatch"],
                        report["reference_min_margin"])
        report["vision_max_abs_diff"] = None
        report["audio_max_abs_diff"] = None
        if "vision" in ref:
            soft = ours.encode_image(*_synthetic_image(cfg)).float()
            report["vision_max_abs_diff"] = _diff(soft, ref["vision"], "vision")
        if "audio" in ref:
            soft = ours.encode_audio(*_synthetic_audio()).float()
            report["audio_max_abs_diff"] = _diff(soft, ref["audio"], "audio")
        if ours_drafter is not None:
            report.update(_compare_drafter(ours, ours_drafter, ids, ref))
    tower_diffs = [report[k] for k in ("vision_max_abs_diff", "audio_max_abs_diff") if report[k] is not None]
    report["ok"] = bool(
        report["max_abs_logit_diff"] <= atol
        and report["greedy_tokens_equal"] == report["greedy_tokens_total"]
        and all(d <= atol for d in tower_diffs)
        and (ours_drafter is None or (report["drafter_max_abs_logit_diff"] <= atol
                                      and report["drafter_max_abs_state_diff"] <= atol
                                      and report["assisted_tokens_equal"] == report["assisted_tokens_total"]))
    )
    return report


def _compare_drafter(ours, drafter, ids: torch.Tensor, ref: dict[str, Any]) -> dict[str, Any]:
    """Our drafter's steps and assisted generation against the reference's (`_reference_drafts`)."""
    from .model.drafter import assisted_greedy, drafter_masks

    lm, L = ours.language_model, ids.shape[1]
    lm.reset_caches()
    embeds, ple_ids = ours.embed(ids)
    h = lm.hidden_states(embeds, lm.ple_rows(ple_ids), torch.arange(L), last_only=True)
    tok, hidden = lm.logits(h)[:, -1:].argmax(-1), h[:, -1:]
    kv, key_positions = lm.draft_kv()
    position = torch.tensor([[L]])
    masks = drafter_masks(position, key_positions, drafter.cfg.sliding_window)
    logit_diff = state_diff = 0.0
    for want_logits, want_state in ref["draft_steps"]:
        logits, state = drafter(lm.embed(tok), hidden, position, kv, masks)
        logit_diff = max(logit_diff, float((logits - want_logits).abs().max()))
        state_diff = max(state_diff, float((state - want_state).abs().max()))
        tok, hidden = want_logits.argmax(-1), want_state  # follow the reference's drafts: one step's error each
    tokens = assisted_greedy(ours, drafter, ids, NEW_TOKENS, draft_len=DRAFT_LEN)
    equal = 0
    for a, b in zip(tokens, ref["assisted_tokens"]):
        if a != b:
            break
        equal += 1
    return {"drafter_max_abs_logit_diff": logit_diff, "drafter_max_abs_state_diff": state_diff,
            "assisted_tokens_equal": equal, "assisted_tokens_total": len(ref["assisted_tokens"])}


def _top2_margin(logits: torch.Tensor) -> float:
    """top-1 minus top-2 logit: how far greedy decoding is from a tie at this step."""
    top = torch.topk(logits.float(), 2).values
    return float(top[0] - top[1])


def _diff(a: torch.Tensor, b: torch.Tensor, what: str) -> float:
    if a.shape != b.shape:
        log.error("%s soft tokens: ours %s, reference %s", what, tuple(a.shape), tuple(b.shape))
        return float("inf")
    return float((a - b).abs().max())


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path,
                        help="Hugging Face Gemma 4 checkpoint directory, or 'default' (the embedded model)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--atol", type=float, default=1e-4, help="max abs difference allowed (default 1e-4)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt length (default 2 * sliding_window + 8)")
    parser.add_argument("--no-towers", action="store_true", help="compare the text path only")
    parser.add_argument("--drafter", type=Path, default=None,
                        help="a Gemma 4 assistant checkpoint directory ('default': the embedded model's drafter): also "
                             "compare its draft steps and the assisted greedy generation with transformers'")
    parser.add_argument("--low-memory", action="store_true",
                        help="keep the reference's embedding tables in the file's dtype (automatic above 1 G parameters)")


def run(args: argparse.Namespace) -> int:
    from .paths import DEFAULT_DRAFTER, resolve_checkpoint

    args.checkpoint = resolve_checkpoint(args.checkpoint)
    if args.drafter is not None and str(args.drafter) == "default":
        args.drafter = DEFAULT_DRAFTER
    report = verify_checkpoint(
        args.checkpoint, args.atol, prompt_len=args.prompt_len, towers=False if args.no_towers else None,
        low_memory=True if args.low_memory else None, drafter=args.drafter,
    )
    if args.json:
        keys = ("max_abs_logit_diff", "greedy_tokens_equal", "greedy_tokens_total", "vision_max_abs_diff",
                "audio_max_abs_diff")  # the JSON contract (tests/test_verify.py); diagnostics stay in the report dict
        if args.drafter is not None:
            keys += ("drafter_max_abs_logit_diff", "assisted_tokens_equal", "assisted_tokens_total")
        print(json.dumps({k: report[k] for k in keys}))
    else:
        fmt = lambda v: "n/a (no tower)" if v is None else f"{v:.3g}"  # noqa: E731
        print(f"checkpoint          {report['checkpoint']}")
        print(f"prompt tokens       {report['prompt_tokens']}")
        print(f"max |logit diff|    {report['max_abs_logit_diff']:.3g}  (atol {report['atol']:g})")
        print(f"greedy tokens       {report['greedy_tokens_equal']}/{report['greedy_tokens_total']} equal")
        if report["reference_margin_at_mismatch"] is not None:
            print(f"first mismatch      reference top-1 minus top-2 logit there: "
                  f"{report['reference_margin_at_mismatch']:.3g} (smallest over all steps "
                  f"{report['reference_min_margin']:.3g})")
        print(f"vision soft tokens  {fmt(report['vision_max_abs_diff'])}")
        print(f"audio soft tokens   {fmt(report['audio_max_abs_diff'])}")
        if args.drafter is not None:
            print(f"drafter |logit diff| {report['drafter_max_abs_logit_diff']:.3g}  (projected state "
                  f"{report['drafter_max_abs_state_diff']:.3g})")
            print(f"assisted tokens     {report['assisted_tokens_equal']}/{report['assisted_tokens_total']} equal")
        print("OK" if report["ok"] else "FAILED")
    return 0 if report["ok"] else 1
