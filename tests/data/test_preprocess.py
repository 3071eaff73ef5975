"""Preprocessing: byte-identical to Megatron-LM, bad-input accounting, atomic output."""
import gzip
import json
import os
import random
import subprocess
import sys
import warnings

import numpy as np
import pytest
import sentencepiece as spm

import megalite.data.preprocess as pre
from megalite.data.corpus import BadInputError, iter_documents, iter_line_chunks
from megalite.data.indexed import IndexedDataset, IndexedDatasetWriter
from megalite.data.preprocess import preprocess
from megalite.data.tokenizer import train_sentencepiece

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _texts(n, seed=0):
    rng = random.Random(seed)
    syllables = "ka lo mi ne ru sa to vi pe da gu ri ho ze fa".split()
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(n)]
    texts[3] = texts[17] = ""  # empty documents: Megatron keeps them without a sequence
    texts[5] = "ünïcödé 日本語 \u2028 line\nbreak"  # unseen characters, a JSON-escaped newline
    return texts


def _write_jsonl(path, texts, extra=True):
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "title": f"Doc {i}"} if extra else {"text": t}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    texts = _texts(300)
    corpus = _write_jsonl(root / "corpus.jsonl", texts)
    model = train_sentencepiece([corpus], str(root / "sp"), vocab_size=300, max_sentences=1000)
    return root, corpus, model, texts


def _bytes(prefix):
    with open(prefix + ".bin", "rb") as b, open(prefix + ".idx", "rb") as i:
        return b.read(), i.read()


