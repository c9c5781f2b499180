"""torch.export -> XNNPACK lowering -> one `.pte` (methods) + one `.ptd` (weights) for the ExecuTorch backend.

Methods of `executorch/model.pte` (batch 1 inside; the runtime passes the shapes below):

  embed    ids [S] int64 (1 <= S <= chunk)                        -> embeds [S, H]
  prefill  inputs_embeds [1,S,H], ple_rows [1,S,L,P], positions [S] -> logits [1, V]   (S dynamic, 1..chunk)
  decode   the same with S = 1 (static shapes: XNNPACK plans the one-token path once)
  reset    () -> zeros [1]; fills the KV caches with zeros (call once after loading)
  load_caches  k_0, v_0, k_1, ... (each cache buffer's shape) -> zeros [1]; overwrites the KV caches
  vision   pixel_values [Np, 3p^2], position_ids [Np, 2]          -> soft tokens [Np/k^2, H], valid [Np/k^2]
  audio    features [T, 128], mask [T] bool                       -> soft tokens [T', H], valid [T']

KV caches: the eager model's static caches (`layers.i.self_attn.kv_cache.k_cache/v_cache`, cache-owning layers only)
are mutable buffers; `KVCache.update`'s `index_copy_` is re-inplaced (`run_reinplace_pass`), and
`MemoryPlanningPass(share_mutable_buffers=True)` gives `prefill`, `decode`, `reset` and `load_caches` ONE allocation
per buffer (mem_id 2). Nothing is serialized for them: the runtime calls `reset` (zeros every cache) once after
loading, since masked slots must hold finite values (a zero attention weight times NaN is NaN). Storing initial zeros
in the `.pte` (`InitializedMutableBufferPass`) would cost the caches' full size (E2B at 4096 positions: ~150 MB).

Weights: every constant (delegated XNNPACK weights and the portable ops' tables) is tagged into the external file
`model.ptd` (`delegate_external_constants_pass_unlifted` on the unlifted module, re-export, and
`ExecutorchBackendConfig(external_constants=...)`); the runtime memory-maps it. The file is keyed by constant name,
shared by all methods: names must be unique across methods (the towers are scoped `vision.` / `audio.`; prefill and
decode share `lm.` because they share the tensors), and const-propagated constants stay in the `.pte` (`_tag`).

Partitioners: `XnnpackDynamicallyQuantizedPartitioner` (the 8da4w / 8da8w linears) then `XnnpackPartitioner`. With
`precise=True` (what the exporter uses) XNNPACK's transcendental kernels (gelu, exp, softmax, sin/cos, pow, rsqrt,
...) are left to the portable kernels: XNNPACK's approximations move the logits (fp32, and int4 against the
emulated eager model) by orders of magnitude more than the precise program does (figures: benchmarks/README.md).
The one exception is tanh, within a few ulp of torch's: the tanh GELU is written out as torch's CPU kernel computes
it (`_gelu_explicit`: cube, scale, tanh, the halves) so that XNNPACK runs all of it, instead of the portable `gelu`
kernel that was the largest share of a prefill chunk.

Lowering a full-size model: seven patches of ExecuTorch's lowering, each a context manager below, active only inside
`lower_program`: `_short_provenance` (provenance chains copied by every pass), `_one_sort_per_program` (one
topological sort and one recompile per method instead of one per partition: lowering was quadratic in the layer
count), `_share_weights_in_preprocess` (the per-partition copies handed to XNNPACK share the weight tensors),
`_spill_serialized_constants` (one copy of each serialized constant for all methods, the large ones in a temporary
file instead of memory until the `.ptd` is written), `_serialize_each_weight_once` (a quantized weight shared by
prefill and decode is serialized once and its int8 codes freed right then), `_compact_dependency_views` (the
partitioners' transitive-dependency sets as bitmasks instead of Python sets: still quadratic, far smaller) and
`_release_weights_after_each_pass` (what only XNNPACK delegates still hold is freed after each partitioner pass). The
modules handed to `lower_program` are consumed.
Without the first three, the lowering of the full-size E2B does not finish; what each patch saves in time and peak
memory is in `benchmarks/README.md` ("ExecuTorch at full size").
"""

