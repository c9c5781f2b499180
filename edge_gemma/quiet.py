"""Other libraries stay quiet unless `-v`: their Python warnings and log records, and the native logs their C++
parts write straight to file descriptor 2 (absl/glog lines of the TFLite converter, cpuinfo, XNNPACK, ORT).

`silence_libraries()` is called once by the CLI, before anything heavy is imported:

* other libraries' Python warnings are ignored and their loggers raised to ERROR (ours, `edge_gemma.*`, untouched);
* their native log levels are set through the environment variables they read (unless the user set them);
* file descriptor 2 is pointed at a temporary file for the rest of the process, while Python's `sys.stderr` (our
  progress bars, messages and errors) keeps writing to the real stderr through a duplicate. Child processes inherit
  the redirected descriptor.

The returned `Captured.replay()` writes what the native libraries said to the real stderr; the CLI calls it when a
command fails, so nothing that explains an error is lost.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings

__all__ = ["LIBRARY_LOGGERS", "Captured", "silence_libraries"]

# Python loggers of the libraries the exporters and runtimes import.
LIBRARY_LOGGERS = ("torch", "torchao", "executorch", "onnxscript", "onnx_ir", "onnxruntime", "absl", "jax",
                   "tensorflow", "litert_torch", "ai_edge_quantizer", "ai_edge_litert", "litert_lm", "transformers",
                   "huggingface_hub")
# Log levels read from the environment when those libraries load (torch configures its own loggers at import, so
# setting their level from here would be undone: TORCH_LOGS="-all" raises them all to ERROR).
_NATIVE_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "GLOG_minloglevel": "2", "TF_ENABLE_ONEDNN_OPTS": "0", "TORCH_LOGS": "-all"}


class Captured:
    """Where fd 2 went (see the module docstring)."""

    def __init__(self) -> None:
        self.sink = tempfile.TemporaryFile()
        sys.stderr.flush()
        self.real_stderr = os.fdopen(os.dup(2), "w", buffering=1, errors="backslashreplace")
        os.dup2(self.sink.fileno(), 2)
        sys.stderr = self.real_stderr

    def replay(self) -> None:
        """Write what was captured to the real stderr (once)."""
        if self.sink.closed:
            return
        self.sink.flush()
        self.sink.seek(0)
        text = self.sink.read().decode(errors="replace")
        self.sink.close()
        if text.strip():
            self.real_stderr.write(text)
            self.real_stderr.flush()


def silence_libraries() -> Captured:
    """Quiet other libraries for the rest of the process (see the module docstring)."""
    for key, value in _NATIVE_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"edge_gemma(\..*)?$")
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    return Captured()
