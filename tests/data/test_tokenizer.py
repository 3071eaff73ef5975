"""Tokenizers (SentencePiece with Megatron semantics, HF tokenizer.json) and SentencePiece training."""
import json
import random

import pytest
import sentencepiece as spm

from megalite.data.tokenizer import (
    TOKENIZER_TYPES,
    build_tokenizer,
    sample_documents,
    train_sentencepiece,
    training_pieces,
)


def _corpus(path, n_docs=300, seed=0):
    rng = random.Random(seed)
    syllables = "ka lo mi ne ru sa to vi pe da gu ri ho ze fa".split()
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 30)))}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    corpus = _corpus(root / "corpus.jsonl")
    return train_sentencepiece([corpus], str(root / "sp"), vocab_size=300, user_defined_symbols=["<code>"],
                               max_sentences=1000, seed=1)


def test_sentencepiece_matches_megatron_semantics(sp_model):
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    text = "kalo mine rusa <code> tovi"
    assert tok.encode(text) == sp.encode_as_ids(text)
    assert tok.encode(text)[0] != sp.bos_id()  # Megatron's GPT flavour adds no BOS
    assert tok.vocab_size == len(sp) == 300
    assert tok.eod == sp.eos_id() == 2 and sp.id_to_piece(tok.eod) == "</s>"
    assert (tok.bos, tok.pad) == (1, 3) and sp.id_to_piece(3) == "<pad>"
    assert sp.piece_to_id("<code>") in tok.encode(text)  # user-defined symbols stay whole
    assert tok.decode(tok.encode(text)) == text


def test_sentencepiece_batch_and_alias(sp_model):
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    alias = build_tokenizer("GPTSentencePieceTokenizer", sp_model, num_threads=2)
    texts = ["kalo mine", "", "ruri hoze fa", "ünïcödé 日本"] * 5
    expected = [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts) == expected
    assert alias.encode_batch(texts) == expected
    assert expected[1] == []


def _hf_tokenizer(special_tokens):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"] + special_tokens)
    tok.train_from_iterator(["the cat sat on the mat", "a dog ate the bone", "cats and dogs"] * 10, trainer)
    return tok


