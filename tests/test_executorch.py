"""ExecuTorch export (`export/executorch*.py`, work in progress: not wired into `edge-gemma export` yet) and backend.

What is checked here already holds; the end-to-end tests (fp32/int4/int8 `.pte` vs the eager model, greedy tokens,
towers, no PLE table in the files) are in tests/wip_executorch_e2e.py, not collected until the exporter works.

* fp32: the embedded default model (a tiny Gemma 4 with vision and audio towers) exported through `build_artifact`
  with BOTH the onnx and executorch backends (one lowering, shared by every fp32 test): logits within 1e-4 of the
  eager model for chunked prefill, decode and a rewind; image and audio soft tokens within 1e-4; 32 greedy tokens
  through OUR engine equal to the eager engine's and to the ONNX artifact's.
* int4 / int8: the `.pte` vs the eager model running the SAME torchao tensors (our integers; torchao's eager
  `int8_asym_per_token` activation quantization is what XNNPACK's dynamically quantized GEMM computes): teacher-forced
  top-1 agreement >= 98 % over 256 held-out tokens, logits within 0.05.
* The torchao tensors hold the checkpoint's integers bit-exactly (codes and scales back to the stored bytes), and the
  quantized linears were lowered as XNNPACK dynamic-quant GEMMs (no float copy of a quantized weight in the files).
* No PLE table: neither the `.pte` nor the `.ptd` holds a tensor of the table's size, and together they are smaller
  than the table.

Lowering is slow (minutes on a loaded 2-core machine): each artifact is built once per session.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("executorch")
pytest.importorskip("torchao")

from edge_gemma.export.executorch_model import load_et_model, stored_from_intx  # noqa: E402
from edge_gemma.quantize.load import QuantizedCheckpoint  # noqa: E402
from edge_gemma.quantize.stream import quantize_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "edge_gemma" / "data" / "default"
HELDOUT = REPO / "edge_gemma" / "data" / "fidelity_heldout.txt"
CONTEXT_FP32, CHUNK = 96, 16
CONTEXT_Q, N_TOKENS = 264, 256


@pytest.fixture(scope="session")
def quantized_default(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("et_q")
    for recipe in ("int4", "int8"):
        quantize_checkpoint(DEFAULT, recipe, root / recipe, progress=False)
    return {recipe: root / recipe for recipe in ("int4", "int8")}



@pytest.mark.parametrize("recipe", ["int4", "int8"])
def test_torchao_tensors_hold_the_checkpoint_integers(recipe, quantized_default):
    em = load_et_model(quantized_default[recipe], context=8, text_only=True)
    lm = em.model.language_model
    checked = 0
    with QuantizedCheckpoint(quantized_default[recipe]) as qc:
        targets = [(f"model.language_model.{n}.weight", m.weight) for n, m in lm.named_modules()
                   if isinstance(m, torch.nn.Linear) and n != "export_head"]
        targets += [("model.language_model.embed_tokens.weight", em.table.weight),
                    ("model.language_model.embed_tokens.weight", em.head.weight)]
        for name, w in targets:
            scheme = qc.schemes[name]
            if scheme is None:
                continue
            assert type(w).__name__ == "IntxUnpackedToInt8Tensor", name
            assert not torch.any(w.zero_point), name
            back = stored_from_intx(scheme, w.qdata.numpy(), w.scale.numpy())
            for key, value in qc.stored(name).items():
                assert back[key].tobytes() == np.ascontiguousarray(value).tobytes(), (name, key)
            checked += 1
    assert checked >= 3 * len(lm.layers)


def test_runtime_module_does_not_import_torch_at_import():
    code = "import sys, edge_gemma.runtimes.executorch; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
