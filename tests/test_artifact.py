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


def _edit_manifest(out, edit):
    m = json.loads((out / "manifest.json").read_text())
    edit(m)
    (out / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("bad", ["/etc/passwd", "../../etc/passwd", "onnx/../../outside", "./onnx/decoder.onnx",
                                 "onnx//decoder.onnx", "onnx\\decoder.onnx", ""])
def test_a_manifest_path_out_of_the_artifact_is_refused(tmp_path, bad):
    out = _write(tmp_path / "art")
    _edit_manifest(out, lambda m: m["files"][0].update(path=bad))
    with pytest.raises(ArtifactError, match=r"files\[0\]\.path"):
        Artifact(out)


@pytest.mark.parametrize("field", [("tokenizer", "dir"), ("ple", "file")])
def test_tokenizer_dir_and_ple_file_must_be_inside_too(tmp_path, field):
    out = _write(tmp_path / "art")
    _edit_manifest(out, lambda m: m.setdefault(field[0], {}).update({field[1]: str(tmp_path)}))
    with pytest.raises(ArtifactError, match=rf"{field[0]}\.{field[1]}"):
        Artifact(out)


def test_symlinks_inside_the_artifact_are_refused(tmp_path):
    out = _write(tmp_path / "art")
    elsewhere = tmp_path / "elsewhere"
    (out / "onnx").rename(elsewhere)
    (out / "onnx").symlink_to(elsewhere, target_is_directory=True)  # a linked folder
    with pytest.raises(ArtifactError, match=r"art/onnx: a symlink \(files\[\d\]\.path\)"):
        Artifact(out)
    (out / "onnx").unlink()
    (out / "onnx").mkdir()
    (out / "onnx" / "decoder.onnx").symlink_to(elsewhere / "decoder.onnx")  # a linked file
    with pytest.raises(ArtifactError, match=r"decoder\.onnx: a symlink"):
        Artifact(out)
    (out / "onnx" / "decoder.onnx").unlink()
    (elsewhere / "decoder.onnx").rename(out / "onnx" / "decoder.onnx")
    art = Artifact(out)  # intact again
    (out / "tokenizer" / "chat_template.jinja").symlink_to(tmp_path / "template.jinja")  # unlisted, in the folder
    with pytest.raises(ArtifactError, match=r"chat_template\.jinja: a symlink \(tokenizer\.dir\)"):
        art.folder("tokenizer", "tokenizer.dir")


@pytest.mark.parametrize("manifest, message", [
    ([1, 2], r"expected a JSON object, found list"),
    ({"schema_version": SCHEMA_VERSION, "files": {"a": 1}}, r"files must be a list"),
    ({"schema_version": SCHEMA_VERSION, "files": [{"path": "a"}]}, r"files\[0\] is malformed"),
    ({"schema_version": SCHEMA_VERSION, "files": [{"path": 3, "size": 1, "sha256": "x"}]}, r"files\[0\] is malformed"),
    ({"schema_version": SCHEMA_VERSION, "files": ["onnx/decoder.onnx"]}, r"files\[0\] is malformed"),
])
def test_a_malformed_manifest_is_a_clear_error(tmp_path, manifest, message):
    out = _write(tmp_path / "art")
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=message):
        Artifact(out)


def test_files_are_used_only_after_their_sha256_and_that_is_remembered(embedded_int8_onnx_artifact, tmp_path,
                                                                      monkeypatch):
    """Opening a model hashes the files it will read (the backend's, ple.bin, the tokenizer: not the other
    backends'), once; a second open only stats them; a byte changed in ple.bin (same size, which used to give
    `<pad>` x 20 with exit 0) is refused before anything reads it, naming the file."""
    import shutil
    from pathlib import Path

    from edge_gemma import api
    from edge_gemma import artifact as artifact_module

    art = tmp_path / "art"
    shutil.copytree(embedded_int8_onnx_artifact, art)
    monkeypatch.setenv("EDGE_GEMMA_VERIFIED_CACHE", str(tmp_path / "verified.json"))
    hashed: list[str] = []
    real = artifact_module.sha256_file
    monkeypatch.setattr(artifact_module, "sha256_file",
                        lambda p, *a, **k: hashed.append(Path(p).relative_to(art.resolve()).as_posix()) or real(p, *a, **k))
    with api.open(art, backend="onnx", threads=1) as m:
        answer = "".join(m.generate("Hi", max_new_tokens=3))
    listed = set(Artifact(art).files)
    used = {p for p in listed if p.startswith(("onnx/", "tokenizer/")) or p == "ple.bin"}
    assert set(hashed) == used and len(hashed) == len(used)
    assert json.loads((tmp_path / "verified.json").read_text())  # remembered

    hashed.clear()
    with api.open(art, backend="onnx", threads=1) as m:
        assert "".join(m.generate("Hi", max_new_tokens=3)) == answer
    assert hashed == []  # a stat per file

    ple = art / "ple.bin"
    data = bytearray(ple.read_bytes())
    data[len(data) // 2] ^= 0x5A
    ple.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"ple\.bin: its sha256 differs from the one in manifest\.json"):
        api.open(art, backend="onnx", threads=1)
    assert hashed == ["ple.bin"]  # only the changed file was hashed again
