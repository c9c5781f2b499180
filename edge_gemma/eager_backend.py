"""A torch `Backend` over our eager model: the reference every exported backend is compared with.

It runs `Gemma4Model` (edge_gemma/model/) on a checkpoint -- float, or quantized (a directory with
`quant_manifest.json`, written by `edge-gemma quantize`), whose weights are dequantized to float32 so that the eager
model sees exactly the values an exported backend computes with. Tests drive the engine through it, and
`edge-gemma export` uses it on the float checkpoint as the teacher for the fidelity figures.

It lives outside `runtimes/` because it imports torch; a device never loads it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_gemma.checkpoint import LAYOUTS, CheckpointError, params_on_meta, load_model
from edge_gemma.config import ModelConfig, load_config
from edge_gemma.model.gemma4 import Gemma4Model
from edge_gemma.runtimes.base import Backend, BackendError, Capabilities

log = logging.getLogger(__name__)

__all__ = ["EagerBackend", "ModelPle", "is_quantized_checkpoint", "load_eager_model"]

QUANT_MANIFEST = "quant_manifest.json"


def is_quantized_checkpoint(path: str | Path) -> bool:
    return (Path(path) / QUANT_MANIFEST).is_file()


PLE_PARAM = "language_model.embed_tokens_per_layer.weight"


def _load_dequantized(path: Path, cfg: ModelConfig, context: int, skip_ple: bool = False) -> Gemma4Model:
    """Build the model on the meta device and assign the dequantized (float32) tensors, strictly by name.

    `skip_ple`: do not materialise the PLE table (E2B: 2.35 G values, 9.4 GB in float32); the decoder never reads it
    (rows come in as an input), so the caller gathers rows elsewhere, e.g. from the artifact's `ple.bin`."""
    from edge_gemma.quantize.load import QuantizedCheckpoint

    with params_on_meta():
        model = Gemma4Model(cfg, max_len=context)
    state: dict[str, torch.Tensor] = {}
    with QuantizedCheckpoint(path) as ckpt:
        available = set(ckpt.names())
        for ours, target in model.state_dict().items():
            theirs = next((p2 + ours[len(p1):] for p1, p2 in LAYOUTS[cfg.model_type] if ours.startswith(p1)), None)
            if skip_ple and ours == PLE_PARAM:
                state[ours] = torch.zeros(1, dtype=torch.float32).expand(*target.shape)  # no memory, never read
                continue
            if theirs is None or theirs not in available:
                raise CheckpointError(f"{path}: missing tensor {theirs or ours!r} (expected shape {list(target.shape)})")
            value = ckpt.dequantized(theirs)
            if tuple(value.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"{path}: tensor {theirs!r} has shape {list(value.shape)}, expected {list(target.shape)}"
                )
            state[ours] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_eager_model(path: str | Path, *, context: int, skip_ple: bool = False) -> Gemma4Model:
    """A float32 eval-mode model with static caches of `context` positions, from a float or quantized checkpoint
    (a float checkpoint keeps its embedding tables memory-mapped; `skip_ple` leaves out a quantized one's table)."""
    path = Path(path)
    if is_quantized_checkpoint(path):
        return _load_dequantized(path, load_config(path), context, skip_ple)
    return load_model(path, max_len=context, mmap_embeddings=True)


class ModelPle:
    """The PLE source of the eager backend: rows of the model's own `embed_tokens_per_layer` (same contract as
    `edge_gemma.ple.PleTable.gather`: [S] ids -> [S, L, P] float32, unscaled)."""

    def __init__(self, model: Gemma4Model):
        self.table = model.language_model.embed_tokens_per_layer.weight
        cfg = model.cfg.text
        self.shape = (cfg.num_hidden_layers, cfg.hidden_size_per_layer_input)

    def gather(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64).reshape(-1)
        rows = self.table[torch.from_numpy(ids)].float().numpy()
        return rows.reshape(ids.size, *self.shape)


