"""`edge-gemma export [CHECKPOINT] [--variant e2b|e4b] --quant Q [--backends onnx,litert] --out DIR [--text-only]`.

CHECKPOINT is a Hugging Face checkpoint directory, a quantized checkpoint from `edge-gemma quantize` (used as it is:
quantization happens once), or `default` (the embedded model). `--variant` without CHECKPOINT downloads the
variant's Hugging Face repo; with CHECKPOINT it must agree with the checkpoint's config.json; with neither, the
embedded model is exported (export/source.py). OUT defaults to `artifacts/<name>-<quant>`. An existing OUT is
replaced only with `--force`; an interrupted export leaves nothing at OUT. `--text-only` leaves out the vision and
audio encoders (the manifest says `"text_only": true`; the runtime refuses images and audio on such an artifact).

`make export` calls exactly this command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?", default=None,
                        help="checkpoint directory, quantized checkpoint, or 'default' (the embedded model)")
    parser.add_argument("--variant", choices=["e2b", "e4b"], default=None,
                        help="download google/gemma-4-E2B-it or -E4B-it when no CHECKPOINT is given; with one, "
                             "check that it is this variant")
    parser.add_argument("--quant", default=None,
                        help="quantization recipe: fp32, int8, int4 (default int4; a quantized CHECKPOINT keeps its "
                             "own recipe)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated: onnx, executorch, litert (default: every backend whose exporter is "
                             "implemented in this installation)")
    parser.add_argument("--out", default=None, help="artifact directory (default artifacts/<name>-<quant>)")
    parser.add_argument("--context", type=int, default=4096, help="context length the caches hold (default 4096)")
    parser.add_argument("--prefill-chunk", type=int, default=128, help="most tokens per prefill call (default 128)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--text-only", action="store_true",
                        help="export the text graphs only (no vision/audio encoders): smaller and faster; the "
                             "artifact refuses images and audio")
    parser.add_argument("--executorch-delegate-all", action="store_true",
                        help="ExecuTorch: delegate every op to XNNPACK, its approximate gelu/tanh/exp/softmax too "
                             "(fewer partitions; logits a few hundredths off the emulated eager model)")
    parser.add_argument("--drafter", default=None, metavar="DIR",
                        help="a Gemma 4 assistant checkpoint for speculative decoding, exported beside the model by "
                             "the backends that support it (ONNX and ExecuTorch so far); 'none' for no drafter "
                             "(default: the embedded model's own drafter for 'default', none otherwise)")
    parser.add_argument("--no-check", action="store_true", help="skip the fidelity check against the float model")
    parser.add_argument("--fidelity-tokens", type=int, default=64, help="held-out tokens for the fidelity check")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _quant_of(path: Path) -> str | None:
    manifest = path / "quant_manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text()).get("recipe", {}).get("name")
    return None


def run(args: argparse.Namespace) -> int:
    from edge_gemma.export.build import build_artifact, implemented_backends
    from edge_gemma.export.source import default_out, resolve_source

    source = resolve_source(args.variant, args.checkpoint)
    quant = args.quant or _quant_of(source.path) or "int4"
    out = Path(args.out) if args.out else default_out(source, quant)
    if args.backends is None:
        backends = implemented_backends()
    else:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    report = build_artifact(
        source.path, quant, backends, out, context=args.context,
        force=args.force, check=not args.no_check, max_prefill_chunk=args.prefill_chunk,
        fidelity_tokens=args.fidelity_tokens, name=source.name, progress=not args.no_progress,
        text_only=args.text_only, executorch_precise=not args.executorch_delegate_all,
        drafter=False if args.drafter == "none" else args.drafter,
    )
    print(report.format())
    return 0
