"""megalite dedup on a synthetic corpus with planted exact and near duplicates at known edit levels:
what is removed and kept, the report's exact numbers, bad lines, determinism (two runs, 1 vs 2
workers), .jsonl.gz input and the command line."""
import gzip
import json
import random
import subprocess
import sys

import pytest

pytest.importorskip("datasketch")

from megalite.data.dedup import DedupConfig, dedup, jaccard, lsh_params, normalize, shingles  # noqa: E402

WORDS = [f"w{i}" for i in range(5000)]


def doc(rng, n=200):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def change_words(rng, text, k):
    words = text.split()
    for i in rng.sample(range(len(words)), k):
        words[i] = f"changed{i}"
    return " ".join(words)


def build_corpus(rng):
    """Lines and the positions that must go: (lines, exact removed, near removed)."""
    base = [doc(rng) for _ in range(30)]
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(base)]
    exact, near = [], []
    # exact duplicates: same text after normalization (case, whitespace) but not the same line
    lines.append(json.dumps({"text": "  " + base[3].upper().replace(" ", " \n\t "), "id": "x3"}))
    exact.append(len(lines) - 1)
    lines.append(json.dumps({"text": base[7], "id": "x7"}))
    exact.append(len(lines) - 1)
    # near duplicates: 2 of 200 words changed (word 5-gram Jaccard ~0.9) -> removed at 0.8
    for j in (1, 10, 20):
        lines.append(json.dumps({"text": change_words(rng, base[j], 2), "id": f"n{j}"}))
        near.append(len(lines) - 1)
    # a document sharing only ~30% of its text -> kept
    half = base[5].split()
    lines.append(json.dumps({"text": " ".join(half[:60] + doc(rng, 140).split()), "id": "far5"}))
    # bad lines: invalid JSON, missing key, non-string
    lines += ["{not json", json.dumps({"body": "no text key"}), json.dumps({"text": 5})]
    return lines, exact, near


@pytest.fixture
def corpus(tmp_path):
    lines, exact, near = build_corpus(random.Random(0))
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, lines, exact, near


def kept_ids(path):
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_normalization_and_shingles():
    assert normalize("  Caf\u0065\u0301  ÜBER\n\tx ") == "caf\u00e9 über x"
    assert shingles("a b c", 5) == {"a b c"}
    assert shingles("a b c d", 2) == {"a b", "b c", "c d"}
    assert shingles("abcd", 3, char_ngrams=True) == {"abc", "bcd"}
    assert jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)


def test_lsh_params():
    b, r = lsh_params(0.8, 128, None, None)
    assert b * r <= 128 and b >= 2
    assert lsh_params(0.8, 128, 16, None) == (16, 8)
    assert lsh_params(0.8, 128, None, 4) == (32, 4)
    with pytest.raises(ValueError, match="bands"):
        lsh_params(0.8, 128, 20, 10)


def test_planted_duplicates_removed_and_report_exact(corpus, tmp_path):
    path, lines, exact, near = corpus
    out = tmp_path / "out.jsonl"
    report = dedup([str(path)], str(out), workers=1)
    good = len(lines) - 3
    assert report["documents_read"] == good
    assert report["bad_lines"] == 3
    assert set(report["bad_input"]) == {"malformed_json", "missing_key", "non_string"}
    assert report["exact_duplicates_removed"] == 2
    assert report["near_duplicates_removed"] == 3
    assert report["near_duplicate_clusters"] == 3
    assert report["documents_removed"] == 5
    assert report["documents_kept"] == good - 5
    ids = kept_ids(out)
    assert ids == [i for i in range(30)] + ["far5"]  # the first of each cluster, input order
    kept_lines = out.read_text(encoding="utf-8").splitlines()
    assert kept_lines == [lines[i] for i in range(30)] + [lines[len(lines) - 4]]  # lines unchanged
    pairs = report["pairs"]
    assert [(p["kept"], p["removed"]) for p in pairs] == [(1, 32), (10, 33), (20, 34)]
    for p in pairs:
        assert 0.8 <= p["true_jaccard"] < 1.0 and abs(p["estimated_jaccard"] - p["true_jaccard"]) < 0.15
    assert json.loads((tmp_path / "out.dedup_report.json").read_text()) == report


def test_fails_without_near_dedup(corpus, tmp_path):
    """The planted near duplicates are found by MinHash, not by the exact pass."""
    path, *_ = corpus
    report = dedup([str(path)], str(tmp_path / "out.jsonl"), DedupConfig(exact_only=True))
    assert report["exact_duplicates_removed"] == 2
    assert report["near_duplicates_removed"] == 0 and report["documents_removed"] == 2


def test_deterministic_runs_and_workers(corpus, tmp_path):
    path, *_ = corpus
    outs, reports = [], []
    for i, workers in enumerate((1, 1, 2)):
        out = tmp_path / f"out{i}.jsonl"
        report = dedup([str(path)], str(out), workers=workers, chunk_bytes=2000)  # many chunks
        outs.append(out.read_bytes())
        reports.append({k: v for k, v in report.items() if k not in ("seconds", "output")})
    assert outs[0] == outs[1] == outs[2]
    assert reports[0] == reports[1] == reports[2]


def test_gzip_input_and_output(corpus, tmp_path):
    path, *_ = corpus
    gz = tmp_path / "corpus.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    plain = dedup([str(path)], str(tmp_path / "a.jsonl"))
    zipped = dedup([str(gz)], str(tmp_path / "b.jsonl.gz"), report_path=str(tmp_path / "b.json"))
    assert gzip.decompress((tmp_path / "b.jsonl.gz").read_bytes()) == (tmp_path / "a.jsonl").read_bytes()
    for key in ("documents_read", "bad_lines", "exact_duplicates_removed", "near_duplicates_removed", "pairs"):
        assert plain[key] == zipped[key]


def test_char_ngrams_find_the_same_near_duplicates(corpus, tmp_path):
    path, *_ = corpus
    report = dedup([str(path)], str(tmp_path / "c.jsonl"), DedupConfig(char_ngrams=True, ngram=8))
    assert report["near_duplicates_removed"] == 3 and report["settings"]["shingles"] == "char"


def test_command_line(corpus, tmp_path):
    path, *_ = corpus
    out, rep = tmp_path / "cli.jsonl", tmp_path / "cli.json"
    res = subprocess.run([sys.executable, "-m", "megalite", "dedup", "--input", str(path), "--output", str(out),
                          "--report", str(rep), "--workers", "2", "--chunk-mb", "0.002"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "2 exact and 3 near duplicates removed (3 clusters)" in res.stderr
    assert json.loads(rep.read_text())["documents_kept"] == 31
    bad = subprocess.run([sys.executable, "-m", "megalite", "dedup", "--input", str(path), "--output", str(out),
                          "--bands", "20", "--rows", "10"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("megalite:") and "bands" in bad.stderr
