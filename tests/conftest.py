"""Shared fixtures: tiny Gemma 4 checkpoints written once per test session by the reference implementation."""

from __future__ import annotations

import lzma
import shutil
from pathlib import Path

import pytest

# The test models are tiny: one intra-op thread is ~20x faster than two on a shared 2-core machine.
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # the runtime-side tests run without torch
    pass

from paths import REPO  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """{"a", "b", "perturbed", "text_only"} -> checkpoint directory (float32, multimodal unless text_only)."""
    import tiny

    root = tmp_path_factory.mktemp("tiny_ckpts")
    return {
        "a": tiny.write_checkpoint(root / "a", "a", seed=0),
        "b": tiny.write_checkpoint(root / "b", "b", seed=1),
        "perturbed": tiny.write_checkpoint(root / "perturbed", "a", seed=2, perturbed=True),
        "text_only": tiny.write_checkpoint(root / "text_only", "b", seed=3, text_only=True),
    }


@pytest.fixture(scope="module")
def restore_torch_state():
    """For a module whose code sets global torch state (threads, deterministic algorithms, seed: the training
    scripts): saved before the module's tests, restored after them, so other modules run as they would alone."""
    import torch

    threads, deterministic, rng = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.get_rng_state()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    torch.set_rng_state(rng)


@pytest.fixture(scope="session")
def gemma4_tokenizer_json_dir(tmp_path_factory) -> Path:
    """tests/data/gemma4_tokenizer with tokenizer.json decompressed (lzma), once per test session, for transformers."""
    data = REPO / "tests" / "data" / "gemma4_tokenizer"
    out = tmp_path_factory.mktemp("gemma4_tokenizer_json")
    with lzma.open(data / "tokenizer.json.xz", "rb") as src, open(out / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(data / name, out / name)
    return out


@pytest.fixture(scope="session")
def embedded_int8_onnx_artifact(tmp_path_factory) -> Path:
    """An int8 ONNX artifact of the embedded model (context 256, no fidelity check), exported once per session through
    the real command and shared by the voice and Pi tests (about a minute of CPU). Tests must not modify it."""
    from artifact_builder import cli

    out = tmp_path_factory.mktemp("embedded_int8_onnx") / "default-int8"
    done = cli("export", "default", "--quant", "int8", "--backends", "onnx", "--context", "256", "--no-check",
               "--no-progress", "--out", str(out), timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


# LiteRT artifacts of the embedded model, shared by test_litert.py, test_litert_mm.py and test_android_demo.py: a LiteRT
# export with the towers takes minutes here, so each is built once per session. Context 512: a 768x768 image is 256
# soft tokens, and the text tests need prompts longer than the sliding window (128).
LITERT_CONTEXT, LITERT_CHUNK = 512, 128
_LITERT: dict[str, Path] = {}


def _litert_artifact(tmp_path_factory, name: str, src, quant) -> Path:
    if name not in _LITERT:
        from edge_gemma.export.build import build_artifact

        out = tmp_path_factory.mktemp("litert_shared") / name
        build_artifact(src, quant, ["litert"], out, context=LITERT_CONTEXT, max_prefill_chunk=LITERT_CHUNK,
                       check=False, progress=False)
        _LITERT[name] = out
    return _LITERT[name]


@pytest.fixture(scope="session")
def embedded_litert_fp32_artifact(tmp_path_factory) -> Path:
    return _litert_artifact(tmp_path_factory, "fp32", REPO / "edge_gemma" / "data" / "default", "fp32")


@pytest.fixture(scope="session")
def embedded_int8_checkpoint(tmp_path_factory) -> Path:
    """The embedded model quantized once with the int8 recipe (`edge-gemma quantize`'s code path)."""
    from edge_gemma.quantize.recipes import get_recipe
    from edge_gemma.quantize.stream import quantize_checkpoint

    out = tmp_path_factory.mktemp("embedded_q") / "int8"
    quantize_checkpoint(REPO / "edge_gemma" / "data" / "default", get_recipe("int8"), out, progress=False)
    return out


@pytest.fixture(scope="session")
def embedded_litert_int8_artifact(tmp_path_factory, embedded_int8_checkpoint) -> Path:
    return _litert_artifact(tmp_path_factory, "int8", embedded_int8_checkpoint, None)


# The longest module first: with `--dist loadfile` xdist hands out modules in collection order, so the ExecuTorch
# end-to-end module (three lowerings, ~10 minutes of one core) starts at once on one worker while the other worker
# takes the rest, instead of starting late (a fresh clone: 24 min 9 s under extra load before, 15 min 43 s after).
_FIRST = ("test_executorch_e2e.py",)


# The fast tier (`make test-fast`, `-m unit`): modules that export nothing and build no model beyond the tiny ones.
UNIT_MODULES = ("test_config.py", "test_sampling.py", "test_budget.py", "test_ple.py", "test_chat.py",
                "test_quant_schemes.py", "test_artifact.py", "test_processors_no_torch.py", "test_tokenizer.py",
                "test_export_common.py", "test_suite_honesty.py", "test_fidelity_math.py", "test_runtime_memory.py")

# What the suite imports. Under CI a module that fails to import is an error at collection, not a silent skip.
SUITE_DEPENDENCIES = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "executorch", "torchao",
                      "litert_torch", "ai_edge_litert", "litert_lm", "peft", "soundfile", "soxr", "sentencepiece",
                      "tokenizers", "safetensors", "matplotlib")


def pytest_configure(config):
    import importlib
    import os
    import tempfile

    if "EDGE_GEMMA_CACHE" not in os.environ:  # per-user caches of the suite's throwaway artifacts (LiteRT-LM's
        cache = tempfile.mkdtemp(prefix="edge-gemma-test-cache-")  # XNNPACK cache) go away with the run
        os.environ["EDGE_GEMMA_CACHE"] = cache  # inherited by the CLI subprocesses and the xdist workers
        config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))
    if os.environ.get("CI", "").strip().lower() not in ("1", "true", "yes") or hasattr(config, "workerinput"):
        return
    broken = []
    for name in SUITE_DEPENDENCIES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure to import is reported by name
            broken.append(f"{name} ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})")
    if broken:
        raise pytest.UsageError("CI=true: the test suite's dependencies must import, and these do not: "
                                + "; ".join(broken))


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: 0 if item.path.name in _FIRST else 1)  # stable: the rest keep their order
    for item in items:
        if item.path.name in UNIT_MODULES:
            item.add_marker(pytest.mark.unit)
