"""`edge_gemma.export.onnx`: the ONNX backend (`exporter.py` writes the graphs; `swaps.py` adapts the one decoder;
`graphs.py` wraps it with graph I/O; `ops.py` holds the MatMulNBits / rms_norm custom ops)."""

from .exporter import (
    OPSET,
    OnnxExportError,
    OnnxLinears,
    audio_frame_layout,
    export_backend,
    export_onnx,
    load_onnx_model,
    write_audio_graph,
    write_embedder,
)

__all__ = ["OPSET", "OnnxExportError", "OnnxLinears", "audio_frame_layout", "export_backend", "export_onnx",
           "load_onnx_model", "write_audio_graph", "write_embedder"]
