"""Merging .bin/.idx pairs: equal to preprocessing the concatenated corpus, dtype-checked, atomic."""
import importlib.util
import json
import os
import random

import numpy as np
import pytest

from megalite.data.indexed import IndexedDataset, IndexedDatasetWriter
from megalite.data.merge import merge_datasets, prefixes_in_dir
from megalite.data.preprocess import preprocess
from megalite.data.tokenizer import train_sentencepiece

TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "merge_datasets.py")


def _lines(n, seed):
    rng = random.Random(seed)
    syllables = "ka lo mi ne ru sa to vi pe da gu ri ho ze fa".split()
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(200)]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 25))) for _ in range(n)]
    return [json.dumps({"text": t}) + "\n" for t in texts]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Three corpus parts preprocessed separately, and the whole corpus preprocessed at once."""
    root = tmp_path_factory.mktemp("merge")
    chunks = [_lines(n, seed) for seed, n in enumerate((40, 1, 60))]
    (root / "all.jsonl").write_text("".join(sum(chunks, [])))
    model = train_sentencepiece([str(root / "all.jsonl")], str(root / "sp"), vocab_size=300)
    (root / "parts").mkdir()
    prefixes = []
    for i, chunk in enumerate(chunks):
        (root / f"p{i}.jsonl").write_text("".join(chunk))
        s = preprocess([str(root / f"p{i}.jsonl")], str(root / "parts" / f"p{i}"), "SentencePieceTokenizer",
                       model, append_eod=True)
        prefixes.append(s.outputs["text"])
    whole = preprocess([str(root / "all.jsonl")], str(root / "whole"), "SentencePieceTokenizer", model,
                       append_eod=True)
    return root, prefixes, whole.outputs["text"]


def _bytes(prefix):
    with open(f"{prefix}.bin", "rb") as b, open(f"{prefix}.idx", "rb") as i:
        return b.read(), i.read()


def test_merge_equals_preprocessing_the_concatenation(parts, tmp_path):
    root, prefixes, whole = parts
    info = merge_datasets(prefixes, str(tmp_path / "merged"), copy_chunk_bytes=64)
    assert _bytes(str(tmp_path / "merged")) == _bytes(whole)
    ds = IndexedDataset(str(tmp_path / "merged"))
    assert info == {"inputs": 3, "sequences": len(ds), "documents": 101, "tokens": ds.num_tokens,
                    "dtype": "uint16"}
    assert sorted(os.listdir(tmp_path)) == ["merged.bin", "merged.idx"]


def test_cli_input_dir(parts, tmp_path):
    root, prefixes, whole = parts
    spec = importlib.util.spec_from_file_location("merge_datasets_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert prefixes_in_dir(str(root / "parts")) == prefixes  # sorted by name: p0, p1, p2
    assert tool.main(["--input-dir", str(root / "parts"), "--output-prefix", str(tmp_path / "m")]) == 0
    assert _bytes(str(tmp_path / "m")) == _bytes(whole)
    assert tool.main(["--input", prefixes[0], "--output-prefix", prefixes[0]]) == 2
    assert tool.main(["--input-dir", str(tmp_path / "nowhere"), "--output-prefix", str(tmp_path / "x")]) == 2


def test_dtype_mismatch_refused(tmp_path):
    for name, dtype in (("a", np.uint16), ("b", np.int32)):
        with IndexedDatasetWriter(str(tmp_path / name), dtype) as w:
            w.add_document([1, 2, 3])
    with pytest.raises(ValueError, match=r"b holds int32 tokens but .*a holds uint16"):
        merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "out"))
    assert not any(n.startswith("out") for n in os.listdir(tmp_path))


def test_empty_documents_and_empty_parts_survive(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "a"), np.int32) as w:
        w.add_document([])
        w.add_document([4, 5])
    with IndexedDatasetWriter(str(tmp_path / "b"), np.int32):
        pass  # a dataset with no documents at all
    with IndexedDatasetWriter(str(tmp_path / "c"), np.int32) as w:
        w.add_document([6])
        w.add_document([])
    merge_datasets([str(tmp_path / p) for p in "abc"], str(tmp_path / "m"))
    with IndexedDatasetWriter(str(tmp_path / "ref"), np.int32) as w:
        for doc in ([], [4, 5], [6], []):
            w.add_document(doc)
    assert _bytes(str(tmp_path / "m")) == _bytes(str(tmp_path / "ref"))
