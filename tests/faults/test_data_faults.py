"""Bad data and bad numbers: caught before training (nothing written), counted and kept where it can be, one
line and exit code 2 otherwise. A run refused here never creates its run directory."""
import gzip
import io
import json
import subprocess
import zlib

import numpy as np
import pytest

from megalite.data.indexed import DTYPE_CODES, HEADER_SIZE, IndexedDatasetWriter, idx_path
from tests.faults.harness import first_line, megalite, snapshot, train_args
from tests.training_helpers import VOCAB

WORDS = "ka lo mi ne ru sa to vi pe da gu ri ho ze fa".split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    from megalite.data.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("tokenizer")
    rng = np.random.default_rng(0)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS, 12))}) + "\n" for _ in range(200)))
    return train_sentencepiece([str(corpus)], str(root / "sp"), vocab_size=60, max_sentences=1000)


def preprocess(capsys, tokenizer, inputs, prefix, *flags):
    return megalite(capsys, "preprocess", "--input", *inputs, "--output-prefix", prefix, "--tokenizer-type",
                    "SentencePieceTokenizer", "--tokenizer-model", tokenizer, "--workers", "1", *flags)


def test_a_truncated_gzip_keeps_the_documents_before_the_damage(capsys, tokenizer, tmp_path):
    docs = [(json.dumps({"text": f"ka lo mi {i} " * 40}) + "\n").encode() for i in range(10)]
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as g:
        g.write(b"".join(docs[:7]))
        g.flush(zlib.Z_FULL_FLUSH)  # a byte boundary after the 7th document
        whole_seven = buf.tell()
        g.write(b"".join(docs[7:]))
    corpus = tmp_path / "cut.jsonl.gz"
    corpus.write_bytes(buf.getvalue()[:whole_seven + 12])  # 7 documents decompress whole, the 8th is cut
    code, err = preprocess(capsys, tokenizer, [corpus], tmp_path / "out")
    assert code == 0, err
    assert "7 docs" in err and f"skipped truncated_gzip: 1 (first at {corpus}:8)" in err, err


@pytest.mark.parametrize("content", [b"", bytes(range(256)) * 40], ids=["empty", "binary"])
def test_input_without_a_document_is_an_error_and_writes_nothing(capsys, tokenizer, tmp_path, content):
    corpus = tmp_path / "in" / "corpus.jsonl"
    corpus.parent.mkdir()
    corpus.write_bytes(content)
    code, err = preprocess(capsys, tokenizer, [corpus], tmp_path / "out" / "x")
    assert code == 2, err
    assert first_line(err).startswith(f"megalite: no document found in {corpus} (skipped "), err
    assert "--allow-empty" in err and not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    code, err = preprocess(capsys, tokenizer, [corpus], tmp_path / "out" / "x", "--allow-empty")
    assert code == 0 and (tmp_path / "out" / "x_text_document.idx").is_file(), err


def test_preprocessing_under_a_file_or_with_a_non_sentencepiece_model_is_one_line(capsys, tokenizer, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "ka lo mi"}) + "\n")
    code, err = preprocess(capsys, tokenizer, [corpus], corpus / "sub" / "x")
    assert code == 2 and first_line(err) == (f"megalite: cannot write {corpus}/sub/x_text_document.bin: {corpus} "
                                             "is a file, not a directory; choose another output prefix"), err
    code, err = preprocess(capsys, str(corpus), [corpus], tmp_path / "x")
    assert code == 2 and first_line(err).startswith(f"megalite: tokenizer model {corpus} is not a SentencePiece "
                                                    ".model"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


def test_preprocessing_into_a_read_only_filesystem_is_one_line(capsys, tokenizer, tmp_path):
    where = tmp_path / "ro"
    where.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(where)], capture_output=True,
                         text=True, timeout=30)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here (needs root where mounting is allowed): {out.stderr}")
    try:
        corpus = tmp_path / "c.jsonl"
        corpus.write_text(json.dumps({"text": "ka lo mi"}) + "\n")
        code, err = preprocess(capsys, tokenizer, [corpus], where / "x")
        assert code == 1 and first_line(err) == f"megalite: Read-only file system: {where}/x_text_document.bin.tmp", err
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