from __future__ import annotations

import collections.abc
import contextlib
import hashlib
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["PRECISE_EXCLUDED", "lower_program", "release_delegated_weights"]

log = logging.getLogger(__name__)

PTD_TAG = "model"  # -> model.ptd
PRECISE_EXCLUDED = ("GeluConfig", "ExpConfig", "SoftmaxConfig", "SinConfig", "CosConfig", "PowConfig",
                    "LogConfig", "SigmoidConfig", "ReciprocalSquareRootConfig", "SquareRootConfig")


@contextlib.contextmanager
def _short_provenance():
    """Keep only one level of `from_node` provenance per node while lowering.

    torch.fx deep-copies a node's whole provenance chain each time a pass rewrites it; through the dozens of edge and
    XNNPACK passes the chains grow with every pass and the copies dominated lowering (py-spy: most of the time in
    `NodeSource.__init__` -> `copy.deepcopy`). Provenance is debug information only."""
    from torch.fx import traceback as fx_traceback

    original = fx_traceback.NodeSource.__init__

    def init(self, node, pass_name="", action=None):
        original(self, None, pass_name, action)
        if node is not None:
            self.node_info = self.NodeInfo(name=node.name, target=str(node.target), graph_id=id(node.graph))

    fx_traceback.NodeSource.__init__ = init
    try:
        yield
    finally:
        fx_traceback.NodeSource.__init__ = original


@contextlib.contextmanager
def _one_sort_per_program():
    """Sort and recompile the top-level graph module once per program instead of once per partition.

    ExecuTorch cuts each delegate partition out of a method's graph with `create_submodule_from_nodes`, which ends in
    `legalize_graph`: a topological sort that copies EVERY node of the method into a new graph, then
    `GraphModule.recompile()`, which generates and compiles the Python code of the whole method. A decoder layer has
    several cut points (the KV-cache update is not delegated; with `precise` every transcendental op is one too), so
    lowering was quadratic in the layer count: at full size py-spy showed most of the lowering time there.

    Here the partitions are cut with `skip_legalize_graph=True` and the top-level module's recompilation is
    deferred; after the last cut, one stable topological sort (torch.fx's own `fuse_by_partitions` also sorts once,
    after fusing all its partitions), a lint and one recompile. The sort is inductor's in-place one, which moves
    nodes instead of copying them (the caller holds the call_module nodes it returns); nothing runs the top-level
    module between two cuts. (torch.fx's lazy recompilation would defer every module's code generation, and breaks
    an XNNPACK pass.)"""
    from executorch.exir.backend import backend_api
    from torch._inductor.pattern_matcher import stable_topological_sort

    original_create = backend_api._create_partitions_in_graph_module
    original_cut = backend_api.create_submodule_from_nodes

    def cut(gm, node_list, tag, skip_legalize_graph=False):
        return original_cut(gm, node_list, tag, skip_legalize_graph=True)

    def create(tagged_graph_module, *args, **kwargs):
        gm = tagged_graph_module
        gm.recompile = lambda: None  # an instance attribute shadows GraphModule.recompile, also in the graph setter
        try:
            result = original_create(gm, *args, **kwargs)
            stable_topological_sort(gm.graph)
            gm.graph.lint()
            return result
        finally:
            del gm.recompile
            gm.recompile()

    backend_api._create_partitions_in_graph_module = create
    backend_api.create_submodule_from_nodes = cut
    try:
        yield
    finally:
        backend_api._create_partitions_in_graph_module = original_create
        backend_api.create_submodule_from_nodes = original_cut


