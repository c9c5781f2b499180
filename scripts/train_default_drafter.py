#!/usr/bin/env python
"""Train the drafter of edge-gemma's embedded default model: a tiny Gemma 4 assistant (MTP), written by transformers.

What it is: `Gemma4AssistantForCausalLM` (transformers' `models/gemma4_assistant`) for `edge_gemma/data/default`: two
KV-shared layers (one sliding, one full, with the target's head sizes and KV heads) that read the target's caches, no
centroid head (the vocabulary has 2048 tokens), stored in bfloat16 in `edge_gemma/data/default_drafter`.

How it learns (distillation, the target frozen): each training block of the default model's own data
(`scripts/train_default_model.py`: stdlib docstrings, the same tokenizer and held-out split) runs once through our
eager target (`edge_gemma.checkpoint.load_model`), which gives the final normed hidden states, the logits and the K/V
of the two layers a drafter reads. Then, for every position p of the block at once, the drafter's first step sees
the token at p and the target's hidden state at p - 1 and attends over the target's keys before p
(`edge_gemma.model.drafter.drafter_masks`), as at inference; its step j (j < `draft_steps`) sees the token at p + j
and its own previous projected state, at the same position p. The loss is the KL divergence from the target's
next-token distribution at p + j to the drafter's, summed over the steps: the drafter learns to propose what the
target would say.

Determinism: fixed seeds, `torch.use_deterministic_algorithms(True)`, one thread, a fixed data order.
`training_report.json` records the first steps' losses (the CI test replays them with `first_step_losses`), the
held-out acceptance of greedy drafts (`assisted_greedy` over held-out prompts) and the settings.

Usage:
    python scripts/train_default_drafter.py                       # about 2 min on one core
    python scripts/train_default_drafter.py --check-first-steps 10
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# the target's training script (this folder): its data, learning-rate schedule and folder installation
import train_default_model as target_trainer  # noqa: E402

logger = logging.getLogger("train_default_drafter")

REPO = Path(__file__).resolve().parents[1]
TARGET_DIR = REPO / "edge_gemma" / "data" / "default"
OUT_DIR = REPO / "edge_gemma" / "data" / "default_drafter"
MAX_FOLDER_BYTES = 2 * 1024 * 1024
CHECK_STEPS = 10


@dataclass(frozen=True, kw_only=True)
class DrafterSettings:
    """Everything that determines the trained drafter (recorded in training_report.json)."""

    seed: int = 4321
    hidden_size: int = 128
    intermediate_size: int = 384
    num_attention_heads: int = 2
    draft_steps: int = 3  # steps unrolled per training position
    batch_size: int = 4
    steps: int = 300
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    threads: int = 1
    storage_dtype: str = "bfloat16"
    eval_prompts: int = 24  # held-out blocks whose first `eval_prompt_len` tokens prompt the acceptance measurement
    eval_prompt_len: int = 64
    eval_new_tokens: int = 48
    eval_draft_len: int = 3


SETTINGS = DrafterSettings()


def load_data(target_dir: Path = TARGET_DIR):
    """The target's training and held-out blocks, from its saved tokenizer (the target's own `prepare_data`)."""
    tokenizer = target_trainer.load_saved_tokenizer(target_dir)
    return target_trainer.prepare_data(tokenizer, target_dir, target_trainer.load_corpus())


def assistant_config(target_dir: Path = TARGET_DIR, settings: DrafterSettings = SETTINGS):
    """The `Gemma4AssistantConfig` of the drafter: the target's head sizes, KV heads, window and RoPE."""
    from transformers import Gemma4AssistantConfig, Gemma4TextConfig

    from edge_gemma.config import load_config

    t = load_config(target_dir).text
    text = Gemma4TextConfig(
        vocab_size=t.vocab_size, vocab_size_per_layer_input=0, hidden_size=settings.hidden_size,
        hidden_size_per_layer_input=0, intermediate_size=settings.intermediate_size, num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"], num_attention_heads=settings.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, global_head_dim=t.global_head_dim,
        num_kv_shared_layers=2, sliding_window=t.sliding_window,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": t.rope_theta_sliding},
            "full_attention": {"rope_type": "proportional", "rope_theta": t.rope_theta_full,
                               "partial_rotary_factor": t.partial_rotary_factor_full},
        },
        max_position_embeddings=t.max_position_embeddings, pad_token_id=t.pad_token_id,
        eos_token_id=list(t.eos_token_id), bos_token_id=t.bos_token_id, rms_norm_eps=t.rms_norm_eps,
    )
    return Gemma4AssistantConfig(text_config=text.to_dict(), backbone_hidden_size=t.hidden_size,
                                 use_ordered_embeddings=False)


