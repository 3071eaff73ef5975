"""Pre-flight checks of the data a config names (megalite.data.checks, through megalite.preflight):
index files, split sizes and the tokenizer, all before any process group exists."""
import os

import pytest

from megalite.config import Config, ConfigError, load_config
from megalite.preflight import preflight


def _dataset(prefix, docs=100):
    from megalite.data.indexed import IndexedDatasetWriter

    with IndexedDatasetWriter(str(prefix), "uint16") as w:
        for d in range(docs):
            w.add_document([1 + d, 2, 3])
    return str(prefix)


def _data_errors(overrides, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        preflight(load_config("tiny", overrides), **kw)
    return str(info.value)


def test_data_path_files_are_checked_before_anything_heavy(tmp_path):
    good = _dataset(tmp_path / "good_text_document")
    preflight(load_config("tiny", [f"data.path=[{good}]"]))
    missing = str(tmp_path / "missing_text_document")
    message = _data_errors([f"data.path=[0.5, {good}, 0.5, {missing}]"])
    assert f"data.path prefix '{missing}'" in message and "missing_text_document.idx cannot be opened" in message
    assert "megalite preprocess" in message and f"'{good}'" not in message
    assert "drop the extension" in _data_errors([f"data.path=[{good}.bin]"])
    os.remove(good + ".bin")
    assert "good_text_document.bin cannot be opened" in _data_errors([f"data.path=[{good}]"])
    trunc = _dataset(tmp_path / "trunc_text_document")
    with open(trunc + ".idx", "r+b") as f:
        f.truncate(os.path.getsize(trunc + ".idx") - 8)
    assert "truncated or corrupt" in _data_errors([f"data.path=[{trunc}]"])
    (tmp_path / "junk.idx").write_bytes(b"not an index at all, not at all")
    (tmp_path / "junk.bin").write_bytes(b"")
    assert "not a Megatron index file" in _data_errors([f"data.path=[{tmp_path / 'junk'}]"])
    preflight(load_config("tiny", [f"data.path=[{missing}]"]), data=False)  # e.g. checkpoint conversion


def test_space_separated_blend_reaches_the_file_check_as_two_prefixes(tmp_path):
    a, b = _dataset(tmp_path / "a_text_document"), _dataset(tmp_path / "b_text_document")
    cfg = preflight(load_config("tiny", [f"data.path=0.3 {a} 0.7 {b}"]))
    assert cfg.data.path == load_config("tiny", [f"data.path=[0.3, {a}, 0.7, {b}]"]).data.path
    path = tmp_path / "run.yaml"
    path.write_text(f"data:\n  path: 0.3 {a} 0.7 {b}\n")
    assert load_config(str(path)).data.path == ["0.3", a, "0.7", b]
    code_set = Config()  # set from code, not loaded: named with the list form to use
    code_set.data.path = [f"0.3 {a} 0.7 {b}"]
    with pytest.raises(ConfigError, match="space-separated blend: give it as a list"):
        preflight(code_set)


def test_split_that_rounds_valid_to_no_document_is_caught(tmp_path):
    small = _dataset(tmp_path / "small_text_document", docs=10)
    message = _data_errors([f"data.path=[{small}]", "data.split=98,2,0"])
    assert "data.split='98,2,0' leaves the valid split without documents" in message
    assert f"{small}: 10" in message and "train.eval_interval=100 evaluates on it" in message
    preflight(load_config("tiny", [f"data.path=[{small}]", "data.split=80,20,0"]))
    preflight(load_config("tiny", [f"data.path=[{small}]", "data.split=98,2,0", "train.eval_interval=0"]))


def test_vocab_size_below_the_tokenizers_is_caught(tmp_path):
    from tokenizers import Tokenizer, models

    vocab = {"</s>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, 5000)}}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    tok = ["data.tokenizer_type=HuggingFaceTokenizer", f"data.tokenizer_model={tmp_path / 'tokenizer.json'}"]
    message = _data_errors(tok)  # the tiny preset has model.vocab_size=4096
    assert "model.vocab_size=4096 is smaller than the 5000 tokens of data.tokenizer_model=" in message
    assert "set model.vocab_size=5000" in message
    preflight(load_config("tiny", tok + ["model.vocab_size=5000"]))
    (tmp_path / "broken.json").write_text("{")
    message = _data_errors(["data.tokenizer_type=HuggingFaceTokenizer", f"data.tokenizer_model={tmp_path}/broken.json"])
    assert "broken.json' cannot be loaded as data.tokenizer_type='HuggingFaceTokenizer'" in message
