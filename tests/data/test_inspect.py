"""megalite.data.inspect (and `megalite inspect`) names the documents of a global batch, decoded or as ids."""
import numpy as np
import pytest

from megalite.cli.data import inspect_main
from megalite.config import DataConfig, load_config
from megalite.data.indexed import IndexedDataset, IndexedDatasetWriter
from megalite.data.inspect import inspect_batch, run_settings
from megalite.data.loader import build_datasets

WORDS = ["<unk>", "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota"]


@pytest.fixture
def corpus(tmp_path):
    """Two datasets whose documents start with a word naming dataset and document: ids 1.. / 5.."""
    prefixes = []
    for name, first_word in (("a", 1), ("b", 5)):
        prefix = str(tmp_path / name)
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            for d in range(30):
                w.add_document([first_word + d % 4] + [9] * (3 + d % 5))
        prefixes.append(prefix)
    return prefixes


def hf_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return str(path)


def test_inspect_names_the_documents_of_a_batch(corpus, tmp_path):
    path = ["0.5", corpus[0], "0.5", corpus[1]]
    cache = str(tmp_path / "cache")
    pieces = inspect_batch(path, seq_len=6, global_batch_size=4, batch=2, seed=9, train_samples=40,
                           cache_dir=cache)
    ds = build_datasets(DataConfig(path=path, seq_len=6, seed=9, cache_dir=cache), {"train": 40})["train"]
    expected = [(k, *piece) for k in range(8, 12) for piece in ds.sample_documents(k)]
    assert [(p.sample, p.prefix, p.document, p.offset, p.num_tokens) for p in pieces] == expected
    assert {p.position for p in pieces} == {0, 1, 2, 3}
    for p in pieces:  # without a tokenizer: the piece's first token ids
        tokens = ds.datasets[corpus.index(p.prefix)].indexed.document_tokens(p.document)
        assert p.text.split() == [str(t) for t in tokens[p.offset:p.offset + min(p.num_tokens, 8)]]


def test_inspect_cli_decodes_with_a_tokenizer(corpus, tmp_path, capsys):
    model = hf_tokenizer(tmp_path / "tokenizer.json")
    assert inspect_main(["--data-path", corpus[1], "--seq-len", "5", "--global-batch-size", "2", "--batch", "0",
                         "--cache-dir", str(tmp_path / "cache"), "--tokenizer-type", "HuggingFaceTokenizer",
                         "--tokenizer-model", model, "--words", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["sample", "pos", "dataset"]
    pieces = inspect_batch([corpus[1]], 5, 2, 0, cache_dir=str(tmp_path / "cache"))
    assert len(lines) == 1 + len(pieces)
    for line, p in zip(lines[1:], pieces):
        assert line.split()[:6] == [str(p.sample), str(p.position), "b", str(p.document), str(p.offset),
                                    str(p.num_tokens)]
        words = line.split("'")[1].split()
        ids = [WORDS.index(w) for w in words]
        doc_first = 5 + p.document % 4
        assert ids == ([doc_first] + [9] * 7)[p.offset:p.offset + len(ids)] and 0 < len(ids) <= 3


def test_inspect_refuses_too_few_samples(corpus):
    with pytest.raises(ValueError, match="too few"):
        inspect_batch([corpus[0]], 4, 8, 3, train_samples=16)


def test_run_dir_answer_is_what_the_trainer_consumed(counting_data, tmp_path, capsys):
    """A short real run records the tokens of every step; inspect --run-dir names the same samples."""
    from megalite.config import load_config
    from megalite.topology import ProcessGroups
    from megalite.train import Trainer
    from tests.training_helpers import tiny_overrides, write_counting_corpus

    other = write_counting_corpus(str(tmp_path / "other_text_document"), docs=200, seed=5)
    run_dir = tmp_path / "run"
    cfg = load_config("tiny", tiny_overrides(counting_data, run_dir, steps=4, **{
        "data.path": f"[0.4,{counting_data},0.6,{other}]", "data.num_workers": 0, "data.seed": 11,
        "data.cache_dir": str(tmp_path / "cache")}))
    trainer = Trainer(cfg, ProcessGroups.single())
    consumed, real_train_batch = [], trainer.runner.train_batch

    def train_batch(batches):
        consumed.extend(b["tokens"].numpy().copy() for b in batches)
        return real_train_batch(batches)

    trainer.runner.train_batch = train_batch
    trainer.fit()
    per_step = np.concatenate(consumed).reshape(4, 8, -1)  # [steps, global batch, seq_len + 1]
    for k in range(4):
        s = run_settings(str(run_dir))
        del s["tokenizer_type"], s["tokenizer_model"]
        pieces = inspect_batch(batch=k, **s)
        read = {prefix: IndexedDataset(prefix) for prefix in s["data_path"][1::2]}
        samples = [np.concatenate([read[p.prefix].document_tokens(p.document)[p.offset:p.offset + p.num_tokens]
                                   for p in pieces if p.position == pos]) for pos in range(8)]
        np.testing.assert_array_equal(np.stack(samples), per_step[k])
    capsys.readouterr()  # the training log
    assert inspect_main(["--run-dir", str(run_dir), "--batch", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + len(pieces) and lines[1].split()[0] == str(3 * 8)


def test_inspect_names_the_warmup_length_of_a_step(counting_data, tmp_path, capsys):
    from megalite.config import save_config
    from tests.training_helpers import tiny_overrides

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(load_config("tiny", tiny_overrides(counting_data, run_dir, steps=8, **{
        "data.seq_len_schedule": "[1:8,3:16,5:32]", "data.cache_dir": str(tmp_path / "cache")})),
        run_dir / "config.yaml")
    assert inspect_main(["--run-dir", str(run_dir), "--batch", "2"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        "step 3 trained on sequences of 16 tokens (data.seq_len_schedule ['1:8', '3:16', '5:32']): each sample above "
        "was cut into 2 consecutive sequences of 16")
    assert inspect_main(["--run-dir", str(run_dir), "--batch", "5"]) == 0  # past the schedule: nothing cut
    assert "trained on sequences" not in capsys.readouterr().out.split("\n")[-2]
