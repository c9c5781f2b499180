"""`edge-gemma run ARTIFACT -p TEXT`: one answer, streamed to stdout (and nothing else on stdout).

The prompt: `-p/--prompt TEXT` (`-p -` reads standard input) or `--prompt-file FILE` (UTF-8). Timings go to stderr
with `--stats`; parsed tool calls are listed on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from ._common import add_model_arguments, add_sampling_arguments, open_model, read_tools, sampling_kwargs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-p", "--prompt", help="the user's message ('-': read it from standard input)")
    source.add_argument("--prompt-file", metavar="FILE", help="read the user's message from FILE (UTF-8)")
    parser.add_argument("--image", action="append", default=[], metavar="FILE", help="an image (repeatable)")
    parser.add_argument("--audio", action="append", default=[], metavar="FILE", help="an audio clip (repeatable)")
    parser.add_argument("--tools", metavar="FILE", help="JSON list of function declarations the model may call")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--thinking", action="store_true", help="let the model think first (enable_thinking)")
    parser.add_argument("--stats", action="store_true", help="print timings to stderr")
    add_sampling_arguments(parser)


def prompt_text(args: argparse.Namespace) -> str:
    """The user's message: `--prompt TEXT`, `--prompt -` (standard input) or `--prompt-file FILE`."""
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except UnicodeDecodeError as exc:
            raise ValueError(f"--prompt-file {args.prompt_file}: not UTF-8 text ({exc.reason} at byte "
                             f"{exc.start})") from None
        except OSError as exc:
            raise ValueError(f"--prompt-file {args.prompt_file}: {exc.strerror}") from None
    if args.prompt == "-":
        try:
            return sys.stdin.buffer.read().decode("utf-8") if hasattr(sys.stdin, "buffer") else sys.stdin.read()
        except UnicodeDecodeError as exc:
            raise ValueError(f"--prompt -: standard input is not UTF-8 text ({exc.reason} at byte "
                             f"{exc.start})") from None
    return args.prompt


def user_content(prompt: str, images: list[str], audios: list[str]):
    if not images and not audios:
        return prompt
    return ([{"type": "image", "path": p} for p in images] + [{"type": "audio", "path": p} for p in audios]
            + [{"type": "text", "text": prompt}])


def _run_litert_lm(args: argparse.Namespace) -> int:
    """`--backend litert-lm`: the artifact's .litertlm in Google's LiteRT-LM engine (its own template, tokenizer,
    image resizing and log-mel); images and audio go in as content parts when the bundle has their sections."""
    from edge_gemma.api import backend_files
    from edge_gemma.artifact import Artifact
    from edge_gemma.runtimes.litert_lm import open_engine

    if args.tools:
        raise ValueError("--backend litert-lm: --tools is not passed to LiteRT-LM here; use --backend onnx or litert")
    if args.stop or args.min_p:
        raise ValueError("--backend litert-lm: --stop and --min-p are not passed to LiteRT-LM; use --backend onnx, "
                         "litert or executorch")
    if args.greedy:
        args.temperature = 0.0
    art = Artifact(args.artifact)
    art.check_sha256(backend_files(art, "litert-lm"))
    with open_engine(art, threads=args.threads) as engine:
        for piece in engine.chat(user_content(args.prompt, args.image, args.audio), system=args.system, max_new_tokens=args.max_new_tokens,
                                 greedy=args.temperature == 0, temperature=args.temperature or None,
                                 top_k=args.top_k or None, top_p=args.top_p, seed=args.seed):
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def run(args: argparse.Namespace) -> int:
    args.prompt = prompt_text(args)
    if not args.prompt.strip():
        raise ValueError("the prompt is empty")
    if args.backend == "litert-lm":
        return _run_litert_lm(args)
    tools = read_tools(args.tools)
    messages = [{"role": "user", "content": user_content(args.prompt, args.image, args.audio)}]
    with open_model(args) as model:
        gen = model.generate(messages, tools=tools, system=args.system, enable_thinking=args.thinking,
                             **sampling_kwargs(args))
        for piece in gen:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        done = gen.completion
        for call in done.response.tool_calls:
            print(f"tool call: {call.name} {json.dumps(call.arguments, ensure_ascii=False)}", file=sys.stderr)
        if args.stats:
            print(f"[{model.backend.name}] {done.stats.format()}", file=sys.stderr)
    return 0
