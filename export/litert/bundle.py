"""The `.litertlm` bundle: our LiteRT models, the tokenizer and the Gemma 4 metadata, for Google's LiteRT-LM engine.

What LiteRT-LM 0.18 reads (found by running it, see tests/test_litert.py): the `llm_metadata` section (model type
`gemma4`, start token, stop tokens, max tokens, the Jinja chat template, the thinking channel, function-calling and
thinking flags), an HF `tokenizer.json` whose vocabulary equals the model's, a PREFILL_DECODE model
(`prefill_<N>` + `decode`), an EMBEDDER and a PER_LAYER_EMBEDDER model each with exactly ONE signature
(`embedder` / `per_layer_embedder`, one token per call: "Input tensor bytes must be 4" otherwise).

Multimodal checkpoints add LiteRT-LM's encoder sections (VISION_ENCODER + VISION_ADAPTER, AUDIO_ENCODER_HW +
AUDIO_ADAPTER; contract in export/litert/graphs.py) and the Gemma 4 image settings (patch size, the patch budget
and the pooling kernel, which LiteRT-LM's Gemma4DataProcessor uses to resize and patchify images itself). LiteRT-LM
computes the audio log-mel itself (its default Gemma 4 audio preprocessor); we keep `skip_mel_spectrogram_extraction`
false so the encoder takes log-mel frames, like ours.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from edge_gemma.config import ModelConfig

log = logging.getLogger(__name__)

__all__ = ["LM_TOWER_KINDS", "build_litertlm", "convert_lm_towers", "llm_metadata", "lm_audio_frames"]

# Role -> TfLiteModelType name of the encoder sections, in bundle order.
LM_TOWER_KINDS = {"vision_encoder": "VISION_ENCODER", "vision_adapter": "VISION_ADAPTER",
                  "audio_encoder": "AUDIO_ENCODER_HW", "audio_adapter": "AUDIO_ADAPTER"}

# The thinking channel of the Gemma 4 chat format (`<|channel>thought\n ... <channel|>`).
THOUGHT_START = "<|channel>thought\n"
THOUGHT_END = "<channel|>"


def lm_audio_frames(num_frames: int) -> int:
    """The static frame count of LiteRT-LM's audio encoder: `num_frames` rounded up to a multiple of 4, because
    LiteRT-LM requires the encoder's input length to be a multiple of its output length (two stride-2 convs)."""
    return -(-num_frames // 4) * 4


def llm_metadata(config: ModelConfig, *, tokenizer_dir: Path, context: int, stop_tokens: list[str],
                 bos_token: str | None, vision_patches: int | None = None):
    """The `LlmMetadata` proto for a Gemma 4 bundle. `vision_patches`: the vision encoder's static patch count (the
    image budget LiteRT-LM resizes to), when the bundle carries the vision sections."""
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
        if vision_patches:
            v = config.vision
            g.patch_width = g.patch_height = v.patch_size
            g.pooling_kernel_size = v.pooling_kernel_size
            g.max_num_patches = vision_patches
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


def convert_lm_towers(model, config: ModelConfig, work_dir: Path, convert, *, vision_patches: int | None,
                      audio_frames: int | None) -> dict[str, Path]:
    """Convert the towers in LiteRT-LM's split encoder/adapter form into `work_dir`: {role: .tflite path}.

    `convert([(signature, module, sample_kwargs)], path)` is the exporter's converter. Float32 (LiteRT-LM runs its
    vision and audio encoders in float32 by default); the same weights as our runtime's vision.tflite/audio.tflite."""
    import torch

    from .graphs import LmAudioAdapter, LmAudioEncoder, LmVisionAdapter, LmVisionEncoder

    out: dict[str, Path] = {}
    if vision_patches and model.vision_tower is not None:
        v = config.vision
        k = v.pooling_kernel_size
        cells = vision_patches // (k * k)
        side = max(1, int((vision_patches // (k * k)) ** 0.5)) * k  # a valid square-ish grid for the sample
        xs, ys = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy")
        pos = torch.full((1, vision_patches, 2), -1, dtype=torch.int32)
        pos[0, : side * side] = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1).to(torch.int32)
        sample = {"images": torch.rand(1, vision_patches, 3 * v.patch_size**2), "positions_xy": pos}
        log.info("litert: LiteRT-LM vision encoder + adapter (%d patches -> %d tokens)", vision_patches, cells)
        out["vision_encoder"] = work_dir / "lm_vision_encoder.tflite"
        convert([(f"vision_{cells}", LmVisionEncoder(model.vision_tower), sample)], out["vision_encoder"])
        out["vision_adapter"] = work_dir / "lm_vision_adapter.tflite"
        convert([(f"vision_{cells}", LmVisionAdapter(model.embed_vision),
                  {"features": torch.randn(1, cells, v.hidden_size)})], out["vision_adapter"])
    if audio_frames and model.audio_tower is not None:
        a = config.audio
        T = lm_audio_frames(audio_frames)
        n = T // 4
        log.info("litert: LiteRT-LM audio encoder + adapter (%d frames -> %d tokens)", T, n)
        out["audio_encoder"] = work_dir / "lm_audio_encoder.tflite"
        convert([("audio_encoder", LmAudioEncoder(model.audio_tower),
                  {"src_inputs": torch.randn(1, T, 128), "mask": torch.ones(1, T, dtype=torch.bool)})],
                out["audio_encoder"])
        out["audio_adapter"] = work_dir / "lm_audio_adapter.tflite"
        convert([("audio_adapter", LmAudioAdapter(model.embed_audio),
                  {"mask": torch.ones(1, n, dtype=torch.bool), "features": torch.randn(1, n, a.output_proj_dims)})],
                out["audio_adapter"])
    return out


def build_litertlm(out: Path, *, config: ModelConfig, tokenizer_dir: Path, context: int, models: dict[str, Path],
                   stop_tokens: list[str], bos_token: str | None, work_dir: Path,
                   vision_patches: int | None = None) -> dict[str, Any]:
    """Write `out` (.litertlm) atomically from the models {"prefill_decode", "embedder", "per_layer_embedder"} plus
    any of LM_TOWER_KINDS' roles (`vision_patches` is then the vision encoder's static patch count)."""
    from litert_lm_builder import litertlm_builder as B

    tok = tokenizer_dir / "tokenizer.json"
    if not tok.is_file():
        raise ValueError(f"{tokenizer_dir}: the .litertlm bundle needs tokenizer.json (LiteRT-LM's HF tokenizer)")
    has_vision = "vision_encoder" in models
    md = llm_metadata(config, tokenizer_dir=tokenizer_dir, context=context, stop_tokens=stop_tokens,
                      bos_token=bos_token, vision_patches=vision_patches if has_vision else None)
    md_path = work_dir / "llm_metadata.pb"
    md_path.write_bytes(md.SerializeToString())
    b = B.LitertLmFileBuilder()
    b.add_system_metadata(B.Metadata(key="Authors", value="edge-gemma", dtype=B.DType.STRING))
    b.add_llm_metadata(str(md_path))
    b.add_hf_tokenizer(str(tok))
    kinds = {"prefill_decode": B.TfLiteModelType.PREFILL_DECODE, "embedder": B.TfLiteModelType.EMBEDDER,
             "per_layer_embedder": B.TfLiteModelType.PER_LAYER_EMBEDDER}
    kinds.update({role: getattr(B.TfLiteModelType, name) for role, name in LM_TOWER_KINDS.items() if role in models})
    for role, kind in kinds.items():
        b.add_tflite_model(str(models[role]), kind)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        b.build(f)
    os.replace(tmp, out)
    md_path.unlink()
    log.info("litert: wrote %s (%.1f MiB)", out, out.stat().st_size / 2**20)
    return {"model_type": "gemma4", "stop_tokens": stop_tokens, "start_token": bos_token, "max_num_tokens": context,
            "sections": sorted(kinds), "vision_max_num_patches": vision_patches if has_vision else None}
