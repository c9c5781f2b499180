"""Data-aware quantization and model-level quality, on the eager PyTorch model (this module imports torch).

* :func:`gptq_text_weights` runs GPTQ (``gptq.py``) on the text decoder's linears, sequentially: stage 0 is the PLE
  model projection, stage ``i + 1`` is decoder layer ``i``. For each stage the calibration batches run through the
  model whose earlier stages already hold their quantized weights, forward pre-hooks accumulate ``H = 2 X^T X / n``
  for the stage's linears, and the forward stops after the stage. The audio and vision towers and the embedding
  tables are rounded to nearest (they would need image/audio calibration data, and the int4 recipes keep them int8).
* :func:`gptq_quantize_checkpoint` = GPTQ in memory, then the streaming writer (``stream.py``) for everything else.
* :func:`model_quality` compares the float and the quantized model on held-out token batches: next-token KL
  divergence, top-1 agreement, perplexities, max logit difference. :func:`quality_report` writes
  ``quant_quality.json`` next to the quantized checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .gptq import GPTQError, act_order_permutation, gptq_quantize
from .load import QuantizedCheckpoint
from .recipes import Recipe, get_recipe
from .report import QuantReport
from .stream import quantize_checkpoint

__all__ = ["token_batches", "gptq_text_weights", "gptq_quantize_checkpoint", "ModelQuality", "model_quality",
           "quality_report", "apply_quantized", "activation_quant", "fake_quant_int8", "ACT_QUANT_MODES",
           "QUALITY_FILENAME"]

logger = logging.getLogger(__name__)
QUALITY_FILENAME = "quant_quality.json"


class _Stop(Exception):
    """Raised by a hook to end a calibration forward once the stage of interest has run."""


def token_batches(ids: Sequence[int], seq_len: int, max_batches: int | None = None) -> list[torch.Tensor]:
    """Cut a token stream into ``[1, seq_len]`` batches (the tail shorter than ``seq_len`` is dropped)."""
    ids = list(ids)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than one sequence of {seq_len}")
    if max_batches is not None:
        n = min(n, max_batches)
    return [torch.tensor([ids[i * seq_len:(i + 1) * seq_len]], dtype=torch.long) for i in range(n)]


def _hf_names(model: nn.Module, layout: str) -> dict[str, str]:
    """Our parameter names -> Hugging Face names (one table: ``edge_gemma.checkpoint.LAYOUTS``)."""
    from edge_gemma.checkpoint import LAYOUTS

    out = {}
    for ours, _ in model.named_parameters():
        for our_prefix, their_prefix in LAYOUTS[layout]:
            if ours.startswith(our_prefix):
                out[ours] = their_prefix + ours[len(our_prefix):]
                break
    return out


def _inverse_hessian_factor(h: np.ndarray, damp: float) -> np.ndarray:
    """``gptq.inverse_hessian_factor`` computed with torch's LAPACK (honours ``torch.set_num_threads``; numpy's
    OpenBLAS threads can be very slow on a loaded machine). Same dead-input handling and dampening retries."""
    t = torch.from_numpy(np.array(h, dtype=np.float64, copy=True))
    diag = torch.diagonal(t)
    diag[diag <= 0] = 1.0
    mean = float(diag.mean())
    eye = torch.eye(t.shape[0], dtype=torch.float64)
    for attempt in range(4):
        lower, info = torch.linalg.cholesky_ex(t + damp * (10**attempt) * mean * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper.numpy()
    raise GPTQError("GPTQ: the Hessian is not positive definite even with 1000x dampening")


class _HessianHook:
    def __init__(self, k: int):
        self.h = torch.zeros(k, k, dtype=torch.float64)
        self.rows = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
        self.h += (x.T @ x).to(torch.float64)
        self.rows += x.shape[0]

    def hessian(self) -> np.ndarray:
        return (2.0 * self.h / max(1, self.rows)).numpy()


@torch.no_grad()
def gptq_text_weights(model: nn.Module, recipe: Recipe | str, batches: Sequence[torch.Tensor], *, layout: str,
                      damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                      progress: bool = True) -> dict[str, dict]:
    """GPTQ for every text-decoder linear the recipe quantizes. Returns HF name -> stored arrays, and leaves the
    model holding the dequantized weights of those linears (callers that need the float model must reload it)."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    names = _hf_names(model, layout)
    lm = model.language_model
    stages: list[tuple[str, nn.Module]] = [("language_model.per_layer_model_projection", lm.layers[0])]
    for i in range(len(lm.layers)):
        stop_at = lm.layers[i + 1] if i + 1 < len(lm.layers) else lm.norm
        stages.append((f"language_model.layers.{i}.", stop_at))
    out: dict[str, dict] = {}
    bar = tqdm(total=len(stages), desc=f"gptq {recipe.name}", unit="stage", disable=not progress)
    for prefix, stop_at in stages:
        linears = {}
        for mname, module in model.named_modules():
            if isinstance(module, nn.Linear) and (mname == prefix or mname.startswith(prefix) and prefix.endswith(".")):
                hf = names[f"{mname}.weight"]
                scheme = recipe.scheme_for(hf, tuple(module.weight.shape))
                if scheme is not None:
                    linears[mname] = (module, hf, scheme)
        if not linears:
            bar.update(1)
            continue
        hooks = {m: _HessianHook(mod.in_features) for m, (mod, _, _) in linears.items()}
        handles = [mod.register_forward_pre_hook(hooks[m]) for m, (mod, _, _) in linears.items()]

        def stop(*_):
            raise _Stop

        handles.append(stop_at.register_forward_pre_hook(stop))
        try:
            for ids in batches:
                try:
                    model(ids, torch.arange(ids.shape[1]))
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
        factors: list[tuple[np.ndarray, np.ndarray]] = []  # (H, factor): q/k/v and gate/up share their input
        for mname, (module, hf, scheme) in linears.items():
            w = module.weight.detach().to(torch.float32).numpy()
            h = hooks[mname].hessian()
            factor = next((f for hh, f in factors if hh.shape == h.shape and np.array_equal(hh, h)), None)
            if factor is None:
                perm = act_order_permutation(h) if act_order else slice(None)
                factor = _inverse_hessian_factor(h[perm][:, perm], damp)
                factors.append((h, factor))
            stored = gptq_quantize(w, h, scheme, damp=damp, block_size=block_size, factor=factor,
                                   act_order=act_order)
            out[hf] = stored
            module.weight.copy_(torch.from_numpy(scheme.decode(stored, w.shape)).to(module.weight.dtype))
        bar.update(1)
    bar.close()
    return out