def test_huggingface_tokenizer_file_and_directory(tmp_path):
    hf = _hf_tokenizer(["<s>", "</s>", "<pad>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    for model in (tmp_path / "tokenizer.json", tmp_path):
        tok = build_tokenizer("HuggingFaceTokenizer", str(model))
        text = "the cat ate the bone"
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids
        assert tok.encode_batch([text, "", "dogs"]) == [tok.encode(t) for t in (text, "", "dogs")]
        assert tok.eod == hf.token_to_id("</s>")
        assert (tok.bos, tok.pad) == (hf.token_to_id("<s>"), hf.token_to_id("<pad>"))
        assert tok.vocab_size == hf.get_vocab_size(with_added_tokens=True)
        assert tok.decode(tok.encode("the cat")).replace(" ", "") == "thecat"


def test_huggingface_eos_from_config_and_missing_eos(tmp_path):
    hf = _hf_tokenizer(["<|im_end|>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer\.json.*add one of"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    tok = build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    assert tok.eod == hf.token_to_id("<|im_end|>") and tok.bos is None and tok.pad is None


def test_bad_type_and_missing_model(tmp_path, sp_model):
    with pytest.raises(ValueError, match="valid types: " + ", ".join(TOKENIZER_TYPES)):
        build_tokenizer("GPT2BPETokenizer", sp_model)
    missing = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        build_tokenizer("SentencePieceTokenizer", missing)
    with pytest.raises(FileNotFoundError, match="without tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path))


def test_reservoir_sample_is_bounded_deterministic_and_spread():
    sample = sample_documents((str(i) for i in range(10_000)), 100, seed=3, max_doc_chars=10)
    assert len(sample) == 100 and len(set(sample)) == 100
    assert sample == sample_documents((str(i) for i in range(10_000)), 100, seed=3, max_doc_chars=10)
    assert max(int(s) for s in sample) > 5000  # not just the head of the stream
    assert sample_documents(iter(["abcdef"]), 5, seed=0, max_doc_chars=3) == ["abc"]


def test_training_pieces_keep_newlines_and_bound_bytes():
    text = "ab\ncd\n" + "é" * 10 + "\n\n  \nxy"
    assert training_pieces(text, 100) == [text]
    pieces = training_pieces(text, 8)
    assert pieces == ["ab\ncd\n", "éééé", "\n  \nxy"]  # the long line is cut at a character boundary
    assert all(len(p.encode()) <= 8 for p in pieces)


def test_train_unigram_via_cli_with_sampling(tmp_path):
    import importlib.util
    import os

    corpus = _corpus(tmp_path / "c.jsonl", n_docs=200)
    txt = tmp_path / "c.txt"
    txt.write_text("\n".join(json.loads(line)["text"] for line in open(corpus)) + "\n")
    path = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "train_tokenizer.py")
    spec = importlib.util.spec_from_file_location("train_tokenizer_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rc = tool.main(["--input", str(tmp_path / "c.*"), "--output-prefix", str(tmp_path / "uni"),
                    "--vocab-size", "400", "--model-type", "unigram", "--byte-fallback",
                    "--max-sentences", "150", "--seed", "7"])
    assert rc == 0
    tok = build_tokenizer("SentencePieceTokenizer", str(tmp_path / "uni.model"))
    assert tok.vocab_size == 400 and tok.eod == 2
    text = "kalo Ω  mine\n\n\tru 2024"  # byte fallback covers unseen characters; whitespace survives
    assert tok.decode(tok.encode(text)) == text
    assert tool.main(["--input", str(tmp_path / "none*.jsonl"), "--output-prefix", str(tmp_path / "x"),
                      "--vocab-size", "100"]) == 2


def test_reservoir_is_bounded_by_bytes_and_stays_uniform():
    docs = [f"{i:04d}" + "x" * 96 for i in range(1000)]  # 100 bytes each
    huge = "h" * 5000
    sample = sample_documents(iter(docs[:500] + [huge] + docs[500:]), 10_000, seed=1, max_doc_chars=10**6,
                              max_bytes=2_000)
    assert len(sample) == 20 and huge not in sample  # 20 * 100 bytes; the huge one never fits
    assert sample == sorted(sample)  # stream order
    multi = "é" * 30  # 60 bytes in UTF-8
    assert sample_documents(iter([multi] * 10), 100, seed=0, max_doc_chars=100, max_bytes=130) == [multi] * 2
    assert sample_documents(iter(docs[:5]), 100, seed=0, max_doc_chars=1000, max_bytes=10**6) == docs[:5]
    # uniform: over many seeds every position of the stream is kept about equally often
    counts = [0] * 10
    for seed in range(400):
        for text in sample_documents(iter(docs[:100]), 10**6, seed=seed, max_doc_chars=1000, max_bytes=1000):
            counts[int(text[:4]) // 10] += 1
    assert all(300 < c < 500 for c in counts), counts  # expected 400 per decile (10 of 100 kept, 400 seeds)


def test_train_tokenizer_cli_skips_a_lone_surrogate_with_its_place(tmp_path, capsys):
    import importlib.util
    import os

    corpus = _corpus(tmp_path / "c.jsonl", n_docs=100)
    lines = open(corpus, encoding="utf-8").read().splitlines(keepends=True)
    lines.insert(1, '{"text": "bad \\ud800 surrogate"}\n')
    lines.insert(3, '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    open(corpus, "w", encoding="utf-8").writelines(lines)
    path = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "train_tokenizer.py")
    spec = importlib.util.spec_from_file_location("train_tokenizer_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = ["--input", corpus, "--output-prefix", str(tmp_path / "sp"), "--vocab-size", "200", "--max-mb", "0.01"]
    assert tool.main(args) == 0
    err = capsys.readouterr().err
    assert f"skipped invalid_utf8: 1 (first at {corpus}:2)" in err
    assert f"skipped malformed_json: 1 (first at {corpus}:4)" in err
    assert tool.main(args + ["--strict"]) == 2
    assert "invalid_utf8" in capsys.readouterr().err