@contextlib.contextmanager
def _share_weights_in_preprocess():
    """Hand XNNPACK's preprocessing a copy of each partition that SHARES the weight tensors.

    `lower_all_submodules_to_backend` deep-copies every partition of every method (weights included) before the
    backend preprocesses it, all at once: a whole second copy of the model's weights per method (prefill and decode
    share their weights, so at full size that is a large part of the lowering's peak). XNNPACK's preprocessing reads the
    constants and serializes converted copies; it never writes to them, so the copy keeps the graph and the state-dict
    mapping independent but memoizes the tensors (what ExecuTorch's own CUDA backend does in its low-memory mode)."""
    import copy

    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    def copy_for_preprocess(cls, edge_program, compile_specs):
        memo = {id(t): t for values in (edge_program.state_dict, edge_program.constants)
                for t in values.values() if isinstance(t, torch.Tensor)}
        return copy.deepcopy(edge_program, memo)

    own = vars(XnnpackBackend).get("copy_exported_program_for_preprocess")  # None: inherited from BackendDetails
    XnnpackBackend.copy_exported_program_for_preprocess = classmethod(copy_for_preprocess)
    try:
        yield
    finally:
        if own is None:
            del XnnpackBackend.copy_exported_program_for_preprocess
        else:
            XnnpackBackend.copy_exported_program_for_preprocess = own


SPILL_BYTES = 1 << 16  # serialized constants at least this large are kept in a file until the program is written


@contextlib.contextmanager
def _spill_serialized_constants(spill_parent: Path):
    """Keep ONE copy of each serialized constant across the partitions and methods being lowered, and keep the large
    ones on disk instead of in memory until the program is written.

    XNNPACK's preprocessing serializes every weight it delegates (`bytes(...)` of the packed tensor) into a named-data
    store per partition, keyed by the bytes' SHA-256, and all these stores live until the program is written: the
    whole packed model (E4B int4: ~3 GB) stayed in memory beside everything else, and `prefill` and `decode`, which
    delegate the same weights, held it twice. ExecuTorch's stores and writers also take `FileBackedData` (bytes in a
    file, hashed and streamed from disk when the `.ptd` is written). Here a store handed bytes of at least
    `SPILL_BYTES` gets them as a file in a temporary folder under `spill_parent` (removed on exit); bytes already held
    under the same key with the same SHA-256 give the held object (the new copy is dropped at once). Nothing changes
    in the written files: ExecuTorch deduplicates the buffers by content when it merges the stores."""
    import tempfile

    from executorch.exir._serialize._cord import FileBackedData
    from executorch.exir._serialize._named_data_store import NamedDataStore

    original = NamedDataStore.add_named_data
    held: dict[tuple[str, int], Any] = {}
    spill_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".executorch-constants-", dir=spill_parent) as spill:

        def add_named_data(self, key, data, *args, **kwargs):
            if isinstance(data, bytes):
                ident = (key, len(data))
                known = held.get(ident)
                if known is None:
                    if len(data) >= SPILL_BYTES:
                        path = os.path.join(spill, f"{len(held)}.bin")
                        with open(path, "wb") as f:
                            f.write(data)
                        data = FileBackedData(path, sha256=hashlib.sha256(data).digest())
                    held[ident] = data
                elif known is not data and (known == data if isinstance(known, bytes)
                                            else known.sha256() == hashlib.sha256(data).digest()):
                    data = known
            return original(self, key, data, *args, **kwargs)

        NamedDataStore.add_named_data = add_named_data
        try:
            yield
        finally:
            NamedDataStore.add_named_data = original
            held.clear()


