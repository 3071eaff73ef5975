"""GPTDataset: packing across documents, epochs, split, index building, cache, multi-rank build."""
import os
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import megalite.data.gpt_dataset as gd
from megalite.data.blend import BlendedDataset
from megalite.data.gpt_dataset import GPTDataset, build_gpt_indices, split_document_ranges
from megalite.data.indexed import IndexedDataset, IndexedDatasetWriter

FAST = settings(max_examples=25, deadline=None)


def write_dataset(prefix, lengths, multi_sequence=False):
    """Document d holds tokens d*1000 + 0, 1, 2, ...: every token names its document and offset."""
    with IndexedDatasetWriter(prefix, np.int32) as w:
        for d, n in enumerate(lengths):
            tokens = d * 1000 + np.arange(n)
            split = [n // 2, n - n // 2] if multi_sequence and n >= 2 else None
            w.add_document(tokens, split)
    return str(prefix)


def stream(ds: GPTDataset) -> np.ndarray:
    """The shuffled document stream, rebuilt independently from the document index."""
    return np.concatenate([ds.indexed.document_tokens(int(d)) for d in ds.document_index]).astype(np.int64)


@FAST
@given(lengths=st.lists(st.integers(0, 30), min_size=1, max_size=20), seq_len=st.integers(1, 16),
       num_samples=st.integers(1, 40), seed=st.integers(0, 2**31), multi=st.booleans())
def test_samples_tile_the_shuffled_document_stream(tmp_path_factory, lengths, seq_len, num_samples, seed, multi):
    if sum(lengths) == 0:
        lengths[0] = 1
    tmp = tmp_path_factory.mktemp("d")
    ds = GPTDataset(write_dataset(tmp / "a", lengths, multi), seq_len, num_samples, seed, cache_dir=str(tmp / "c"))
    assert len(ds) == num_samples
    samples = [ds.packed_sample(j)["tokens"] for j in range(num_samples)]
    assert all(s.dtype == np.int64 and s.shape == (seq_len + 1,) for s in samples)
    joined = np.concatenate([s[:-1] for s in samples] + [samples[-1][-1:]])
    np.testing.assert_array_equal(joined, stream(ds)[:num_samples * seq_len + 1])
    # Every non-empty document once per epoch, empty ones never.
    nonempty = [d for d, n in enumerate(lengths) if n]
    epochs = ds.document_index.reshape(-1, len(nonempty))
    assert all(sorted(row) == nonempty for row in epochs.tolist())
    assert epochs.shape[0] == -(-(num_samples * seq_len + 1) // sum(lengths))  # no more epochs than needed
    # ds[i] is the shuffled sample (no sample twice, shuffled within its epoch); its provenance reads back.
    order = ds.shuffle_index.tolist()
    assert len(set(order)) == num_samples and max(order) < len(ds.sample_index)
    through = [gd.samples_through(e, sum(lengths), seq_len) for e in range(epochs.shape[0] + 1)]
    assert len(ds.sample_index) == through[-1]
    for i, j in enumerate(order):  # sample i is drawn from the epoch it belongs to
        assert sum(t <= i for t in through[1:]) == sum(t <= j for t in through[1:])
    for i in range(num_samples):
        tokens = ds[i]["tokens"]
        np.testing.assert_array_equal(tokens, ds.packed_sample(int(ds.shuffle_index[i]))["tokens"])
        pieces = ds.sample_documents(i)
        assert sum(n for _, _, n in pieces) == seq_len + 1
        assert all(n > 0 and off + n <= lengths[doc] for doc, off, n in pieces)
        np.testing.assert_array_equal(tokens, np.concatenate([doc * 1000 + off + np.arange(n)
                                                              for doc, off, n in pieces]))


@FAST
@given(lengths=st.lists(st.integers(0, 30), min_size=1, max_size=20), seq_len=st.integers(1, 16),
       num_samples=st.integers(0, 60), more=st.integers(0, 200), seed=st.integers(0, 2**31))
def test_the_first_samples_do_not_depend_on_the_total(tmp_path_factory, lengths, seq_len, num_samples, more, seed):
    """Extending a run (more samples) must not reorder the samples a shorter run consumed."""
    lengths[0] = max(lengths[0], 1)
    short = build_gpt_indices(np.arange(len(lengths)), lengths, seq_len, num_samples, seed)
    long = build_gpt_indices(np.arange(len(lengths)), lengths, seq_len, num_samples + more, seed)
    assert len(short["shuffle_index"]) == num_samples
    np.testing.assert_array_equal(long["shuffle_index"][:num_samples], short["shuffle_index"])
    for name in ("document_index", "sample_index"):  # the shorter stream is a prefix of the longer one
        np.testing.assert_array_equal(long[name][:len(short[name])], short[name])


def test_dataset_for_n_samples_is_the_first_n_of_one_for_2n(tmp_path):
    prefix = write_dataset(tmp_path / "a", [5, 0, 9, 3, 12, 7, 1, 30])
    short = GPTDataset(prefix, 4, 40, 3, cache_dir=str(tmp_path / "c"))
    long = GPTDataset(prefix, 4, 80, 3, cache_dir=str(tmp_path / "c"))
    assert short.cache_key != long.cache_key and len(long) == 80
    for i in range(40):
        np.testing.assert_array_equal(short[i]["tokens"], long[i]["tokens"])
        assert short.sample_documents(i) == long.sample_documents(i)


def test_one_epoch_by_default_and_token_coverage(tmp_path):
    lengths = [5, 0, 9, 3, 0, 12, 7]
    ds = GPTDataset(write_dataset(tmp_path / "a", lengths), 4, None, 1, cache_dir=str(tmp_path / "c"))
    assert len(ds) == (sum(lengths) - 1) // 4
    covered = np.concatenate([ds.packed_sample(j)["tokens"][:-1] for j in range(len(ds))])
    assert len(np.unique(covered)) == len(covered) == len(ds) * 4  # no token twice within one epoch


def test_deterministic_for_a_seed_and_different_for_another(tmp_path):
    prefix = write_dataset(tmp_path / "a", list(range(1, 40)))
    a = GPTDataset(prefix, 8, 60, 7, cache_dir=str(tmp_path / "c1"))
    b = GPTDataset(prefix, 8, 60, 7, cache_dir=str(tmp_path / "c2"))
    c = GPTDataset(prefix, 8, 60, 8, cache_dir=str(tmp_path / "c3"))
    for name in gd.INDEX_NAMES:
        np.testing.assert_array_equal(a._arrays[name], b._arrays[name])
    assert not np.array_equal(a.document_index, c.document_index)
    assert not np.array_equal(a.shuffle_index, c.shuffle_index)


def test_empty_documents_never_crash(tmp_path):
    only_empty = write_dataset(tmp_path / "e", [0, 0, 0])
    assert len(GPTDataset(only_empty, 4, None, 1, cache_dir=str(tmp_path / "c"))) == 0
    with pytest.raises(ValueError, match="no tokens"):
        GPTDataset(only_empty, 4, 3, 1, cache_dir=str(tmp_path / "c"))
    ds = GPTDataset(write_dataset(tmp_path / "m", [0, 3, 0, 0, 2, 0]), 4, 10, 1, cache_dir=str(tmp_path / "c"))
    assert all(doc in (1, 4) for i in range(len(ds)) for doc, _, _ in ds.sample_documents(i))


@FAST
@given(weights=st.lists(st.integers(0, 1000), min_size=1, max_size=3).filter(lambda w: sum(w) > 0),
       num_documents=st.integers(0, 5000))
def test_split_ranges_partition_documents_in_proportion(weights, num_documents):
    ranges = split_document_ranges(",".join(map(str, weights)), num_documents)
    bounds = [ranges["train"][0]] + [ranges[s][1] for s in ("train", "valid", "test")]
    assert bounds[0] == 0 and bounds[-1] == num_documents and bounds == sorted(bounds)
    assert all(ranges[a][1] == ranges[b][0] for a, b in (("train", "valid"), ("valid", "test")))
    full = weights + [0] * (3 - len(weights))
    for (start, end), w in zip(ranges.values(), full):
        assert abs((end - start) - w / sum(full) * num_documents) <= 1


@pytest.mark.parametrize("bad", ["", "a,b", "1,2,3,4", "-1,2", "0,0,0", "nan"])
def test_bad_split_is_refused_with_an_example(bad):
    with pytest.raises(ValueError, match="969,30,1"):
        split_document_ranges(bad, 10)


def test_split_datasets_read_only_their_documents(tmp_path):
    prefix = write_dataset(tmp_path / "a", [6] * 100)
    ranges = split_document_ranges("80,15,5", 100)
    assert ranges == {"train": (0, 80), "valid": (80, 95), "test": (95, 100)}
    ds = GPTDataset(prefix, 5, 30, 1, ranges["valid"], cache_dir=str(tmp_path / "c"))
    assert set(ds.document_index.tolist()) == set(range(80, 95))


def test_index_building_on_ten_million_documents():
    rng = np.random.default_rng(0)
    n, seq_len = 10_000_000, 1024
    lengths = rng.integers(0, 120, n)
    start = time.perf_counter()
    idx = build_gpt_indices(np.arange(n), lengths, seq_len, None, 3)
    print(f"\nbuilt indices for {n} documents in {time.perf_counter() - start:.2f} s")
    nonempty = np.flatnonzero(lengths)
    doc_index, sample_index = idx["document_index"], idx["sample_index"]
    assert len(doc_index) == len(nonempty) and np.all(np.bincount(doc_index, minlength=n)[nonempty] == 1)
    num_samples = (int(lengths.sum()) - 1) // seq_len
    assert len(sample_index) == len(idx["shuffle_index"]) == num_samples
    ends = np.cumsum(lengths[doc_index])
    probe = rng.integers(0, num_samples, 1000)  # spot-check sample starts against the stream
    pos, off = sample_index[probe, 0], sample_index[probe, 1]
    assert np.all(off >= 0) and np.all(off < lengths[doc_index[pos]])
    np.testing.assert_array_equal(np.where(pos > 0, ends[pos - 1], 0) + off, probe * seq_len)


def test_second_build_loads_from_cache_and_parameters_change_the_key(tmp_path, monkeypatch):
    prefix = write_dataset(tmp_path / "a", [7] * 30)
    cache = str(tmp_path / "c")
    first = GPTDataset(prefix, 8, 20, 1, cache_dir=cache)
    assert not [f for f in os.listdir(cache) if f.endswith(".tmp")]
    real, calls = gd.build_gpt_indices, []

    def refuse(*args, **kwargs):
        raise AssertionError("rebuilt although the cache holds these indices")

    monkeypatch.setattr(gd, "build_gpt_indices", refuse)
    again = GPTDataset(prefix, 8, 20, 1, cache_dir=cache)
    assert again.cache_key == first.cache_key
    np.testing.assert_array_equal(again[3]["tokens"], first[3]["tokens"])
    monkeypatch.setattr(gd, "build_gpt_indices", lambda *a, **k: calls.append(1) or real(*a, **k))
    keys = {first.cache_key}
    for args in ((9, 20, 1, None), (8, 21, 1, None), (8, 20, 2, None), (8, 20, 1, (0, 29))):
        keys.add(GPTDataset(prefix, *args, cache_dir=cache).cache_key)
    write_dataset(tmp_path / "a", [7] * 31)  # the data changed: its .idx size and mtime change the key
    keys.add(GPTDataset(prefix, 8, 20, 1, cache_dir=cache).cache_key)
    assert len(keys) == 6 and len(calls) == 5


def _build_on_ranks(prefix, cache):
    import megalite.data.gpt_dataset as mod

    calls = []
    real = mod.build_gpt_indices
    mod.build_gpt_indices = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        ds = GPTDataset(prefix, 8, 40, 5, cache_dir=cache)
        blend = BlendedDataset([ds, ds], [1, 2], 30)
        samples = [ds[i]["tokens"] for i in range(len(ds))] + [blend[k]["tokens"] for k in range(30)]
        return len(calls), np.stack(samples)
    finally:
        mod.build_gpt_indices = real


def test_rank_zero_builds_and_rank_one_loads(tmp_path, spawn):
    prefix = write_dataset(tmp_path / "a", list(range(3, 40)))
    (calls0, samples0), (calls1, samples1) = spawn(_build_on_ranks, 2, prefix, str(tmp_path / "c"))
    assert (calls0, calls1) == (1, 0)
    np.testing.assert_array_equal(samples0, samples1)
    assert IndexedDataset(prefix).num_documents == 37