def build(target_dir: Path = TARGET_DIR, settings: DrafterSettings = SETTINGS):
    """-> (transformers assistant, our `Drafter` sharing its initial weights, our target). Seeded: transformers'
    initialization, then the target's embedding table copied into the drafter's (tied) head, both 128 wide."""
    from transformers import Gemma4AssistantForCausalLM

    from edge_gemma.checkpoint import load_model
    from edge_gemma.drafter import parse_drafter_config
    from edge_gemma.model.drafter import Drafter

    torch.manual_seed(settings.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(settings.threads)
    target = load_model(target_dir).eval()
    hf = Gemma4AssistantForCausalLM(assistant_config(target_dir, settings)).float()
    config = json.loads(hf.config.to_json_string())
    ours = Drafter(parse_drafter_config(config, source="assistant config"))
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    ours.load_state_dict(state, strict=True)
    with torch.no_grad():
        table = target.language_model.embed_tokens.weight
        if table.shape == ours.model.embed_tokens.weight.shape:
            ours.model.embed_tokens.weight.copy_(table)
    return hf, ours, target


def target_pass(target, batch: torch.Tensor):
    """One no-grad pass of the target over `batch [B, T]`: (normed hidden [B, T, H], logits [B, T, V],
    {sliding: (k, v)} of the layers a drafter reads)."""
    lm = target.language_model
    cfg = lm.cfg
    readers = {sliding: max(i for i in cfg.cache_layers if cfg.is_full(i) != sliding) for sliding in (True, False)}
    kv: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [lm.layers[i].self_attn.register_forward_hook(
        lambda module, args, out, sliding=sliding: kv.__setitem__(sliding, out[1])) for sliding, i in readers.items()]
    try:
        with torch.no_grad():
            embeds, ple_ids = target.embed(batch)
            h = lm.hidden_states(embeds, lm.ple_rows(ple_ids), torch.arange(batch.shape[1]))
            logits = lm.logits(h)
    finally:
        for hook in hooks:
            hook.remove()
    return h, logits, kv


def draft_loss(drafter, target, batch: torch.Tensor, draft_steps: int) -> torch.Tensor:
    """Sum over the draft steps of KL(target's next-token distribution || the drafter's), mean over positions."""
    from edge_gemma.model.drafter import drafter_masks

    h, logits, kv = target_pass(target, batch)
    B, T = batch.shape
    positions = torch.arange(1, T - draft_steps + 1)  # p: the last token's position (needs p - 1 and p + steps - 1)
    key_positions = {s: torch.arange(T) for s in kv}
    masks = drafter_masks(positions[None, :], key_positions, drafter.cfg.sliding_window)
    embed = target.language_model.embed
    hidden = h[:, positions - 1]
    loss = torch.zeros(())
    for j in range(draft_steps):
        with torch.no_grad():
            tokens = embed(batch[:, positions + j])
            want = F.log_softmax(logits[:, positions + j].float(), dim=-1)
        got, hidden = drafter(tokens, hidden, positions[None, :], kv, masks)
        kl = F.kl_div(F.log_softmax(got.float(), dim=-1), want, log_target=True, reduction="batchmean")
        loss = loss + kl / len(positions)
    return loss


def train(drafter, target, train_blocks: torch.Tensor, settings: DrafterSettings, *,
          stop_after: int | None = None) -> list[float]:
    from tqdm import tqdm

    decay = [p for p in drafter.parameters() if p.ndim >= 2]
    no_decay = [p for p in drafter.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(settings.seed)
    per_epoch = train_blocks.shape[0] // settings.batch_size
    steps = settings.steps if stop_after is None else min(stop_after, settings.steps)
    losses: list[float] = []
    order = None
    drafter.train()
    for step in tqdm(range(steps), desc="training the drafter", unit="step", disable=stop_after is not None):
        if step % per_epoch == 0:
            order = torch.randperm(train_blocks.shape[0], generator=gen)
        j = step % per_epoch
        batch = train_blocks[order[j * settings.batch_size:(j + 1) * settings.batch_size], :-1]
        for group in opt.param_groups:
            group["lr"] = target_trainer.lr_at(step, settings)  # the same warm-up and cosine decay
        loss = draft_loss(drafter, target, batch, settings.draft_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decay + no_decay, settings.grad_clip)
        opt.step()
        losses.append(loss.item())
    drafter.eval()
    return losses


def first_step_losses(n: int = CHECK_STEPS, settings: DrafterSettings = SETTINGS, *, data=None) -> list[float]:
    """Rerun the first `n` training steps (the same code path as training); nothing is written."""
    data = data if data is not None else load_data()
    _, drafter, target = build(TARGET_DIR, settings)
    return train(drafter, target, data.train_blocks, settings, stop_after=n)


@torch.no_grad()
def acceptance(target, drafter, heldout_blocks: torch.Tensor, settings: DrafterSettings = SETTINGS) -> dict:
    """Greedy assisted decoding (`assisted_greedy`, `eval_draft_len` drafts per round) from held-out prompts: the
    share of drafts the target accepted, the tokens per target call, and whether every output equals plain greedy."""
    from edge_gemma.model.drafter import assisted_greedy

    max_len = settings.eval_prompt_len + settings.eval_new_tokens + settings.eval_draft_len + 1
    target.language_model.setup_caches(max_len)
    drafted = accepted = rounds = tokens = 0
    equal = True
    for block in heldout_blocks[: settings.eval_prompts]:
        ids = block[None, : settings.eval_prompt_len]
        stats: dict = {}
        out = assisted_greedy(target, drafter, ids, settings.eval_new_tokens, draft_len=settings.eval_draft_len,
                              stats=stats)
        equal &= out == target.generate_greedy(ids, settings.eval_new_tokens)
        drafted, accepted, rounds = drafted + stats["drafted"], accepted + stats["accepted"], rounds + stats["rounds"]
        tokens += len(out) - 1  # the first token comes from the prefill
    target.language_model.drop_caches()
    return {"prompts": min(settings.eval_prompts, heldout_blocks.shape[0]), "draft_len": settings.eval_draft_len,
            "acceptance": accepted / drafted, "tokens_per_target_call": tokens / rounds, "equals_plain_greedy": equal}


def main_train(out_dir: Path, settings: DrafterSettings = SETTINGS) -> dict:
    from edge_gemma.drafter import load_drafter

    t0 = time.time()
    data = load_data()
    hf, drafter, target = build(TARGET_DIR, settings)
    untrained = acceptance(target, drafter, data.heldout_blocks, settings)
    losses = train(drafter, target, data.train_blocks, settings)
    train_seconds = time.time() - t0
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".default_drafter-", dir=out_dir.parent))
    try:
        state = drafter.state_dict()
        hf.load_state_dict({**state, "lm_head.weight": state["model.embed_tokens.weight"]}, strict=True)
        hf.generation_config.num_assistant_tokens = settings.eval_draft_len
        hf.generation_config.num_assistant_tokens_schedule = "constant"
        hf.to(getattr(torch, settings.storage_dtype)).save_pretrained(tmp)
        stored = load_drafter(tmp, target.cfg.text)  # score the drafter as stored
        report = {
            "settings": asdict(settings),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "target": "edge_gemma/data/default",
            "params": sum(p.numel() for p in drafter.parameters()),
            "first_step_losses": losses[:CHECK_STEPS],
            "losses_every_10_steps": losses[::10],
            "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
            "heldout_acceptance": acceptance(target, stored, data.heldout_blocks, settings),
            "heldout_acceptance_untrained": untrained,
            "train_seconds": train_seconds,
        }
        (tmp / "training_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        target_trainer.install_folder(tmp, out_dir, MAX_FOLDER_BYTES)
        return report
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="drafter folder to (re)write")
    parser.add_argument("--check-first-steps", type=int, metavar="N", default=None,
                        help="rerun the first N steps, print their losses beside training_report.json's; write nothing")
    parser.add_argument("--steps", type=int, default=None, help="override the number of training steps (for trials)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = SETTINGS if args.steps is None else DrafterSettings(**{**asdict(SETTINGS), "steps": args.steps})
    if args.check_first_steps is not None:
        target_trainer.print_first_steps(first_step_losses(args.check_first_steps, settings),
                                         args.out / "training_report.json")
        return 0
    report = main_train(args.out, settings)
    a, u = report["heldout_acceptance"], report["heldout_acceptance_untrained"]
    size = target_trainer.folder_bytes(args.out)
    print(f"wrote {args.out} ({size / 2**20:.2f} MiB, {report['params']:,} parameters) in "
          f"{report['train_seconds']:.0f} s; held-out acceptance {a['acceptance']:.1%} "
          f"({a['tokens_per_target_call']:.2f} tokens per target call; untrained {u['acceptance']:.1%}), "
          f"equal to plain greedy: {a['equals_plain_greedy']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
