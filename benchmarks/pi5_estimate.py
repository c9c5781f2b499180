"""Raspberry Pi 5 latency of an E2B int4 voice turn through the ONNX runtime: ESTIMATED, not measured (no Pi here).

    .venv/bin/python benchmarks/pi5_estimate.py [--audio-seconds 5] [--context 4096] [--json]

Why an estimate: the emulated Pi (scripts/pi_emulation.py, qemu-user) proves the install path and the numerics, not
speed (qemu is 10-50x slower than the real core). So the figures come from two independent views, and the smaller
(slower) one wins:

1. **Compute scaling from x86 measurements** (benchmarks/README.md, "Full-size figures on an idle machine": E2B
   int4, 2 threads, context 4096, prefill 163.5 tok/s median / 165.9 best, decode 11.84 / 13.64 tok/s). The MACs of one
   step come from the E2B config (edge_gemma/data/configs); x86 effective GMAC/s = measured tok/s x MACs per token;
   the Pi's = that x (4 Pi cores / 2 x86 threads) x PER-CORE RATIO x thread scaling, then divided by the MACs per
   token of the Pi's run.
2. **Memory-bandwidth bound for decode**: every decode step streams the whole decoder weight file (int4 block 32
   with float32 scales, plus the int8 tied head: decoder.onnx.data = 1.55 GiB measured) and reads the KV-cache
   slots in use (the graph is given only those), so tok/s <=
   efficiency x bandwidth / bytes per token.

A third, rougher view is printed as a cross-check: our speed relative to llama.cpp / LiteRT-LM on the same x86
machine (peers.md), applied to their published Pi 5 figures.

Time to first token of a voice turn = audio encoder (MACs of the conformer over the clip) + prefill of the chat
prompt (the exact token count from our processor and the real Gemma 4 tokenizer: 5 s of audio -> 125 audio tokens,
140 tokens with the chat frame), both at the Pi's effective prefill GMAC/s. Not included: the VAD's end-of-speech
silence (`listen` waits for it before the turn starts), session start-up, page-cache misses on a cold start.

Every input is a named constant below with its source; `--per-core-ratio`, `--bandwidth-gbs` and friends override
them. The result is printed for three scenarios (pessimistic / central / optimistic) so the spread stays visible.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
E2B_CONFIG = REPO / "edge_gemma" / "data" / "configs" / "gemma-4-E2B-it.config.json"
TOKENIZER_DIR = REPO / "tests" / "data" / "gemma4_tokenizer"
BUDGETS = REPO / "edge_gemma" / "data" / "budgets.json"

GIB = 1024**3


@dataclasses.dataclass(frozen=True, kw_only=True)
class X86Measured:
    """benchmarks/README.md, "The peers side by side" (2026-12-07, 22:48-22:58 UTC): `make bench-peers`, synthetic
    full-size E2B int4 text-only artifact, 512-token prompt, 128 new tokens, 2 threads, medians of 3 interleaved
    fresh processes, onnxruntime 1.32.0 with the sliced head and the released scale pages, a 2-core AMD EPYC VM
    (AVX-512 VNNI) with nothing else running; the graph attends over the cache slots in use (buckets of 64). The
    per-core ratios below were reasoned against the Intel Xeon VM of the earliest figures (AVX-512 VNNI, 2.6 GHz)."""

    threads: int = 2
    context: int = 4096
    prefill_chunk: int = 128
    prompt_tokens: int = 512
    new_tokens: int = 128
    prefill_tok_s_median: float = 273.11
    prefill_tok_s_best: float = 277.70
    decode_tok_s_median: float = 18.15
    decode_tok_s_best: float = 21.26
    decoder_data_bytes: float = 1.515 * GIB  # `du` of the bench-peers artifact's decoder.onnx.data (1627090944 B)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Peer:
    """peers.md: E2B, the same 2-core x86 VM (idle, medians of 3) and the project's published Raspberry Pi 5 figure."""

    name: str
    x86_prefill_tok_s: float
    x86_decode_tok_s: float
    pi5_prefill_tok_s: float
    pi5_decode_tok_s: float


