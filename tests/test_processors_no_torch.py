"""The processors run where torch (and transformers) cannot be imported, as on a Raspberry Pi or a phone."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

from paths import REPO  # noqa: E402
MODULES = ["tokenizer", "chat", "audio", "image", "processor"]

SCRIPT = r"""
import importlib.abc, json, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "transformers", "torchvision", "torchaudio"}:
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
try:
    import torch  # noqa: F401
    raise SystemExit("torch import was not blocked")
except ImportError:
    pass

import numpy as np
from PIL import Image
from edge_gemma import audio, chat, image, tokenizer
from edge_gemma.processor import Processor

proc = Processor.from_dir(sys.argv[1])
img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
wave = (np.sin(np.arange(24000) * 0.05) * 8000).astype(np.int16)
tools = [{"type": "function", "function": {"name": "f", "description": "d",
          "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}}]
out = proc([{"role": "system", "content": "sys"},
            {"role": "user", "content": [{"type": "image", "image": img}, {"type": "audio", "audio": wave,
                                         "sample_rate": 48000}, {"type": "text", "text": "hi"}]}],
           tools=tools, enable_thinking=True)
reply = chat.parse_response('<|channel>thought\nhm<channel|>ok<|tool_call>call:f{x:<|"|>y<|"|>}<tool_call|>')
dec = proc.tokenizer.stream_decoder()
text = "".join(dec.feed_many(proc.tokenizer.encode("naïve 🦙")))
print(json.dumps({
    "n_ids": int(out.input_ids.shape[0]),
    "bos": int((out.input_ids == proc.tokenizer.special.bos).sum()),
    "image_tokens": list(out.num_soft_tokens_per_image),
    "audio_tokens": list(out.num_soft_tokens_per_audio),
    "call": [reply.tool_calls[0].name, reply.tool_calls[0].arguments],
    "text": text,
    "torch_loaded": any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules),
}))
"""


def test_processors_work_without_torch():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(REPO / "tests" / "data" / "gemma4_tokenizer")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["torch_loaded"] is False
    assert out["bos"] == 1
    assert out["image_tokens"] == [260]  # 40x60 -> 624x960 px = 13x20 cells of 3x3 patches at budget 280
    assert out["audio_tokens"] == [13]  # 0.5 s at 48 kHz -> 8000 samples at 16 kHz -> 13 tokens
    assert out["call"] == ["f", {"x": "y"}]
    assert out["text"] == "naïve 🦙"


def test_no_torch_import_in_processor_sources():
    """Static check: no module-level or local import of torch/transformers in the processors."""
    for name in MODULES:
        path = REPO / "edge_gemma" / f"{name}.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            assert not {"torch", "transformers"} & set(roots), f"{path}:{node.lineno} imports {roots}"
