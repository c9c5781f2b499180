"""Arguments and model opening shared by `run`, `chat` and `bench`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEFAULT_EAGER_CONTEXT = 2048


def _number(kind: type, *, low: float | None = None, high: float | None = None, low_open: bool = False):
    """An argparse `type` that parses `kind`, refuses NaN/inf, and checks the range at parse time."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if low_open else '>='} {low:g}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} must be <= {high:g}")
        return value
    return parse


positive_int = _number(int, low=1)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="artifact directory (from `edge-gemma export`); a checkpoint directory or "
                                         "'default' runs the eager reference model instead (needs torch)")
    parser.add_argument("--backend", choices=["onnx", "executorch", "litert", "litert-lm", "eager"], default=None,
                        help="runtime (default: the first of onnx, litert, executorch that the artifact holds and "
                             "that is installed)")
    parser.add_argument("-t", "--threads", type=positive_int, default=None, help="CPU threads for the backend (>= 1)")
    parser.add_argument("--image-tokens", type=int, default=280, choices=[70, 140, 280, 560, 1120],
                        help="soft-token budget of each image (default 280)")
    parser.add_argument("--context", type=positive_int, default=DEFAULT_EAGER_CONTEXT,
                        help=f"context of the eager model on a checkpoint (default {DEFAULT_EAGER_CONTEXT}); an "
                             "artifact has its own")


def add_sampling_arguments(parser: argparse.ArgumentParser, *, max_new_tokens: int = 256) -> None:
    parser.add_argument("-n", "--max-new-tokens", type=positive_int, default=max_new_tokens,
                        help=f"stop after this many new tokens (default {max_new_tokens})")
    parser.add_argument("--temperature", type=_number(float, low=0.0), default=0.0, help="0 = greedy (default)")
    parser.add_argument("--greedy", action="store_true",
                        help="greedy decoding (temperature 0, whatever --temperature says): reproducible output")
    parser.add_argument("--top-k", type=_number(int, low=0), default=0, help="0 = off")
    parser.add_argument("--top-p", type=_number(float, low=0.0, high=1.0, low_open=True), default=1.0,
                        help="in (0, 1]; 1 = off")
    parser.add_argument("--min-p", type=_number(float, low=0.0, high=1.0), default=0.0,
                        help="in [0, 1]: drop tokens less likely than this fraction of the most likely one; 0 = off")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="end the answer before this text (not shown); repeat for several")
    parser.add_argument("--repetition-penalty", type=_number(float, low=0.0, low_open=True), default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (the same seed, the same answer)")
    add_draft_argument(parser)


def add_draft_argument(parser: argparse.ArgumentParser) -> None:
    from edge_gemma.runtimes.speculative import parse_draft

    parser.add_argument("--draft", type=parse_draft, default="auto", metavar="auto|off|N",
                        help="speculative decoding with the model's drafter: auto (default; plain decoding when there "
                             "is no drafter), off, or N drafts per round (1..8). Greedy output is plain greedy's; "
                             "sampled output keeps the model's distribution")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    if any(not s for s in args.stop):
        raise ValueError("--stop needs a non-empty text")
    return dict(max_new_tokens=args.max_new_tokens, temperature=0.0 if args.greedy else args.temperature,
                top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                seed=args.seed, draft=args.draft, stop=tuple(args.stop))


def is_artifact(path: str) -> bool:
    return (Path(path) / "manifest.json").is_file()


def open_model(args: argparse.Namespace):
    """An artifact through the runtime registry (no torch), or a checkpoint through the eager backend."""
    from edge_gemma import api

    if is_artifact(args.artifact):
        if args.backend == "eager":
            raise ValueError("--backend eager runs a checkpoint directory, not an artifact")
        return api.open(args.artifact, backend=args.backend, threads=args.threads,
                        max_soft_tokens=args.image_tokens)
    path = args.artifact
    if path != "default" and not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path}: neither an artifact (no manifest.json) nor a checkpoint (no config.json)")
    if args.backend not in (None, "eager"):
        raise ValueError(f"{path} is a checkpoint, not an artifact: only the eager backend runs it "
                         f"(export it first: edge-gemma export {path} --backends {args.backend})")
    return api.open_checkpoint(path, context=args.context, max_soft_tokens=args.image_tokens, threads=args.threads)


def read_tools(path: str | None) -> list[dict] | None:
    if not path:
        return None
    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such tools file") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(tools, dict) and "tools" in tools:
        tools = tools["tools"]
    if not isinstance(tools, list):
        raise ValueError(f"{path}: expected a JSON list of function declarations, found {type(tools).__name__}")
    return tools
