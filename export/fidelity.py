"""Export fidelity: how closely an exported backend follows the float model on held-out text.

Teacher forcing: the same token sequence is fed, one position at a time, to the backend under test and to the
reference (the eager model on the FLOAT checkpoint), and the next-token distributions are compared at every
position: top-1 agreement (how often both pick the same next token), KL(reference || backend) in nats (mean and
max over positions), and each side's perplexity on the text itself. A quantized artifact's figures therefore
include both the quantization error and the conversion error; the eager model on the dequantized weights
(`eager-dequantized`) separates the two.

The held-out text (`edge_gemma/data/fidelity_heldout.txt`) is a few docstrings of Python standard-library modules
that `scripts/train_default_model.py` holds out of the embedded model's training set.

Backends are driven through the `Backend` contract only (`decode` one token at a time, since `prefill` returns the
last position's logits), so the figures describe exactly what the engine will run. torch is imported only by
`reference_backend`.

**Bounded reference** (`reference_backend`). A float32 copy of the full E2B (text + towers, ~11 GB with the
dequantized copy) does not fit the 8 GB export target. The held-out text needs no tower, so the reference is the
TEXT model only; its embedding tables stay memory-mapped; a checkpoint stored in 16 bits (every Gemma 4 release, bf16)
keeps its linear weights in that dtype and each linear upcasts its weight to float32 when it runs, so every product
and sum is float32 and the logits equal a float32 model's (the upcast is exact); the tied head runs over the vocabulary
in slices, so the float32 copy of the 0.4 G-value table never exists. Resident: the stored weights (the linears in
their 16-bit dtype + the touched pages of the bf16 table), not 4 bytes per parameter. The eager model on the dequantized
weights (`eager-dequantized`) is float32 throughout (E2B: ~9.4 GB), so `dequantized_fits` keeps it to models whose
float32 weights fit `DEQUANTIZED_BUDGET_BYTES`; above it the figure is left out and the manifest's `notes` say why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edge_gemma.runtimes.base import Backend

HELDOUT_FILE = Path(__file__).resolve().parents[1] / "edge_gemma" / "data" / "fidelity_heldout.txt"

__all__ = ["DEQUANTIZED_BUDGET_BYTES", "Fidelity", "compare_logits", "dequantized_fits", "heldout_text",
           "reference_backend", "teacher_forced_logits"]

DEQUANTIZED_BUDGET_BYTES = 3 * 2**30  # float32 weights of the eager-dequantized comparison (PLE table excluded)
_HEAD_SLICE = 16384  # vocabulary rows per slice of the reference's tied head


def heldout_text() -> str:
    try:
        from importlib.resources import files

        return (files("edge_gemma") / "data" / "fidelity_heldout.txt").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        return HELDOUT_FILE.read_text(encoding="utf-8")


@dataclass(frozen=True, kw_only=True)
class Fidelity:
    tokens: int  # positions compared
    top1_agreement: float  # fraction of positions where both argmaxes agree
    kl_mean: float  # mean KL(reference || backend), nats
    kl_max: float
    ppl_reference: float  # perplexity of the held-out continuation under each model
    ppl_backend: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        return (
            f"top-1 agreement {self.top1_agreement * 100:.1f}% | KL mean {self.kl_mean:.4g} max {self.kl_max:.4g} nats"
            f" | ppl {self.ppl_backend:.3g} (float {self.ppl_reference:.3g}) over {self.tokens} tokens"
        )


def teacher_forced_logits(
    backend: Backend,
    gather_ple: Callable[[np.ndarray], np.ndarray],
    ids: Sequence[int],
    *,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Logits after each of `ids` (`[N, V]` float32): token t is decoded at position t after a reset."""
    backend.reset()
    out = []
    for t, tok in enumerate(ids):
        tid = np.asarray([int(tok)], np.int64)
        logits = backend.decode(np.asarray(backend.embed(tid), np.float32), gather_ple(tid), np.asarray([t], np.int64))
        out.append(np.asarray(logits, np.float32).reshape(-1))
        if progress is not None:
            progress(1)
    backend.reset()
    return np.stack(out)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def compare_logits(reference: np.ndarray, test: np.ndarray, ids: Sequence[int]) -> Fidelity:
    """Compare `[N, V]` logits position by position; `ids` (length N) gives the next tokens for the perplexities."""
    if reference.shape != test.shape:
        raise ValueError(f"fidelity: reference logits {reference.shape} and backend logits {test.shape} differ")
    lp, lq = _log_softmax(reference), _log_softmax(test)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)  # (N,)
    agree = reference.argmax(-1) == test.argmax(-1)
    nxt = np.asarray(ids[1:], np.int64)
    n = nxt.size
    rows = np.arange(n)
    ppl_ref = float(np.exp(-lp[rows, nxt].mean())) if n else float("nan")
    ppl_test = float(np.exp(-lq[rows, nxt].mean())) if n else float("nan")
    return Fidelity(
        tokens=int(reference.shape[0]), top1_agreement=float(agree.mean()), kl_mean=float(np.maximum(kl, 0).mean()),
        kl_max=float(kl.max()), ppl_reference=ppl_ref, ppl_backend=ppl_test,
    )


