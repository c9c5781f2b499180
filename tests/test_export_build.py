"""`edge-gemma export` end to end on the embedded model (ONNX), the artifact it writes, and what reads it back:
atomicity under SIGKILL, --force, the manifest, fidelity figures, inspect --verify, run/chat/bench on the artifact,
and the CHECKPOINT / VARIANT resolution of `make export` (download path tested against a local HTTP server)."""

from __future__ import annotations

import hashlib
import importlib.util
import http.server
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from artifact_builder import REPO, build_once, cli, cli_env
from edge_gemma.paths import DEFAULT_CHECKPOINT


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return build_once(tmp_path_factory)


@pytest.fixture(scope="session")
def artifact(built) -> Path:
    assert built["done"].returncode == 0, built["done"].stderr[-3000:]
    return built["out"]


# ------------------------------------------------------------------------------------------------ atomicity
def test_existing_out_is_refused_without_force(built):
    r = built["refused"]
    assert r.returncode == 2
    assert "already exists; pass --force" in r.stderr and str(built["out"]) in r.stderr


def test_a_killed_export_leaves_out_untouched_and_the_next_run_succeeds(built, artifact):
    killed = built["after_kill"]
    assert killed["first_graph"] is not None, "the export never wrote a graph file"
    assert killed["out_files"] == ["manifest.json", "old.txt"]  # OUT still the previous artifact, nothing half-written
    assert len(killed["temporaries"]) == 1  # the killed run's temporary directory was left behind...
    assert built["temporaries_after"] == []  # ...and the next export removed it
    assert not (artifact / "old.txt").exists()  # --force replaced OUT
    assert (artifact / "manifest.json").is_file()


def test_force_never_replaces_the_source_or_a_folder_that_is_not_ours(tmp_path):
    """`export SRC --out SRC --force` used to delete the checkpoint; `--force` on a folder holding other files
    deleted them. Both are refused before anything is written, and the folders are left as they were."""
    src = tmp_path / "ckpt"
    shutil.copytree(REPO / "edge_gemma" / "data" / "default", src)
    before = sorted(p.name for p in src.iterdir())
    for out in (src, src / "artifact", tmp_path):
        r = cli("export", str(src), "--out", str(out), "--force", "--backends", "onnx", "--no-check")
        assert r.returncode == 2 and "delete the checkpoint" in r.stderr, r.stderr[-2000:]
    assert sorted(p.name for p in src.iterdir()) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("not an artifact")
    r = cli("export", "default", "--out", str(mine), "--force", "--backends", "onnx", "--no-check")
    assert r.returncode == 2 and "replaces only an artifact" in r.stderr, r.stderr[-2000:]
    assert (mine / "thesis.tex").read_text() == "not an artifact"


# ------------------------------------------------------------------------------------------------ manifest
def test_manifest_describes_the_artifact(artifact, built):
    from edge_gemma.artifact import Artifact
    from edge_gemma.config import ModelConfig, load_config

    art = Artifact(artifact)
    m = art.manifest
    cfg = load_config(DEFAULT_CHECKPOINT)
    assert ModelConfig.from_dict(m["model"]["config"]) == cfg
    assert m["name"] == "default" and m["context"] == 128
    assert m["quantization"]["recipe"]["name"] == "int4"
    schemes = m["quantization"]["tensors"]
    assert schemes["model.language_model.layers.0.mlp.down_proj.weight"]["scheme"]["kind"].startswith("int4")
    # tokenizer files are byte copies of the checkpoint's
    for rel in m["tokenizer"]["files"]:
        assert (artifact / rel).read_bytes() == (DEFAULT_CHECKPOINT / Path(rel).name).read_bytes()
    assert m["tokenizer"]["chat_template"] == "tokenizer/chat_template.jinja"
    # caches: exactly the layers before the KV-shared ones, at the export context
    layers = m["caches"]["layers"]
    assert [c["layer"] for c in layers] == list(cfg.text.cache_layers)
    assert all(c["k_shape"][2] == 128 for c in layers)
    assert m["caches"]["shared"] == {str(i): cfg.text.kv_producer(i)
                                     for i in range(cfg.text.first_shared_layer, cfg.text.num_hidden_layers)}
    assert m["prefill"]["max_chunk"] == 32
    # the PLE table holds the quantized checkpoint's bytes: its rows decode to the dequantized table
    from edge_gemma.ple import PleTable
    from edge_gemma.quantize.stream import quantize_checkpoint
    from edge_gemma.quantize.load import QuantizedCheckpoint

    q = artifact.parent / "q-int4"
    if not q.exists():
        quantize_checkpoint(DEFAULT_CHECKPOINT, "int4", q, progress=False)
    with QuantizedCheckpoint(q) as ck:
        table = ck.dequantized("model.language_model.embed_tokens_per_layer.weight")
    ple = PleTable(art.path("ple.bin"), m["ple"])
    ids = np.array([0, 5, 77, table.shape[0] - 1])
    np.testing.assert_array_equal(ple.gather(ids).reshape(4, -1), table[ids])
    ple.close()
    # every file is checksummed
    listed = {f["path"] for f in m["files"]}
    on_disk = {p.relative_to(artifact).as_posix() for p in artifact.rglob("*") if p.is_file()} - {"manifest.json"}
    assert listed == on_disk


