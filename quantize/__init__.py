"""Quantization toolkit: recipes, numpy reference packers, algorithms, reports (installed as edge_gemma.quantize)."""