@contextlib.contextmanager
def _serialize_each_weight_once():
    """Serialize each quantized weight ONCE for all partitions and methods, and free its integers right then.

    XNNPACK reads a delegated weight's int8 codes when it serializes them (`get_serialized_buffer_index`: packed to
    int4 where the scheme says), and `prefill` and `decode` delegate the same weights, so the codes had to stay until
    the second method was lowered: at the E4B's first partitioner pass the whole int8 model (~4.5 GB) sat beside its
    packed copy. Here the first serialization of a codes tensor is remembered (by its storage and view, and the
    conversion asked for) and the codes are freed in place at once (`resize_(0)`); a later partition asking for the
    same tensor the same way gets the recorded name and bytes without reading the tensor. Only integer codes behind a
    dequantize are handled: nothing else in XNNPACK's preprocessing reads them (its passes read scales, zero points
    and float weights, which are left alone). Yields {storage id: tensor} of what was freed, for
    `_release_weights_after_each_pass` to check that no method still uses one outside a delegate."""
    from executorch.backends.xnnpack.operators.node_visitor import NodeVisitor
    from executorch.backends.xnnpack.serialization.xnnpack_graph_schema import ConstantDataOffset
    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import CONSTANT_TENSOR_ALIGNMENT
    from executorch.backends.xnnpack.utils.utils import get_param_tensor, is_param_node
    from executorch.backends.xnnpack.utils.xnnpack_constants import UINT64_MAX

    original = NodeVisitor.get_serialized_buffer_index
    done: dict[tuple, tuple[str, Any, torch.Tensor]] = {}
    freed: dict[int, torch.Tensor] = {}

    def get_serialized_buffer_index(self, tensor, xnn_graph, vals_to_ids, convert_to_nhwc, swap_in_out_for_weights,
                                    quant_params, force_fp32=False, groups=1):
        args = (tensor, xnn_graph, vals_to_ids, convert_to_nhwc, swap_in_out_for_weights, quant_params, force_fp32,
                groups)
        const = None
        if quant_params is not None and is_param_node(self.exported_program, quant_params.q_input):
            const = get_param_tensor(self.exported_program, quant_params.q_input)
        if (not isinstance(const, torch.Tensor) or isinstance(const, torch._subclasses.FakeTensor)
                or const.dtype not in (torch.int8, torch.uint8) or const.dtype != quant_params.dtype):
            return original(self, *args)  # (codes of another dtype would be quantized again with the scales)
        storage = const.untyped_storage()
        key = (storage._cdata, const.storage_offset(), tuple(const.shape), tuple(const.stride()), const.dtype,
               bool(convert_to_nhwc), bool(swap_in_out_for_weights), int(groups), bool(force_fp32),
               bool(quant_params.is_qc4w), quant_params.dtype, bool(quant_params.is_dynamic))
        entry = done.get(key)
        if entry is None:
            index = original(self, *args)
            named_key = xnn_graph.constant_data[index].named_key
            store = self._named_data_store
            done[key] = (named_key, store.buffers[store.key_to_buffer_idx[named_key]], const)
            if storage.resizable():
                freed[storage._cdata] = const
                storage.resize_(0)
            return index
        named_key, data, _ = entry
        index = len(xnn_graph.constant_data)
        xnn_graph.constant_data.append(ConstantDataOffset(offset=UINT64_MAX, size=len(data), named_key=named_key))
        custom = tensor.meta.get("custom", None)
        self._named_data_store.add_named_data(
            named_key, data, alignment=CONSTANT_TENSOR_ALIGNMENT,
            external_tag=custom.get("delegate_constant_tag", None) if custom else None)
        return index

    NodeVisitor.get_serialized_buffer_index = get_serialized_buffer_index
    try:
        yield freed
    finally:
        NodeVisitor.get_serialized_buffer_index = original
        done.clear()