# ---- token files that do not fit the model: refused before the run directory exists -------------------

def _dataset(prefix, tokens, dtype=np.uint16) -> str:
    with IndexedDatasetWriter(prefix, dtype) as w:
        for start in range(0, len(tokens), 50):
            w.add_document(tokens[start:start + 50])
    return str(prefix)


def _counting(n=6000):
    return np.arange(n) % VOCAB


def _too_big_ids(prefix):
    tokens = _counting()
    tokens[4321] = VOCAB + 5  # one bad id among thousands: the sampled check reads every token of a small file
    return _dataset(prefix, tokens)


def _truncated_bin(prefix):
    _dataset(prefix, _counting())
    with open(f"{prefix}.bin", "r+b") as f:
        f.truncate(3000)
    return str(prefix)


def _other_dtype_index(prefix):
    _dataset(prefix, _counting())
    with open(idx_path(prefix), "r+b") as f:  # the index now says int32 over a file of uint16 tokens
        f.seek(HEADER_SIZE - 17)
        f.write(bytes([DTYPE_CODES[np.dtype(np.int32)]]))
    return str(prefix)


BAD_DATA = {
    "token-id-over-vocab": (_too_big_ids, f"holds token id {VOCAB + 5} (document 86), but model.vocab_size={VOCAB}"),
    "truncated-bin": (_truncated_bin, "x.bin: 3000 bytes, but its index"),
    "index-of-another-dtype": (_other_dtype_index, "x.idx: sequence pointers do not follow the sequence lengths of "
                                                   "int32 tokens; the index is corrupt, or its dtype is not the one"),
}


@pytest.mark.parametrize("bad", list(BAD_DATA))
def test_data_that_does_not_fit_is_refused_before_anything_is_written(capsys, tmp_path, bad):
    make, message = BAD_DATA[bad]
    prefix = make(tmp_path / "data" / "x")
    code, err = megalite(capsys, *train_args(prefix, tmp_path / "run"))
    assert code == 2, err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_a_learning_rate_that_is_not_finite_is_refused(capsys, counting_data, tmp_path, value):
    code, err = megalite(capsys, *train_args(counting_data, tmp_path / "run", **{"optim.lr": value}))
    assert code == 2, err
    assert f"optim.lr={float(value)!r} must be a finite number" in err, err
    assert not (tmp_path / "run").exists()


# ---- inspect: a batch the run never reads is refused, without building an index for it -----------------

@pytest.fixture(scope="module")
def finished(counting_data, tmp_path_factory):
    from megalite.config import load_config
    from megalite.topology import ProcessGroups
    from megalite.train import Trainer
    from tests.training_helpers import tiny_overrides

    run_dir = tmp_path_factory.mktemp("inspected") / "run"
    cfg = load_config("tiny", tiny_overrides(counting_data, run_dir, steps=4,
                                             **{"data.cache_dir": str(run_dir.parent / "cache")}))
    Trainer(cfg, ProcessGroups.single()).fit()
    return run_dir


@pytest.mark.parametrize("batch, message", [
    ("100000000", "--batch 100000000: the run reads 4 global batches of the train split (0 to 3); ask for one of them"),
    ("-1", "--batch -1 must be >= 0 and --global-batch-size 8 > 0"),
])
def test_inspect_refuses_a_batch_the_run_never_reads(capsys, finished, batch, message):
    before = snapshot(finished.parent)
    code, err = megalite(capsys, "inspect", "--run-dir", finished, "--batch", batch)
    assert code == 2 and first_line(err) == f"megalite: {message}", err
    assert snapshot(finished.parent) == before  # no index cache was built for it
    assert megalite(capsys, "inspect", "--run-dir", finished, "--batch", "3")[0] == 0


def test_inspect_without_a_run_asks_before_building_a_huge_index(capsys, counting_data, tmp_path):
    code, err = megalite(capsys, "inspect", "--data-path", counting_data, "--seq-len", "32", "--global-batch-size",
                         "8", "--batch", "100000000", "--cache-dir", tmp_path / "cache")
    assert code == 2 and "GiB of cache); give --run-dir so the run bounds it, or --train-samples" in err, err
    assert not (tmp_path / "cache").exists()