def gptq_quantize_checkpoint(src: str | os.PathLike, recipe: Recipe | str, out: str | os.PathLike,
                             calibration: Sequence[torch.Tensor], *, damp: float = 0.01, block_size: int = 128,
                             act_order: bool = False, progress: bool = True, **stream_kwargs: Any) -> QuantReport:
    """GPTQ for the text linears (needs the float model in memory), round-to-nearest for the rest, written by the
    streaming writer with the same layout and manifest as :func:`quantize_checkpoint`."""
    from edge_gemma.checkpoint import load_model
    from edge_gemma.config import load_config

    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    layout = load_config(Path(src)).model_type
    model = load_model(src, text_only=True, mmap_embeddings=True)  # the tables are not calibrated: keep them on disk
    precomputed = gptq_text_weights(model, recipe, calibration, layout=layout, damp=damp, block_size=block_size,
                                    act_order=act_order, progress=progress)
    del model
    algorithm = {"name": "gptq", "damp": damp, "block_size": block_size, "act_order": act_order,
                 "calibration": {"sequences": len(calibration),
                                 "tokens": int(sum(int(b.numel()) for b in calibration))}}
    return quantize_checkpoint(src, recipe, out, precomputed=precomputed, algorithm=algorithm, progress=progress,
                               **stream_kwargs)


@torch.no_grad()
def apply_quantized(model: nn.Module, quant_dir: str | os.PathLike, *, layout: str) -> nn.Module:
    """Overwrite the model's weights with the dequantized weights of a quantized checkpoint (strict on names)."""
    names = _hf_names(model, layout)
    with QuantizedCheckpoint(quant_dir) as ckpt:
        available = set(ckpt.names())
        for ours, param in model.named_parameters():
            hf = names.get(ours)
            if hf is None or hf not in available:
                raise ValueError(f"{quant_dir}: no tensor {hf or ours!r} for model parameter {ours!r}")
            value = torch.from_numpy(ckpt.dequantized(hf))
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{quant_dir}: tensor {hf!r} has shape {list(value.shape)}, "
                                 f"model expects {list(param.shape)}")
            param.copy_(value.to(param.dtype))
    return model


ACT_QUANT_MODES = ("none", "per-token", "per-block")


