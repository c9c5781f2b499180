"""The Gemma 4 assistant (MTP drafter) against transformers' `Gemma4AssistantForCausalLM`, and its strict loading.

Tiny target/assistant pairs are built with transformers itself (`tiny.write_assistant`), centroid head on and off.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from edge_gemma.checkpoint import load_model
from edge_gemma.drafter import DrafterError, load_drafter
from edge_gemma.model.drafter import assisted_greedy, drafter_masks

VARIANTS = ("a", "b")
STEPS = 3
LOGIT_TOL = 1e-4


@pytest.fixture(scope="module")
def assistants(tmp_path_factory):
    """(variant, ordered) -> assistant directory."""
    import tiny

    root = tmp_path_factory.mktemp("assistants")
    return {(v, o): tiny.write_assistant(root / f"{v}-{int(o)}", v, seed=11 + i, ordered=o)
            for i, (v, o) in enumerate((v, o) for v in VARIANTS for o in (False, True))}


@pytest.fixture(scope="module")
def references(tiny_checkpoints, assistants):
    """(variant, ordered) -> (transformers target, transformers assistant, our target, our drafter)."""
    from transformers import Gemma4AssistantForCausalLM, Gemma4ForConditionalGeneration

    cache: dict = {}

    def get(variant: str, ordered: bool):
        if variant not in cache:
            cache[variant] = (Gemma4ForConditionalGeneration.from_pretrained(tiny_checkpoints[variant]).eval(),
                              load_model(tiny_checkpoints[variant], max_len=96))
        ref, ours = cache[variant]
        path = assistants[(variant, ordered)]
        ref_drafter = Gemma4AssistantForCausalLM.from_pretrained(path).eval()
        return ref, ref_drafter, ours, load_drafter(path, ours.cfg.text)

    return get


def prompt(length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (1, length), generator=g)
    ids[0, 0] = 2
    return ids


@pytest.mark.parametrize("ordered", [False, True], ids=["lm_head", "centroids"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_draft_steps_match_the_reference(references, variant, ordered):
    """After a prefill longer than twice the sliding window, `STEPS` draft steps give transformers' logits (the full
    vocabulary: with the centroid head, the same selected tokens and fill value) and projected states."""
    ref, ref_drafter, ours, drafter = references(variant, ordered)
    ids = prompt(21, seed=3)
    L = ids.shape[1]
    with torch.no_grad():
        out = ref(input_ids=ids, output_hidden_states=True, return_shared_kv_states=True)
        tok = out.logits[:, -1:].argmax(-1)
        kv = {k: (v[0][:, :, :L + 1], v[1][:, :, :L + 1]) for k, v in out.shared_kv_states.items()}
        hidden, embed = out.hidden_states[-1][:, -1:], ref.get_input_embeddings()
        expected = []
        for _ in range(STEPS):
            o = ref_drafter(inputs_embeds=torch.cat([embed(tok), hidden], -1), attention_mask=torch.ones(1, L + 1),
                            position_ids=torch.tensor([[L]]), shared_kv_states=kv)
            expected.append((o.logits, o.last_hidden_state))
            tok, hidden = o.logits.argmax(-1), o.last_hidden_state

        lm = ours.language_model
        lm.reset_caches()
        embeds, ple_ids = ours.embed(ids)
        h = lm.hidden_states(embeds, lm.ple_rows(ple_ids), torch.arange(L), last_only=True)
        tok, hidden = lm.logits(h)[:, -1:].argmax(-1), h[:, -1:]
        kv, key_positions = lm.draft_kv()
        masks = drafter_masks(torch.tensor([[L]]), key_positions, drafter.cfg.sliding_window)
        for want_logits, want_state in expected:
            logits, state = drafter(lm.embed(tok), hidden, torch.tensor([[L]]), kv, masks)
            assert (logits - want_logits).abs().max().item() <= LOGIT_TOL
            assert (state - want_state).abs().max().item() <= LOGIT_TOL
            tok, hidden = logits.argmax(-1), state
    if ordered:  # the centroid head computed top_k * (vocab / centroids) logits; the rest hold one fill value
        cfg = drafter.cfg
        computed = cfg.centroid_intermediate_top_k * cfg.vocab_size // cfg.num_centroids
        assert (logits[0, 0] > logits[0, 0].min()).sum().item() == computed


@pytest.mark.parametrize("draft_len", [1, 3, 5])
@pytest.mark.parametrize("ordered", [False, True], ids=["lm_head", "centroids"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_assisted_greedy_equals_the_reference_assisted_generate(references, variant, ordered, draft_len):
    """Our assisted loop gives transformers' `generate(assistant_model=...)` tokens, which are plain greedy's."""
    ref, ref_drafter, ours, drafter = references(variant, ordered)
    ids = prompt(17, seed=5 + draft_len)
    new = 24
    ref.generation_config.eos_token_id = None
    ref_drafter.generation_config.num_assistant_tokens = draft_len
    ref_drafter.generation_config.num_assistant_tokens_schedule = "constant"
    with torch.no_grad():
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
        plain = ref.generate(input_ids=ids, **kwargs)[0, ids.shape[1]:].tolist()
        assisted = ref.generate(input_ids=ids, assistant_model=ref_drafter, **kwargs)[0, ids.shape[1]:].tolist()
    stats: dict = {}
    got = assisted_greedy(ours, drafter, ids, new, draft_len=draft_len, stats=stats)
    assert assisted == plain
    assert got == assisted
    assert stats["rounds"] >= 1 and 0 <= stats["accepted"] <= stats["drafted"]
    assert stats["accepted"] + stats["rounds"] >= new - 1  # every round adds its accepted drafts and one token


def test_an_oracle_drafter_has_every_draft_accepted(references, monkeypatch):
    """The acceptance bookkeeping on a drafter that proposes the target's own next tokens: every draft accepted, so
    each round adds draft_len + 1 tokens (a wrong rewind or position would break the equality or the counts)."""
    from edge_gemma.model import drafter as module

    _, _, ours, drafter = references("a", False)
    ids = prompt(15, seed=9)
    plain = ours.generate_greedy(ids, 20)
    script = iter(plain[1:])
    V = ours.cfg.text.vocab_size

    def oracle(self, token_embeds, hidden, position, kv, masks):
        return torch.nn.functional.one_hot(torch.tensor([[next(script)]]), V).float(), hidden

    monkeypatch.setattr(module.Drafter, "forward", oracle)
    stats: dict = {}
    assert assisted_greedy(ours, drafter, ids, 20, draft_len=3, stats=stats) == plain
    assert stats["accepted"] == stats["drafted"]
    assert stats["rounds"] == 5  # 1 (prefill) + 5 rounds of 4 tokens = 21 >= 20 (the last round cut at 2 drafts)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, edit):
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _rewrite_tensors(path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("case, expected", [
    ("unknown_field", r"unknown field\(s\) \['draft_magic'\]"),
    ("not_assistant", r"model_type 'gemma4' is not a Gemma 4 assistant"),
    ("ple", r"hidden_size_per_layer_input=8 is not supported"),
    ("missing", r"missing tensor 'post_projection.weight'"),
    ("shape", r"tensor 'pre_projection.weight' has shape \[64, 200\], expected \[64, 256\]"),
    ("nan", r"tensor 'model.norm.weight' has 1 NaN or inf"),
    ("extra", r"unexpected tensor\(s\) \['model.layers.0.self_attn.k_proj.weight'\]"),
    ("head", r"lm_head.weight differs from model.embed_tokens.weight"),
    ("ordering", r"token_ordering is not a permutation"),
    ("backbone", r"does not fit the target: backbone_hidden_size 96 != the target's hidden_size 128"),
    ("no_config", r"no config.json"),
])
def test_bad_drafters_are_refused_naming_the_field(assistants, tiny_checkpoints, tmp_path, case, expected):
    from edge_gemma.config import load_config

    path = _copy(assistants[("a", True)], tmp_path / "d")
    if case == "unknown_field":
        _edit_config(path, lambda c: c.update(draft_magic=1))
    elif case == "not_assistant":
        _edit_config(path, lambda c: c.update(model_type="gemma4"))
    elif case == "ple":
        _edit_config(path, lambda c: c["text_config"].update(hidden_size_per_layer_input=8))
    elif case == "missing":
        _rewrite_tensors(path, lambda t: t.pop("post_projection.weight"))
    elif case == "shape":
        _rewrite_tensors(path, lambda t: t.update({"pre_projection.weight": torch.zeros(64, 200)}))
    elif case == "nan":
        def poison(t):
            t["model.norm.weight"][3] = float("nan")
        _rewrite_tensors(path, poison)
    elif case == "extra":
        _rewrite_tensors(path, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 64)}))
    elif case == "head":
        _rewrite_tensors(path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1}))
    elif case == "ordering":
        _rewrite_tensors(path, lambda t: t.update({"masked_embedding.token_ordering": torch.zeros(512, dtype=torch.long)}))
    elif case == "backbone":
        _edit_config(path, lambda c: c.update(backbone_hidden_size=96))
    elif case == "no_config":
        (path / "config.json").unlink()
    with pytest.raises(DrafterError, match=expected):
        load_drafter(path, load_config(tiny_checkpoints["a"]).text)


def test_a_tied_head_copy_equal_to_the_embedding_is_accepted(assistants, tmp_path):
    path = _copy(assistants[("a", False)], tmp_path / "d")
    _rewrite_tensors(path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    assert load_drafter(path).cfg.backbone_hidden_size == 128
