"""Our engine on LiteRT: the artifact's `litert/` models through `ai_edge_litert`. No torch.

The decoder follows LiteRT-LM's Gemma 4 contract (export/litert/graphs.py): `prefill_<N>` writes K/V only, `decode`
returns logits. So `prefill(S tokens)` runs `prefill_<N>` on the first S-1 tokens (padded to N at the end, padding
at position 0 with fully hidden mask rows, as LiteRT-LM does) and `decode` on the last one, which gives the logits the
engine needs. PLE rows come from `ple.bin` (raw) and are multiplied by sqrt(P) here, as the per-layer embedder model
would. The vision and audio models have static shapes (280 * k^2 patches, 30 s of frames): inputs are padded up
(position -1 / mask 0) and only the valid soft tokens are returned.

The decoder runs as LiteRT's `CompiledModel`, set up as LiteRT-LM sets up its CPU executor: XNNPACK with its default
flags plus `DYNAMIC_FULLY_CONNECTED` and `ENABLE_LATEST_OPERATORS` (`XNNPACK_FLAGS`: without dynamic fully connected
the int4 linears ran on a slower path, a decode step took 92-99 ms instead of 57-64 ms on the full-size E2B), and
the KV caches in two sets of LiteRT tensor buffers that stay inside the runtime: each call reads one set and writes
the other, then they swap (LiteRT-LM's ping-pong). The classic `Interpreter` path copied every cache in and out of
Python on every call. The embedder, vision and audio models keep the `Interpreter` (one call per token or clip).
"""

from __future__ import annotations

import logging
import os

import numpy as np

from edge_gemma.artifact import Artifact, ArtifactError

from .base import Backend, BackendError, Capabilities

log = logging.getLogger(__name__)

__all__ = ["LitertBackend"]

MASK_MIN = np.float32(-0.7 * np.finfo(np.float32).max)  # LiteRT-LM's hidden value; finite on purpose

# tensorflow/lite/delegates/xnnpack/xnnpack_delegate.h: QS8 | QU8 (the delegate's defaults), DYNAMIC_FULLY_CONNECTED,
# ENABLE_LATEST_OPERATORS. Measured per decode step in the module docstring's comparison.
XNNPACK_FLAGS = 0x1 | 0x2 | 0x8 | 0x40


