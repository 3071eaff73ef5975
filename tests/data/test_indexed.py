"""The Megatron .bin/.idx format: round trip, both-way compatibility, corruption refused by name."""
import filecmp
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megalite.data.indexed import IndexedDataset, IndexedDatasetWriter, IndexFileError, optimal_dtype

mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset")

DOCS = [[1, 2, 3], [], [7] * 5, [65000, 0], [4, 5, 6, 7, 8, 9]]


def write(prefix, docs, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)
    return IndexedDataset(prefix)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2**31 - 1), max_size=20), max_size=15))
def test_round_trip_any_documents(tmp_path_factory, docs):
    ds = write(tmp_path_factory.mktemp("rt") / "x", docs, np.int32)
    assert ds.num_documents == len(docs)
    assert [ds.document_tokens(i).tolist() for i in range(len(docs))] == docs
    assert len(ds) == sum(1 for d in docs if d)


def test_slices_and_random_access(tmp_path):
    ds = write(tmp_path / "x", DOCS)
    assert ds[0].tolist() == [1, 2, 3] and ds[-1].tolist() == [4, 5, 6, 7, 8, 9]
    assert ds.get(3, offset=2, length=3).tolist() == [6, 7, 8]
    assert [a.tolist() for a in ds[1:3]] == [[7] * 5, [65000, 0]]
    with pytest.raises(IndexError):
        ds.get(0, offset=2, length=5)


def test_dtype_choice_follows_megatron():
    assert optimal_dtype(32000) is np.uint16 and optimal_dtype(65499) is np.uint16
    assert optimal_dtype(65500) is np.int32 and optimal_dtype(128256) is np.int32


def test_megatron_core_reads_our_files(tmp_path):
    write(tmp_path / "ours", DOCS)
    theirs = mcore.IndexedDataset(str(tmp_path / "ours"))
    assert [theirs[i].tolist() for i in range(len(theirs))] == [d for d in DOCS if d]
    assert theirs.document_indices.tolist() == [0, 1, 1, 2, 3, 4]


def test_we_read_megatron_core_files_and_bytes_are_identical(tmp_path):
    builder = mcore.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for d in DOCS:
        builder.add_document(np.array(d, dtype=np.int64), [len(d)] if d else [])
    builder.finalize(str(tmp_path / "theirs.idx"))
    ours = write(tmp_path / "ours", DOCS)
    read = IndexedDataset(tmp_path / "theirs")
    assert [read.document_tokens(i).tolist() for i in range(read.num_documents)] == DOCS
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(tmp_path / f"theirs{ext}", f"{ours.prefix}{ext}", shallow=False)


def test_interrupted_write_leaves_nothing_readable(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "x", np.uint16) as w:
            w.add_document([1, 2, 3])
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.with_suffix(".idx").write_bytes(b"NOTMAGIC!" + p.with_suffix(".idx").read_bytes()[9:]), "bad magic"),
    (lambda p: p.with_suffix(".idx").write_bytes(p.with_suffix(".idx").read_bytes()[:-8]), "truncated or corrupt"),
    (lambda p: p.with_suffix(".bin").write_bytes(p.with_suffix(".bin").read_bytes()[:-2]), "truncated or mismatched"),
    (lambda p: p.with_suffix(".bin").unlink(), "token file not found"),
    (lambda p: p.with_suffix(".idx").unlink(), "index file not found"),
])
def test_corrupt_pairs_fail_with_file_and_reason(tmp_path, damage, message):
    write(tmp_path / "x", DOCS)
    damage(tmp_path / "x")
    with pytest.raises(IndexFileError, match=message) as err:
        IndexedDataset(tmp_path / "x")
    assert str(tmp_path / "x") in str(err.value)
