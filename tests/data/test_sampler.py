"""The batch sampler (dp-invariant global order, exact resume) and the loader glue."""
import pickle

import numpy as np
import pytest
import torch

from megalite.config import DataConfig
from megalite.data.indexed import IndexedDatasetWriter
from megalite.data.loader import build_dataloader, build_datasets
from megalite.data.sampler import DistributedBatchSampler

GB = 16


def rank_batches(total, mbs, dp, consumed=0):
    return [list(DistributedBatchSampler(total, GB, mbs, r, dp, consumed)) for r in range(dp)]


@pytest.mark.parametrize("dp", [1, 2, 4])
@pytest.mark.parametrize("mbs", [1, 2, 4])
def test_ranks_together_read_each_global_batch(dp, mbs):
    total = 5 * GB + 7  # the trailing partial global batch is never read
    per_rank = rank_batches(total, mbs, dp)
    steps = GB // (mbs * dp)
    for r, batches in enumerate(per_rank):
        assert len(batches) == 5 * steps == len(DistributedBatchSampler(total, GB, mbs, r, dp))
        assert all(len(b) == mbs for b in batches)
    for g in range(5):
        union = sorted(i for r in range(dp) for b in per_rank[r][g * steps:(g + 1) * steps] for i in b)
        assert union == list(range(g * GB, (g + 1) * GB))
        # Each rank's share is one contiguous slice of the global batch.
        for r in range(dp):
            mine = [i for b in per_rank[r][g * steps:(g + 1) * steps] for i in b]
            assert mine == list(range(g * GB + r * GB // dp, g * GB + (r + 1) * GB // dp))


@pytest.mark.parametrize("dp,mbs", [(1, 1), (2, 2), (4, 1), (2, 8)])
def test_resume_continues_exactly(dp, mbs):
    total = 6 * GB
    straight = rank_batches(total, mbs, dp)
    step = mbs * dp
    for consumed in range(0, total + 1, step):
        resumed = rank_batches(total, mbs, dp, consumed)
        for r in range(dp):
            assert resumed[r] == straight[r][consumed // step:]


def test_invalid_sizes_are_rejected_with_the_rule():
    with pytest.raises(ValueError, match=r"divisible by micro_batch_size \* dp_size = 3\*2 = 6"):
        DistributedBatchSampler(100, 16, 3, 0, 2)
    with pytest.raises(ValueError, match="dp_rank=2 must be < dp_size=2"):
        DistributedBatchSampler(100, 16, 2, 2, 2)
    with pytest.raises(ValueError, match="consumed_samples=6 must be a multiple"):
        DistributedBatchSampler(100, 16, 2, 0, 2, consumed_samples=6)
    with pytest.raises(ValueError, match="exceeds"):
        DistributedBatchSampler(100, 16, 2, 0, 2, consumed_samples=104)
    with pytest.raises(ValueError, match="micro_batch_size=0"):
        DistributedBatchSampler(100, 16, 0, 0, 2)


@pytest.fixture
def data_cfg(tmp_path):
    prefixes = []
    for name, n_docs, base in (("a", 60, 0), ("b", 3, 50_000)):
        prefix = str(tmp_path / name)
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            for d in range(n_docs):
                w.add_document(base + d * 100 + np.arange(5 + d % 13))
        prefixes.append(prefix)
    return DataConfig(path=["0.4", prefixes[0], "0.6", prefixes[1]], split="90,10,0", seq_len=8, seed=3,
                      cache_dir=str(tmp_path / "cache"))


def test_build_datasets_and_dataloader(data_cfg):
    with pytest.warns(UserWarning, match="no documents of"):  # dataset b (3 docs) has none in 'valid'
        ds = build_datasets(data_cfg, {"train": 64, "valid": 32, "test": 16})
    assert ds["test"] is None and len(ds["train"]) == 64 and len(ds["valid"]) == 32
    assert {p for k in range(32) for p, *_ in ds["valid"].sample_documents(k)} == {data_cfg.path[1]}
    with pytest.raises(ValueError, match="no dataset"):
        build_dataloader(ds["test"], 16, 2)
    loaders = [build_dataloader(ds["train"], 16, 2, r, 2, consumed_samples=16) for r in range(2)]
    batches = [list(loader) for loader in loaders]
    assert len(batches[0]) == 3 * 4
    first = batches[1][0]["tokens"]
    assert first.dtype == torch.long and first.shape == (2, 9)
    expected = np.stack([ds["train"][k]["tokens"] for k in (24, 25)])  # rank 1's slice of global batch 1
    np.testing.assert_array_equal(first.numpy(), expected)
    read = sorted(k for r in range(2) for b in batches[r] for k in b["tokens"][:, 0].tolist())
    assert read == sorted(int(ds["train"][k]["tokens"][0]) for k in range(16, 64))


def test_datasets_pickle_small_for_loader_workers(data_cfg):
    ds = build_datasets(data_cfg, {"train": 64})["train"]
    blob = pickle.dumps(ds)
    clone = pickle.loads(blob)
    assert len(blob) < 20_000  # memory maps are reopened, not copied
    for k in (0, 17, 63):
        np.testing.assert_array_equal(clone[k]["tokens"], ds[k]["tokens"])
