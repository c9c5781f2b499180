"""Runtimes: the backend-agnostic engine and one module per backend. Never imports torch (installed as edge_gemma.runtimes)."""
