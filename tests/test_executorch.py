"""ExecuTorch pieces that need no lowering (the end-to-end tests are in tests/test_executorch_e2e.py).

* The torchao tensors the exporter builds hold the checkpoint's integers bit-exactly (codes and scales back to the
  stored bytes): nothing is re-quantized.
* `runtimes/executorch.py` imports no torch at import time.
* The XNNPACK emulation (`export/executorch/reference.py`): the per-token activation quantization follows XNNPACK's
  recipe, and the emulated linear equals dequantized activations times dequantized weights.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("executorch")
pytest.importorskip("torchao")

from edge_gemma.export.executorch.model import load_et_model, stored_from_intx  # noqa: E402
from edge_gemma.quantize.load import QuantizedCheckpoint  # noqa: E402
from edge_gemma.quantize.stream import quantize_checkpoint  # noqa: E402

from paths import DEFAULT, REPO  # noqa: E402
HELDOUT = REPO / "edge_gemma" / "data" / "fidelity_heldout.txt"
CONTEXT_FP32, CHUNK = 96, 16
CONTEXT_Q, N_TOKENS = 264, 256


@pytest.fixture(scope="session")
def quantized_default(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("et_q")
    for recipe in ("int4", "int8"):
        quantize_checkpoint(DEFAULT, recipe, root / recipe, progress=False)
    return {recipe: root / recipe for recipe in ("int4", "int8")}



@pytest.mark.parametrize("recipe", ["int4", "int8"])
def test_torchao_tensors_hold_the_checkpoint_integers(recipe, quantized_default):
    em = load_et_model(quantized_default[recipe], context=8, text_only=True)
    lm = em.model.language_model
    checked = 0
    with QuantizedCheckpoint(quantized_default[recipe]) as qc:
        targets = [(f"model.language_model.{n}.weight", m.weight) for n, m in lm.named_modules()
                   if isinstance(m, torch.nn.Linear) and n != "export_head"]
        targets += [("model.language_model.embed_tokens.weight", em.table.weight),
                    ("model.language_model.embed_tokens.weight", em.head.weight)]
        for name, w in targets:
            scheme = qc.schemes[name]
            if scheme is None:
                continue
            assert type(w).__name__ == "IntxUnpackedToInt8Tensor", name
            assert not torch.any(w.zero_point), name
            back = stored_from_intx(scheme, w.qdata.numpy(), w.scale.numpy())
            for key, value in qc.stored(name).items():
                assert back[key].tobytes() == np.ascontiguousarray(value).tobytes(), (name, key)
            checked += 1
    assert checked >= 3 * len(lm.layers)


def test_runtime_module_does_not_import_torch_at_import():
    code = "import sys, edge_gemma.runtimes.executorch; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_xnnpack_row_quantization_follows_xnnpack_recipe():
    """XNNPACK's qd8 parameters worked by hand (quantization.h): range widened to include 0, multiplier 255/range,
    zero point from the smaller-error end, rint; codes = rint(x * (1 / (1 / m))) + zp, clamped."""
    from edge_gemma.export.executorch.reference import xnnpack_quantize_rows

    x = torch.tensor([[-1.0, 0.5, 2.0], [0.25, 1.0, 0.0], [0.0, 0.0, 0.0]])
    codes, zp, scale = xnnpack_quantize_rows(x)
    f = np.float32
    # row 0: range [-1, 2], m = 255 / 3 = 85; zero point -128 + 85 = -43 (the min end's error is the smaller)
    m0 = f(1) / (f(1) / f(85))
    assert zp[:, 0].tolist() == [-43.0, -128.0, 127.0]
    assert codes[0].tolist() == [-128.0, float(np.rint(f(0.5) * m0)) - 43.0, 127.0]
    # row 1: range [0, 1], m = 255, zero point -128; 0.25 * 255 = 63.75 -> 64
    assert codes[1].tolist() == [-64.0, 127.0, -128.0]
    assert scale[1, 0] == f(1) / f(255)
    # row 2: all zeros: multiplier 1, zero point from the max end (the errors sum to -1, not > 0)
    assert scale[2, 0] == 1.0 and codes[2].tolist() == [127.0] * 3


def test_xnnpack_inline_packing_multiplier_is_m_and_the_convert_operator_uses_one_over_one_over_m():
    """XNNPACK's two multipliers, worked in float32 with numpy: the convert operator quantizes with 1 / (1 / m), the
    GEMM that packs its own input with m = 255 / range. They differ by one float32 step for some ranges, and then a
    value close to a rounding boundary gets different codes; the linears named in INLINE_LHS_PACKED use m."""
    from edge_gemma.export.executorch.reference import (
        INLINE_LHS_PACKED,
        XnnpackDynamicQuantLinear,
        emulate_xnnpack,
        xnnpack_quantize_rows,
    )

    f = np.float32

    def straddling():  # a range where the two multipliers differ, and a value they round to different codes
        for span in np.linspace(1.0, 3.0, 2001, dtype=np.float32):
            m = f(255) / span
            m_conv = f(1) / (f(1) / m)
            for k in (40.5, 41.5, 100.5):
                near = f(k) / m
                xs = near + np.arange(-200, 200, dtype=np.float32) * np.spacing(near)
                differ = np.nonzero(np.rint(xs * m) != np.rint(xs * m_conv))[0]
                if m != m_conv and differ.size:
                    return span, m, m_conv, xs[differ[0]]
        raise AssertionError("no range where 1 / (1 / m) != m")

    span, m, m_conv, x = straddling()
    row = torch.tensor([[0.0, float(x), float(span)]])  # range [0, span]: zero point -128
    conv, zp, _ = xnnpack_quantize_rows(row)
    inline, zp2, _ = xnnpack_quantize_rows(row, inline_lhs_packing=True)
    assert zp.item() == zp2.item() == -128.0
    assert conv[0, 1].item() == float(np.rint(x * m_conv)) - 128.0
    assert inline[0, 1].item() == float(np.rint(x * m)) - 128.0
    assert inline[0, 1] != conv[0, 1]
    # emulate_xnnpack marks exactly the linears named in INLINE_LHS_PACKED
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8TensorActivationQuantization as ActQ,
    )

    def qlinear():
        lin = torch.nn.Linear(32, 4, bias=False)
        w = IntxUnpackedToInt8Tensor(torch.ones(4, 32, dtype=torch.int8), torch.ones(4, 1), torch.zeros(4, 1,
                                     dtype=torch.int8), torch.int8, (1, 32), torch.float32, ActQ.INT8_ASYM_PER_TOKEN)
        lin.weight = torch.nn.Parameter(w, requires_grad=False)
        return lin

    model = torch.nn.Module()
    model.lm = torch.nn.Module()
    model.lm.per_layer_model_projection = qlinear()
    model.lm.o_proj = qlinear()
    emulate_xnnpack(model)
    assert isinstance(model.lm.o_proj, XnnpackDynamicQuantLinear)
    assert model.lm.per_layer_model_projection.inline_lhs_packing and not model.lm.o_proj.inline_lhs_packing
    assert INLINE_LHS_PACKED == ("per_layer_model_projection",)


def test_xnnpack_linear_is_dequantized_activations_times_dequantized_weights():
    from edge_gemma.export.executorch.reference import XnnpackDynamicQuantLinear, xnnpack_quantize_rows

    g = torch.Generator().manual_seed(0)
    w = torch.randint(-8, 8, (5, 64), generator=g, dtype=torch.int8)
    s = torch.rand(5, 2, generator=g) * 0.1 + 0.01
    x = torch.randn(3, 64, generator=g)
    y = XnnpackDynamicQuantLinear(w, s, 32, None)(x).double()
    codes, zp, a_scale = xnnpack_quantize_rows(x)
    a = (codes - zp).double() * a_scale.double()
    wd = w.double() * s.double().repeat_interleave(32, dim=1)
    torch.testing.assert_close(y, a @ wd.T, rtol=1e-5, atol=1e-6)


def test_lowering_keeps_one_copy_of_each_serialized_constant_and_the_large_ones_on_disk(tmp_path):
    """`_spill_serialized_constants`: two named-data stores (two partitions / methods) handed equal bytes under one key
    hold the SAME object (the second copy is dropped); bytes of at least `SPILL_BYTES` are held as a file with the
    same content; different bytes are kept apart and ExecuTorch still refuses one key with different data; on exit
    the files are gone and the patch is undone."""
    from executorch.exir._serialize._cord import FileBackedData
    from executorch.exir._serialize._named_data_store import NamedDataStore

    from edge_gemma.export.executorch.lower import SPILL_BYTES, _spill_serialized_constants

    small = np.arange(SPILL_BYTES // 8, dtype=np.int32).tobytes()
    large = np.arange(SPILL_BYTES // 2, dtype=np.int32).tobytes()
    original = NamedDataStore.add_named_data
    with _spill_serialized_constants(tmp_path):
        a, b = NamedDataStore(), NamedDataStore()
        for key, payload in (("s", small), ("l", large)):
            a.add_named_data(key, bytes(bytearray(payload)), external_tag="model")
            b.add_named_data(key, bytes(bytearray(payload)), external_tag="model")
        assert a.buffers[0] is b.buffers[0] and a.buffers[0] == small
        assert a.buffers[1] is b.buffers[1] and isinstance(a.buffers[1], FileBackedData)
        assert a.buffers[1].to_bytes() == large
        spilled = list(tmp_path.rglob("*.bin"))
        assert len(spilled) == 1 and spilled[0].stat().st_size == len(large)
        b.add_named_data("v", bytes(bytearray(small[::-1])), external_tag="model")
        assert b.buffers[2] is not b.buffers[0] and b.buffers[2] == small[::-1]
        for key, payload in (("s", small), ("l", large)):
            with pytest.raises(ValueError, match="different data"):
                a.add_named_data(key, bytes(len(payload)), external_tag="model")
    assert NamedDataStore.add_named_data is original
    assert list(tmp_path.iterdir()) == []
    c, d = NamedDataStore(), NamedDataStore()
    c.add_named_data("w", bytes(bytearray(large)))
    d.add_named_data("w", bytes(bytearray(large)))
    assert c.buffers[0] is not d.buffers[0] and isinstance(c.buffers[0], bytes)  # without the patch: a copy each


class _QuantizedPair(torch.nn.Module):
    """Two linears over our own int4 / int8 integers (`intx_weight`, 8da4w / 8da8w), for methods that share them."""

    def __init__(self):
        from edge_gemma.export.executorch.model import intx_weight
        from edge_gemma.quantize.schemes import Int4Group, Int8PerChannel

        super().__init__()
        rng = np.random.default_rng(0)
        self.up, self.down = torch.nn.Linear(128, 256, bias=False), torch.nn.Linear(256, 64, bias=False)
        for layer, scheme in ((self.up, Int4Group(group_size=32)), (self.down, Int8PerChannel())):
            shape = tuple(layer.weight.shape)
            stored = scheme.encode((rng.standard_normal(shape) / shape[1] ** 0.5).astype(np.float32))
            layer.weight = torch.nn.Parameter(intx_weight(scheme, stored, shape, dynamic_activations=True),
                                              requires_grad=False)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def test_lowering_serializes_each_shared_quantized_weight_once_and_frees_its_codes(tmp_path, monkeypatch):
    """`_serialize_each_weight_once`: two methods delegating the same int4 and int8 linears (as prefill and decode
    do) make XNNPACK serialize each codes tensor ONCE (counted at XNNPACK's own serializer, which always finds the
    codes still there), the codes are freed, and the written `.pte` and `.ptd` are byte for byte those of a lowering
    without this patch and `_spill_serialized_constants` (the spill threshold lowered so the weights go to disk)."""
    from executorch.backends.xnnpack.operators.node_visitor import NodeVisitor
    from executorch.backends.xnnpack.utils.utils import get_param_tensor, is_param_node

    from edge_gemma.export.executorch import lower as executorch_lower

    serialized = []
    xnnpack_serialize = NodeVisitor.get_serialized_buffer_index

    def counting(self, tensor, xnn_graph, vals_to_ids, convert_to_nhwc, swap, quant_params, *args, **kwargs):
        if quant_params is not None and is_param_node(self.exported_program, quant_params.q_input):
            codes = get_param_tensor(self.exported_program, quant_params.q_input)
            assert codes.dtype == torch.int8 and codes.untyped_storage().nbytes() == codes.numel()  # not freed yet
            serialized.append(quant_params.q_input.name)
        return xnnpack_serialize(self, tensor, xnn_graph, vals_to_ids, convert_to_nhwc, swap, quant_params, *args,
                                 **kwargs)

    def lower(out):
        torch.manual_seed(0)
        net = _QuantizedPair().eval()
        x = torch.randn(1, 3, 128)
        methods = {"prefill": (net, (x,), ({1: torch.export.Dim("seq", min=1, max=8)},)),
                   "decode": (net, (x[:, :1],), None)}
        executorch_lower.lower_program(methods, out, precise=True)
        return net

    monkeypatch.setattr(NodeVisitor, "get_serialized_buffer_index", counting)
    monkeypatch.setattr(executorch_lower, "SPILL_BYTES", 1024)
    net = lower(tmp_path / "ours")
    ours = list(serialized)
    assert net.up.weight.qdata.untyped_storage().nbytes() == net.down.weight.qdata.untyped_storage().nbytes() == 0

    @contextlib.contextmanager
    def unpatched(*args):
        yield {}

    serialized.clear()
    monkeypatch.setattr(executorch_lower, "_serialize_each_weight_once", unpatched)
    monkeypatch.setattr(executorch_lower, "_spill_serialized_constants", unpatched)
    lower(tmp_path / "plain")
    assert len(ours) == 2 and len(serialized) == 4  # two codes tensors, serialized once each instead of per method
    for name in ("model.pte", "model.ptd"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["model.ptd", "model.pte"]  # spill folder gone


def _branchy_graph(width: int = 3, depth: int = 40):
    """An fx graph with a residual stream, fan-out and joins (the shape of a decoder's dependency structure)."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    side = graph.placeholder("side")  # joins late: its downstream set is small
    for d in range(depth):
        branches = [graph.call_function(torch.tanh if (d + b) % 2 else torch.sin, (x,)) for b in range(width)]
        total = branches[0]
        for b in branches[1:]:
            total = graph.call_function(torch.add, (total, b))
        x = graph.call_function(torch.add, (x, total))
        if d == depth - 5:
            x = graph.call_function(torch.mul, (x, side))
    graph.call_function(torch.neg, (branches[0],))  # a dead end
    graph.output(x)
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def test_compact_dependency_view_answers_what_the_partitioners_own_views_answer():
    """`_CompactDependencyViewer` (bitmasks) against the two originals it replaces, node by node: the same transitive
    downstream sets (torch.fx and ExecuTorch) and upstream sets (ExecuTorch), the same membership answers, also for a
    node from another graph; and it holds far less (tracemalloc, deterministic)."""
    import tracemalloc

    from executorch.exir.backend.canonical_partitioners import group_partitioner
    from torch.fx.passes.infra import partitioner

    from edge_gemma.export.executorch.lower import _CompactDependencyViewer

    gm = _branchy_graph()
    ours, fx_view, et_view = (_CompactDependencyViewer(gm), partitioner._DependencyViewer(gm),
                              group_partitioner._DependencyViewer(gm))
    nodes = list(gm.graph.nodes)
    for node in nodes:
        down = ours.downstreams_of(node)
        assert set(down) == fx_view.downstreams_of(node) == et_view.downstreams_of(node), node
        assert len(down) == len(fx_view.downstreams_of(node))
        assert set(ours.upstreams_of(node)) == et_view.upstreams_of(node), node
        assert all((other in down) == (other in fx_view.downstreams_of(node)) for other in nodes)
    stranger = next(iter(_branchy_graph(1, 2).graph.nodes))
    assert set(ours.downstreams_of(stranger)) == set() and stranger not in ours.downstreams_of(nodes[0])
    assert len(ours.downstreams_of(nodes[0])) > len(nodes) // 2  # the graph does have large closures

    big = _branchy_graph(width=4, depth=250)  # ~2,500 nodes
    sizes = []
    for viewer in (partitioner._DependencyViewer, _CompactDependencyViewer):
        tracemalloc.start()
        kept = viewer(big)
        sizes.append(tracemalloc.get_traced_memory()[0])
        tracemalloc.stop()
        del kept
    assert sizes[1] * 20 < sizes[0], sizes


def test_compact_dependency_views_leave_the_xnnpack_partitions_unchanged():
    """Lowering a small module with linears and transcendental ops (left out of XNNPACK in precise mode: several
    partitions) gives the same delegates, node for node, with and without `_compact_dependency_views`; the patch is
    undone on exit."""
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from torch.fx.passes.infra import partitioner

    from edge_gemma.export.executorch.lower import _compact_dependency_views, _partitioners

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (torch.nn.Linear(16, 16) for _ in range(3))

        def forward(self, x):
            for _ in range(3):
                h = torch.tanh(self.a(x)) * self.b(x)
                x = x + self.c(torch.nn.functional.gelu(h, approximate="tanh")).softmax(-1)
            return x

    torch.manual_seed(0)
    module, args = Block().eval(), (torch.randn(2, 16),)

    def lowered():
        ep = torch.export.export(module, args, strict=False)
        edge = to_edge_transform_and_lower(ep, partitioner=_partitioners(precise=True),
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False))
        gm = edge.exported_program().graph_module
        subgraphs = [str(getattr(gm, n.target).original_module.graph) for n in gm.graph.nodes
                     if n.op == "get_attr" and n.target.startswith("lowered_module")]
        return str(gm.graph), subgraphs

    original = partitioner._DependencyViewer
    plain = lowered()
    with _compact_dependency_views():
        assert partitioner._DependencyViewer is not original
        compact = lowered()
    assert partitioner._DependencyViewer is original
    assert len(plain[1]) > 1 and compact == plain


