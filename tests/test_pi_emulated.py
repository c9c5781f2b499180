"""The Raspberry Pi 5 install path, emulated: our wheel with its `onnx` extra and aarch64 wheels of its dependencies
in Debian bookworm's Python 3.11, run under qemu-aarch64 as a Cortex-A76 (scripts/pi_emulation.py builds it).

The emulated `edge-gemma run` must give the x86 run's greedy answer token for token (same text, same count), with
no attempt to import torch anywhere (a sitecustomize probe blocks and records every such import). First-time
set-up in CI: ~1-2 min (debootstrap + wheel downloads into .cache/pi5-rootfs); later sessions reuse the cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from artifact_builder import cli, cli_env

from paths import REPO  # noqa: E402
PROMPT = "What does json.dumps do?"
RUN_ARGS = ["--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "16", "--stats"]
BLOCKED = ("torch", "transformers", "torchvision", "torchaudio", "torchao", "executorch")

# Loaded as sitecustomize (first on PYTHONPATH): blocks and records any import of torch & co., and at exit writes
# what the process was (machine, Python, libc, numpy's CPU features) and which modules it loaded.
PROBE = textwrap.dedent(f"""
    import atexit, importlib.abc, json, os, platform, sys

    BLOCKED = {set(BLOCKED)!r}
    attempts = []

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(name)
                raise ModuleNotFoundError(f"{{name}} is blocked: the Pi runtime must not import it", name=name)
            return None

    sys.meta_path.insert(0, Block())

    def report():
        cpu = {{}}
        if "numpy" in sys.modules:
            from numpy._core._multiarray_umath import __cpu_features__
            cpu = sorted(k for k, v in __cpu_features__.items() if v)
        package = sys.modules.get("edge_gemma")
        with open(os.environ["EDGE_GEMMA_PROBE_OUT"], "w") as f:
            json.dump({{"attempts": attempts, "machine": platform.machine(), "python": list(sys.version_info[:2]),
                       "libc": list(platform.libc_ver()), "cpu": cpu,
                       "edge_gemma": getattr(package, "__file__", None),
                       "loaded": sorted({{m.split(".")[0] for m in sys.modules}})}}, f)

    atexit.register(report)