class LitertBackend(Backend):
    """`LitertBackend(artifact, threads=None)`; implements `runtimes.base.Backend`."""

    name = "litert"

    def __init__(self, artifact: Artifact, threads: int | None = None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise BackendError("the litert backend needs the ai-edge-litert wheel: "
                               "pip install ai-edge-litert") from None
        parsed = artifact.backend_entry("litert", absent=BackendError)
        entry = parsed.raw
        files, self.context, self.chunk = parsed.files, parsed.context, parsed.max_prefill_chunk
        H, V, self._P = parsed.hidden_size, parsed.vocab_size, parsed.ple_dim
        caches = parsed.require(artifact, "caches")
        self.threads = int(threads) if threads else (os.cpu_count() or 1)

        def interp(key: str):
            rel = files.get(key)
            if not rel:
                return None
            return Interpreter(model_path=str(artifact.path(rel)), num_threads=self.threads)

        self._emb = interp("embedder")
        if not files.get("decoder") or self._emb is None:
            raise ArtifactError(f"{artifact.root}: backends.litert lacks the decoder or embedder model")
        try:
            from ai_edge_litert.compiled_model import CompiledModel
            from ai_edge_litert.cpu_options import CpuOptions
            from ai_edge_litert.options import Options
        except ImportError as exc:
            raise BackendError(f"the litert backend needs ai-edge-litert's CompiledModel API: {exc}") from None
        self._dec = CompiledModel.from_file(str(artifact.path(files["decoder"])), options=Options(
            cpu_options=CpuOptions(num_threads=self.threads, xnnpack_flags=XNNPACK_FLAGS)))
        sigs = self._dec.get_signature_list()
        self._prefill_name = f"prefill_{self.chunk}"
        for need in (self._prefill_name, "decode"):
            if need not in sigs:
                raise ArtifactError(f"{artifact.root}: {files['decoder']} has no signature {need!r} "
                                    f"(found {sorted(sigs)})")
        self._embed_runner = self._emb.get_signature_runner("embedder")
        self._vision = interp("vision")
        self._vision_patches = int(entry.get("vision_patches") or 0)
        self._vision_runner = self._vision.get_signature_runner("vision_encoder") if self._vision else None
        self._audio = interp("audio")
        self._audio_frames = int(entry.get("audio_frames") or 0)
        self._audio_runner = self._audio.get_signature_runner("audio_encoder") if self._audio else None
        self._cache_spec = [(c["name"], tuple(int(x) for x in c["shape"])) for c in caches]
        expected = set(sigs["decode"]["inputs"]) - {"embeddings", "per_layer_embeddings", "input_pos", "mask"}
        if expected != {n for n, _ in self._cache_spec}:
            raise ArtifactError(f"{artifact.root}: decoder cache inputs {sorted(expected)} differ from the manifest's "
                                f"{sorted(n for n, _ in self._cache_spec)}")
        # per signature: its non-cache input buffers and (decode) the logits buffer; the caches: two sets, swapped
        self._inputs = {sig: {name: self._dec.create_input_buffer_by_name(sig, name)
                              for name in ("embeddings", "per_layer_embeddings", "input_pos", "mask")}
                        for sig in (self._prefill_name, "decode")}
        self._logits = self._dec.create_output_buffer_by_name("decode", "logits")
        self._cache_sets = [{name: self._dec.create_input_buffer_by_name("decode", name) for name, _ in
                             self._cache_spec} for _ in range(2)]
        self._vocab = V
        self.reset()
        self._ple_scale = np.float32(self._P**0.5)
        self.capabilities = Capabilities(context=self.context, max_prefill_chunk=self.chunk, hidden_size=H,
                                         vocab_size=V, vision=self._vision is not None, audio=self._audio is not None)

    # -- text -----------------------------------------------------------------------------------------------------

    def embed(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        rows = [self._embed_runner(token_ids=np.array([[i]], dtype=np.int32))["embeddings"][0, 0] for i in ids]
        return np.stack(rows).astype(np.float32, copy=False) if rows else np.zeros((0, self.capabilities.hidden_size),
                                                                                   np.float32)

    def _mask(self, positions: np.ndarray, rows: int) -> np.ndarray:
        mask = np.full((1, 1, rows, self.context), MASK_MIN, dtype=np.float32)
        for r, p in enumerate(positions):
            mask[0, 0, r, : int(p) + 1] = 0.0
        return mask

    def _run(self, sig: str, embeds: np.ndarray, ple: np.ndarray, positions: np.ndarray, rows: int) -> None:
        S = embeds.shape[0]
        E = np.zeros((1, rows, embeds.shape[1]), np.float32)
        E[0, :S] = embeds
        Pl = np.zeros((1, rows, *ple.shape[1:]), np.float32)
        Pl[0, :S] = ple
        pos = np.zeros((rows,), np.int32)
        pos[:S] = positions
        buffers = self._inputs[sig]
        for name, value in (("embeddings", E), ("per_layer_embeddings", Pl), ("input_pos", pos),
                            ("mask", self._mask(positions, rows))):
            buffers[name].write(value)
        read, write = self._cache_sets
        outputs = dict(write)
        if sig == "decode":
            outputs["logits"] = self._logits
        self._dec.run_by_name(sig, {**buffers, **read}, outputs)
        self._cache_sets = [write, read]  # the caches just written are the next call's input

    def prefill(self, embeds: np.ndarray, ple_rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        embeds = np.asarray(embeds, dtype=np.float32)
        ple = np.asarray(ple_rows, dtype=np.float32) * self._ple_scale
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        S = positions.shape[0]
        if S == 0 or S > self.chunk:
            raise BackendError(f"litert: prefill of {S} tokens; expected 1..{self.chunk}")
        if S > 1 and not np.array_equal(positions, positions[0] + np.arange(S)):
            raise BackendError("litert: prefill positions must be consecutive (the cache is written as one slice)")
        if int(positions[-1]) >= self.context:
            raise BackendError(f"litert: position {int(positions[-1])} is beyond the context {self.context}")
        head = S - 1
        if head:
            if int(positions[0]) + self.chunk <= self.context:  # the padded slice must fit (no clamped write)
                self._run(self._prefill_name, embeds[:head], ple[:head], positions[:head], self.chunk)
            else:
                for j in range(head):
                    self._run("decode", embeds[j:j + 1], ple[j:j + 1], positions[j:j + 1], 1)
        self._run("decode", embeds[head:], ple[head:], positions[head:], 1)
        return self._logits.read(self._vocab, np.float32)

    def decode(self, embeds: np.ndarray, ple_rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self.prefill(embeds, ple_rows, positions)

    def encode_image(self, pixel_values: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        if self._vision_runner is None:
            return super().encode_image(pixel_values, position_ids)
        pv = np.asarray(pixel_values, dtype=np.float32)
        pos = np.asarray(position_ids, dtype=np.int64)
        n = self._vision_patches
        if pv.ndim != 2 or pos.shape != (pv.shape[0], 2):
            raise ValueError(f"encode_image: pixel_values {pv.shape} / position_ids {pos.shape}; expected "
                             "[Np, 3*p*p] and [Np, 2]")
        if pv.shape[0] > n:
            raise BackendError(f"litert: {pv.shape[0]} image patches; the vision model takes at most {n} "
                               "(export with a larger image budget)")
        P = np.zeros((n, pv.shape[1]), np.float32)
        P[: pv.shape[0]] = pv
        Q = np.full((n, 2), -1, np.int32)  # padding patches, masked by the encoder
        Q[: pos.shape[0]] = pos
        out = self._vision_runner(pixel_values=P, position_ids=Q)
        return np.asarray(out["soft_tokens"], np.float32)[np.asarray(out["valid"]).astype(bool)]

    def encode_audio(self, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self._audio_runner is None:
            return super().encode_audio(features, mask)
        f = np.asarray(features, dtype=np.float32)
        m = np.asarray(mask).astype(bool).reshape(-1)
        n = self._audio_frames
        if f.ndim != 2 or f.shape[1] != 128 or m.shape[0] != f.shape[0]:
            raise ValueError(f"encode_audio: features {f.shape} / mask {m.shape}; expected [T, 128] and [T]")
        if f.shape[0] > n:
            raise BackendError(f"litert: {f.shape[0]} audio frames; the audio model takes at most {n} (30 s)")
        F = np.zeros((n, 128), np.float32)
        F[: f.shape[0]] = f
        M = np.zeros((n,), np.int32)
        M[: m.shape[0]] = m
        out = self._audio_runner(features=F, mask=M)
        return np.asarray(out["soft_tokens"], np.float32)[np.asarray(out["valid"]).astype(bool)]

    def reset(self) -> None:
        """Zero both cache sets: masked slots must hold finite values (a zero attention weight times NaN is NaN)."""
        for caches in self._cache_sets:
            for name, shape in self._cache_spec:
                caches[name].write(np.zeros(shape, np.float32))

    def close(self) -> None:
        self._embed_runner = self._inputs = self._logits = None
        self._cache_sets = []
        if self._dec is not None:
            self._dec.close()
        self._dec = self._emb = self._vision = self._vision_runner = None
        self._audio = self._audio_runner = None