def test_fidelity_figures_are_in_the_manifest_and_the_report(artifact, built):
    m = json.loads((artifact / "manifest.json").read_text())
    fid = m["fidelity"]
    assert fid["tokens"] == 24 and fid["reference"] == "float checkpoint"
    for name in ("onnx", "eager-dequantized"):
        f = fid["backends"][name]
        assert 0.8 <= f["top1_agreement"] <= 1.0  # int4 of the trained tiny model keeps most predictions
        assert 0.0 <= f["kl_mean"] <= f["kl_max"] < 0.5
        assert f["ppl_reference"] > 1
        assert f"{f['top1_agreement'] * 100:.1f}%" in built["done"].stdout
    assert "fidelity on held-out text" in built["done"].stdout


def test_inspect_shows_the_manifest_and_verify_catches_a_tampered_file(artifact, tmp_path):
    ok = cli("inspect", str(artifact), "--verify")
    assert ok.returncode == 0, ok.stderr
    for word in ("backend    onnx", "context    128", "int4", "ple.bin", "fidelity", "verify: OK"):
        assert word in ok.stdout
    copy = tmp_path / "tampered"
    shutil.copytree(artifact, copy)
    target = copy / "onnx" / "decoder.onnx.data"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    bad = cli("inspect", str(copy), "--verify")
    assert bad.returncode == 1
    assert "onnx/decoder.onnx.data" in bad.stderr and "checksum mismatch" in bad.stderr


# ------------------------------------------------------------------------------------------------ --text-only
@pytest.fixture(scope="session")
def text_only(tmp_path_factory):
    out = tmp_path_factory.mktemp("text_only") / "default-text"
    backends = "onnx,litert" if importlib.util.find_spec("ai_edge_litert") else "onnx"
    r = cli("export", "default", "--out", str(out), "--quant", "int4", "--backends", backends, "--context", "128",
            "--prefill-chunk", "16", "--fidelity-tokens", "12", "--no-progress", "--text-only")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_text_only_artifact_has_no_encoders_and_says_so(text_only):
    out, r = text_only
    m = json.loads((out / "manifest.json").read_text())
    assert m["text_only"] is True
    files = m["backends"]["onnx"]["files"]
    assert files["vision"] is None and files["audio"] is None and files["decoder"] and files["embedder"]
    # the text graphs, and the embedded model's drafter (a text graph too)
    assert sorted(p.name for p in (out / "onnx").iterdir()) == ["decoder.onnx", "decoder.onnx.data", "drafter.onnx",
                                                                 "drafter.onnx.data", "embedder.onnx",
                                                                 "embedder.onnx.data"]
    # the fidelity check still runs (bounded reference: text-only, bf16 weights upcast per call) and is reported
    fid = m["fidelity"]
    assert fid["tokens"] == 12 and set(fid["backends"]) >= {"onnx", "eager-dequantized"}
    assert 0.8 <= fid["backends"]["onnx"]["top1_agreement"] <= 1.0
    assert "fidelity on held-out text" in r.stdout