def fake_quant_int8(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Symmetric int8 quantize-dequantize of activations ``x[..., K]``: one scale ``amax / 127`` per token
    (``block=None``) or per block of ``block`` consecutive input features (``K % block == 0``), codes rounded to
    nearest (ties to even, as ``torch.round``) and clipped to [-127, 127]; all-zero tokens/blocks stay zero."""
    shape = x.shape
    xf = x.to(torch.float32)
    if block is not None:
        xf = xf.reshape(*shape[:-1], shape[-1] // block, block)  # (..., K/B, B)
    scale = xf.abs().amax(-1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(xf / scale), -127, 127) * scale
    return q.reshape(shape).to(x.dtype)


def activation_quant(model: nn.Module, quant_dir: str | os.PathLike, *, layout: str, mode: str = "per-token"
                     ) -> list[Any]:
    """Emulate the backends' dynamic int8 activation quantization in front of every int4 linear of a quantized
    checkpoint (XNNPACK's dynamically quantized linear quantizes each token's input row to int8; ONNX Runtime's
    ``MatMulNBits`` with ``accuracy_level=4`` quantizes the input in blocks of the weight's group size). ``mode``:
    ``per-token`` (one scale per row), ``per-block`` (one scale per int4 group of the row) or ``none``. int8 linears
    and the float/embedding paths are left alone. Returns the hook handles (``h.remove()`` undoes it)."""
    if mode not in ACT_QUANT_MODES:
        raise ValueError(f"activation quantization mode {mode!r}: expected one of {ACT_QUANT_MODES}")
    if mode == "none":
        return []
    manifest = json.loads((Path(quant_dir) / "quant_manifest.json").read_text())
    int4 = {name: entry["scheme"]["group_size"] for name, entry in manifest["tensors"].items()
            if entry.get("scheme") and entry["scheme"].get("bits") == 4}
    names = _hf_names(model, layout)
    handles = []
    for mname, module in model.named_modules():
        hf = names.get(f"{mname}.weight")
        if isinstance(module, nn.Linear) and hf in int4:
            block = int4[hf] if mode == "per-block" else None
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, block=block: (fake_quant_int8(args[0], block), *args[1:])))
    if not handles:
        logger.debug("%s: no int4 linear; activations stay float", quant_dir)
    return handles


@dataclass(frozen=True, kw_only=True)
class ModelQuality:
    """Next-token agreement of a quantized model with its float original over ``tokens`` predicted positions."""

    tokens: int
    kl_mean: float  # mean KL(p_float || p_quant), nats
    kl_max: float
    top1_agreement: float  # fraction of positions whose argmax matches
    ppl_float: float  # perplexity of the evaluation tokens
    ppl_quant: float
    max_abs_logit_diff: float
    activations: str = "float"  # what the quantized model did to activations (see activation_quant)

    def format(self) -> str:
        return (f"model-level ({self.tokens} tokens): KL mean {self.kl_mean:.5f} max {self.kl_max:.5f} nats, "
                f"top-1 agreement {100 * self.top1_agreement:.2f} %, perplexity {self.ppl_float:.3f} -> "
                f"{self.ppl_quant:.3f}, max |logit diff| {self.max_abs_logit_diff:.4f}; activations: "
                f"{self.activations}")


@torch.no_grad()
def model_quality(reference: nn.Module, quantized: nn.Module, batches: Sequence[torch.Tensor]) -> ModelQuality:
    kl_sum = kl_max = agree = nll_f = nll_q = 0.0
    max_diff = 0.0
    n = 0
    for ids in batches:
        pos = torch.arange(ids.shape[1])
        lf = reference(ids, pos).to(torch.float32)[:, :-1]  # (1, S-1, V) predictions of tokens 1..S-1
        lq = quantized(ids, pos).to(torch.float32)[:, :-1]
        target = ids[:, 1:]
        log_pf, log_pq = torch.log_softmax(lf, -1), torch.log_softmax(lq, -1)
        kl = (log_pf.exp() * (log_pf - log_pq)).sum(-1)  # (1, S-1)
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
        agree += float((lf.argmax(-1) == lq.argmax(-1)).sum())
        nll_f -= float(log_pf.gather(-1, target[..., None]).sum())
        nll_q -= float(log_pq.gather(-1, target[..., None]).sum())
        max_diff = max(max_diff, float((lf - lq).abs().max()))
        n += target.numel()
    if n == 0:
        raise ValueError("model_quality needs at least one batch of two or more tokens")
    return ModelQuality(tokens=n, kl_mean=kl_sum / n, kl_max=kl_max, top1_agreement=agree / n,
                        ppl_float=math.exp(nll_f / n), ppl_quant=math.exp(nll_q / n), max_abs_logit_diff=max_diff)


def quality_report(src: str | os.PathLike, quant_dir: str | os.PathLike, batches: Sequence[torch.Tensor], *,
                   text_only: bool = True, act_quant: str = "per-token") -> ModelQuality:
    """Load the float checkpoint twice (float, and with the quantized weights applied), compare them on ``batches``,
    and write ``quant_quality.json`` into ``quant_dir``.

    ``act_quant``: the int4 linears see int8 dynamically quantized activations, as on the backends (XNNPACK's
    dynamically quantized linear, ORT MatMulNBits ``accuracy_level=4``); see :func:`activation_quant`. The result's
    ``activations`` field says what was emulated.

    Memory: two float32 text models (E2B: 4.63 G parameters, 18.5 GB each with the embedding tables): fine for the
    tiny and reduced models, too much for a full-size checkpoint on a 24 GB machine (a quantized-embedding eager path
    would fix that; not done yet)."""
    from edge_gemma.checkpoint import load_model
    from edge_gemma.config import load_config

    layout = load_config(Path(src)).model_type
    reference = load_model(src, text_only=text_only)
    quantized = apply_quantized(load_model(src, text_only=text_only), quant_dir, layout=layout)
    handles = activation_quant(quantized, quant_dir, layout=layout, mode=act_quant)
    quality = model_quality(reference, quantized, batches)
    for h in handles:
        h.remove()
    if handles:
        quality = replace(quality, activations=f"int8 dynamic ({act_quant}, symmetric) before the int4 linears, "
                                               f"as the backends run them")
    path = Path(quant_dir) / QUALITY_FILENAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(quality), indent=1))
    os.replace(tmp, path)
    return quality
