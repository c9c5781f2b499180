"""Paths the tests share (on `sys.path` through pytest's `pythonpath` setting in pyproject.toml)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "edge_gemma" / "data" / "default"  # the embedded default model