def _megatron_reference(lines, model, prefix, key, append_eod):
    """Megatron-LM preprocess_data.py's per-document logic, written with megatron.core's builder."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    sp = spm.SentencePieceProcessor(model_file=model)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(len(sp)))
    for line in lines:
        ids = sp.encode_as_ids(json.loads(line)[key])
        lens = [len(ids)] if ids else []
        if ids and append_eod:
            ids.append(sp.eos_id())
            lens[-1] += 1
        builder.add_document(ids, lens)
    builder.finalize(prefix + ".idx")


@pytest.mark.parametrize("append_eod", [True, False])
def test_byte_identical_to_megatron(setup, tmp_path, append_eod):
    root, corpus, model, texts = setup
    out = str(tmp_path / "ours")
    summary = preprocess([corpus], out, "SentencePieceTokenizer", model, json_keys=["text", "title"],
                         append_eod=append_eod, workers=1, chunk_bytes=2000)
    lines = open(corpus, encoding="utf-8").readlines()
    for key in ("text", "title"):
        _megatron_reference(lines, model, str(tmp_path / f"ref_{key}"), key, append_eod)
        assert _bytes(f"{out}_{key}_document") == _bytes(str(tmp_path / f"ref_{key}"))
    assert summary.documents == 300 and summary.empty_documents == 2
    assert summary.stats.first["empty_document"] == f"{corpus}:4"
    assert summary.stats.skipped() == {}


def test_tokens_equal_direct_encoding_in_both_readers(setup, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronDataset
    root, corpus, model, texts = setup
    sp = spm.SentencePieceProcessor(model_file=model)
    summary = preprocess([corpus], str(tmp_path / "o"), "SentencePieceTokenizer", model, append_eod=True,
                         workers=1, chunk_bytes=1500)
    prefix = summary.outputs["text"]
    ours, theirs = IndexedDataset(prefix), MegatronDataset(prefix)
    assert ours.dtype == np.uint16 and ours.num_documents == len(texts) == len(theirs.document_indices) - 1
    expected = [sp.encode_as_ids(t) + [2] if t else [] for t in texts]
    assert [ours.document_tokens(d).tolist() for d in range(len(texts))] == expected
    nonempty = [e for e in expected if e]
    assert [theirs[i].tolist() for i in range(len(theirs))] == nonempty
    assert summary.tokens["text"] == sum(map(len, expected))


def test_workers_give_identical_bytes_and_inputs_formats_agree(setup, tmp_path):
    root, corpus, model, texts = setup
    one = preprocess([corpus], str(tmp_path / "w1"), "SentencePieceTokenizer", model, append_eod=True,
                     workers=1, chunk_bytes=1000)
    two = preprocess([corpus], str(tmp_path / "w2"), "SentencePieceTokenizer", model, append_eod=True,
                     workers=2, chunk_bytes=1000, log_interval=50)
    assert _bytes(one.outputs["text"]) == _bytes(two.outputs["text"])
    gz = tmp_path / "corpus.jsonl.gz"
    gz.write_bytes(gzip.compress(open(corpus, "rb").read()))
    txt = tmp_path / "corpus.txt"  # a .txt line is one document; this text has its newline in-line
    txt.write_text("".join(t.replace("\n", " ") + "\n" for t in texts[:100]), encoding="utf-8")
    from_gz = preprocess([str(gz)], str(tmp_path / "gz"), "SentencePieceTokenizer", model, append_eod=True)
    assert _bytes(from_gz.outputs["text"]) == _bytes(one.outputs["text"])
    from_txt = preprocess([str(txt)], str(tmp_path / "txt"), "SentencePieceTokenizer", model, append_eod=True)
    ds = IndexedDataset(from_txt.outputs["text"])
    sp = spm.SentencePieceProcessor(model_file=model)
    assert ds.document_tokens(5).tolist() == sp.encode_as_ids(texts[5].replace("\n", " ")) + [2]
    assert ds.num_documents == 100 and len(ds.document_tokens(3)) == 0


def _wordlevel_tokenizer_json(path, size):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(size - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


@pytest.mark.parametrize("size,dtype", [(65499, np.uint16), (65500, np.int32)])
def test_dtype_follows_vocab_size(tmp_path, size, dtype):
    model = _wordlevel_tokenizer_json(tmp_path / "tokenizer.json", size)
    corpus = _write_jsonl(tmp_path / "c.jsonl", [f"w0 w{size - 3} w7", "", "w5"], extra=False)
    summary = preprocess([corpus], str(tmp_path / "o"), "HuggingFaceTokenizer", model, append_eod=True)
    ds = IndexedDataset(summary.outputs["text"])
    assert ds.dtype == dtype
    assert [ds.document_tokens(i).tolist() for i in range(3)] == [[2, size - 1, 9, 1], [], [7, 1]]


def _bad_corpus(path):
    good = [json.dumps({"text": f"kalo mine {i}"}).encode() for i in range(6)]
    lines = [good[0], b"{not json", good[1], json.dumps({"body": "x"}).encode(), good[2],
             json.dumps({"text": 7}).encode(), b'{"text": "caf\xe9"}', good[3], b"", b"[1, 2]",
             b"{broken", good[4], json.dumps({"text": ""}).encode(), good[5]]
    path.write_bytes(b"\n".join(lines))  # no final newline: the last line still counts
    return str(path)


def test_every_bad_input_kind_counted_with_first_place_and_skipped(setup, tmp_path):
    root, corpus, model, texts = setup
    bad = _bad_corpus(tmp_path / "bad.jsonl")
    summary = preprocess([bad], str(tmp_path / "o"), "SentencePieceTokenizer", model, append_eod=True,
                         chunk_bytes=40)
    expected = {"malformed_json": (3, 2), "missing_key": (1, 4), "non_string": (1, 6), "invalid_utf8": (1, 7),
                "blank_line": (1, 9)}
    assert summary.stats.skipped() == {k: n for k, (n, _) in expected.items()}
    assert {k: summary.stats.first[k] for k in expected} == {k: f"{bad}:{ln}" for k, (_, ln) in expected.items()}
    assert summary.stats.first["empty_document"] == f"{bad}:13"
    sp = spm.SentencePieceProcessor(model_file=model)
    ds = IndexedDataset(summary.outputs["text"])
    want = [sp.encode_as_ids(f"kalo mine {i}") + [2] for i in range(5)] + [[]] + \
           [sp.encode_as_ids("kalo mine 5") + [2]]
    assert [ds.document_tokens(i).tolist() for i in range(ds.num_documents)] == want
    assert "malformed_json: 3 (first at " + f"{bad}:2)" in summary.report()


def test_strict_fails_and_writes_nothing(setup, tmp_path):
    root, corpus, model, texts = setup
    bad = _bad_corpus(tmp_path / "bad.jsonl")
    with pytest.raises(BadInputError, match=f"malformed_json.*{bad}:2"):
        preprocess([bad], str(tmp_path / "o"), "SentencePieceTokenizer", model, strict=True)
    assert os.listdir(tmp_path) == ["bad.jsonl"]


def test_truncated_gzip_is_named(setup, tmp_path):
    root, corpus, model, texts = setup
    data = gzip.compress(open(corpus, "rb").read())
    gz = tmp_path / "cut.jsonl.gz"
    gz.write_bytes(data[: len(data) * 2 // 3])
    summary = preprocess([str(gz)], str(tmp_path / "o"), "SentencePieceTokenizer", model, chunk_bytes=1000)
    where = summary.stats.first["truncated_gzip"]
    line = int(where.rsplit(":", 1)[1])
    assert where.startswith(str(gz)) and 1 < line <= len(texts) and summary.documents == line - 1
    with pytest.raises(BadInputError, match=f"truncated_gzip.*{gz}:"):
        preprocess([str(gz)], str(tmp_path / "s"), "SentencePieceTokenizer", model, strict=True)


def test_interrupted_run_leaves_no_output(setup, tmp_path, monkeypatch):
    root, corpus, model, texts = setup
    calls = []
    real = pre.parse_chunk

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(pre, "parse_chunk", failing)
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        preprocess([corpus], str(out), "SentencePieceTokenizer", model, workers=1, chunk_bytes=1000)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="json keys"):
        preprocess([corpus], str(out), "SentencePieceTokenizer", model, json_keys=["text", "text"])


def test_cli(setup, tmp_path):
    root, corpus, model, texts = setup
    tool = os.path.join(ROOT, "tools", "preprocess_data.py")
    args = [sys.executable, tool, "--input", os.path.join(os.path.dirname(corpus), "corpus.*"),
            "--output-prefix", str(tmp_path / "cli"), "--tokenizer-type", "GPTSentencePieceTokenizer",
            "--tokenizer-model", model, "--append-eod", "--workers", "2", "--log-interval", "100"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "300 docs" in run.stderr and "empty documents (kept, no sequence): 2" in run.stderr
    ref = preprocess([corpus], str(tmp_path / "lib"), "SentencePieceTokenizer", model, append_eod=True)
    assert _bytes(str(tmp_path / "cli_text_document")) == _bytes(ref.outputs["text"])
    bad = _bad_corpus(tmp_path / "bad.jsonl")
    run = subprocess.run(args[:3] + [bad] + args[4:] + ["--strict"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "malformed_json" in run.stderr and f"{bad}:2" in run.stderr


def test_writer_add_raw_matches_add_document(tmp_path):
    """The chunk packing used by the workers describes documents exactly as add_document would."""
    docs = [[5, 6, 7], [], [8], [], [9, 10]]
    with IndexedDatasetWriter(str(tmp_path / "a"), np.uint16) as w:
        for d in docs:
            w.add_document(d)
    packer = pre.ChunkEncoder.__new__(pre.ChunkEncoder)
    packer.append_eod, packer.dtype = False, np.dtype(np.uint16)
    buf = packer._pack([list(d) for d in docs])
    with IndexedDatasetWriter(str(tmp_path / "b"), np.uint16) as w:
        w.add_raw(buf.tokens[:3].tobytes(), buf.sequence_lengths[:1], buf.document_ends[:2])
        w.add_raw(buf.tokens[3:].tobytes(), buf.sequence_lengths[1:], buf.document_ends[2:] - 1)
    assert _bytes(str(tmp_path / "a")) == _bytes(str(tmp_path / "b"))


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 10_000])
def test_line_chunks_keep_whole_lines_and_numbers(tmp_path, chunk_bytes):
    lines = [b"x" * n for n in (0, 5, 50, 1, 200, 3)]
    path = tmp_path / "a.txt"
    path.write_bytes(b"\n".join(lines))  # no final newline
    got = []
    for p, first, blob in iter_line_chunks(str(path), chunk_bytes):
        got += [(first + i, part) for i, part in enumerate(blob.split(b"\n")[:-1])]
    assert got == list(enumerate(lines, start=1))


def test_iter_documents_text_lines_and_globs(tmp_path):
    (tmp_path / "b.txt").write_bytes("one\r\n\ntwo \u2028 still two\n".encode())
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "zero"}) + "\n")
    docs = list(iter_documents([str(tmp_path / "*")]))
    assert [(d.texts["text"], d.source) for d in docs] == [
        ("zero", f"{tmp_path}/a.jsonl:1"), ("one", f"{tmp_path}/b.txt:1"), ("", f"{tmp_path}/b.txt:2"),
        ("two \u2028 still two", f"{tmp_path}/b.txt:3")]
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        list(iter_documents([str(tmp_path / "nothing-here*.jsonl")]))


def _tricky_corpus(path):
    """Valid JSON that used to crash: a lone surrogate escape and a deeply nested array."""
    good = [json.dumps({"text": f"kalo mine {i}"}).encode() for i in range(4)]
    lines = [good[0], b'{"text": "bad \\ud800 surrogate"}', good[1], json.dumps({"text": ""}).encode(),
             b'{"text": "x", "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", good[2],
             b'{"text": "emoji \\ud83d\\ude00 pair is fine"}', b'{"text": "\\udfff"}', good[3]]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


@pytest.mark.parametrize("workers", [1, 2])
def test_lone_surrogate_and_deep_nesting_are_counted_and_skipped(setup, tmp_path, workers):
    root, corpus, model, texts = setup
    bad = _tricky_corpus(tmp_path / "tricky.jsonl")
    summary = preprocess([bad], str(tmp_path / "o"), "SentencePieceTokenizer", model, append_eod=True,
                         workers=workers, chunk_bytes=64)
    assert summary.stats.skipped() == {"invalid_utf8": 2, "malformed_json": 1}
    assert summary.stats.first["invalid_utf8"] == f"{bad}:2" and summary.stats.first["malformed_json"] == f"{bad}:5"
    assert summary.documents == 6 and summary.empty_documents == 1
    sp = spm.SentencePieceProcessor(model_file=model)
    ds = IndexedDataset(summary.outputs["text"])
    assert ds.document_tokens(4).tolist() == sp.encode_as_ids("emoji \U0001F600 pair is fine") + [2]
    report = summary.report()
    assert f"empty documents (kept, no sequence): 1 (first at {bad}:4)" in report
    assert f"skipped invalid_utf8: 2 (first at {bad}:2)" in report
    assert summary.to_dict()["first_empty_document"] == f"{bad}:4"
    with pytest.raises(BadInputError, match=f"invalid_utf8.*{bad}:2"):
        preprocess([bad], str(tmp_path / "s"), "SentencePieceTokenizer", model, strict=True)
