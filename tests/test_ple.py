"""ple.bin: streamed out of a table, gathered back through memmaps, equal to the numpy reference dequantization."""

from __future__ import annotations

import numpy as np
import pytest

from edge_gemma.ple import PAGE, ROW_CHUNK, PleTable, write_ple
from edge_gemma.quantize.schemes import Int4Group, Int8PerChannel


def _table(rows, cols, seed=0):
    t = np.random.default_rng(seed).normal(size=(rows, cols)).astype(np.float32)
    t[0] = 0.0  # the padding row is all zeros in Hugging Face's initialisation
    return t


@pytest.mark.parametrize("scheme", [None, Int8PerChannel(), Int4Group(group_size=32)], ids=["float", "int8", "int4"])
def test_write_then_gather_equals_reference(tmp_path, scheme):
    rows, layers, dim = ROW_CHUNK + 37, 3, 64  # more than one chunk, a ragged last chunk
    table = _table(rows, layers * dim)
    stored = {"tensor": table} if scheme is None else scheme.encode(table)

    def read_rows(a, b):
        return {k: v[a:b] for k, v in stored.items()}

    entry = write_ple(tmp_path / "ple.bin", rows=rows, num_layers=layers, dim=dim, scheme=scheme, read_rows=read_rows)
    assert entry["size"] == (tmp_path / "ple.bin").stat().st_size
    assert all(seg["offset"] % PAGE == 0 for seg in entry["segments"].values())
    ple = PleTable(tmp_path / "ple.bin", entry)
    ids = np.array([0, 5, rows - 1, 5, ROW_CHUNK])
    got = ple.gather(ids)
    assert got.shape == (5, layers, dim) and got.dtype == np.float32
    expect = table if scheme is None else scheme.decode(stored, table.shape)
    np.testing.assert_array_equal(got.reshape(5, -1), expect[ids])
    # the stored bytes are exactly the quantizer's (bit-exact), not a re-quantization
    if scheme is not None:
        np.testing.assert_array_equal(np.asarray(ple.maps["qdata"]), stored["qdata"])
    ple.close()


def test_out_of_range_id_and_truncated_file(tmp_path):
    table = _table(64, 2 * 32)
    entry = write_ple(tmp_path / "ple.bin", rows=64, num_layers=2, dim=32, scheme=None,
                      read_rows=lambda a, b: {"tensor": table[a:b]})
    with pytest.raises(ValueError, match="token id 64 is outside the PLE table"):
        PleTable(tmp_path / "ple.bin", entry).gather(np.array([1, 64]))
    with open(tmp_path / "ple.bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match="segment 'tensor' ends at byte"):
        PleTable(tmp_path / "ple.bin", entry)


def test_wrong_row_shape_is_refused(tmp_path):
    with pytest.raises(ValueError, match="qdata rows 0:8 have shape"):
        write_ple(tmp_path / "ple.bin", rows=8, num_layers=1, dim=32, scheme=Int8PerChannel(),
                  read_rows=lambda a, b: {"qdata": np.zeros((b - a, 16), np.int8), "scales": np.ones(b - a, np.float32)})


def test_gather_maps_nothing_and_reads_with_pread(tmp_path):
    """Rows come from os.pread: after gathers the process has no mapping of ple.bin (a mapping faulted in ~540 KiB
    of a hot page cache per 8.75 KiB row on the synthetic E2B), duplicates are read once, a closed table refuses."""
    from edge_gemma.commands.bench import mapped_resident_bytes

    rows, layers, dim = 300, 2, 32
    table = _table(rows, layers * dim)
    scheme = Int4Group(group_size=32)
    stored = scheme.encode(table)
    entry = write_ple(tmp_path / "ple.bin", rows=rows, num_layers=layers, dim=dim, scheme=scheme,
                      read_rows=lambda a, b: {k: v[a:b] for k, v in stored.items()})
    ple = PleTable(tmp_path / "ple.bin", entry)
    ids = np.array([7, 7, 299, 0, 7])
    got = ple.gather(ids)
    np.testing.assert_array_equal(got.reshape(5, -1), scheme.decode(stored, table.shape)[ids])
    assert mapped_resident_bytes(tmp_path / "ple.bin") is None  # not mapped at all
    ple.close()
    with pytest.raises(ValueError, match="closed"):
        ple.gather(np.array([1]))