def _trim_heap() -> None:
    """Give freed heap memory back to the system (glibc's `malloc_trim`; nothing elsewhere). Tensors under glibc's
    mmap threshold (which grows to 32 MB as large blocks are freed) live in the heap, and freeing them does not
    lower the process's RSS until the heap is trimmed."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _NodeSet(collections.abc.Set):
    """A read-only set of graph nodes held as a bitmask over their topological positions (a Python int)."""

    __slots__ = ("_mask", "_nodes", "_index")

    def __init__(self, mask: int, nodes: np.ndarray, index: dict):
        self._mask, self._nodes, self._index = mask, nodes, index

    def __contains__(self, node) -> bool:
        i = self._index.get(node)
        return i is not None and (self._mask >> i) & 1 == 1

    def __len__(self) -> int:
        return self._mask.bit_count()

    def __iter__(self):
        mask = self._mask
        if not mask:
            return iter(())
        bits = np.unpackbits(np.frombuffer(mask.to_bytes((mask.bit_length() + 7) // 8, "little"), np.uint8),
                             bitorder="little")
        return iter(self._nodes[np.flatnonzero(bits)])


class _CompactDependencyViewer:
    """What the partitioners' `_DependencyViewer`s answer (every node's transitive users, and upstream nodes), held
    as one bitmask per node instead of one Python set per node; upstreams only when asked (no caller asks today).

    The originals materialise the transitive closure as sets: on a method graph of N nodes where almost every node
    reaches the rest (a residual stream), ~N^2/2 set entries of 8+ bytes each, versus N^2/16 bytes here."""

    def __init__(self, graph_module):
        self._nodes = np.empty(len(graph_module.graph.nodes), dtype=object)  # indexable by an array of positions
        self._nodes[:] = list(graph_module.graph.nodes)
        self._index = {n: i for i, n in enumerate(self._nodes)}
        self._down = self._closure(reversed(range(len(self._nodes))), lambda n: n.users)
        self._up: list[int] | None = None

    def _closure(self, order, neighbours) -> list[int]:
        masks = [0] * len(self._nodes)
        index = self._index
        for i in order:
            mask = 0
            for other in neighbours(self._nodes[i]):
                j = index[other]
                mask |= masks[j] | (1 << j)
            masks[i] = mask
        return masks

    def _view(self, masks: list[int], node) -> _NodeSet:
        i = self._index.get(node)
        return _NodeSet(masks[i] if i is not None else 0, self._nodes, self._index)

    def downstreams_of(self, node) -> _NodeSet:
        return self._view(self._down, node)

    def upstreams_of(self, node) -> _NodeSet:
        if self._up is None:
            self._up = self._closure(range(len(self._nodes)), lambda n: n.all_input_nodes)
        return self._view(self._up, node)


@contextlib.contextmanager
def _compact_dependency_views():
    """Give torch.fx's `CapabilityBasedPartitioner` and ExecuTorch's `GroupBasedPartitioner` (the XNNPACK
    partitioners build one per method and pass) the bitmask dependency view above.

    Both precompute every node's transitive downstream nodes as a set (ExecuTorch's also the upstream ones, unused),
    and a group partitioner builds both its own and its base class's: on the full-size models this was the largest
    part of the lowering peak above the weights, growing with every partitioner pass (figures: benchmarks/README.md).
    The callers only iterate over the sets or test membership, which `_NodeSet` answers the same."""
    from executorch.exir.backend.canonical_partitioners import group_partitioner
    from torch.fx.passes.infra import partitioner

    originals = (partitioner._DependencyViewer, group_partitioner._DependencyViewer)
    partitioner._DependencyViewer = group_partitioner._DependencyViewer = _CompactDependencyViewer
    try:
        yield
    finally:
        partitioner._DependencyViewer, group_partitioner._DependencyViewer = originals


def _storages(program) -> dict[int, Any]:
    """{data_ptr: untyped storage} of the tensors an ExportedProgram holds (parameters, buffers, constants)."""
    out = {}
    for values in (program.state_dict, program.constants):
        for t in values.values():
            if isinstance(t, torch.Tensor) and not isinstance(t, torch._subclasses.FakeTensor):
                storage = t.untyped_storage()
                if storage.nbytes():
                    out[storage.data_ptr()] = storage
    return out


def release_delegated_weights(manager) -> int:
    """Free the storage of every tensor that only XNNPACK delegates of `manager` (an EdgeProgramManager) still hold;
    returns the bytes freed.

    Once a partition is preprocessed, its weights live on as serialized bytes in the named-data store; the float and
    int8 tensors they came from are held only by the lowered module's `original_module` (and by the caller's eager
    modules, which share them). `to_executorch` emits the delegates from the serialized bytes and never reads those
    tensors, so they are freed in place (`resize_(0)`: every module sharing them then holds an empty tensor, and
    reading one fails loudly). Tensors a top-level program still uses (constants of portable ops, such as the int8
    embedding table of `embed`, or a later partitioner pass's inputs) are kept."""
    from executorch.exir.lowered_backend_module import LoweredBackendModule

    kept: dict[int, Any] = {}
    delegated: dict[int, Any] = {}
    for program in manager._edge_programs.values():
        kept.update(_storages(program))
        gm = program.graph_module
        for node in gm.graph.nodes:
            if node.op == "get_attr" and isinstance(getattr(gm, node.target, None), LoweredBackendModule):
                delegated.update(_storages(getattr(gm, node.target).original_module))
    freed = 0
    for ptr, storage in delegated.items():
        if ptr not in kept:
            if storage.resizable():
                freed += storage.nbytes()
                storage.resize_(0)
            else:
                log.debug("executorch: a delegated weight of %d B is not resizable; kept", storage.nbytes())
    return freed


def _check_freed_weights_unused(manager, freed: dict[int, torch.Tensor]) -> None:
    """Raise if a method of `manager` still uses, outside its delegates, a weight `_serialize_each_weight_once` freed
    (running or emitting it would read freed memory). Never seen: every method that holds a quantized weight delegates
    all its uses to XNNPACK."""
    for method, program in manager._edge_programs.items():
        for values in (program.state_dict, program.constants):
            for name, t in values.items():
                if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata in freed:
                    raise RuntimeError(f"ExecuTorch lowering: method {method!r} uses {name!r} outside XNNPACK, but its "
                                       "integers were freed once XNNPACK serialized them (export/executorch/lower.py)")


@contextlib.contextmanager
def _release_weights_after_each_pass(freed: dict[int, torch.Tensor]):
    """After each partitioner pass of `to_edge_transform_and_lower` (one `EdgeProgramManager.to_backend` call per
    pass, over all methods): check that no method uses a weight freed while serializing (`freed`, from
    `_serialize_each_weight_once`) outside a delegate, call `release_delegated_weights` (what only delegates still
    hold: scales, zero points, float weights) and trim the heap."""
    from executorch.exir.program._program import EdgeProgramManager

    original = EdgeProgramManager.to_backend

    def to_backend(self, *args, **kwargs):
        manager = original(self, *args, **kwargs)
        _check_freed_weights_unused(manager, freed)
        released = release_delegated_weights(manager)
        _trim_heap()
        log.info("executorch: released %.1f MiB of delegated weights (%d codes tensors freed while serializing)",
                 released / 2**20, len(freed))
        return manager

    EdgeProgramManager.to_backend = to_backend
    try:
        yield
    finally:
        EdgeProgramManager.to_backend = original


def _tag(node) -> str | None:
    """External-file tag of a constant, or None to keep it in the `.pte`.

    Kept inside: the KV caches (mutable, planned memory) and the constants the const-propagation pass creates
    (`_prop_tensor_constant<i>`): they are numbered per method, so in a file shared by all methods the same name
    would stand for different tensors (the runtime then refuses the method: error 0x24 InvalidExternalData)."""
    target = f"{getattr(node, 'target', '')} {getattr(node, 'name', '')}"
    return None if ("kv_cache" in target or "_prop_tensor_constant" in target) else PTD_TAG


def _export(module: nn.Module, args: tuple, dynamic_shapes: Any):
    """torch.export (no_grad, non-strict), then tag the constants for the external file and export again."""
    from executorch.exir.passes.external_constants_pass import delegate_external_constants_pass_unlifted

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
        unlifted = ep.module()
        delegate_external_constants_pass_unlifted(unlifted, gen_tag_fn=_tag)
        return torch.export.export(unlifted, args, dynamic_shapes=dynamic_shapes, strict=False)


_GELU_BETA = math.sqrt(2.0) * (2.0 / math.sqrt(math.pi)) * 0.5  # ATen's kBeta for the tanh GELU
_GELU_KAPPA = 0.044715


def _gelu_explicit(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """`aten.gelu` as elementwise ops, in the order ATen's vectorized CPU kernel evaluates it (GeluKernelImpl:
    `0.5 x (1 + tanh(kBeta (x + kKappa x^3)))`, `x^3` as `x * x * x`); the exact (erf) form for approximate='none'.
    Multiplications and additions are IEEE in XNNPACK and the portable kernels alike, so only tanh's last ulps can
    differ from eager."""
    if approximate == "tanh":
        inner = _GELU_BETA * (x + _GELU_KAPPA * (x * x * x))
        return (0.5 * x) * (1.0 + torch.tanh(inner))
    return (0.5 * x) * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))


