"""Exporters: one module per backend (installed as edge_gemma.export)."""