def test_export_and_run_leave_stderr_to_us(text_only):
    """Other libraries stay quiet without -v (torch, torchao, the TFLite converter's absl lines, ai-edge-quantizer's
    bars, ExecuTorch's runtime logs): with --no-progress the export's stderr is empty, and so is `run`'s on every
    backend of the artifact; with -v their output is let through."""
    out, r = text_only
    assert r.stderr == "", r.stderr[-3000:]
    backends = json.loads((out / "manifest.json").read_text())["backends"]
    runs = [b for b in ("onnx", "litert") if b in backends] + (["litert-lm"] if "litert" in backends else [])
    for backend in runs:
        run = cli("run", str(out), "--prompt", "Hello", "--backend", backend, "--max-new-tokens", "4")
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stderr == "", (backend, run.stderr[-3000:])
        assert run.stdout.strip()
    # running wrote nothing into the artifact (LiteRT-LM's XNNPACK cache goes to the user's cache folder)
    listed = {f["path"] for f in json.loads((out / "manifest.json").read_text())["files"]} | {"manifest.json"}
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == listed


def test_text_only_litert_has_no_encoders_and_says_so(text_only):
    """--text-only is honoured by the LiteRT exporter too: no vision/audio models, no encoder sections in the bundle."""
    pytest.importorskip("ai_edge_litert")
    out, _ = text_only
    m = json.loads((out / "manifest.json").read_text())
    entry = m["backends"]["litert"]
    assert entry["files"]["vision"] is None and entry["files"]["audio"] is None
    assert entry["vision_patches"] is None and entry["audio_frames"] is None
    assert not any(s.startswith(("vision", "audio")) for s in entry["litertlm"]["sections"])
    assert sorted(p.name for p in (out / "litert").iterdir()) == [
        "decoder.tflite", "embedder.tflite", "model.litertlm"]  # the per-layer embedder only inside the bundle
    assert "litert" in m["fidelity"]["backends"]


def test_text_only_artifact_refuses_images_and_audio(text_only):
    from PIL import Image

    import edge_gemma
    from edge_gemma.runtimes.base import BackendError

    out, _ = text_only
    img = Image.fromarray(np.zeros((32, 32, 3), np.uint8))
    wave = (0.3 * np.sin(np.arange(16000) * 0.07)).astype(np.float32)
    with edge_gemma.open(out, backend="onnx", max_soft_tokens=70) as model:
        assert not model.backend.capabilities.vision and not model.backend.capabilities.audio
        assert "".join(model.generate("Read a file.", max_new_tokens=2)) is not None  # text works
        for item, encoder in (({"type": "image", "image": img}, "vision"),
                              ({"type": "audio", "audio": wave, "sample_rate": 16000}, "audio")):
            with pytest.raises(BackendError, match=f"has no {encoder} encoder"):
                "".join(model.generate([{"role": "user", "content": [item, {"type": "text", "text": "What?"}]}],
                                       max_new_tokens=2))


# ------------------------------------------------------------------------------------------------ runtime
def test_run_prints_only_the_answer_on_stdout(artifact):
    import edge_gemma

    with edge_gemma.open(artifact, backend="onnx") as model:
        expected = "".join(model.generate("Return the absolute value.", max_new_tokens=8))
    r = cli("run", str(artifact), "--prompt", "Return the absolute value.", "--max-new-tokens", "8", "--stats")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
    assert "ttft" in r.stderr and "decode" in r.stderr and "[onnx]" in r.stderr