def _partitioners(precise: bool) -> list:
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
        XnnpackDynamicallyQuantizedPartitioner,
        XnnpackPartitioner,
    )

    configs = [c for c in ALL_PARTITIONER_CONFIGS if not (precise and c.__name__ in PRECISE_EXCLUDED)]
    return [XnnpackDynamicallyQuantizedPartitioner(configs=configs), XnnpackPartitioner(configs=configs)]


def lower_program(methods: dict[str, tuple[nn.Module, tuple, Any]], out_dir: Path, *, precise: bool,
                  name: str = "model") -> dict[str, Any]:
    """Export every method `{name: (module, example args, dynamic_shapes)}`, lower them together and write
    `out_dir/<name>.pte` and `out_dir/model.ptd`. Returns timings and file names.

    The modules are CONSUMED: the weights their XNNPACK delegates took are freed while lowering
    (`_serialize_each_weight_once`, `release_delegated_weights`); build them again to run them eagerly. The large
    serialized weights wait in a temporary folder under `out_dir` (removed before returning) until the `.ptd` is
    written: the disk needs about the `.ptd`'s size twice."""
    with contextlib.ExitStack() as stack:
        for patch in (_short_provenance(), _one_sort_per_program(), _share_weights_in_preprocess(),
                      _spill_serialized_constants(out_dir), _compact_dependency_views()):
            stack.enter_context(patch)
        stack.enter_context(_release_weights_after_each_pass(stack.enter_context(_serialize_each_weight_once())))
        return _lower(methods, out_dir, precise=precise, name=name)


