"""Artifact directory: atomic writes, validation, checksums."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from edge_gemma.artifact import SCHEMA_VERSION, Artifact, ArtifactError, ArtifactWriter


def _write(out, force=False, payload=b"graph"):
    with ArtifactWriter(out, force=force) as w:
        w.write_bytes("onnx/decoder.onnx", payload)
        w.write_json("tokenizer/tokenizer_config.json", {"bos_token": "<bos>"})
        w.manifest["backends"] = {"onnx": {"decoder": "onnx/decoder.onnx"}}
    return out


def test_round_trip_and_verify(tmp_path):
    out = _write(tmp_path / "art")
    art = Artifact(out)
    assert art.manifest["schema_version"] == SCHEMA_VERSION
    assert set(art.files) == {"onnx/decoder.onnx", "tokenizer/tokenizer_config.json"}
    assert art.verify() == []
    assert art.backends == {"onnx": {"decoder": "onnx/decoder.onnx"}}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"


def test_tampered_file_fails_verify(tmp_path):
    out = _write(tmp_path / "art")
    p = out / "onnx" / "decoder.onnx"
    p.write_bytes(b"GRAPH")  # same size, different bytes
    assert Artifact(out).verify() == ["onnx/decoder.onnx"]
    p.write_bytes(b"longer graph")
    with pytest.raises(ArtifactError, match="decoder.onnx: size"):
        Artifact(out)
    p.unlink()
    with pytest.raises(ArtifactError, match="decoder.onnx: listed in manifest.json but missing"):
        Artifact(out)


def test_schema_version_and_not_an_artifact(tmp_path):
    out = _write(tmp_path / "art")
    m = json.loads((out / "manifest.json").read_text())
    m["schema_version"] = 99
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="schema_version 99"):
        Artifact(out)
    with pytest.raises(ArtifactError, match="not an edge-gemma artifact"):
        Artifact(tmp_path)


def test_existing_out_needs_force_and_failure_keeps_old(tmp_path):
    out = _write(tmp_path / "art", payload=b"old")
    with pytest.raises(ArtifactError, match="--force"):
        ArtifactWriter(out)
    with pytest.raises(RuntimeError):
        with ArtifactWriter(out, force=True) as w:
            w.write_bytes("onnx/decoder.onnx", b"new")
            raise RuntimeError("export failed")
    assert (out / "onnx" / "decoder.onnx").read_bytes() == b"old"
    _write(out, force=True, payload=b"new")
    assert (out / "onnx" / "decoder.onnx").read_bytes() == b"new"
    assert Artifact(out).verify() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_sigkill_mid_write_leaves_no_out(tmp_path):
    out = tmp_path / "art"
    script = textwrap.dedent(
        f"""
        import os, signal
        from edge_gemma.artifact import ArtifactWriter
        w = ArtifactWriter({str(out)!r})
        w.write_bytes("onnx/decoder.onnx", b"x" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    _write(out)  # the next run succeeds, and cleans up what the killed one left
    assert Artifact(out).verify() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_paths_cannot_escape(tmp_path):
    with pytest.raises(ArtifactError, match="inside the artifact"):
        with ArtifactWriter(tmp_path / "art") as w:
            w.write_bytes("../evil", b"")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "art").exists()
    assert os.listdir(tmp_path) == []