def test_onnx_engine_follows_the_eager_engine_on_text_image_and_audio(artifact):
    """Through the ONNX backend the engine gives, on each modality, the first-token distribution of the eager model
    on the same (dequantized) weights, up to MatMulNBits' int8 activations."""
    from PIL import Image

    import edge_gemma
    from edge_gemma.runtimes.engine import GenerationOptions
    from edge_gemma.quantize.stream import quantize_checkpoint

    q = artifact.parent / "q-int4"
    if not q.exists():
        quantize_checkpoint(DEFAULT_CHECKPOINT, "int4", q, progress=False)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    wave = (0.3 * np.sin(np.arange(16000) * 0.07)).astype(np.float32)
    prompts = [
        "Read a file.",
        [{"type": "image", "image": img}, {"type": "text", "text": "What is it?"}],
        [{"type": "audio", "audio": wave, "sample_rate": 16000}, {"type": "text", "text": "Transcribe."}],
    ]

    def first_logits(model, content):
        seen = []
        inner = model.engine.backend.prefill
        model.engine.backend.prefill = lambda *a: seen.append(inner(*a)) or seen[-1]
        model.engine.reset()
        done = model.engine.generate([{"role": "user", "content": content}],
                                     options=GenerationOptions(max_new_tokens=1)).result()
        model.engine.backend.prefill = inner
        return seen[-1], done

    with edge_gemma.open(artifact, max_soft_tokens=70) as onnx_model, \
            edge_gemma.open_checkpoint(q, context=128, max_soft_tokens=70, tokenizer_dir=DEFAULT_CHECKPOINT) as ref:
        assert onnx_model.backend.name == "onnx"
        for content in prompts:
            a, done = first_logits(onnx_model, content)
            b, _ = first_logits(ref, content)
            la = a - np.log(np.exp(a - a.max()).sum()) - a.max()
            lb = b - np.log(np.exp(b - b.max()).sum()) - b.max()
            kl = float((np.exp(lb) * (lb - la)).sum())
            assert int(a.argmax()) == int(b.argmax())
            assert kl < 0.05, kl
            assert done.stats.prompt_tokens > 5