def _lower(methods, out_dir: Path, *, precise: bool, name: str) -> dict[str, Any]:
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from torchao.utils import unwrap_tensor_subclass

    t0 = time.perf_counter()
    programs = {}
    for method, (module, args, dyn) in methods.items():
        log.info("executorch: exporting %s", method)
        unwrap_tensor_subclass(module)
        programs[method] = _export(module, args, dyn)
        if precise:
            programs[method] = programs[method].run_decompositions({torch.ops.aten.gelu.default: _gelu_explicit})
        for node in programs[method].graph.nodes:
            node.meta.pop("from_node", None)
    t_export = time.perf_counter() - t0
    log.info("executorch: lowering %d methods to XNNPACK", len(programs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edge = to_edge_transform_and_lower(
            programs, partitioner={m: _partitioners(precise) for m in programs},
            compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True))
        et = edge.to_executorch(ExecutorchBackendConfig(
            extract_delegate_segments=True,
            do_quant_fusion_and_const_prop=True,
            run_reinplace_pass=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=True),
            emit_mutable_buffer_names=True,
            external_constants=_tag,
        ))
    t_lower = time.perf_counter() - t0 - t_export
    out_dir.mkdir(parents=True, exist_ok=True)
    pte = out_dir / f"{name}.pte"
    tmp = pte.with_name(pte.name + ".tmp")
    with open(tmp, "wb") as f:
        et.write_to_file(f)
    os.replace(tmp, pte)
    et.write_tensor_data_to_file(str(out_dir))
    ptd = out_dir / f"{PTD_TAG}.ptd"
    if not ptd.is_file():
        raise RuntimeError(f"ExecuTorch wrote no {ptd.name} into {out_dir} (found {sorted(os.listdir(out_dir))})")
    for p in (pte, ptd):
        os.chmod(p, 0o644)
    log.info("executorch: export %.1f s, lowering %.1f s; %s %d B, %s %d B", t_export, t_lower, pte.name,
             pte.stat().st_size, ptd.name, ptd.stat().st_size)
    return {"pte": pte.name, "ptd": ptd.name, "export_seconds": round(t_export, 1),
            "lower_seconds": round(t_lower, 1)}
