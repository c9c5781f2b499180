"""edge-gemma: Gemma 4 E2B/E4B, quantized ahead of time, exported to ExecuTorch, LiteRT and ONNX.

Importing this package never imports torch: a Raspberry Pi runs the runtime with numpy and one backend wheel.
"""

__version__ = "0.1.0"
