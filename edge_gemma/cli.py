"""The `edge-gemma` command. Thin: every subcommand is a module with `add_arguments(parser)` and `run(args) -> int`,
imported only when that subcommand runs, so `edge-gemma run` on a Raspberry Pi never imports torch."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .quiet import silence_libraries

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "verify": ("edge_gemma.verify", "compare our model with the transformers reference on a checkpoint"),
    "quantize": ("edge_gemma.quantize.cli", "quantize a checkpoint once (int8/int4) and report what it costs"),
    "export": ("edge_gemma.commands.export", "export a checkpoint to an artifact (onnx, executorch, litert)"),
    "run": ("edge_gemma.commands.run", "answer one prompt with an artifact, streamed to stdout"),
    "chat": ("edge_gemma.commands.chat", "multi-turn chat with an artifact, one message per line of stdin"),
    "inspect": ("edge_gemma.commands.inspect", "show an artifact's manifest; --verify checks every checksum"),
    "bench": ("edge_gemma.commands.bench", "measure speed and memory; --budget judges them against a device"),
    "listen": ("edge_gemma.commands.listen", "voice in, answer out: speak into the microphone, the answer streams"),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edge-gemma")
    except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    # Parse the command name first so that only its module is imported.
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("-v", "--verbose") for a in argv)  # accepted before or after the subcommand
    argv = [a for a in argv if a not in ("-v", "--verbose")]
    names = [a for a in argv if not a.startswith("-")]
    parser = argparse.ArgumentParser(prog="edge-gemma")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr (anywhere on "
                        "the command line)")
    parser.add_argument("--version", action="version", version=f"edge-gemma {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if names and names[0] == name:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    args.verbose = verbose
    captured = None if verbose else silence_libraries()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(args._module)
    code = 1
    try:
        code = int(module.run(args) or 0)
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        code = 130
        print("interrupted", file=sys.stderr)
        return code
    except BrokenPipeError:  # stdout closed by the reader (`edge-gemma run ... | head`): end quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        code = 141
        return code
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        if args.verbose:
            raise
        code = 2
        print(f"edge-gemma {args.command}: error: {exc}", file=sys.stderr)
        return code
    finally:
        if captured is not None and code not in (0, 141):
            captured.replay()  # what other libraries said may explain the failure


if __name__ == "__main__":
    sys.exit(main())
