"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"),
producing codes and scales in exactly the formats of ``schemes.py``, so the backends store GPTQ weights as they store
round-to-nearest ones.

For a linear ``y = x @ W^T`` and calibration inputs ``X`` (rows = tokens), GPTQ quantizes ``W`` one input column at a
time and spreads each column's rounding error over the not-yet-quantized columns, weighted by the inverse Hessian
``H = 2 X^T X / n`` of the layer's output error. Choices (the reference implementation's defaults, stated because
they affect the stored values):

* static groups, no act-order: column ``k`` is quantized in order, and a group's scale (and zero point) is chosen,
  with the scheme's own rule (bf16-exact, rounded up, never zero), from the *updated* weights of that group just
  before its first column is quantized; int8 per-channel scales come from the original rows.
* dampening ``damp * mean(diag(H))`` on the diagonal (``damp=0.01``), retried x10 if the Cholesky factor fails;
  inputs that never fire (``H[k, k] == 0``) get ``H[k, k] = 1`` and their weights are kept (not zeroed) because
  calibration text is not all text.
* lazy batch updates over blocks of ``block_size`` columns (a multiple of the group size).

This module is numpy only; collecting ``H`` from the eager model lives in ``calibrate.py``.
"""

from __future__ import annotations

import logging

import numpy as np

from .schemes import Int4Group, Int4GroupAsym, Int8PerChannel, Scheme, SchemeError

__all__ = ["gptq_quantize", "inverse_hessian_factor", "act_order_permutation", "GPTQError"]

logger = logging.getLogger(__name__)


class GPTQError(ValueError):
    """Bad inputs to GPTQ (shapes, a Hessian that stays indefinite after dampening)."""


def inverse_hessian_factor(hessian: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (float64). Linears that share an input
    (q/k/v, gate/up) share it: compute once and pass it to :func:`gptq_quantize` as ``factor``."""
    h = np.array(hessian, dtype=np.float64, copy=True)
    diag = np.diagonal(h).copy()
    dead = diag <= 0
    h[dead, dead] = 1.0
    mean = float(np.mean(np.diagonal(h)))
    for attempt in range(4):
        lam = damp * (10**attempt) * mean
        try:
            hd = h + lam * np.eye(h.shape[0])
            lower = np.linalg.cholesky(hd)
            inv_lower = np.linalg.solve(lower, np.eye(h.shape[0]))  # L^-1
            hinv = inv_lower.T @ inv_lower  # (L L^T)^-1
            return np.linalg.cholesky(hinv).T  # upper factor U with U^T U = H^-1
        except np.linalg.LinAlgError:
            logger.debug("GPTQ: Cholesky failed with dampening %g, retrying", lam)
    raise GPTQError("GPTQ: the Hessian is not positive definite even with 1000x dampening")


def act_order_permutation(hessian: np.ndarray) -> np.ndarray:
    """Columns in decreasing ``diag(H)`` order (stable), the order act-order GPTQ quantizes them in."""
    return np.argsort(-np.diagonal(np.asarray(hessian)), kind="stable")


def gptq_quantize(w: np.ndarray, hessian: np.ndarray, scheme: Scheme, *, damp: float = 0.01,
                  block_size: int = 128, factor: np.ndarray | None = None,
                  act_order: bool = False) -> dict[str, np.ndarray]:
    """Quantize ``w[N, K]`` with GPTQ under ``hessian[K, K]`` (``2 X^T X / n``); returns the scheme's stored arrays
    (``scheme.decode(result, w.shape)`` is the GPTQ-quantized weight).

    ``act_order``: quantize the columns in decreasing ``diag(H)`` order (largest activations first, so their error
    can still be compensated by the most columns). Groups stay the stored, contiguous ones, so the group scales are
    *static*: chosen from the original weights before any update (AutoGPTQ's ``static_groups=True``); the layout
    does not change. ``factor``, when given, must then be the factor of the *permuted* Hessian
    (``H[p][:, p]``, ``p = act_order_permutation(H)``)."""
    w = np.array(w, dtype=np.float32, copy=True)
    scheme.check_shape(w.shape)
    n, k = w.shape
    if np.shape(hessian) != (k, k):
        raise GPTQError(f"GPTQ: Hessian has shape {np.shape(hessian)}, expected ({k}, {k}) for a weight {w.shape}")
    if not np.all(np.isfinite(w)) or not np.all(np.isfinite(hessian)):
        raise GPTQError("GPTQ: weight or Hessian contains NaN or inf")
    perm = act_order_permutation(hessian) if act_order else np.arange(k)
    if factor is None:
        factor = inverse_hessian_factor(np.asarray(hessian)[perm][:, perm] if act_order else hessian, damp)
    u = factor.astype(np.float32)  # (K, K) upper, in quantization order

    group = getattr(scheme, "group_size", None)
    if group is not None:
        block_size = max(block_size, group) // group * group
        group_scheme = type(scheme)(group_size=group)
        n_groups = k // group
        scales = np.zeros((n, n_groups), np.float32)
        zeros = np.zeros((n, n_groups), np.uint8) if isinstance(scheme, Int4GroupAsym) else None
        if act_order:  # static groups: scales from the original weights
            params = group_scheme.quantize(w)
            scales[:] = params["scales"]
            if zeros is not None:
                zeros[:] = params["zeros"]
    elif isinstance(scheme, Int8PerChannel):
        row_scales = scheme.quantize(w)["scales"]  # (N,) from the original rows
    else:
        raise GPTQError(f"GPTQ: unsupported scheme {scheme.label}")
    codes = np.zeros((n, k), np.int16)

    col_scale = col_zero = None
    w = w[:, perm] if act_order else w
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].copy()  # (N, B) current values of this block
        err1 = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if act_order:  # static group of the original column perm[col]
                col = int(perm[col])
                if group is not None:
                    col_scale = scales[:, col // group]
                    col_zero = None if zeros is None else zeros[:, col // group]
                else:
                    col_scale = row_scales
            elif group is not None and col % group == 0:
                params = group_scheme.quantize(w1[:, i:i + group])  # scales (N, 1), zeros (N, 1)
                col_scale = params["scales"][:, 0]
                scales[:, col // group] = col_scale
                if zeros is not None:
                    col_zero = params["zeros"][:, 0]
                    zeros[:, col // group] = col_zero
            elif group is None:
                col_scale = row_scales
            x = w1[:, i]
            if isinstance(scheme, Int4GroupAsym):
                c = np.clip(np.rint(x / col_scale) + col_zero, 0, Int4GroupAsym.UMAX)
                deq = (c - col_zero.astype(np.float32)) * col_scale
            elif isinstance(scheme, Int4Group):
                c = np.clip(np.rint(x / col_scale), Int4Group.QMIN, Int4Group.QMAX)
                deq = c * col_scale
            else:
                c = np.clip(np.rint(x / col_scale), -Int8PerChannel.QMAX, Int8PerChannel.QMAX)
                deq = c * col_scale
            codes[:, col] = c
            e = (x - deq.astype(np.float32)) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    if group is None:
        quantized = {"q": codes.astype(np.int8), "scales": row_scales}
    elif zeros is None:
        quantized = {"q": codes.astype(np.int8), "scales": scales}
    else:
        quantized = {"q": codes.astype(np.uint8), "scales": scales, "zeros": zeros}
    try:
        return scheme.pack(quantized)
    except SchemeError as e:  # pragma: no cover - codes are clipped above
        raise GPTQError(f"GPTQ produced codes the scheme cannot pack: {e}") from e
