"""The `.litertlm` bundle: our LiteRT models, the tokenizer and the Gemma 4 metadata, for Google's LiteRT-LM engine.

What LiteRT-LM 0.18 reads (found by running it, see tests/test_litert.py): the `llm_metadata` section (model type
`gemma4`, start token, stop tokens, max tokens, the Jinja chat template, the thinking channel, function-calling and
thinking flags), an HF `tokenizer.json` whose vocabulary equals the model's, a PREFILL_DECODE model
(`prefill_<N>` + `decode`), an EMBEDDER and a PER_LAYER_EMBEDDER model each with exactly ONE signature
(`embedder` / `per_layer_embedder`, one token per call: "Input tensor bytes must be 4" otherwise).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from edge_gemma.config import ModelConfig

log = logging.getLogger(__name__)

__all__ = ["build_litertlm", "llm_metadata"]

# The thinking channel of the Gemma 4 chat format (`<|channel>thought\n ... <channel|>`).
THOUGHT_START = "<|channel>thought\n"
THOUGHT_END = "<channel|>"


def llm_metadata(config: ModelConfig, *, tokenizer_dir: Path, context: int, stop_tokens: list[str],
                 bos_token: str | None):
    """The `LlmMetadata` proto for a Gemma 4 bundle."""
    from litert_lm_builder.runtime.proto import llm_metadata_pb2, llm_model_type_pb2

    md = llm_metadata_pb2.LlmMetadata()
    if bos_token:
        md.start_token.token_str = bos_token
    for s in stop_tokens:
        md.stop_tokens.add().token_str = s
    md.max_num_tokens = context
    md.llm_model_type.CopyFrom(llm_model_type_pb2.LlmModelType(gemma4=llm_model_type_pb2.Gemma4()))
    g = md.llm_model_type.gemma4
    g.code_fence_start, g.code_fence_end = "<|tool_call>", "<tool_call|>"
    g.open_quote = g.close_quote = '<|"|>'
    g.function_response_start = "<|tool_response>"
    if config.vision is not None:
        g.start_of_image_token.token_str, g.end_of_image_token.token_str = "<|image>", "<image|>"
    if config.audio is not None:
        g.start_of_audio_token.token_str, g.end_of_audio_token.token_str = "<|audio>", "<audio|>"
    channel = md.channels.add()
    channel.channel_name, channel.start, channel.end = "thought", THOUGHT_START, THOUGHT_END
    template = tokenizer_dir / "chat_template.jinja"
    if template.is_file():
        md.jinja_prompt_template = template.read_text()
    md.supports_thinking = True
    md.supports_function_calling = True
    return md


def build_litertlm(out: Path, *, config: ModelConfig, tokenizer_dir: Path, context: int, models: dict[str, Path],
                   stop_tokens: list[str], bos_token: str | None, work_dir: Path) -> dict[str, Any]:
    """Write `out` (.litertlm) atomically from the models {"prefill_decode", "embedder", "per_layer_embedder"}."""
    from litert_lm_builder import litertlm_builder as B

    tok = tokenizer_dir / "tokenizer.json"
    if not tok.is_file():
        raise ValueError(f"{tokenizer_dir}: the .litertlm bundle needs tokenizer.json (LiteRT-LM's HF tokenizer)")
    md = llm_metadata(config, tokenizer_dir=tokenizer_dir, context=context, stop_tokens=stop_tokens,
                      bos_token=bos_token)
    md_path = work_dir / "llm_metadata.pb"
    md_path.write_bytes(md.SerializeToString())
    b = B.LitertLmFileBuilder()
    b.add_system_metadata(B.Metadata(key="Authors", value="edge-gemma", dtype=B.DType.STRING))
    b.add_llm_metadata(str(md_path))
    b.add_hf_tokenizer(str(tok))
    kinds = {"prefill_decode": B.TfLiteModelType.PREFILL_DECODE, "embedder": B.TfLiteModelType.EMBEDDER,
             "per_layer_embedder": B.TfLiteModelType.PER_LAYER_EMBEDDER}
    for role, kind in kinds.items():
        b.add_tflite_model(str(models[role]), kind)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        b.build(f)
    os.replace(tmp, out)
    md_path.unlink()
    log.info("litert: wrote %s (%.1f MiB)", out, out.stat().st_size / 2**20)
    return {"model_type": "gemma4", "stop_tokens": stop_tokens, "start_token": bos_token, "max_num_tokens": context}
