"""The suite's own guarantees: under CI a dependency that fails to import stops the run at collection (naming it)
instead of turning its tests into skips; the fast tier exists and is selected by its marker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from paths import REPO  # noqa: E402


def _collect(tmp_path: Path, ci: str) -> subprocess.CompletedProcess:
    (tmp_path / "soxr.py").write_text("raise ImportError('a broken wheel')\n")  # shadows the real soxr
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           str(REPO / "tests" / "test_config.py")], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


def test_ci_collection_fails_naming_a_dependency_that_does_not_import(tmp_path):
    r = _collect(tmp_path, "true")
    assert r.returncode != 0
    assert "soxr" in r.stdout + r.stderr and "a broken wheel" in r.stdout + r.stderr


def test_outside_ci_the_same_collection_runs(tmp_path):
    r = _collect(tmp_path, "")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_fast_tier_is_selected_by_its_marker():
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "unit", "-p", "no:cacheprovider",
                        str(REPO / "tests")], capture_output=True, text=True, cwd=REPO, timeout=600,
                       env={**os.environ, "CI": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    collected = [line for line in r.stdout.splitlines() if "::" in line]
    assert len(collected) >= 100
    assert all(line.split("::")[0].rsplit("/", 1)[-1].startswith("test_") for line in collected)
    assert not any("test_executorch_e2e.py" in line or "test_onnx.py" in line for line in collected)
