"""`edge_gemma.export.executorch`: the ExecuTorch backend (`exporter.py` writes the program; `swaps.py` adapts the one
decoder; `model.py` holds the weights as torchao tensors and the method modules; `lower.py` lowers to XNNPACK;
`reference.py` emulates XNNPACK's dynamic quantization for the tests)."""

from .exporter import ExecutorchExportError, export_backend, export_executorch

__all__ = ["ExecutorchExportError", "export_backend", "export_executorch"]
