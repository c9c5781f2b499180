"""What every exporter shares: the one loader of the export model, the quantized head, the tower graphs.

`load_export_model(checkpoint, linears)` builds the eager `Gemma4Model` from a quantized checkpoint
(`quant_manifest.json`, any recipe) or a float Hugging Face checkpoint, strictly: one name table
(`edge_gemma.checkpoint.LAYOUTS`), one error for a tensor that is missing, of the wrong shape, quantized where no
linear can take it, or left over. The model is built on the meta device and only what the graphs use is
materialised; the PLE table is never read (every artifact serves its rows from `ple.bin`).

How a quantized weight is represented is the backend's choice, made by its `Linears` (a linear factory): ONNX builds
`MatMulNBits` linears over the stored integers, ExecuTorch torchao tensors over the same integers, LiteRT shared
placeholders that its converter quantizes and that are then overwritten with ours. The loader never re-quantizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from torch import nn

from edge_gemma.config import ModelConfig, load_config
from edge_gemma.quantize.schemes import Scheme

__all__ = ["EMBED", "PLE", "AudioGraph", "ExportModel", "ExportModelError", "LinearHead", "Linears", "VisionGraph",
           "load_export_model", "replace_modules"]

EMBED = "language_model.embed_tokens.weight"
PLE = "language_model.embed_tokens_per_layer.weight"


class ExportModelError(ValueError):
    """The checkpoint cannot be built into an export model; the message names the file and tensor."""


class Linears(Protocol):
    """A backend's representation of the checkpoint's weights (see the module docstring).

    `linear` turns one quantized `nn.Linear` weight (its scheme, the stored arrays, `(out, in)`, an optional float
    bias) into the module that replaces the linear; `head` builds the tied LM head from the embedding table's stored
    arrays (`scheme` None: a float table, `stored["tensor"]` float32)."""

    def linear(self, scheme: Scheme, stored: dict[str, np.ndarray], shape: tuple[int, int],
               bias: torch.Tensor | None, name: str) -> nn.Module: ...

    def head(self, scheme: Scheme | None, stored: dict[str, np.ndarray], shape: tuple[int, int],
             name: str) -> nn.Module: ...


@dataclass
class ExportModel:
    """The eager model prepared for export (linears as the backend represents them, tables on the meta device)."""

    cfg: ModelConfig
    model: nn.Module  # Gemma4Model
    head: nn.Module  # [.., H] -> [.., V] raw logits over the embedding table's values
    embed_scheme: Scheme | None
    embed_stored: dict[str, np.ndarray]  # the embedding table's stored arrays ({"tensor"} when float)
    schemes: dict[str, str]  # HF name -> scheme label or "float", every tensor the model holds


class LinearHead(nn.Module):
    """The LM head as its own linear (a quantized one over the table's integers), in place of `TiedHead`."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear

    def forward(self, h: torch.Tensor, table: nn.Module) -> torch.Tensor:
        return self.linear(h)


def _float32(arr: np.ndarray) -> torch.Tensor:
    """A float32 tensor in memory torch allocated (so an exporter can free it in place once it is serialized)."""
    return torch.tensor(np.asarray(arr, dtype=np.float32))


def load_export_model(checkpoint: str | Path, linears: Linears, *, text_only: bool = False,
                      include: Callable[[str], bool] | None = None) -> ExportModel:
    """`Gemma4Model` for export (see the module docstring). `include(our_name)`: load only those tensors, leaving the
    others on the meta device (an exporter that converts the towers alone); the head is then not built."""
    from edge_gemma.checkpoint import LM_HEAD, _ignored, hf_name, load_model, params_on_meta
    from edge_gemma.model.gemma4 import Gemma4Model
    from edge_gemma.quantize.load import QuantizedCheckpoint
    from edge_gemma.quantize.stream import MANIFEST_FILENAME

    path = Path(checkpoint)
    cfg = load_config(path)
    layout = cfg.model_type
    if not (path / MANIFEST_FILENAME).is_file():  # a float Hugging Face checkpoint: exported in float32
        model = load_model(path, text_only=text_only, mmap_embeddings=True)
        lm = model.language_model
        lm._modules.pop("embed_tokens_per_layer")
        table = lm.embed_tokens.weight.detach().float().contiguous().numpy()
        schemes = {hf_name(n, layout) or n: "float" for n in model.state_dict()}
        stored = {"tensor": table}
        head = linears.head(None, stored, tuple(table.shape), hf_name(EMBED, layout))
        return ExportModel(cfg=model.cfg, model=model.eval(), head=head, embed_scheme=None, embed_stored=stored,
                           schemes=schemes)

    with QuantizedCheckpoint(path) as qc:
        if text_only:
            cfg = cfg.text_only()
        with params_on_meta():
            model = Gemma4Model(cfg)
        model.language_model._modules.pop("embed_tokens_per_layer")
        wanted = include or (lambda name: True)
        schemes: dict[str, str] = {}

        def hf(ours: str) -> str:
            name = hf_name(ours, layout)
            if name is None or name not in qc.manifest["tensors"]:
                raise ExportModelError(f"{path}: the quantized checkpoint has no tensor for {ours!r} ({name!r})")
            return name

        swapped: set[str] = set()
        for full, child in list(model.named_modules()):  # module order: the order of the state dict
            if not isinstance(child, nn.Linear) or not wanted(full + ".weight"):
                continue
            mod_name, _, child_name = full.rpartition(".")
            mod = model.get_submodule(mod_name)
            name = hf(full + ".weight")
            scheme = qc.schemes[name]
            if scheme is None:
                continue
            bias = _float32(qc.stored(hf(full + ".bias"))["tensor"]) if child.bias is not None else None
            shape = tuple(qc.entry(name)["shape"])
            setattr(mod, child_name, linears.linear(scheme, qc.stored(name), shape, bias, name))
            swapped.add(full)
            schemes[name] = scheme.label
            if bias is not None:
                schemes[hf(full + ".bias")] = "float"

        state, skipped = {}, set()
        for ours, target in model.state_dict().items():
            if ours == EMBED or ours.rpartition(".")[0] in swapped or not wanted(ours):
                skipped.add(ours)
                continue
            name = hf(ours)
            if qc.schemes[name] is not None:
                raise ExportModelError(f"{path}: tensor {name!r} is quantized ({qc.schemes[name].label}) but {ours!r} "
                                       "is not a linear weight the exporter can quantize")
            arr = qc.stored(name)["tensor"]
            if tuple(arr.shape) != tuple(target.shape):
                raise ExportModelError(f"{path}: tensor {name!r} has shape {list(arr.shape)}, expected "
                                       f"{list(target.shape)}")
            state[ours] = _float32(arr)
            schemes[name] = "float"
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = sorted(set(missing) - skipped)
        if missing or unexpected:
            raise ExportModelError(f"{path}: could not load {missing[:5]} / unexpected {unexpected[:5]}")

        head, emb_scheme, emb_stored = None, None, {}
        emb = hf(EMBED)
        if wanted(EMBED):
            emb_scheme, emb_stored = qc.schemes[emb], qc.stored(emb)
            schemes[emb] = "float" if emb_scheme is None else emb_scheme.label
            if emb_scheme is None:
                emb_stored = {"tensor": np.asarray(emb_stored["tensor"], dtype=np.float32)}
            head = linears.head(emb_scheme, emb_stored, tuple(qc.entry(emb)["shape"]), emb)
            left = sorted(n for n in qc.names() if n not in schemes and n not in (emb, hf(PLE), LM_HEAD)
                          and not _ignored(n, cfg, layout, text_only))
            if left:
                raise ExportModelError(f"{path}: unexpected tensor(s) {left[:5]} ({len(left)} in all) for a "
                                       f"{layout!r} model")
    model.eval().requires_grad_(False)
    return ExportModel(cfg=cfg, model=model, head=head, embed_scheme=emb_scheme, embed_stored=emb_stored,
                       schemes=schemes)


class VisionGraph(nn.Module):
    """`(pixel_values [Np, 3p^2], position_ids [Np, 2]) -> (soft_tokens [Np/k^2, H], valid [Np/k^2])`: the vision
    tower and `embed_vision`, batch 1 added inside; the valid cells come first (`valid` masks the padding)."""

    def __init__(self, tower: nn.Module, embed: nn.Module):
        super().__init__()
        self.tower, self.embed = tower, embed

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor):
        soft, valid = self.tower(pixel_values.unsqueeze(0), position_ids.unsqueeze(0))
        return self.embed(soft)[0], valid[0]


class AudioGraph(nn.Module):
    """`(features [T, 128], mask [T] bool) -> (soft_tokens [T', H], valid [T'])`, T' = ceil(ceil(T/2)/2): the audio
    tower and `embed_audio`, batch 1 added inside."""

    def __init__(self, tower: nn.Module, embed: nn.Module):
        super().__init__()
        self.tower, self.embed = tower, embed

    def forward(self, features: torch.Tensor, mask: torch.Tensor):
        hidden, valid = self.tower(features.unsqueeze(0), mask.unsqueeze(0))
        return self.embed(hidden)[0], valid[0]


def replace_modules(root: nn.Module, kind: type[nn.Module], make: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every submodule of `root` that is an instance of `kind` (exactly, not a subclass) by `make(old)`;
    returns how many were replaced. The source transformation each backend's swaps are written with."""
    count = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is kind:
                setattr(parent, name, make(child))
                count += 1
    return count
