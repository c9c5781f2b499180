"""ONNX Runtime backend: runs an artifact's `onnx/` graphs (see `export/onnx/` for what each graph computes).

The backend owns the KV caches as numpy arrays `[1, nkv, slots, hd]`, one K and one V per cache-owning layer. They
are bound to the decoder session zero-copy (`OrtValue.ortvalue_from_numpy` shares the array's memory on CPU), as
read-only inputs; every call returns only the new chunk's K/V `[1, nkv, S, hd]`, which is written into the arrays at
its positions with a numpy slice assignment. So a decode step moves O(S) cache bytes, not O(T).

`slots` is not the context: the decoder graph takes any number of old slots (1..context) and attends over those only,
so the arrays hold the positions in use rounded up to `CACHE_BUCKET` and are reallocated one bucket larger (a copy
of what they hold, then a re-bind) when a call would write past their end. Attention then reads ~p slots at
position p instead of all `context` (all 4096 slots were a large share of a prefill chunk even at position 0;
figures: benchmarks/README.md), and cache memory follows the conversation's length.

Session options: `intra_op_num_threads` = `threads` (default: all cores), one inter-op thread, and ORT's default
spinning of idle intra-op workers (on an otherwise idle machine it makes decode steps, many short kernels, faster;
turning it off helps only when another process competes for the cores: benchmarks/README.md); no memory arena (it
held more memory at the same speed). External data (the weights) is memory-mapped by ONNX Runtime; MatMulNBits
prepacks its weights once per session, which is why prefill and decode share ONE decoder session, and the pages of the
mapped data that prepacking read are given back after the decoder loads (`release_mapped_pages`). The vision and audio
sessions open on the first image / audio clip, so a text-only run does not hold their weights. `ORT_ENABLE_ALL` keeps
ORT's fusions (MatMulNBits stays as exported: its `accuracy_level=4` int8-activation kernels are the fast CPU path).

No torch here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from edge_gemma.artifact import Artifact, ArtifactError

from .base import Backend, BackendError, Capabilities, check_step_inputs
from .memory import release_mapped_pages

__all__ = ["CACHE_BUCKET", "OnnxBackend"]

log = logging.getLogger(__name__)

CACHE_BUCKET = 64  # cache arrays grow by this many slots; a call reads (and masks) at most this many unused ones


class OnnxBackend(Backend):
    """`OnnxBackend(artifact, threads=None)`; implements `runtimes.base.Backend`."""

    name = "onnx"

    def __init__(self, artifact: Artifact, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("the onnx backend needs the onnxruntime wheel: pip install onnxruntime") from None
        self._ort = ort
        parsed = artifact.backend_entry("onnx", absent=BackendError)
        self.entry = parsed.raw
        files, self.context, chunk = parsed.files, parsed.context, parsed.max_prefill_chunk
        H, V, self._ple = parsed.hidden_size, parsed.vocab_size, (parsed.ple_layers, parsed.ple_dim)
        caches = parsed.require(artifact, "caches")
        self.threads = int(threads) if threads else (os.cpu_count() or 1)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # warnings about unfoldable CastLike nodes are noise
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.enable_cpu_mem_arena = False  # the arena kept ~85 MB more at the same speed (benchmarks/README.md)
        self._opts = opts

        def session(key: str):
            rel = files.get(key)
            if not rel:
                return None
            path = artifact.path(rel)  # raises if the manifest does not list it
            try:
                return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
            except Exception as exc:  # ORT's pybind errors (InvalidProtobuf, Fail, ...) are not Python's own kinds
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise ArtifactError(f"{path}: ONNX Runtime cannot load this graph ({type(exc).__name__}: {first}); "
                                    "the file is damaged or was changed (`edge-gemma inspect ARTIFACT --verify` "
                                    "checks every file against its sha256)") from None

        self._embedder = session("embedder")
        self._decoder = session("decoder")
        if self._decoder is not None:  # after the load, never during it (see its docstring)
            release_mapped_pages(artifact.path(files["decoder"]).with_name(Path(files["decoder"]).name + ".data"))
        if self._embedder is None or self._decoder is None:
            raise ArtifactError(f"{artifact.root}: backends.onnx lacks the embedder or decoder graph")
        # the towers' sessions open on first use: a text-only conversation never pays their prepacked weights
        self._session = session
        self._towers: dict[str, Any] = {}
        for key in ("vision", "audio"):
            if files.get(key):
                artifact.path(files[key])  # raises now if the manifest does not list it
        # the drafter (speculative decoding): one step reads the target's cache arrays of the layers it names
        self._drafter, self._drafter_caches = None, []
        drafter = self.entry.get("drafter")
        if drafter:
            self._drafter = session("drafter")
            if self._drafter is None:
                raise ArtifactError(f"{artifact.root}: backends.onnx.drafter is set but files.drafter is not")
            self._drafter_caches = [int(c["layer"]) for c in drafter.get("caches", [])]
            unknown = sorted(set(self._drafter_caches) - {int(c["layer"]) for c in caches})
            if unknown:
                raise ArtifactError(f"{artifact.root}: the drafter reads the caches of layers {unknown}, which the "
                                    "decoder does not have")
        self.capabilities = Capabilities(context=self.context, max_prefill_chunk=chunk, hidden_size=H, vocab_size=V,
                                         vision=bool(files.get("vision")), audio=bool(files.get("audio")),
                                         drafter=self._drafter is not None)

        # caches: numpy arrays bound zero-copy as decoder inputs, grown in buckets as positions advance (see module doc)
        inputs = {i.name: i.shape for i in self._decoder.get_inputs()}
        self._caches: list[tuple[dict[str, Any], np.ndarray, np.ndarray]] = []
        shapes = []
        for c in caches:
            shape = tuple(int(x) for x in c["shape"])
            if c.get("dtype", "float32") != "float32" or shape[2] != self.context:
                raise ArtifactError(f"{artifact.root}: cache entry for layer {c.get('layer')} has shape {shape} / "
                                    f"dtype {c.get('dtype')}; expected float32 with {self.context} slots")
            for name in (c["past_key"], c["past_value"]):
                if name not in inputs:
                    raise ArtifactError(f"{artifact.root}: decoder graph has no input {name!r} (manifest caches)")
            shapes.append(shape)
        fixed = [c[key] for c in caches for key in ("past_key", "past_value") if isinstance(inputs[c[key]][2], int)]
        if fixed:
            raise ArtifactError(f"{artifact.root}: decoder input {fixed[0]!r} has a fixed slot count (an artifact of "
                                "edge-gemma before 0.1); export it again")
        self._binding = self._decoder.io_binding()
        self._keep: dict[str, Any] = {}
        self._slots = 0
        for c, shape in zip(caches, shapes):
            empty = np.zeros((*shape[:2], 0, shape[3]), np.float32)
            self._caches.append((c, empty, empty))
        self._grow(self._initial_slots())
        self._outputs = [o.name for o in self._decoder.get_outputs()]
        expected = ["logits", "hidden"] + [n for c, _, _ in self._caches for n in (c["new_key"], c["new_value"])]
        if "keep" not in inputs or self._outputs != expected:
            raise ArtifactError(f"{artifact.root}: decoder outputs {self._outputs} (inputs {sorted(inputs)}), expected "
                                f"{expected} and a 'keep' input (an artifact of edge-gemma before 0.2?); export it again")
        self._hidden: np.ndarray | None = None

    # -- caches ---------------------------------------------------------------------------------------------------

    def _initial_slots(self) -> int:
        return min(self.context, CACHE_BUCKET)

    def _grow(self, slots: int) -> None:
        """Reallocate every cache to `slots` slots (contiguous), keep what the first min(old, new) slots hold, and
        bind the new arrays to the decoder zero-copy."""
        keep = min(self._slots, slots)
        grown = []
        for c, k, v in self._caches:
            pair = []
            for name, old in ((c["past_key"], k), (c["past_value"], v)):
                new = np.zeros((*old.shape[:2], slots, old.shape[3]), np.float32)
                new[:, :, :keep] = old[:, :, :keep]
                ov = self._ort.OrtValue.ortvalue_from_numpy(new)
                self._keep[name] = ov  # the OrtValue shares `new`'s memory; keep both alive while bound
                self._binding.bind_ortvalue_input(name, ov)
                pair.append(new)
            grown.append((c, pair[0], pair[1]))
        self._caches = grown
        self._slots = slots

    # -- text ---------------------------------------------------------------------------------------------------

    def embed(self, ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.capabilities.vocab_size):
            raise ValueError(f"embed: token ids must be in [0, {self.capabilities.vocab_size}), found "
                             f"[{ids.min()}, {ids.max()}]")
        return self._embedder.run(None, {"ids": ids})[0]

    def prefill(self, embeds: np.ndarray, ple_rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        logits, _ = self._run("prefill", embeds, ple_rows, positions, last_only=True)
        return logits[0]

    def verify(self, embeds: np.ndarray, ple_rows: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._run("verify", embeds, ple_rows, positions, last_only=False)

    def last_hidden(self) -> np.ndarray:
        if self._hidden is None:
            raise BackendError("onnx: no hidden state yet (call prefill first)")
        return self._hidden.copy()

    def draft(self, token_embed: np.ndarray, hidden: np.ndarray, position: int) -> tuple[np.ndarray, np.ndarray]:
        if self._drafter is None:
            return super().draft(token_embed, hidden, position)
        H = self.capabilities.hidden_size
        if not 0 < int(position) <= self._slots:
            raise ValueError(f"draft: position {position} must be in 1..{self._slots} (the positions cached so far)")
        feed = {"token_embed": np.ascontiguousarray(token_embed, np.float32).reshape(1, 1, H),
                "hidden": np.ascontiguousarray(hidden, np.float32).reshape(1, 1, H),
                "position": np.asarray([int(position)], np.int64)}
        layers = {int(c["layer"]): (k, v) for c, k, v in self._caches}
        for i in self._drafter_caches:
            feed[f"key_{i}"], feed[f"value_{i}"] = layers[i]
        logits, projected = self._drafter.run(None, feed)
        return logits[0], projected[0]

    def _run(self, what: str, embeds, ple_rows, positions, *, last_only: bool) -> tuple[np.ndarray, np.ndarray]:
        """One decoder call: the chunk's K/V into the cache arrays; -> logits and hidden states `[n, V]`, `[n, H]`
        of the last position (`last_only`) or of every position."""
        embeds, ple_rows, positions = check_step_inputs(what, self.capabilities, self._ple, embeds, ple_rows,
                                                        positions)
        S, p0 = positions.size, int(positions[0])
        if p0 + S > self._slots:  # the new K/V must land inside the arrays: grow to the next bucket
            self._grow(min(self.context, -(-(p0 + S) // CACHE_BUCKET) * CACHE_BUCKET))
        b = self._binding
        b.bind_cpu_input("inputs_embeds", embeds[None])
        b.bind_cpu_input("ple_rows", ple_rows[None])
        b.bind_cpu_input("positions", positions)
        b.bind_cpu_input("keep", np.asarray([S - 1] if last_only else np.arange(S), np.int64))
        b.clear_binding_outputs()  # output shapes follow S: let ORT allocate them each call
        for name in self._outputs:
            b.bind_output(name, "cpu")
        self._decoder.run_with_iobinding(b)
        outs = b.get_outputs()
        for n, (_, k, v) in enumerate(self._caches):
            k[:, :, p0:p0 + S] = outs[2 + 2 * n].numpy()
            v[:, :, p0:p0 + S] = outs[3 + 2 * n].numpy()
        logits, hidden = outs[0].numpy()[0].copy(), outs[1].numpy()[0].copy()
        self._hidden = hidden[-1]
        return logits, hidden

    def reset(self) -> None:
        self._slots = 0  # back to one bucket: frees the memory of a long conversation
        self._grow(self._initial_slots())
        self._hidden = None

    # -- towers ---------------------------------------------------------------------------------------------------

    def _tower(self, key: str):
        if key not in self._towers:
            self._towers[key] = self._session(key)
        return self._towers[key]

    def encode_image(self, pixel_values: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        if not self.capabilities.vision:
            return super().encode_image(pixel_values, position_ids)
        pv = np.ascontiguousarray(pixel_values, dtype=np.float32)
        pos = np.ascontiguousarray(position_ids, dtype=np.int64)
        if pv.ndim != 2 or pos.shape != (pv.shape[0], 2):
            raise ValueError(f"encode_image: pixel_values {pv.shape} / position_ids {pos.shape}; expected "
                             "[Np, 3*p*p] and [Np, 2]")
        soft, valid = self._tower("vision").run(None, {"pixel_values": pv, "position_ids": pos})
        return soft[valid.astype(bool)]

    def encode_audio(self, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if not self.capabilities.audio:
            return super().encode_audio(features, mask)
        f = np.ascontiguousarray(features, dtype=np.float32)
        m = np.ascontiguousarray(mask, dtype=bool).reshape(-1)
        if f.ndim != 2 or m.shape != (f.shape[0],):
            raise ValueError(f"encode_audio: features {f.shape} / mask {m.shape}; expected [T, 128] and [T]")
        # The audio graph takes T a multiple of `audio.frame_multiple` (export/onnx/exporter.py `audio_frame_layout`): pad with
        # masked frames, which change no valid soft token; `valid` drops their outputs.
        pad = -f.shape[0] % int((self.entry.get("audio") or {}).get("frame_multiple", 1))
        if pad:
            f, m = np.pad(f, ((0, pad), (0, 0))), np.pad(m, (0, pad))
        soft, valid = self._tower("audio").run(None, {"features": f, "mask": m})
        return soft[valid.astype(bool)]

    def close(self) -> None:
        self._embedder = self._decoder = self._drafter = None
        self._towers = {}
        self._binding = None
        self._keep = {}
        self._caches = []
