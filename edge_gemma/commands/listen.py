"""`edge-gemma listen ARTIFACT`: speak into the microphone, the answer streams to stdout.

Only answers go to stdout (one line per turn); the state, the level meter, per-turn latency against the `--budget`
device and errors go to stderr. `--input FILE` runs the same loop on a recording instead of a microphone.
`--list-devices` lists the input devices (no artifact needed). Ctrl-C stops with exit status 130.

Debugging: with the environment variable EDGE_GEMMA_LISTEN_DUMP=DIR, the waveform of every turn, exactly as
handed to the engine, is written to DIR/turn-NNN.npy (with turn-NNN.json saying where it lies in the input).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from ._common import add_model_arguments, add_sampling_arguments, open_model, read_tools, sampling_kwargs

DUMP_ENV = "EDGE_GEMMA_LISTEN_DUMP"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    for action in parser._actions:  # ARTIFACT is optional here: `listen --list-devices` needs no model
        if action.dest == "artifact":
            action.nargs, action.required, action.default = "?", False, None
    src = parser.add_argument_group("audio input")
    src.add_argument("--device", help="input device: index or part of its name (default: the system default)")
    src.add_argument("--list-devices", action="store_true", help="list the input devices and exit")
    src.add_argument("--input", metavar="FILE", help="listen to this recording instead of a microphone")
    src.add_argument("--vad-aggressiveness", type=int, default=2, choices=[0, 1, 2, 3],
                     help="webrtcvad: 0 keeps the most audio as speech, 3 the least (default 2)")
    src.add_argument("--end-silence-ms", type=int, default=700, help="silence that ends an utterance (default 700)")
    src.add_argument("--max-utterance-s", type=float, default=120.0,
                     help="an utterance is cut after this long (default 120; over 30 s it reaches the model in "
                          "30 s chunks)")
    conv = parser.add_argument_group("conversation")
    conv.add_argument("--system", help="system prompt")
    conv.add_argument("--image", metavar="FILE", help="an image sent with the first turn")
    conv.add_argument("--tools", metavar="FILE", help="JSON list of function declarations the model may call")
    conv.add_argument("--thinking", action="store_true", help="let the model think first (enable_thinking)")
    conv.add_argument("--max-turns", type=int, default=None, help="stop after this many answers")
    out = parser.add_argument_group("output")
    out.add_argument("--speak", action="store_true", help="also speak each answer (espeak-ng by default)")
    out.add_argument("--speak-command", default="espeak-ng",
                     help="text-to-speech program reading the text on stdin (default: espeak-ng)")
    out.add_argument("--budget", default="pi5", choices=["pi5", "phone", "none"],
                     help="judge each turn's latency against this device's budget (default pi5)")
    out.add_argument("--variant", choices=["e2b", "e4b"], help="budget entry (default: the artifact's variant)")
    out.add_argument("--quiet", action="store_true", help="no state lines or meter on stderr (latency still shown)")
    add_sampling_arguments(parser)


def _list_devices() -> int:
    from edge_gemma.listen.capture import list_input_devices

    devices = list_input_devices()
    if not devices:
        print("no audio input device found (is a microphone connected? `arecord -l` lists ALSA capture devices)",
              file=sys.stderr)
        return 1
    for d in devices:
        mark = "*" if d.is_default else " "
        print(f"{mark} [{d.index}] {d.name} ({d.hostapi}, {d.channels} ch, {d.default_samplerate:.0f} Hz)")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list_devices:
        return _list_devices()
    if not args.artifact:
        raise ValueError("ARTIFACT is required (an artifact directory from `edge-gemma export`)")
    if args.backend == "litert-lm":
        raise ValueError("--backend litert-lm runs text prompts only; listen needs the audio encoder "
                         "(use --backend onnx)")
    if args.max_turns is not None and args.max_turns < 1:
        raise ValueError(f"--max-turns must be >= 1, got {args.max_turns}")
    from edge_gemma.listen.capture import FileSource, MicSource, list_input_devices, resolve_device
    from edge_gemma.listen.display import StatusLine
    from edge_gemma.listen.latency import model_variant, turn_budget
    from edge_gemma.listen.session import ListenOptions, ListenSession, dump_utterance
    from edge_gemma.listen.tts import Speaker
    from edge_gemma.listen.vad import Segmenter, VadConfig

    # Everything that can fail fast fails before the (slow) model load.
    segmenter = Segmenter(VadConfig(aggressiveness=args.vad_aggressiveness, end_silence_ms=args.end_silence_ms,
                                    tail_ms=min(240, args.end_silence_ms), max_utterance_s=args.max_utterance_s))
    if args.input:
        source = FileSource(args.input)
    else:
        resolve_device(args.device, list_input_devices())
        source = None
    if args.image and not Path(args.image).is_file():
        raise FileNotFoundError(f"--image {args.image}: no such file")
    tools = read_tools(args.tools)
    speaker = Speaker(args.speak_command) if args.speak else None
    dump_dir = os.environ.get(DUMP_ENV)
    display = StatusLine(sys.stderr, quiet=args.quiet)

    with open_model(args) as model:
        device = None if args.budget == "none" else args.budget
        variant = args.variant or model_variant(model)
        options = ListenOptions(system=args.system, tools=tools, image=args.image, enable_thinking=args.thinking,
                                max_turns=args.max_turns, budget_device=device, budget=turn_budget(device, variant))
        session = ListenSession(
            model, options=options, generation=model.options(**sampling_kwargs(args)), segmenter=segmenter,
            display=display, out=sys.stdout, speaker=speaker,
            on_audio=(lambda n, utt, audio: dump_utterance(dump_dir, n, utt, audio)) if dump_dir else None,
        )
        source = source or MicSource(args.device)
        try:
            with source:
                turns = session.run(source)
        except KeyboardInterrupt:
            display.clear()
            print("\nstopped", file=sys.stderr)
            return 130
        finally:
            _summary(session.turns)
    if not turns and args.input:
        print(f"edge-gemma listen: no speech found in {args.input}", file=sys.stderr)
    return 0


def _summary(turns) -> None:
    latencies = [t.first_token_s for t in turns if t.first_token_s is not None]
    if len(turns) > 1 and latencies:
        print(f"{len(turns)} turns; speech end -> first token: median {statistics.median(latencies) * 1000:.0f} ms, "
              f"worst {max(latencies) * 1000:.0f} ms", file=sys.stderr)
