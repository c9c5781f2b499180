"""Builds the test artifact ONCE per test session, through the real `edge-gemma export` command, and on the way
checks the atomicity and `--force` rules (an export costs about a minute on 2 shared cores, so the kill test and
the final export share it):

1. OUT exists (a previous artifact: a manifest.json and a marker file): export without --force is refused, the
   marker is untouched.
2. export --force is SIGKILLed right after its first graph file appears in the temporary directory: OUT still holds
   the old content, the temporary directory is left behind (the process had no chance to clean up).
3. export --force again: succeeds, replaces OUT, and removes the killed run's temporary directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from paths import REPO  # noqa: E402
EXPORT_ARGS = ["--quant", "int4", "--backends", "onnx", "--context", "128", "--prefill-chunk", "32",
               "--fidelity-tokens", "24", "--no-progress"]
_CACHE: dict[str, object] = {}


def cli_env() -> dict[str, str]:
    # One torch thread: on a loaded 2-core machine torch's thread pool makes tiny matmuls 20x slower.
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def cli(*args: str, input: str | None = None, timeout: float = 600, env: dict | None = None):
    return subprocess.run([sys.executable, "-m", "edge_gemma.cli", *args], capture_output=True, text=True,
                          input=input, timeout=timeout, cwd=REPO, env=env or cli_env())


def build_once(tmp_path_factory) -> dict[str, object]:
    if _CACHE:
        return _CACHE
    root = tmp_path_factory.mktemp("export")
    out = root / "default-int4"
    out.mkdir()
    (out / "manifest.json").write_text("{}")  # a previous artifact (ours: --force may replace it)
    (out / "old.txt").write_text("the previous artifact")

    refused = cli("export", "default", "--out", str(out), *EXPORT_ARGS)

    proc = subprocess.Popen([sys.executable, "-m", "edge_gemma.cli", "export", "default", "--out", str(out),
                             "--force", *EXPORT_ARGS], cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first_graph = None
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        found = sorted(root.glob(f".{out.name}.tmp-{proc.pid}-*/onnx/*.onnx"))
        if found:
            first_graph = found[0]
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    after_kill = {
        "first_graph": first_graph,
        "out_files": sorted(p.name for p in out.iterdir()),
        "temporaries": sorted(p.name for p in root.glob(f".{out.name}.tmp-*")),
    }

    done = cli("export", "default", "--out", str(out), "--force", *EXPORT_ARGS)
    _CACHE.update(
        out=out, root=root, refused=refused, after_kill=after_kill, done=done,
        temporaries_after=sorted(p.name for p in root.glob(f".{out.name}.*")),
    )
    return _CACHE
