"""`edge-gemma chat ARTIFACT`: a multi-turn conversation, one user message per line of stdin.

The KV cache is kept across turns and only what changed is prefilled (runtimes/engine.py documents the policy).
`/reset` starts a new conversation, `/exit` (or end of input) quits. When the conversation no longer fits the
context, that message is refused with an error saying to `/reset`; the conversation so far is kept.
"""

from __future__ import annotations

import argparse
import sys

from edge_gemma.runtimes.engine import ContextOverflowError

from ._common import add_model_arguments, add_sampling_arguments, open_model, read_tools, sampling_kwargs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--tools", metavar="FILE", help="JSON list of function declarations the model may call")
    parser.add_argument("--thinking", action="store_true", help="let the model think first (enable_thinking)")
    parser.add_argument("--stats", action="store_true", help="print timings of every turn to stderr")
    add_sampling_arguments(parser)


def _not_utf8(text: str) -> int | None:
    """Index of the first character of `text` that is not encodable as UTF-8 (a lone surrogate), or None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        return exc.start


def run(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty()
    with open_model(args) as model:
        conv = model.chat(system=args.system, tools=read_tools(args.tools), enable_thinking=args.thinking)
        opts = model.options(**sampling_kwargs(args))
        number = 0
        while True:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            number += 1
            text = line.strip()
            if not text:
                continue
            bad = _not_utf8(text)
            if bad is not None:  # Python decodes stdin with surrogateescape: undecodable bytes become lone surrogates
                print(f"edge-gemma chat: line {number} of standard input is not UTF-8 text (character {bad}); "
                      "skipped", file=sys.stderr)
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                conv.reset()
                print("(new conversation)", file=sys.stderr)
                continue
            try:
                gen = conv.send(text, options=opts)
            except ContextOverflowError as exc:
                print(f"edge-gemma chat: {exc}", file=sys.stderr)
                continue
            for piece in gen:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
            for call in gen.completion.response.tool_calls:
                print(f"tool call: {call.name} {call.arguments_json()}", file=sys.stderr)
            if args.stats:
                print(gen.completion.stats.format(), file=sys.stderr)
    return 0