def test_lowering_frees_the_delegated_weights_and_the_program_still_computes_the_eager_output(tmp_path):
    """`lower_program` releases the weights only XNNPACK delegates hold (`release_delegated_weights`): the linears'
    weights are freed in the module handed in, the embedding table (a portable op's constant) is kept, and the
    written `.pte` + `.ptd` still compute what the module computed before lowering."""
    from executorch.runtime import Runtime

    from edge_gemma.export.executorch.lower import lower_program

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Embedding(64, 32)
            self.up, self.down = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

        def forward(self, ids):
            return self.down(torch.relu(self.up(self.table(ids))))

    torch.manual_seed(0)
    net, ids = Net().eval(), torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    with torch.no_grad():
        expected = net(ids)
    lower_program({"forward": (net, (ids,), None)}, tmp_path, precise=True)
    assert net.up.weight.untyped_storage().nbytes() == 0 and net.down.weight.untyped_storage().nbytes() == 0
    assert net.table.weight.untyped_storage().nbytes() == 64 * 32 * 4
    program = Runtime.get().load_program(str(tmp_path / "model.pte"), data_path=str(tmp_path / "model.ptd"))
    (got,) = program.load_method("forward").execute([ids])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_backend_turns_on_xnnpacks_weight_cache():
    """`runtimes.executorch._enable_xnnpack_weight_cache` sets the XNNPACK backend option through the runtime
    library's `set_option` and reads it back with `get_option` (the structure layout is ExecuTorch's C++ one: a wrong
    layout reads back something else). With the cache, prefill and decode share one packed copy of each weight."""
    from edge_gemma.runtimes.executorch import _enable_xnnpack_weight_cache

    assert _enable_xnnpack_weight_cache(False) is True  # read back: off
    assert _enable_xnnpack_weight_cache(True) is True  # read back: on
