"""ExecuTorch backend: runs an artifact's `executorch/model.pte` (+ `model.ptd`) through ExecuTorch's Python runtime.

Methods (see `export/executorch/lower.py`): `embed`, `prefill` (1..max_prefill_chunk tokens), `decode` (one token),
`vision`, `audio`, and with a drafter `draft` (one draft step over the caches in place; a verify call is a `prefill`
whose `keep` input names every position, so it returns the logits and hidden states of all of them). The KV caches
live INSIDE the program as mutable buffers shared by `prefill`, `decode` and `draft` (one allocation, updated in
place): the backend never sees a cache tensor. Slots are indexed by absolute position and
masks come from positions, so `reset()` has nothing to clear (stale slots are never visible; the program's own `reset`
method zeroes them once at load, and every later value is finite) and a rewind simply overwrites positions.

Dependencies, honestly: the `executorch` wheel's Python bindings link libtorch and take `torch.Tensor` inputs, so
this backend imports torch -- lazily, when the backend is opened, never at module import. On a phone the same `.pte`
runs from ExecuTorch's C++/Java/Swift runtime without torch; the Raspberry Pi runtimes of this project are
onnxruntime and LiteRT.

Quantized programs need ExecuTorch's quantized kernels registered (`embedding_byte` / `embedding_4bit`):
`import executorch.kernels.quantized` before loading.

Memory: XNNPACK packs each delegated weight when a method loads; `prefill` and `decode` are separate methods over the
same named weights, and without XNNPACK's weight cache each held a packed copy of its own (1.4 GB more for the
full-size E2B int4). The cache (the XNNPACK backend option `weight_cache_enabled`, set before the program loads)
packs each named weight once for all methods. ExecuTorch's Python bindings have no call for backend options, so it
is set through the runtime library's exported `executorch::runtime::set_option` (`_enable_xnnpack_weight_cache`),
and read back with `get_option`: if the read-back differs, the backend warns and runs without the cache. After a
method loads, the pages of `model.ptd` that packing read are unlocked (ExecuTorch's loader locks what it maps) and
given back (`memory.release_mapped_pages`).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import sys
from pathlib import Path

import numpy as np

from edge_gemma.artifact import Artifact, ArtifactError

from .base import Backend, BackendError, Capabilities, check_step_inputs
from .memory import release_mapped_pages

__all__ = ["ExecutorchBackend"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _runtime_log_captured():
    """ExecuTorch's runtime logs (`ET_LOG`: cpuinfo probing, thread pool size) come through Python's `sys.stderr`.
    While the `executorch` logger is quieted (the CLI without `-v`) they are held back, and written out only if the
    block fails."""
    if logging.getLogger("executorch").getEffectiveLevel() <= logging.WARNING:
        yield
        return
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


class _BackendOption(ctypes.Structure):
    """`executorch::runtime::BackendOption` (runtime/backend/options.h): `char key[64]` then
    `std::variant<bool, int, std::array<char, 256>>` (256 bytes of storage, then the alternative's index)."""

    _fields_ = [("key", ctypes.c_char * 64), ("storage", ctypes.c_uint8 * 256), ("index", ctypes.c_uint8),
                ("_pad", ctypes.c_uint8 * 3)]


def _enable_xnnpack_weight_cache(enabled: bool = True) -> bool:
    """Turn the XNNPACK backend's weight cache on (or off) for the programs loaded from now on (process-wide); ->
    whether the backend reads back that value. See the module docstring."""
    try:
        import executorch.extension.pybindings.portable_lib as portable

        lib = ctypes.CDLL(str(Path(portable.__file__).resolve().parents[2] / "lib" / "libexecutorch.so"))
        set_option = lib._ZN10executorch7runtime10set_optionEPKcNS0_4SpanINS0_13BackendOptionEEE
        get_option = lib._ZN10executorch7runtime10get_optionEPKcNS0_4SpanINS0_13BackendOptionEEE
    except (ImportError, OSError, AttributeError) as exc:
        log.debug("executorch: no set_option to call (%s)", exc)
        return False
    for fn in (set_option, get_option):  # (const char* backend, Span<BackendOption> {data, size})
        fn.argtypes = [ctypes.c_char_p, ctypes.POINTER(_BackendOption), ctypes.c_size_t]
        fn.restype = ctypes.c_uint32  # executorch::runtime::Error; 0 is Ok
    value = int(bool(enabled))
    option = _BackendOption(key=b"weight_cache_enabled", index=0)  # the bool alternative
    option.storage[0] = value
    if set_option(b"XnnpackBackend", ctypes.byref(option), 1) != 0:
        return False
    back = _BackendOption(key=b"weight_cache_enabled")
    back.index = 255  # not a valid alternative: get_option must overwrite it
    back.storage[0] = 2  # neither false nor true: get_option must overwrite it
    return get_option(b"XnnpackBackend", ctypes.byref(back), 1) == 0 and back.index == 0 and back.storage[0] == value


class ExecutorchBackend(Backend):
    """`ExecutorchBackend(artifact, threads=None)`; implements `runtimes.base.Backend`."""

    name = "executorch"

    def __init__(self, artifact: Artifact, threads: int | None = None):
        try:
            import torch
            from executorch.runtime import Runtime
        except ImportError as exc:
            raise BackendError(f"the executorch backend needs the executorch wheel (and torch): {exc}") from None
        try:
            import executorch.kernels.quantized  # noqa: F401  (registers embedding_byte / embedding_4bit)
        except ImportError as exc:
            raise BackendError(f"executorch's quantized kernels cannot be loaded: {exc}") from None
        self._torch = torch
        parsed = artifact.backend_entry("executorch", absent=BackendError)
        self.entry = parsed.raw
        self._root = artifact.root
        files, self.context, chunk = parsed.files, parsed.context, parsed.max_prefill_chunk
        H, V, self._ple = parsed.hidden_size, parsed.vocab_size, (parsed.ple_layers, parsed.ple_dim)
        methods = parsed.require(artifact, "methods")
        for role in ("program", "data"):
            if not files.get(role):
                raise ArtifactError(f"{artifact.root}: manifest backends.executorch is malformed (no files.{role})")
        pte, ptd = artifact.path(files["program"]), artifact.path(files["data"])
        self.threads = int(threads) if threads else (os.cpu_count() or 1)
        with _runtime_log_captured():
            try:
                from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

                _unsafe_reset_threadpool(self.threads)
            except (ImportError, RuntimeError) as exc:  # not fatal: XNNPACK keeps its default pool
                log.warning("executorch: could not set the thread pool to %d threads (%s)", self.threads, exc)
            if not _enable_xnnpack_weight_cache():
                log.warning("executorch: could not turn on XNNPACK's weight cache; prefill and decode each hold "
                            "their own packed copy of the weights")
            self._program = Runtime.get().load_program(str(pte), data_path=str(ptd))
        self._ptd = ptd
        available = set(self._program.method_names)
        wanted = {"embed", "prefill", "decode"} | {m for m in ("vision", "audio") if methods.get(m)}
        if not wanted <= available:
            raise ArtifactError(f"{pte}: the program has methods {sorted(available)}, the manifest needs "
                                f"{sorted(wanted)}")
        # Text methods now; a tower's method on first use (loading a method allocates its planned activation
        # memory, sized for the largest input its dynamic shapes allow).
        # `keep` (exports from 2026-12-08 on): logits and hidden states of the chunk positions it names; older
        # programs give the last position's logits only
        self._keep = "keep" in methods["prefill"].get("inputs", [])
        self._hidden: np.ndarray | None = None
        drafter = self.entry.get("drafter")
        if drafter and not ("draft" in available and self._keep):
            raise ArtifactError(f"{pte}: the manifest names a drafter but the program has no `draft` method or no "
                                "`keep` input (re-export the artifact)")
        self._wanted = wanted
        # the drafter's method too: loaded on its first call, its set-up would land inside the first decode round
        self._methods = {m: self._program.load_method(m)
                         for m in ("embed", "prefill", "decode", *(("draft",) if drafter else ()))}
        release_mapped_pages(ptd, unlock=True)
        if "reset" not in available:
            raise ArtifactError(f"{pte}: the program has no `reset` method (it zeroes the KV caches after loading; "
                                "re-export the artifact)")
        self._run("reset")  # the caches are planned memory: zero them once, masked slots must be finite
        self.capabilities = Capabilities(context=self.context, max_prefill_chunk=chunk, hidden_size=H, vocab_size=V,
                                         vision="vision" in wanted, audio="audio" in wanted,
                                         drafter=bool(drafter))

    def _run(self, method: str, *arrays: np.ndarray) -> list[np.ndarray]:
        if method not in self._methods:
            self._methods[method] = self._program.load_method(method)
            release_mapped_pages(self._ptd, unlock=True)
        inputs = [self._torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        return [o.numpy() for o in self._methods[method].execute(inputs)]

    # -- text -----------------------------------------------------------------------------------------------------

    def embed(self, ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.capabilities.vocab_size):
            raise ValueError(f"embed: token ids must be in [0, {self.capabilities.vocab_size}), found "
                             f"[{ids.min()}, {ids.max()}]")
        chunk = self.capabilities.max_prefill_chunk
        parts = [self._run("embed", ids[s:s + chunk])[0] for s in range(0, ids.size, chunk)]
        H = self.capabilities.hidden_size
        return np.concatenate(parts).copy() if parts else np.zeros((0, H), np.float32)

    def prefill(self, embeds: np.ndarray, ple_rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self._step("prefill", embeds, ple_rows, positions)

    def decode(self, embeds: np.ndarray, ple_rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self._step("decode" if np.size(positions) == 1 else "prefill", embeds, ple_rows, positions)

    def _step(self, method: str, embeds: np.ndarray, ple_rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        logits, _ = self._call(method, embeds, ple_rows, positions, last_only=True)
        return logits[0]

    def _call(self, what: str, embeds, ple_rows, positions, *,
              last_only: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """One `decode` (one token) or `prefill` call (`what` names it in errors); -> logits `[n, V]` and final
        hidden states `[n, H]` (None from a program without `keep`) of the last position (`last_only`) or of every
        position. The outputs are copied once: the program reuses their memory on its next call."""
        embeds, ple_rows, positions = check_step_inputs(what, self.capabilities, self._ple, embeds, ple_rows,
                                                        positions)
        S = positions.size
        method = "decode" if S == 1 else "prefill"
        if not self._keep:
            return self._run(method, embeds[None], ple_rows[None], positions)[0].copy(), None
        keep = np.asarray([S - 1] if last_only else np.arange(S), np.int64)
        logits, hidden = (o.copy() for o in self._run(method, embeds[None], ple_rows[None], positions, keep))
        self._hidden = hidden[-1]
        return logits, hidden

    # -- speculative decoding (artifacts with a drafter) ----------------------------------------------------------

    def verify(self, embeds: np.ndarray, ple_rows: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.capabilities.drafter:
            return super().verify(embeds, ple_rows, positions)
        return self._call("verify", embeds, ple_rows, positions, last_only=False)

    def last_hidden(self) -> np.ndarray:
        if not self.capabilities.drafter:
            return super().last_hidden()
        if self._hidden is None:
            raise BackendError("executorch: no hidden state yet (call prefill first)")
        return self._hidden.copy()

    def draft(self, token_embed: np.ndarray, hidden: np.ndarray, position: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.capabilities.drafter:
            return super().draft(token_embed, hidden, position)
        H = self.capabilities.hidden_size
        if not 0 < int(position) < self.context:
            raise ValueError(f"draft: position {position} must be in 1..{self.context - 1}")
        logits, projected = self._run("draft", np.asarray(token_embed, np.float32).reshape(1, 1, H),
                                      np.asarray(hidden, np.float32).reshape(1, 1, H),
                                      np.asarray([int(position)], np.int64))
        return logits[0].copy(), projected[0].copy()

    def reset(self) -> None:
        """Nothing to clear: masks are built from positions, so slots beyond the new prefix are never read."""

    def load_caches(self, caches: dict[str, np.ndarray]) -> None:
        """Overwrite the program's KV caches: `{buffer name: array}` with every name of the manifest's
        `methods.load_caches.inputs` (e.g. `layers.0.self_attn.kv_cache.k_cache`), each the buffer's shape.

        Not used by the engine: it puts the program in a known cache state (the tests give it the eager reference's
        history; an application could restore a saved prompt)."""
        spec = self.entry["methods"].get("load_caches")
        if spec is None:
            raise BackendError(f"{self._root}: this artifact's program has no `load_caches` method "
                               "(re-export it)")
        names = list(spec["inputs"])
        if set(caches) != set(names):
            missing, extra = sorted(set(names) - set(caches)), sorted(set(caches) - set(names))
            raise ValueError(f"load_caches: missing {missing}, unexpected {extra}")
        meta = self._program.metadata("load_caches")
        arrays = []
        for i, name in enumerate(names):
            a = np.ascontiguousarray(caches[name], dtype=np.float32)
            want = tuple(meta.input_tensor_meta(i).sizes())
            if a.shape != want:
                raise ValueError(f"load_caches: {name} has shape {a.shape}, the program's buffer is {want}")
            arrays.append(a)
        self._run("load_caches", *arrays)

    # -- towers ---------------------------------------------------------------------------------------------------

    def encode_image(self, pixel_values: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        if "vision" not in self._wanted:
            return super().encode_image(pixel_values, position_ids)
        pv = np.ascontiguousarray(pixel_values, dtype=np.float32)
        pos = np.ascontiguousarray(position_ids, dtype=np.int64)
        if pv.ndim != 2 or pos.shape != (pv.shape[0], 2):
            raise ValueError(f"encode_image: pixel_values {pv.shape} / position_ids {pos.shape}; expected "
                             "[Np, 3*p*p] and [Np, 2]")
        most = int(self.entry["methods"]["vision"].get("max_patches", pv.shape[0]))
        if pv.shape[0] > most:
            raise ValueError(f"encode_image: {pv.shape[0]} patches; this artifact's vision method takes at most {most}")
        soft, valid = self._run("vision", pv, pos)
        return soft[valid.astype(bool)].copy()

    def encode_audio(self, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if "audio" not in self._wanted:
            return super().encode_audio(features, mask)
        f = np.ascontiguousarray(features, dtype=np.float32)
        m = np.ascontiguousarray(mask, dtype=bool).reshape(-1)
        if f.ndim != 2 or m.shape != (f.shape[0],):
            raise ValueError(f"encode_audio: features {f.shape} / mask {m.shape}; expected [T, 128] and [T]")
        spec = self.entry["methods"]["audio"]
        mod, rem, lo = int(spec["frames_modulus"]), int(spec["frames_remainder"]), int(spec["min_frames"])
        T = max(f.shape[0], lo)
        T += (rem - T) % mod  # the method takes T = rem (mod mod) frames: pad with masked-out zeros
        if T > int(spec.get("max_frames", T)):
            raise ValueError(f"encode_audio: {f.shape[0]} frames; this artifact's audio method takes at most "
                             f"{spec['max_frames']}")
        if T != f.shape[0]:
            f = np.concatenate([f, np.zeros((T - f.shape[0], f.shape[1]), np.float32)])
            m = np.concatenate([m, np.zeros(T - m.shape[0], bool)])
        soft, valid = self._run("audio", f, m)
        return soft[valid.astype(bool)].copy()

    def close(self) -> None:
        self._methods = {}
        self._program = None
