"""`--speak`: say the answer with a local text-to-speech program (espeak-ng by default; no network).

The command (split like a shell would, but run without one) gets the text on stdin and speaks it; espeak-ng reads
stdin when given no words, so `--speak-command "espeak-ng -v en-us -s 160"` picks a voice and speed, and any program
with that interface works. The call blocks until the speech ends, so that the session can throw away what the microphone
heard meanwhile (the model's own voice) before it listens again.
"""

from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess

log = logging.getLogger(__name__)

__all__ = ["Speaker", "SpeakError", "speakable"]

DEFAULT_COMMAND = "espeak-ng"
_SPECIAL = re.compile(r"<[|/]?[A-Za-z_]+[|]?>")  # <turn|>, <|tool_call>, <eos> ... never spoken


class SpeakError(RuntimeError):
    """The text-to-speech program is missing or failed."""


def speakable(text: str) -> str:
    """The answer without special tokens and markdown emphasis, on one line."""
    text = _SPECIAL.sub(" ", text)
    text = re.sub(r"[*_#`]+", "", text)
    return " ".join(text.split())


class Speaker:
    def __init__(self, command: str = DEFAULT_COMMAND, *, timeout_s: float = 120.0):
        self.argv = shlex.split(command)
        if not self.argv:
            raise SpeakError("--speak-command is empty")
        if shutil.which(self.argv[0]) is None:
            hint = " (sudo apt install espeak-ng)" if self.argv[0] == DEFAULT_COMMAND else ""
            raise SpeakError(f"--speak needs the text-to-speech program {self.argv[0]!r}, which is not on PATH{hint}")
        self.timeout_s = timeout_s

    def say(self, text: str) -> None:
        text = speakable(text)
        if not text:
            return
        try:
            done = subprocess.run(self.argv, input=text, text=True, capture_output=True, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not finish speaking in %.0f s; stopped", self.argv[0], self.timeout_s)
            return
        except OSError as exc:
            raise SpeakError(f"cannot run {self.argv[0]}: {exc}") from None
        if done.returncode != 0:
            raise SpeakError(f"{' '.join(self.argv)} failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")
