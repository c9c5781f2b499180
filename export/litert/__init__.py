"""`edge_gemma.export.litert`: the LiteRT backend (`exporter.py` writes the `.tflite` models and the `.litertlm`;
`swaps.py` adapts the one decoder; `graphs.py` holds the signature wrappers; `quant.py` writes our integers into
the flatbuffers; `bundle.py` builds LiteRT-LM's bundle)."""

from .exporter import LitertExportError, export_backend

__all__ = ["LitertExportError", "export_backend"]