PEERS = (  # x86: the same bench-peers run as X86Measured (llama.cpp Q4_0; LiteRT-LM on Google's int4 b32 bundle)
    Peer(name="llama.cpp Q4_0 / Q4_K_M", x86_prefill_tok_s=125.30, x86_decode_tok_s=21.87, pi5_prefill_tok_s=28.0,
         pi5_decode_tok_s=6.7),
    Peer(name="LiteRT-LM int4", x86_prefill_tok_s=272.15, x86_decode_tok_s=15.35, pi5_prefill_tok_s=133.0,
         pi5_decode_tok_s=8.0),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scenario:
    """The Pi 5's side. BCM2712: 4x Cortex-A76 @ 2.4 GHz (NEON + dotprod, no i8mm, no SVE), LPDDR4X-4267 on a 32-bit
    bus = 17.1 GB/s theoretical; measured STREAM-like figures on Pi 5 boards are ~9-12 GB/s (peers.md: 11.6 GB/s).

    per_core_ratio: one A76 core's throughput on ORT's MLAS kernels (int4/int8 MatMulNBits with int8 activations,
    fp32 attention) relative to one core of the x86 VM. Peak SIMD says 0.23: sdot on 2x128-bit pipes = 32 int8
    MAC/cycle x 2.4 GHz = 77 GMAC/s against AVX-512 VNNI 2x64 MAC/cycle x 2.6 GHz = 333 GMAC/s (fp32 FMA: the same
    0.23). But the x86 kernels ran at ~5 % of that peak (README: 33.6 GMAC/s on two cores for one MatMulNBits), so
    much of the time is overhead (dequantization, scalar code, threading) where an A76 is closer to an x86 core per
    clock: up to ~0.7. Central 0.35.
    efficiency: the share of `bandwidth_gbs` a decode step sustains while streaming weights (peers.md: llama.cpp
    reaches ~0.8 of the bound on a Pi 5, LiteRT-LM ~0.54)."""

    name: str
    per_core_ratio: float
    bandwidth_gbs: float
    efficiency: float
    x86_figures: str  # "median" or "best"
    cores: int = 4
    thread_scaling: float = 0.85  # 4 threads give ~1.7x of 2 on ORT's intra-op pool (not measured on a Pi)


SCENARIOS = (
    Scenario(name="pessimistic", per_core_ratio=0.23, bandwidth_gbs=9.0, efficiency=0.54, x86_figures="median"),
    # The best x86 run is the closest to an idle machine; the median is slowed by other jobs' load, not by the Pi.
    Scenario(name="central", per_core_ratio=0.35, bandwidth_gbs=11.6, efficiency=0.65, x86_figures="best"),
    Scenario(name="optimistic", per_core_ratio=0.7, bandwidth_gbs=12.0, efficiency=0.8, x86_figures="best"),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextCosts:
    """Per-token work of the E2B text decoder as our ONNX graph runs it (KV-shared layers reuse the caches of the
    last unshared layer of their type; logits for the last position only)."""

    linear_macs: float  # every decoder linear once (q/k/v/o, MLP, PLE gate/projection, PLE model projection)
    head_macs: float  # tied LM head, once per graph call
    attention_macs_per_slot: float  # scores + p @ V, all layers, per cache slot attended
    kv_bytes_per_slot: float  # float32 K and V read per cache slot, all layers (shared layers read them again)
    int4_weight_bytes: float  # int4 block 32 + float32 scales for the decoder, int8 block 32 for the head


def text_costs(config: dict) -> TextCosts:
    """From the E2B config.json (gemma4-architecture.md): hybrid attention (5 sliding : 1 full, head_dim 256 / 512,
    1 KV head), the last `num_kv_shared_layers` layers without K/V projections, the double-wide MLP (2x intermediate)
    on the shared layers, PLE (per-layer gate H->P and projection P->H, plus the model projection H->L*P)."""
    t = config["text_config"]
    h, heads, kv = t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"]
    p = t["hidden_size_per_layer_input"]
    n, shared = t["num_hidden_layers"], t["num_kv_shared_layers"]
    head_dims = [int(t["per_layer_config"].get(f"{i:02d}", {}).get("head_dim", t["head_dim"])) for i in range(n)]
    linear = h * n * p  # per_layer_model_projection
    attention = 0.0
    kv_bytes = 0.0
    for i, d in enumerate(head_dims):
        is_shared = i >= n - shared
        linear += 2 * h * heads * d  # q, o
        if not is_shared:
            linear += 2 * h * kv * d  # k, v
        width = t["intermediate_size"] * (2 if is_shared and t["use_double_wide_mlp"] else 1)
        linear += 3 * h * width  # gate, up, down
        linear += 2 * h * p  # per_layer_input_gate, per_layer_projection
        attention += 2 * heads * d  # q . k and p . v for one slot
        kv_bytes += 2 * kv * d * 4  # float32 K and V of one slot
    head = h * t["vocab_size"]
    int4_bytes = linear * (4 + 32 / 32) / 8 + head * (8 + 32 / 32) / 8
    return TextCosts(linear_macs=linear, head_macs=head, attention_macs_per_slot=attention,
                     kv_bytes_per_slot=kv_bytes, int4_weight_bytes=int4_bytes)


def audio_encoder_macs(config: dict, seconds: float) -> float:
    """The conformer over `seconds` of audio (approximate, +-20 %): mel frames at 100/s, two stride-2 3x3 convs
    (128 then 32 channels), then 25 frames/s through `num_hidden_layers` blocks of two macaron FFNs (H->4H->H),
    attention q/k/v/o + relative-position projection, a light conv module (H->2H GLU, depthwise k, H->H), and the
    output projection plus `embed_audio` into the text width. Chunked local attention is small and left out."""
    a, h_text = config["audio_config"], config["text_config"]["hidden_size"]
    h, layers, k = a["hidden_size"], a["num_hidden_layers"], a["conv_kernel_size"]
    c1, c2 = a["subsampling_conv_channels"]
    mel = 128
    frames_100 = seconds * 100
    conv = (frames_100 / 2) * (mel / 2) * c1 * 9 + (frames_100 / 4) * (mel / 4) * c2 * c1 * 9
    tokens = seconds * 25  # 40 ms per audio token (gemma4-architecture.md)
    per_layer = 2 * (2 * h * 4 * h) + 5 * h * h + (2 * h * h + h * k + h * h)
    per_token = (mel // 4) * c2 * h + layers * per_layer + h * a["output_proj_dims"] + a["output_proj_dims"] * h_text
    return conv + tokens * per_token


def voice_prompt_tokens(seconds: float, system: str | None) -> int:
    """Exact prompt length of one voice turn: our processor with the real Gemma 4 tokenizer and chat template."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from edge_gemma.processor import Processor

    proc = Processor.from_dir(TOKENIZER_DIR)
    wave = np.zeros(int(seconds * 16000), dtype=np.int16)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": [{"type": "audio", "audio": wave, "sample_rate": 16000}]}]
    return int(proc(messages).input_ids.shape[0])


def estimate(scenario: Scenario, *, x86: X86Measured, costs: TextCosts, audio_macs: float, prompt_tokens: int,
             context: int) -> dict:
    def per_token(slots: float) -> float:  # decode step: every linear, the head, attention over the slots in use
        return costs.linear_macs + costs.head_macs + slots * costs.attention_macs_per_slot

    def per_prefill_token(slots: float, chunk: int) -> float:  # the head runs once per chunk
        return costs.linear_macs + costs.head_macs / chunk + slots * costs.attention_macs_per_slot

    # Slots attended on average: a decode step at position p reads ~p slots; a prefill chunk starting at p reads
    # p + chunk. (The graph passes only the slots in use, rounded up to 64: runtimes/onnx.py CACHE_BUCKET.)
    x86_decode_slots = x86.prompt_tokens + x86.new_tokens / 2
    x86_prefill_slots = x86.prompt_tokens / 2 + x86.prefill_chunk / 2
    answer_tokens = 128
    decode_slots = min(context, prompt_tokens + answer_tokens / 2)
    prefill_slots = min(context, prompt_tokens / 2 + x86.prefill_chunk / 2)

    pi_over_x86 = scenario.cores * scenario.per_core_ratio * scenario.thread_scaling / x86.threads
    best = scenario.x86_figures == "best"
    x86_decode = x86.decode_tok_s_best if best else x86.decode_tok_s_median
    x86_prefill = x86.prefill_tok_s_best if best else x86.prefill_tok_s_median
    decode_gmacs = x86_decode * per_token(x86_decode_slots) * pi_over_x86 / 1e9
    prefill_gmacs = x86_prefill * per_prefill_token(x86_prefill_slots, x86.prefill_chunk) * pi_over_x86 / 1e9

    decode_compute = decode_gmacs * 1e9 / per_token(decode_slots)
    bytes_per_token = x86.decoder_data_bytes + decode_slots * costs.kv_bytes_per_slot
    decode_bandwidth = scenario.efficiency * scenario.bandwidth_gbs * 1e9 / bytes_per_token
    decode = min(decode_compute, decode_bandwidth)

    chunks = math.ceil(prompt_tokens / x86.prefill_chunk)
    prefill_macs = (prompt_tokens * (costs.linear_macs + prefill_slots * costs.attention_macs_per_slot)
                    + chunks * costs.head_macs)
    prefill_s = prefill_macs / (prefill_gmacs * 1e9)
    audio_s = audio_macs / (prefill_gmacs * 1e9)
    return {
        "scenario": scenario.name, "per_core_ratio": scenario.per_core_ratio, "bandwidth_gbs": scenario.bandwidth_gbs,
        "efficiency": scenario.efficiency, "x86_figures": scenario.x86_figures, "context": context,
        "pi_decode_gmac_s": round(decode_gmacs, 2), "pi_prefill_gmac_s": round(prefill_gmacs, 1),
        "decode_bytes_per_token_gb": round(bytes_per_token / 1e9, 3),
        "decode_tok_s_compute": round(decode_compute, 2), "decode_tok_s_bandwidth": round(decode_bandwidth, 2),
        "decode_tok_s": round(decode, 2),
        "decode_bound": "compute" if decode_compute <= decode_bandwidth else "bandwidth",
        "prompt_tokens": prompt_tokens, "prefill_tok_s": round(prompt_tokens / prefill_s, 1),
        "audio_encoder_s": round(audio_s, 2), "prefill_s": round(prefill_s, 2), "ttft_s": round(audio_s + prefill_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audio-seconds", type=float, default=5.0, help="length of the spoken question (default 5)")
    parser.add_argument("--system", default=None, help="a system prompt to count into the prompt")
    parser.add_argument("--context", type=int, default=4096, help="context the artifact was exported with")
    parser.add_argument("--answer-tokens", type=int, default=40, help="answer length for the turn total (default 40)")
    parser.add_argument("--per-core-ratio", type=float, default=None, help="override the central scenario's ratio")
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="override the central scenario's GB/s")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    config = json.loads(E2B_CONFIG.read_text())
    costs = text_costs(config)
    x86 = X86Measured()
    prompt_tokens = voice_prompt_tokens(args.audio_seconds, args.system)
    audio_macs = audio_encoder_macs(config, args.audio_seconds)
    scenarios = list(SCENARIOS)
    overrides = {k: v for k, v in (("per_core_ratio", args.per_core_ratio), ("bandwidth_gbs", args.bandwidth_gbs))
                 if v is not None}
    if overrides:
        scenarios[1] = dataclasses.replace(scenarios[1], name="central (overridden)", **overrides)
    rows = [estimate(s, x86=x86, costs=costs, audio_macs=audio_macs, prompt_tokens=prompt_tokens,
                     context=args.context) for s in scenarios]
    budget = json.loads(BUDGETS.read_text())["pi5"]["e2b"]
    model = {"linear_gmacs_per_token": round(costs.linear_macs / 1e9, 3), "head_gmacs": round(costs.head_macs / 1e9, 3),
             "attention_gmacs_per_token_at_context": round(args.context * costs.attention_macs_per_slot / 1e9, 3),
             "kv_gb_read_per_token": round(args.context * costs.kv_bytes_per_slot / 1e9, 3),
             "int4_weight_gb_from_config": round(costs.int4_weight_bytes / 1e9, 3),
             "decoder_data_gb_measured": round(x86.decoder_data_bytes / 1e9, 3),
             "audio_encoder_gmacs": round(audio_macs / 1e9, 1)}
    if args.json:
        print(json.dumps({"model": model, "x86": dataclasses.asdict(x86), "scenarios": rows, "budget": budget},
                         indent=1))
        return 0
    print(f"E2B int4 (ONNX, MatMulNBits), voice turn: {args.audio_seconds:g} s of audio -> {prompt_tokens} prompt "
          f"tokens, context {args.context}")
    print("model per token: " + ", ".join(f"{k} {v}" for k, v in model.items()))
    print()
    print("| scenario | A76/x86 core | GB/s x eff. | decode tok/s (compute / bandwidth) | prefill tok/s | audio enc. | "
          f"TTFT | turn with {args.answer_tokens}-token answer |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        turn = r["ttft_s"] + args.answer_tokens / r["decode_tok_s"]
        print(f"| {r['scenario']} | {r['per_core_ratio']} | {r['bandwidth_gbs']} x {r['efficiency']} | "
              f"**{r['decode_tok_s']}** ({r['decode_tok_s_compute']} / {r['decode_tok_s_bandwidth']}) | "
              f"{r['prefill_tok_s']} | {r['audio_encoder_s']} s | **{r['ttft_s']} s** | {turn:.1f} s |")
    print("\ncross-check, our x86 speed relative to a peer on the same machine x the peer's published Pi 5 figure:")
    for peer in PEERS:
        for label, ours in (("median", (x86.prefill_tok_s_median, x86.decode_tok_s_median)),
                            ("best", (x86.prefill_tok_s_best, x86.decode_tok_s_best))):
            decode = ours[1] / peer.x86_decode_tok_s * peer.pi5_decode_tok_s
            prefill = ours[0] / peer.x86_prefill_tok_s * peer.pi5_prefill_tok_s
            print(f"  {peer.name} ({label} x86 run): decode {decode:.2f} tok/s, prefill {prefill:.1f} tok/s")
    print(f"\npi5 budget (edge_gemma/data/budgets.json, {budget['source']}): decode >= {budget['decode_tok_s_min']} "
          f"tok/s; TTFT <= {budget['ttft_s_max']} s for {budget['ttft_prompt_tokens']} prompt tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
