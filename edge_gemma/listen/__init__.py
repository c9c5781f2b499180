"""Voice in, answer out: `edge-gemma listen` as a library.

capture.py (microphone via sounddevice, or a recorded file, as 30 ms frames), vad.py (webrtcvad endpointing into
utterances), session.py (the turn loop over one conversation), display.py (state and level meter on stderr),
latency.py (per-turn latency against a device budget), tts.py (`--speak` with espeak-ng). No torch anywhere here:
a Raspberry Pi runs this with numpy, onnxruntime (or LiteRT), sounddevice and webrtcvad.
"""
