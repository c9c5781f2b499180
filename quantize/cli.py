"""``edge-gemma quantize`` arguments and entry point; the main CLI (edge_gemma/cli.py) calls ``add_arguments(parser)``
on its subparser and ``run(args)``.

Only this module prints (the table); the library logs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_gemma.paths import TEXT

from .recipes import RECIPES
from .safetensors_io import SafetensorsFile
from .report import REPORT_FILENAME
from .stream import quantize_checkpoint

__all__ = ["add_arguments", "run"]

CALIBRATION_TEXT = TEXT / "calibration.txt"  # built-in texts (package data)
HELDOUT_TEXT = TEXT / "heldout.txt"
# The model-level report loads the float model twice: the default above this size is per-tensor errors only.
FULL_REPORT_MAX_PARAMS = 1_000_000_000


def num_parameters(src: Path) -> int:
    """Values stored in a checkpoint's safetensors files (headers only)."""
    files = [src] if src.is_file() else sorted(src.glob("*.safetensors"))
    total = 0
    for f in files:
        with SafetensorsFile(f) as st:
            total += sum(t.rows * t.row_numel for t in st.tensors.values())
    return total


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="Hugging Face checkpoint directory (model.safetensors or sharded with an "
                                           "index), a single .safetensors file, or 'default' (the embedded model)")
    parser.add_argument("--recipe", default="int4", choices=sorted(RECIPES),
                        help="quantization recipe (default: int4); written into quant_manifest.json")
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--force", "--overwrite", dest="overwrite", action="store_true",
                        help="replace --out if it exists (as `export --force`; --overwrite is the older spelling)")
    parser.add_argument("--max-shard-gb", type=float, default=2.0, help="output shard size limit in GiB (default 2)")
    parser.add_argument("--chunk-mb", type=int, default=32, help="float32 MiB processed at once (bounds memory)")
    parser.add_argument("--report-top", type=int, default=None,
                        help="print only the N tensors with the largest error (default: all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--algorithm", choices=("rtn", "gptq"), default="rtn",
                        help="rtn: round to nearest, streaming (default); gptq: GPTQ for the text linears, using "
                             "--calibration (loads the float text model into memory)")
    parser.add_argument("--calibration", metavar="TEXT_FILE", default=str(CALIBRATION_TEXT),
                        help="UTF-8 text for GPTQ calibration, tokenized with the checkpoint's tokenizer "
                             "(default: the built-in edge_gemma/data/text/calibration.txt, Python docstrings)")
    parser.add_argument("--report", choices=("tensors", "full"), default=None,
                        help="tensors: per-tensor errors only; full: also the model-level figures (KL, top-1 "
                             "agreement, perplexity of float vs quantized on held-out text, quant_quality.json). "
                             f"Default: full below {FULL_REPORT_MAX_PARAMS / 1e9:g} billion parameters when the checkpoint has a "
                             "tokenizer, else tensors")
    parser.add_argument("--quality-text", metavar="TEXT_FILE", default=str(HELDOUT_TEXT),
                        help="held-out UTF-8 text for the full report (default: the built-in "
                             "edge_gemma/data/text/heldout.txt, docstrings the embedded model never saw)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration/evaluation sequence")
    parser.add_argument("--max-sequences", type=int, default=128, help="at most this many sequences per text")


def run(args: argparse.Namespace) -> int:
    from edge_gemma.paths import resolve_checkpoint  # `default` = the embedded tiny model

    src = resolve_checkpoint(args.checkpoint)
    kwargs = dict(max_shard_bytes=int(args.max_shard_gb * 2**30), chunk_bytes=args.chunk_mb * 2**20,
                  overwrite=args.overwrite, progress=not args.no_progress)
    if args.algorithm == "gptq":
        from .calibrate import gptq_quantize_checkpoint

        report = gptq_quantize_checkpoint(src, args.recipe, args.out, _batches(src, args.calibration, args), **kwargs)
    else:
        report = quantize_checkpoint(src, args.recipe, args.out, **kwargs)
    sort = "error" if args.report_top is not None else "order"
    print(report.format_table(limit=args.report_top, sort=sort))
    has_tokenizer = src.is_dir() and any((src / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    full = args.report == "full" or (
        args.report is None and has_tokenizer and num_parameters(src) < FULL_REPORT_MAX_PARAMS
    )
    if args.report is None and not full:
        why = ("the checkpoint has no tokenizer (tokenizer.json or tokenizer.model) to read the held-out text with"
               if not has_tokenizer else f"it has {FULL_REPORT_MAX_PARAMS / 1e9:g} billion parameters or more "
               "(the model-level figures load the float text model)")
        print(f"model-level figures (KL, top-1 agreement, perplexity) skipped: {why}; --report full asks for them",
              file=sys.stderr)
    if full:
        from .calibrate import quality_report

        print(quality_report(src, args.out, _batches(src, args.quality_text, args)).format())
    print(f"wrote {args.out} (per-tensor errors in {Path(args.out) / REPORT_FILENAME})")
    return 0


def _batches(src: Path, text_file: str, args: argparse.Namespace):
    from edge_gemma.tokenizer import Tokenizer

    from .calibrate import token_batches

    ids = Tokenizer.from_dir(src).encode(Path(text_file).read_text(encoding="utf-8"), add_bos=False)
    return token_batches(ids, args.seq_len, args.max_sequences)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m edge_gemma.quantize.cli``), for use before the main CLI wires it in."""
    parser = argparse.ArgumentParser(prog="edge-gemma quantize",
                                     description="quantize a checkpoint once (int8/int4) and report what it costs")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
