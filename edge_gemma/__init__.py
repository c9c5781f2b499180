"""edge-gemma: Gemma 4 E2B/E4B, quantized ahead of time, exported to ExecuTorch, LiteRT and ONNX.

Importing this package never imports torch: a Raspberry Pi runs the runtime with numpy and one backend wheel.
"""

__version__ = "0.1.0"

__all__ = ["open", "open_checkpoint"]


def __getattr__(name: str):
    # Lazy: `import edge_gemma` stays cheap and torch-free; `edge_gemma.open` loads the runtime on first use.
    if name in ("open", "open_checkpoint"):
        from edge_gemma import api

        return getattr(api, name)
    raise AttributeError(f"module 'edge_gemma' has no attribute {name!r}")