def test_chat_keeps_the_cache_across_turns(artifact):
    r = cli("chat", str(artifact), "--max-new-tokens", "4", "--stats",
            input="Read a file.\nClose it.\n/reset\nOpen it.\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 3
    stats = [line for line in r.stderr.splitlines() if line.startswith("prompt ")]
    assert len(stats) == 3
    assert "(0 reused" in stats[0] and "(0 reused" not in stats[1] and "(0 reused" in stats[2]
    assert "(new conversation)" in r.stderr


def test_bench_measures_the_artifact(artifact):
    r = cli("bench", str(artifact), "--prompt-tokens", "20", "--new-tokens", "5", "--ignore-eos", "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)["measured"]
    assert m["prompt_tokens"] == 20 and m["new_tokens"] == 5 and m["backend"] == "onnx"
    assert m["decode_tok_s"] > 0 and m["prefill_tok_s"] > 0 and m["ttft_s"] > 0 and m["peak_rss_mb"] > 0
    # The engine reads PLE rows with pread: the process maps no page of ple.bin (/proc/self/smaps), and the rows it
    # read are in the page cache (mincore), some of the file but never more than the file.
    ple = m["ple"]
    assert ple["file_bytes"] == (artifact / "ple.bin").stat().st_size
    assert ple["resident_bytes"] == 0
    assert 0 < ple["page_cache_bytes"] <= ple["file_bytes"]


def test_an_unavailable_backend_is_an_error_listing_the_available_ones(artifact):
    r = cli("run", str(artifact), "--prompt", "hi", "--backend", "executorch")
    assert r.returncode == 2
    assert "backend 'executorch' cannot run" in r.stderr and "available: onnx" in r.stderr


# ------------------------------------------------------------------------------------------------ export args
def test_unknown_and_unimplemented_backends_are_named(tmp_path, monkeypatch):
    r = cli("export", "default", "--backends", "onnx,tensorrt", "--out", str(tmp_path / "x"))
    assert r.returncode == 2
    assert "unknown backend 'tensorrt'; known backends: onnx, executorch, litert" in r.stderr
    assert not (tmp_path / "x").exists()
    from edge_gemma.export import build

    monkeypatch.setattr(build, "implemented_backends", lambda: ["onnx"])
    with pytest.raises(build.ExportError, match="the litert exporter is not implemented yet; implemented: onnx"):
        build._check_backends(["onnx", "litert"])


def test_a_quantized_checkpoint_is_used_as_it_is(tmp_path):
    from edge_gemma.export.build import ExportError, _prepare_source
    from edge_gemma.quantize.stream import quantize_checkpoint

    q = tmp_path / "q"
    quantize_checkpoint(DEFAULT_CHECKPOINT, "int8", q, progress=False)
    weights, quantized, manifest = _prepare_source(q, None, tmp_path, progress=False)
    assert weights == q and quantized and manifest["recipe"]["name"] == "int8"
    assert not (tmp_path / "_quantized").exists()  # nothing was quantized again
    with pytest.raises(ExportError, match=r"already quantized with recipe 'int8' \(field recipe.name\)"):
        _prepare_source(q, "int4", tmp_path, progress=False)


# ------------------------------------------------------------------------------------------------ make export
def test_source_resolution_names_and_disagreements(tmp_path):
    from edge_gemma.export.source import SourceError, default_out, resolve_source

    s = resolve_source(None, None)
    assert s.path == DEFAULT_CHECKPOINT and default_out(s, "int4") == Path("artifacts/default-int4")
    assert resolve_source("", "default").name == "default"
    ck = tmp_path / "my-model"
    shutil.copytree(DEFAULT_CHECKPOINT, ck)
    assert default_out(resolve_source(None, ck), "int8") == Path("artifacts/my-model-int8")
    with pytest.raises(SourceError, match=r"text\.global_head_dim is 128 in the checkpoint, 512 for e2b"):
        resolve_source("e2b", ck)
    with pytest.raises(SourceError, match="VARIANT='e9b' is not known"):
        resolve_source("e9b", None)


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """Serves one fake repo (the real E2B config.json) the way huggingface_hub's snapshot_download reads it, or
    answers every request with HTTP 500 when `broken`."""

    broken = False
    files = {"config.json": (REPO / "edge_gemma/data/configs/gemma-4-E2B-it.config.json").read_bytes()}
    sha = "0123456789abcdef0123456789abcdef01234567"

    def log_message(self, *args):
        pass

    def _send(self, body: bytes, headers=None, head=False):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _handle(self, head=False):
        if self.broken:
            self.send_response(500)
            self.end_headers()
            return
        path = self.path.split("?")[0]
        if path.startswith("/api/models/") and "/tree/" in path:
            return self._send(json.dumps([{"type": "file", "path": f, "size": len(d),
                                           "oid": hashlib.sha1(d).hexdigest()} for f, d in self.files.items()]).encode(),
                              {"Content-Type": "application/json"}, head)
        if path.startswith("/api/models/"):
            return self._send(json.dumps({"id": "google/gemma-4-E2B-it", "sha": self.sha,
                                          "siblings": [{"rfilename": f} for f in self.files]}).encode(),
                              {"Content-Type": "application/json"}, head)
        for name, data in self.files.items():
            if path.endswith(f"/resolve/{self.sha}/{name}"):
                return self._send(data, {"X-Repo-Commit": self.sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'},
                                  head)
        self.send_response(404)
        self.end_headers()

    def do_GET(self):
        self._handle()

    def do_HEAD(self):
        self._handle(head=True)


@pytest.fixture()
def hub(tmp_path):
    servers = []

    def start(broken: bool):
        handler = type("Hub", (_FakeHub,), {"broken": broken})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return {**cli_env(), "HF_ENDPOINT": f"http://127.0.0.1:{srv.server_port}", "HF_HOME": str(tmp_path / "hf"),
                "HF_HUB_DISABLE_TELEMETRY": "1"}

    yield start
    for srv in servers:
        srv.shutdown()


def test_variant_without_checkpoint_downloads_the_repo(hub, tmp_path):
    env = hub(broken=False)
    code = ("from edge_gemma.export.source import resolve_source; from edge_gemma.config import load_config, PRESETS;"
            "s = resolve_source('e2b', None); print(s.name, s.downloaded, load_config(s.path) == PRESETS['e2b'])")
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["e2b", "True", "True"]


def test_variant_download_failure_says_how_to_pass_a_checkpoint(hub, tmp_path):
    env = hub(broken=True)
    r = cli("export", "--variant", "e4b", "--out", str(tmp_path / "x"), env=env, timeout=300)
    assert r.returncode == 2
    assert "could not download google/gemma-4-E4B-it" in r.stderr
    assert "make export CHECKPOINT=DIR" in r.stderr
    assert not (tmp_path / "x").exists()
