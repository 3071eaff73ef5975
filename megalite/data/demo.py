"""The demo corpus: real text that is on every machine, turned into tokens.

The Python standard library's own source files are the corpus: every machine
that runs megalite has them, they need no download, and they are real enough
for a small model's loss to fall well below its starting value. One file is
one document. Left out besides the tests: data dressed as code, which a small
model otherwise learns to recite, namely the `encodings` package (codec tables,
1.4 MB of lines like "'\\xe9'  #  0xE9 -> LATIN SMALL LETTER E WITH ACUTE") and
`pydoc_data` (the help topics as one big string).
Everything is built once and cached, and rebuilt when the recipe that built it
changes; a file lock makes it safe for several ranks (or several runs) to ask
at the same time.
"""
from __future__ import annotations

import fcntl
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

DEMO_VOCAB_SIZE = 4096
DEFAULT_MAX_BYTES = 8 * 1024 * 1024  # plenty for the tiny preset, quick to tokenize on 2 cores
TOKENIZER_SENTENCES = 20000
SKIP = ("site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "encodings", "pydoc_data")
# What the cached files are built from: a cache built by another recipe (or by an older megalite,
# which wrote none) is rebuilt.
RECIPE = {"version": 2, "max_bytes": DEFAULT_MAX_BYTES, "skip": list(SKIP), "vocab_size": DEMO_VOCAB_SIZE,
          "tokenizer": f"bpe, byte fallback, {TOKENIZER_SENTENCES} sentences"}


@dataclass(frozen=True)
class DemoData:
    corpus: str          # the .jsonl corpus
    tokenizer_model: str  # SentencePiece .model
    prefix: str          # Megatron dataset prefix (PREFIX.bin / PREFIX.idx)


def default_cache_dir() -> Path:
    """$MEGALITE_CACHE, else ~/.cache/megalite."""
    root = os.environ.get("MEGALITE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "megalite")
    return Path(root) / "demo"


def stdlib_sources(max_bytes: int = DEFAULT_MAX_BYTES) -> list[Path]:
    """The stdlib's .py files in a fixed order, up to max_bytes in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if any(part in SKIP for part in path.relative_to(root).parts):
            continue
        size = path.stat().st_size
        if total + size > max_bytes:
            continue
        files.append(path)
        total += size
    if not files:
        raise RuntimeError(f"no Python source files found under {root}; pass a corpus explicitly "
                           "with data.path=... instead of relying on the demo corpus")
    return files


def write_corpus(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[int, int]:
    """Write the stdlib corpus as JSONL ({"text", "source"} per file); returns (docs, bytes)."""
    tmp = path.with_suffix(".tmp")
    docs = nbytes = 0
    with open(tmp, "w", encoding="utf-8") as out:
        for src in stdlib_sources(max_bytes):
            text = src.read_text(encoding="utf-8", errors="replace")
            out.write(json.dumps({"text": text, "source": src.name}) + "\n")
            docs += 1
            nbytes += len(text.encode("utf-8"))
    os.replace(tmp, path)
    return docs, nbytes


def read_recipe(path: Path) -> dict | None:
    """The recipe a cache was built by; None when it has none (or a torn one)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def ensure_demo_data(cache_dir: str | os.PathLike | None = None, log=print) -> DemoData:
    """Build (once) the demo corpus, its tokenizer and its token files; return their paths."""
    from megalite.data.preprocess import preprocess
    from megalite.data.tokenizer import train_sentencepiece

    root = Path(cache_dir) if cache_dir else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    data = DemoData(corpus=str(root / "corpus.jsonl"), tokenizer_model=str(root / "tokenizer.model"),
                    prefix=str(root / "demo_text_document"))
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait and then reuse
        recipe = root / "recipe.json"
        stale = read_recipe(recipe) != RECIPE
        if stale:  # (the index caches beside the data notice new .idx files themselves)
            for path in (data.corpus, data.tokenizer_model, data.prefix + ".bin", data.prefix + ".idx"):
                Path(path).unlink(missing_ok=True)
        if not os.path.exists(data.corpus):
            docs, nbytes = write_corpus(Path(data.corpus))
            log(f"demo corpus: {docs} stdlib source files, {nbytes / 1e6:.1f} MB -> {data.corpus}")
        if not os.path.exists(data.tokenizer_model):
            train_sentencepiece([data.corpus], str(root / "tokenizer"), vocab_size=DEMO_VOCAB_SIZE,
                                model_type="bpe", byte_fallback=True, max_sentences=TOKENIZER_SENTENCES)
            log(f"demo tokenizer: SentencePiece BPE, {DEMO_VOCAB_SIZE} tokens -> {data.tokenizer_model}")
        if not os.path.exists(data.prefix + ".idx"):
            summary = preprocess([data.corpus], str(root / "demo"), "SentencePieceTokenizer",
                                 data.tokenizer_model, append_eod=True, workers=max(1, os.cpu_count() or 1))
            log(f"demo tokens: {summary}")
        if stale:  # written last: its presence means everything above was built by this recipe
            recipe.write_text(json.dumps(RECIPE))
    return data