def _dequantized_values(checkpoint: Path) -> int:
    """Values the eager-dequantized model materialises in float32: every weight (towers included, as
    `load_eager_model` builds it) but the PLE table (`skip_ple`: its rows come from ple.bin). From config.json alone."""
    from edge_gemma.checkpoint import params_on_meta
    from edge_gemma.config import load_config
    from edge_gemma.model.gemma4 import Gemma4Model

    with params_on_meta():
        model = Gemma4Model(load_config(checkpoint))
    ple = model.language_model.embed_tokens_per_layer.weight
    return sum(p.numel() for p in model.parameters()) - ple.numel()


def dequantized_fits(checkpoint: str | Path) -> tuple[bool, str]:
    """Whether the eager-dequantized comparison (float32) stays within `DEQUANTIZED_BUDGET_BYTES`, and a sentence
    for the manifest when it does not."""
    need = 4 * _dequantized_values(Path(checkpoint))
    if need <= DEQUANTIZED_BUDGET_BYTES:
        return True, ""
    return False, (f"eager-dequantized not run: its float32 weights take {need / 2**30:.1f} GiB, over the "
                   f"{DEQUANTIZED_BUDGET_BYTES / 2**30:.0f} GiB the export's fidelity check may use")


def reference_backend(checkpoint: str | Path, *, context: int) -> Backend:
    """The float reference as an `EagerBackend`, text-only and memory-bounded (see the module docstring).

    Its logits equal those of `load_model(checkpoint)` in float32 (tested): a 16-bit checkpoint's linears upcast
    their weights per call; a float32 checkpoint is loaded in float32 as it is."""
    import torch
    from torch import nn

    from edge_gemma.checkpoint import EMBEDDING_TABLES, checkpoint_tensors, load_model
    from edge_gemma.eager_backend import EagerBackend

    from .common import replace_modules

    path = Path(checkpoint)
    dtypes = {info.dtype for name, info in checkpoint_tensors(path).items() if info.dtype in ("F32", "F16", "BF16")}
    storage = {"BF16": torch.bfloat16, "F16": torch.float16}.get(dtypes.pop()) if len(dtypes) == 1 else None
    model = load_model(path, dtype=storage or torch.float32, text_only=True, mmap_embeddings=True)
    lm = model.language_model
    if storage is not None:
        upcast = _upcast_linear_class()
        replace_modules(model, nn.Linear, upcast)  # weights stay 16-bit; float32 only while they run
        tables = {id(model.get_parameter(n)) for n in EMBEDDING_TABLES}
        for module in model.modules():
            if isinstance(module, upcast):
                continue
            for name, param in module.named_parameters(recurse=False):
                if id(param) not in tables:
                    param.data = param.data.float()  # norms, scalars: small
            for name, buf in module.named_buffers(recurse=False):
                if buf is not None and buf.is_floating_point():
                    setattr(module, name, buf.float())

        lm.lm_head = SlicedTiedHead()
    lm.setup_caches(context, dtype=torch.float32)
    return EagerBackend(model)


def _upcast_linear_class():
    """`nn.Linear` whose 16-bit weight is upcast to the input's dtype per call (built lazily: no torch at import)."""
    global _UPCAST_LINEAR
    if _UPCAST_LINEAR is None:
        import torch.nn.functional as F
        from torch import nn

        class UpcastLinear(nn.Module):
            def __init__(self, linear: nn.Linear):
                super().__init__()
                self.weight = linear.weight
                self.bias = None if linear.bias is None else nn.Parameter(linear.bias.float(), requires_grad=False)

            def forward(self, x):
                return F.linear(x, self.weight.to(x.dtype), self.bias)

        _UPCAST_LINEAR = UpcastLinear
    return _UPCAST_LINEAR


_UPCAST_LINEAR = None


def SlicedTiedHead():  # noqa: N802 - builds the module lazily (no torch at import)
    """The tied head over a 16-bit table, `_HEAD_SLICE` vocabulary rows at a time in float32 (never the whole table
    upcast)."""
    import torch
    import torch.nn.functional as F

    from edge_gemma.model.text import TiedHead

    class _SlicedTiedHead(TiedHead):
        def forward(self, h, table):
            w = table.weight
            return torch.cat([F.linear(h, w[a:a + _HEAD_SLICE].to(h.dtype)) for a in range(0, w.shape[0], _HEAD_SLICE)],
                             dim=-1)  # (B, S, V)

    return _SlicedTiedHead()
