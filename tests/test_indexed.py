"""MMIDIDX indexed datasets: byte layout against a hand-written struct.pack reference, round trips, errors."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from engram_pretrain.data.indexed import (
    IndexedDataset,
    IndexedDatasetBuilder,
    best_fitting_dtype,
    is_complete,
)


def reference_index_bytes(docs: list[list[int]], code: int, itemsize: int) -> bytes:
    """The Megatron-Core MMIDIDX index, written field by field with struct (independent of the code)."""
    out = b"MMIDIDX\x00\x00"
    out += struct.pack("<Q", 1)
    out += struct.pack("<B", code)
    out += struct.pack("<Q", len(docs))
    out += struct.pack("<Q", len(docs) + 1)
    for d in docs:
        out += struct.pack("<i", len(d))
    pos = 0
    for d in docs:
        out += struct.pack("<q", pos)
        pos += len(d) * itemsize
    for k in range(len(docs) + 1):
        out += struct.pack("<q", k)
    return out


DOCS = [[5, 6, 7, 0], [1, 0], [65000, 3, 2, 9, 0], [0]]


@pytest.mark.parametrize(("dtype", "code", "fmt"), [(np.uint16, 8, "<H"), (np.int32, 4, "<i")])
def test_byte_layout_matches_megatron(tmp_path, dtype, code, fmt):
    prefix = tmp_path / "shard"
    b = IndexedDatasetBuilder(prefix, dtype)
    for d in DOCS:
        b.add_document(d)
    assert not is_complete(prefix)
    b.finalize()
    assert is_complete(prefix)
    itemsize = struct.calcsize(fmt)
    assert (tmp_path / "shard.idx").read_bytes() == reference_index_bytes(DOCS, code, itemsize)
    expected_bin = b"".join(struct.pack(fmt, t) for d in DOCS for t in d)
    assert (tmp_path / "shard.bin").read_bytes() == expected_bin
    assert not list(tmp_path.glob("*.tmp"))


def test_reads_independently_written_file(tmp_path):
    """A dataset written with struct only (as Megatron/GPT-NeoX would) reads back with our reader."""
    docs = [[3, 1, 4, 1, 5], [9, 2, 6], [], [5, 3, 5, 8, 9, 7]]
    prefix = tmp_path / "foreign"
    (tmp_path / "foreign.idx").write_bytes(reference_index_bytes(docs, 4, 4))
    (tmp_path / "foreign.bin").write_bytes(b"".join(struct.pack("<i", t) for d in docs for t in d))
    ds = IndexedDataset(prefix)
    assert len(ds) == len(docs)
    assert ds.dtype == np.dtype(np.int32)
    assert ds.num_tokens == sum(len(d) for d in docs)
    for i, d in enumerate(docs):
        assert ds[i].tolist() == d
    assert ds.get(3, offset=2, length=3).tolist() == docs[3][2:5]
    assert ds.get(0, offset=1).tolist() == docs[0][1:]
    assert ds.document_indices.tolist() == list(range(len(docs) + 1))
    assert ds.sizes.dtype == np.int32 and ds.sizes.tolist() == [len(d) for d in docs]
    with pytest.raises(IndexError):
        ds.get(1, offset=2, length=5)
    with pytest.raises(IndexError):
        ds[len(docs)]


def test_round_trip_random(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50000, size=int(rng.integers(0, 300))) for _ in range(200)]
    with IndexedDatasetBuilder(tmp_path / "rt", np.uint16) as b:
        for d in docs:
            b.add_document(d)
    ds = IndexedDataset(tmp_path / "rt")
    assert len(ds) == 200
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    np.testing.assert_array_equal(ds.tokens(), np.concatenate(docs))


def test_abort_leaves_nothing(tmp_path):
    b = IndexedDatasetBuilder(tmp_path / "x", np.uint16)
    b.add_document([1, 2, 3])
    b.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        b.add_document([1])


def test_context_manager_aborts_on_error(tmp_path):
    with pytest.raises(KeyError), IndexedDatasetBuilder(tmp_path / "x", np.uint16) as b:
        b.add_document([1])
        raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []


def test_out_of_range_tokens_rejected(tmp_path):
    b = IndexedDatasetBuilder(tmp_path / "x", np.uint16)
    with pytest.raises(ValueError, match="do not fit"):
        b.add_document([70000])
    b.abort()


def test_errors_name_the_path(tmp_path):
    with IndexedDatasetBuilder(tmp_path / "ok", np.uint16) as b:
        b.add_document([1, 2, 3])
        b.add_document([4, 5])
    good = (tmp_path / "ok.idx").read_bytes()

    (tmp_path / "bad.bin").write_bytes((tmp_path / "ok.bin").read_bytes())
    (tmp_path / "bad.idx").write_bytes(b"NOTMAGIC!" + good[9:])
    with pytest.raises(ValueError, match=r"bad\.idx.*bad magic"):
        IndexedDataset(tmp_path / "bad")

    (tmp_path / "bad.idx").write_bytes(good[:9] + struct.pack("<Q", 2) + good[17:])
    with pytest.raises(ValueError, match="version"):
        IndexedDataset(tmp_path / "bad")

    (tmp_path / "bad.idx").write_bytes(good[:-5])
    with pytest.raises(ValueError, match=r"bad\.idx.*truncated"):
        IndexedDataset(tmp_path / "bad")

    (tmp_path / "bad.idx").write_bytes(good[:10])
    with pytest.raises(ValueError, match="truncated"):
        IndexedDataset(tmp_path / "bad")

    (tmp_path / "bad.idx").write_bytes(good)
    (tmp_path / "bad.bin").write_bytes((tmp_path / "ok.bin").read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"bad\.bin.*truncated"):
        IndexedDataset(tmp_path / "bad")

    with pytest.raises(ValueError, match="does not exist"):
        IndexedDataset(tmp_path / "missing")


def test_best_fitting_dtype():
    assert best_fitting_dtype(4096) == np.uint16
    assert best_fitting_dtype(65499) == np.uint16
    assert best_fitting_dtype(65500) == np.int32
    assert best_fitting_dtype(129280) == np.int32
