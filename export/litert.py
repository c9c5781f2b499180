"""`edge_gemma.export.litert`: the LiteRT backend's exporter (see `export/litert_export.py` for what it writes)."""

from .litert_export import LitertExportError, export_backend

__all__ = ["LitertExportError", "export_backend"]