class EagerBackend(Backend):
    """`Backend` over `Gemma4Model`; numpy in, numpy out, float32."""

    name = "eager"

    def __init__(self, model: Gemma4Model, *, max_prefill_chunk: int = 512, has_ple: bool = True,
                 drafter: torch.nn.Module | None = None):
        if model.language_model.max_len is None:
            raise BackendError("eager backend: the model has no KV caches (build it with a context length)")
        self.model = model
        self.has_ple = has_ple
        self.drafter = drafter  # edge_gemma.model.drafter.Drafter, for speculative decoding
        self._last_hidden: torch.Tensor | None = None
        cfg = model.cfg
        self.config = cfg
        self.capabilities = Capabilities(
            context=int(model.language_model.max_len),
            max_prefill_chunk=int(max_prefill_chunk),
            hidden_size=cfg.text.hidden_size,
            vocab_size=cfg.text.vocab_size,
            vision=model.vision_tower is not None,
            audio=model.audio_tower is not None,
            drafter=drafter is not None,
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, context: int, max_prefill_chunk: int = 512,
                        skip_ple: bool = False, drafter: str | Path | None = None) -> "EagerBackend":
        """`drafter`: a Gemma 4 assistant checkpoint directory for speculative decoding (`edge_gemma/drafter.py`)."""
        skip = skip_ple and is_quantized_checkpoint(path)
        model = load_eager_model(path, context=context, skip_ple=skip)
        draft_model = None
        if drafter is not None:
            from edge_gemma.drafter import load_drafter

            draft_model = load_drafter(drafter, model.cfg.text)
        return cls(model, max_prefill_chunk=max_prefill_chunk, has_ple=not skip, drafter=draft_model)

    def ple_source(self) -> ModelPle:
        if not self.has_ple:
            raise BackendError("eager backend: loaded without its PLE table (skip_ple); gather rows from ple.bin")
        return ModelPle(self.model)

    @torch.no_grad()
    def embed(self, ids: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.asarray(ids, np.int64).reshape(1, -1))
        return self.model.language_model.embed(t)[0].float().numpy()  # (S, H)

    @torch.no_grad()
    def prefill(self, embeds: np.ndarray, ple_rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        logits, _ = self._forward("prefill", embeds, ple_rows, positions, last_only=True)
        return logits[-1]

    # -- speculative decoding (runtimes/base.py) ----------------------------------------------------------------

    def last_hidden(self) -> np.ndarray:
        if self._last_hidden is None:
            raise BackendError("eager backend: no hidden state yet (call prefill first)")
        return self._last_hidden.float().numpy().copy()

    @torch.no_grad()
    def verify(self, embeds: np.ndarray, ple_rows: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._forward("verify", embeds, ple_rows, positions, last_only=False)

    def _forward(self, what: str, embeds, ple_rows, positions, *, last_only: bool) -> tuple[np.ndarray, np.ndarray]:
        """One decoder call at `positions` (caches written): -> logits and final normed hidden states, `[n, V]` and
        `[n, H]`, of the last position (`last_only`) or of every position."""
        S = int(np.asarray(positions).size)
        if S > self.capabilities.max_prefill_chunk:
            raise BackendError(f"eager backend: {what} of {S} tokens exceeds max_prefill_chunk "
                               f"{self.capabilities.max_prefill_chunk}")
        pos = torch.from_numpy(np.asarray(positions, np.int64).reshape(-1))
        if int(pos.max()) >= self.capabilities.context:
            raise BackendError(f"eager backend: position {int(pos.max())} is beyond the context "
                               f"{self.capabilities.context}")
        e = torch.from_numpy(np.asarray(embeds, np.float32)).unsqueeze(0)  # (1, S, H)
        r = torch.from_numpy(np.asarray(ple_rows, np.float32)).unsqueeze(0)  # (1, S, L, P)
        lm = self.model.language_model
        h = lm.hidden_states(e, r, pos, last_only=last_only)  # (1, n, H)
        self._last_hidden = h[0, -1]
        return lm.logits(h)[0].float().numpy(), h[0].float().numpy()

    @torch.no_grad()
    def draft(self, token_embed: np.ndarray, hidden: np.ndarray, position: int) -> tuple[np.ndarray, np.ndarray]:
        if self.drafter is None:
            return super().draft(token_embed, hidden, position)
        from edge_gemma.model.drafter import drafter_masks

        kv, key_positions = self.model.language_model.draft_kv()
        p = torch.tensor([[int(position)]])
        masks = drafter_masks(p, key_positions, self.drafter.cfg.sliding_window)
        e = torch.from_numpy(np.asarray(token_embed, np.float32).reshape(1, 1, -1))
        s = torch.from_numpy(np.asarray(hidden, np.float32).reshape(1, 1, -1))
        logits, projected = self.drafter(e, s, p, kv, masks)
        return logits[0, 0].float().numpy(), projected[0, 0].float().numpy()

    @torch.no_grad()
    def encode_image(self, pixel_values: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        if self.model.vision_tower is None:
            return super().encode_image(pixel_values, position_ids)
        pv = torch.from_numpy(np.asarray(pixel_values, np.float32)).unsqueeze(0)
        pid = torch.from_numpy(np.asarray(position_ids, np.int64)).unsqueeze(0)
        return self.model.encode_image(pv, pid).float().numpy()

    @torch.no_grad()
    def encode_audio(self, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.model.audio_tower is None:
            return super().encode_audio(features, mask)
        f = torch.from_numpy(np.asarray(features, np.float32)).unsqueeze(0)
        m = torch.from_numpy(np.asarray(mask, bool)).unsqueeze(0)
        return self.model.encode_audio(f, m).float().numpy()

    def reset(self) -> None:
        self.model.language_model.reset_caches()
        self._last_hidden = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "context": self.capabilities.context}