""")


def _load_pi_emulation():
    spec = importlib.util.spec_from_file_location("pi_emulation", REPO / "scripts" / "pi_emulation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


pi_emulation = _load_pi_emulation()


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("probe")
    (folder / "sitecustomize.py").write_text(PROBE)
    return folder


@pytest.fixture(scope="module")
def pi():
    """The prepared emulation: rootfs and dependency wheels cached across sessions, our wheel rebuilt now."""
    cache = Path(os.environ.get("EDGE_GEMMA_PI_CACHE", REPO / ".cache" / "pi5-rootfs"))
    return pi_emulation.prepare(cache, extras="onnx,listen")


@pytest.fixture(scope="module")
def int8_artifact(embedded_int8_onnx_artifact) -> Path:
    return embedded_int8_onnx_artifact


def _probed(cmd_result: subprocess.CompletedProcess, report: Path) -> dict:
    assert cmd_result.returncode == 0, cmd_result.stderr[-3000:]
    return json.loads(report.read_text())


def _new_tokens(stderr: str) -> int:
    found = re.search(r"\b(\d+) new\b", stderr)
    assert found, f"no token count in --stats output: {stderr[-500:]}"
    return int(found.group(1))


@pytest.mark.slow
def test_pi_run_matches_x86_and_imports_no_torch(pi, int8_artifact, probe_dir, tmp_path):
    x86_report = tmp_path / "x86.json"
    env = {**cli_env(), "PYTHONPATH": f"{probe_dir}{os.pathsep}{REPO}", "EDGE_GEMMA_PROBE_OUT": str(x86_report)}
    x86 = cli("run", str(int8_artifact), *RUN_ARGS, env=env)
    x86_probe = _probed(x86, x86_report)

    pi_report = tmp_path / "pi.json"
    pi_env_extra = {"EDGE_GEMMA_PROBE_OUT": str(pi_report)}
    emulated = subprocess.run(pi.command(["edge-gemma", "run", str(int8_artifact), *RUN_ARGS]),
                              env={**pi.env([probe_dir]), **pi_env_extra}, capture_output=True, text=True,
                              cwd=tmp_path, timeout=900)
    pi_probe = _probed(emulated, pi_report)

    # It really is the Pi's userland: aarch64, Python 3.11 on bookworm's glibc 2.36, a Cortex-A76 (NEON dotprod,
    # no SVE), running OUR installed wheel from site/ (not the checkout) with the onnx backend.
    assert x86_probe["machine"] == "x86_64"
    assert pi_probe["machine"] == "aarch64"
    assert pi_probe["python"] == [3, 11]
    assert pi_probe["libc"] == ["glibc", "2.36"]
    assert "ASIMDDP" in pi_probe["cpu"] and "SVE" not in pi_probe["cpu"], pi_probe["cpu"]
    assert Path(pi_probe["edge_gemma"]).is_relative_to(pi.site), pi_probe["edge_gemma"]
    assert "onnxruntime" in pi_probe["loaded"]
    assert any(line.startswith("[onnx]") for line in emulated.stderr.splitlines()), emulated.stderr[-1000:]

    # No hidden torch import in the CLI, the package __init__ or the runtime, on either machine.
    for probe in (x86_probe, pi_probe):
        assert probe["attempts"] == [], probe["attempts"]
        assert not set(BLOCKED) & set(probe["loaded"])

    # Same greedy answer: the aarch64 kernels of onnxruntime agree with x86 token for token.
    assert x86.stdout.strip(), "the x86 run printed no answer"
    assert emulated.stdout == x86.stdout
    assert _new_tokens(emulated.stderr) == _new_tokens(x86.stderr) > 0


@pytest.mark.slow
def test_pi_site_is_our_wheel_without_torch(pi):
    """site/ is what `pip install 'edge-gemma[onnx,listen]'` puts on a Pi: our wheel, onnxruntime, the capture and
    VAD packages, no torch at all."""
    dists = {re.sub(r"-[^-]+\.dist-info$", "", p.name).lower().replace("_", "-")
             for p in pi.site.glob("*.dist-info")}
    assert {"edge-gemma", "onnxruntime", "numpy", "tokenizers", "sounddevice", "webrtcvad-wheels"} <= dists, dists
    assert not {"torch", "transformers", "executorch", "torchao"} & dists, sorted(dists)
    assert not any((pi.site / name).exists() for name in BLOCKED)
    # Every compiled extension in site/ is an aarch64 build (an x86 one would mean a wrong --platform).
    machines = {so.name: so.read_bytes()[18:20] for so in pi.site.rglob("*.so")}
    assert machines and set(machines.values()) == {b"\xb7\x00"}, {n: m for n, m in machines.items() if m != b"\xb7\x00"}
    # The console script is pip's own: `from edge_gemma.cli import main` (pyproject's [project.scripts]).
    script = pi.console_script.read_text()
    assert "from edge_gemma.cli import main" in script and "sys.exit(main())" in script


VAD_SCRIPT = """
import json, sys
import sounddevice, webrtcvad
pcm = open(sys.argv[1], "rb").read()
frame = 480 * 2  # 30 ms of 16 kHz int16
vad = webrtcvad.Vad(2)
flags = [vad.is_speech(pcm[i:i + frame], 16000) for i in range(0, len(pcm) - frame + 1, frame)]
print(json.dumps({"portaudio": sounddevice.get_portaudio_version()[1], "flags": flags}))
"""


@pytest.mark.slow
def test_pi_listen_dependencies_work_on_aarch64(pi, tmp_path):
    """The `listen` extra on the Pi: sounddevice finds bookworm's aarch64 libportaudio2, and webrtcvad's aarch64
    build takes the same speech/silence decision as x86 on every 30 ms frame of an espeak-ng utterance."""
    wav, raw = tmp_path / "hello.wav", tmp_path / "hello16k.raw"
    subprocess.run(["espeak-ng", "-w", str(wav), "turn on the kitchen lights"], check=True, capture_output=True)
    silence = ["pad", "0.5", "0.5"]  # speech between two half-seconds of silence
    subprocess.run(["sox", str(wav), "-r", "16000", "-c", "1", "-b", "16", "-e", "signed-integer", "-t", "raw",
                    str(raw), *silence], check=True, capture_output=True)
    x86 = subprocess.run([sys.executable, "-c", VAD_SCRIPT, str(raw)], capture_output=True, text=True, timeout=120)
    assert x86.returncode == 0, x86.stderr[-2000:]
    arm = pi.run(["python", "-c", VAD_SCRIPT, str(raw)], capture_output=True, text=True, timeout=300)
    assert arm.returncode == 0, arm.stderr[-2000:]
    x86_out, arm_out = json.loads(x86.stdout), json.loads(arm.stdout)
    assert "PortAudio V19" in arm_out["portaudio"]
    flags = arm_out["flags"]
    assert flags == x86_out["flags"]
    assert any(flags) and not any(flags[:10]) and not any(flags[-10:]), flags  # speech found, silence not


@pytest.mark.slow
def test_pi_listen_modules_are_installed_and_import_no_torch(pi, probe_dir, tmp_path):
    """`edge-gemma listen` on the Pi: every module of edge_gemma/listen/ in the checkout is in the installed wheel
    (pyproject's package list) and imports on aarch64 with sounddevice and webrtcvad, trying no torch import."""
    modules = ["edge_gemma.commands.listen", "edge_gemma.listen"] + [
        f"edge_gemma.listen.{p.stem}" for p in sorted((REPO / "edge_gemma" / "listen").glob("*.py"))
        if p.stem != "__init__"]
    report = tmp_path / "listen.json"
    env = {**pi.env([probe_dir]), "EDGE_GEMMA_PROBE_OUT": str(report)}
    code = "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]"
    result = subprocess.run(pi.command(["python", "-c", code, *modules]), env=env, capture_output=True, text=True,
                            cwd=tmp_path, timeout=600)
    probe = _probed(result, report)
    assert probe["machine"] == "aarch64"
    assert Path(probe["edge_gemma"]).is_relative_to(pi.site), probe["edge_gemma"]
    assert probe["attempts"] == [] and not set(BLOCKED) & set(probe["loaded"]), probe["attempts"]


def test_cli_and_runtime_modules_import_no_torch():
    """x86, no artifact needed: the modules `edge-gemma run` loads never try to import torch (tried-and-caught
    imports count too). The processors have their own test (test_processors_no_torch.py)."""
    code = textwrap.dedent(f"""
        import importlib.abc, sys
        attempts = []
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {set(BLOCKED)!r}:
                    attempts.append(name)
                    raise ModuleNotFoundError(name, name=name)
        sys.meta_path.insert(0, Block())
        import edge_gemma, edge_gemma.cli, edge_gemma.commands.run, edge_gemma.commands._common, edge_gemma.api
        import edge_gemma.runtimes.onnx, edge_gemma.runtimes.engine, edge_gemma.runtimes.registry
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {set(BLOCKED)!r})
        assert not attempts and not loaded, (attempts, loaded)
        print("ok")
    """)
    env = {**cli_env(), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


def test_emulation_runs_only_edge_gemma_or_python(tmp_path):
    emu = pi_emulation.PiEmulation(cache=tmp_path)
    with pytest.raises(ValueError, match="not 'bash'"):
        emu.command(["bash", "-c", "true"])
    cmd = emu.command(["edge-gemma", "run", "x"])
    assert cmd[1:3] == ["-cpu", "cortex-a76"] and cmd[-4:] == ["-P", str(emu.console_script), "run", "x"]
    platforms = pi_emulation.pip_platform_args()
    assert "manylinux_2_36_aarch64" in platforms and "manylinux2014_aarch64" in platforms
    assert "manylinux_2_37_aarch64" not in platforms  # bookworm's glibc is 2.36: newer wheels would not load


def test_pi5_estimate_counts_e2b_work_per_token():
    """benchmarks/pi5_estimate.py's per-token model of E2B, against figures measured independently: ~2.28e9 weights
    read per decode step (peers.md, "The physical limit") and decoder.onnx.data = 1.55 GiB (benchmarks/README.md)."""
    spec = importlib.util.spec_from_file_location("pi5_estimate", REPO / "benchmarks" / "pi5_estimate.py")
    est = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = est
    spec.loader.exec_module(est)
    config = json.loads(est.E2B_CONFIG.read_text())
    costs = est.text_costs(config)
    assert abs(costs.linear_macs + costs.head_macs - 2.28e9) / 2.28e9 < 0.01
    assert abs(costs.int4_weight_bytes - 1.55 * 1024**3) / (1.55 * 1024**3) < 0.05
    # K/V of one cache slot, float32: 28 sliding layers x 2 x 256 + 7 full layers x 2 x 512 values (KV sharing reads
    # the caches of layers 13 and 14 again in layers 15-34).
    assert costs.kv_bytes_per_slot == (28 * 2 * 256 + 7 * 2 * 512) * 4
    central = next(s for s in est.SCENARIOS if s.name == "central")
    row = est.estimate(central, x86=est.X86Measured(), costs=costs, audio_macs=0.0, prompt_tokens=140, context=4096)
    assert row["decode_tok_s"] == min(row["decode_tok_s_compute"], row["decode_tok_s_bandwidth"])
    assert 0 < row["ttft_s"] < 60
