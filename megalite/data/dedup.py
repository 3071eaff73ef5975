"""Exact and near-duplicate removal for jsonl / jsonl.gz (or .txt) corpora, before preprocessing.

Exact duplicates: two documents are the same when their *normalized* texts are equal, compared by
a 128-bit BLAKE2b digest. Normalization (`normalize`): Unicode NFC, then lowercase (str.lower),
then every run of whitespace collapsed to one space and the ends stripped.

Near duplicates: MinHash signatures (datasketch.MinHash, `num_perm` permutations from `seed`) of
the document's shingle set, indexed by LSH banding (datasketch.MinHashLSH, `bands` x `rows`; by
default datasketch's optimal parameters for the threshold). Shingles are word n-grams of the
normalized text (default 5 words) or, with char_ngrams, character n-grams; a document shorter than
n is one shingle. A document is a near duplicate when an earlier *kept* document is an LSH candidate
and their estimated Jaccard (share of equal MinHash values) is >= threshold; it joins the cluster
of the first such document (lowest input position). Only kept documents enter the index, so a
removal never chains through documents that were themselves removed.

Streaming: the main process reads raw line chunks (megalite.data.corpus), a pool of `workers`
processes parses them and computes digests and signatures, results come back in input order with a
bounded window in flight, and each kept line is written at once, byte for byte. Memory is one
digest per document plus the signature and LSH band keys of each kept document, not the text. The
report's true Jaccard (of the shingle sets) for the first few pairs re-reads the input up to the
last document they name. Bad lines are counted per kind (as in preprocessing) and skipped.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing as mp
import os
import time
import unicodedata
from collections import deque
from contextlib import closing
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from megalite.data.corpus import InputStats, iter_line_chunks, parse_chunk, resolve_inputs

INSTALL_HINT = 'near-duplicate removal needs datasketch: pip install "megalite[dedup]" (or pip install datasketch)'
SCHEME = "affine32"  # datasketch's default MinHash scheme, named so rebuilt sketches compare with the workers'


class MissingDependencyError(ImportError):
    """datasketch is not installed; megalite's own type, so the command line says so in one line."""


def _datasketch():
    try:
        import datasketch
    except ImportError as e:
        raise MissingDependencyError(INSTALL_HINT) from e
    return datasketch


@dataclass(frozen=True)
class DedupConfig:
    json_key: str = "text"
    threshold: float = 0.8
    num_perm: int = 128
    bands: int | None = None
    rows: int | None = None
    ngram: int = 5
    char_ngrams: bool = False
    seed: int = 1
    exact_only: bool = False  # near-dedup off: only exact duplicates are removed


def normalize(text: str) -> str:
    """NFC, lowercase, whitespace runs collapsed to one space (ends stripped)."""
    return " ".join(unicodedata.normalize("NFC", text).lower().split())


def exact_digest(normalized: str) -> bytes:
    # 128 bits: a chance collision among a billion documents is ~1e-21, and 16 bytes a document is small
    return hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).digest()


def shingles(normalized: str, n: int, char_ngrams: bool = False) -> set[str]:
    """Word (or character) n-grams of a normalized text; a text shorter than n is one shingle."""
    units = normalized if char_ngrams else normalized.split()
    if not units:
        return set()
    sep = "" if char_ngrams else " "
    if len(units) <= n:
        return {sep.join(units)}
    return {sep.join(units[i:i + n]) for i in range(len(units) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def lsh_params(threshold: float, num_perm: int, bands: int | None, rows: int | None) -> tuple[int, int]:
    """(bands, rows): both given, one given (the other fills num_perm), or datasketch's optimum."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold {threshold} must be in (0, 1]")
    if num_perm < 2:
        raise ValueError(f"num_perm {num_perm} must be at least 2")
    if bands is None and rows is None:
        lsh = _datasketch().MinHashLSH(threshold=threshold, num_perm=num_perm)
        return lsh.b, lsh.r
    bands = bands if bands is not None else num_perm // rows
    rows = rows if rows is not None else num_perm // bands
    if bands < 2 or rows < 1 or bands * rows > num_perm:
        raise ValueError(f"bands {bands} x rows {rows} must have bands >= 2, rows >= 1 and "
                         f"bands * rows <= num_perm ({num_perm})")
    return bands, rows


# ---- workers: parse a chunk, digest and sign each document ---------------------------------------

@dataclass
class ChunkSignatures:
    """One chunk's good documents: their line index in the chunk, digest and MinHash values (or None
    for a text with no shingle, which only exact dedup sees)."""

    rows: list[int]
    digests: list[bytes]
    signatures: list
    stats: InputStats


class Signer:
    """Parses and signs one raw chunk; runs in the main process or in a pool worker."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        if not cfg.exact_only:
            # permutations are drawn once per process and shared by every MinHash (what MinHash.bulk does)
            self.proto = _datasketch().MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=SCHEME)

    def sign(self, normalized: str):
        grams = shingles(normalized, self.cfg.ngram, self.cfg.char_ngrams)
        if self.cfg.exact_only or not grams:
            return None
        m = _datasketch().MinHash(seed=self.cfg.seed, permutations=self.proto.permutations, scheme=SCHEME)
        m.update_batch([g.encode("utf-8") for g in grams])
        return m.hashvalues

    def __call__(self, chunk: tuple[str, int, bytes]) -> ChunkSignatures:
        path, first_line, blob = chunk
        stats = InputStats()
        out = ChunkSignatures([], [], [], stats)
        for doc in parse_chunk(path, first_line, blob, (self.cfg.json_key,), stats):
            norm = normalize(doc.texts[self.cfg.json_key])
            out.rows.append(doc.line - first_line)
            out.digests.append(exact_digest(norm))
            out.signatures.append(self.sign(norm))
        return out


_WORKER: Signer | None = None


def _init_worker(cfg: DedupConfig) -> None:
    global _WORKER
    _WORKER = Signer(cfg)


def _sign_in_worker(chunk) -> ChunkSignatures:
    return _WORKER(chunk)


def ordered_signatures(cfg: DedupConfig, chunks: Iterator, workers: int) -> Iterator[tuple[bytes, ChunkSignatures]]:
    """(blob, signatures) per chunk in input order; at most 2 * workers chunks in flight so reading
    never runs ahead of signing (the blob is kept to write the kept lines unchanged)."""
    if workers <= 1:
        signer = Signer(cfg)
        for chunk in chunks:
            yield chunk[2], signer(chunk)
        return
    with mp.Pool(workers, initializer=_init_worker, initargs=(cfg,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk[2], pool.apply_async(_sign_in_worker, (chunk,))))
            if len(pending) >= 2 * workers:
                blob, res = pending.popleft()
                yield blob, res.get()
        while pending:
            blob, res = pending.popleft()
            yield blob, res.get()


# ---- main process: decide, write, report ---------------------------------------------------------

@dataclass
class Pair:
    kept: int      # document positions (0-based over good documents, in input order)
    removed: int
    estimated: float
    true: float | None = None


@dataclass
class Deduper:
    """The streaming decision: exact digests of every document, LSH over the kept ones."""

    cfg: DedupConfig
    bands: int
    rows: int
    max_pairs: int = 10
    documents: int = 0
    exact_removed: int = 0
    near_removed: int = 0
    cluster_heads: set = field(default_factory=set)
    pairs: list = field(default_factory=list)

    def __post_init__(self):
        self.seen: set[bytes] = set()
        self.kept_minhash: dict[int, object] = {}
        if not self.cfg.exact_only:
            ds = _datasketch()
            self._lean = ds.LeanMinHash
            self.lsh = ds.MinHashLSH(num_perm=self.cfg.num_perm, params=(self.bands, self.rows))

    def keep(self, digest: bytes, signature) -> tuple[bool, int | None, float]:
        """(keep?, the kept document it duplicates or None, estimated Jaccard) for the next document."""
        index = self.documents
        self.documents += 1
        if digest in self.seen:
            self.exact_removed += 1
            return False, None, 1.0
        self.seen.add(digest)
        if signature is None:
            return True, None, 0.0
        m = self._lean(seed=self.cfg.seed, hashvalues=signature, scheme=SCHEME)
        head, est = self._best_match(m)
        if head is not None:
            self.near_removed += 1
            self.cluster_heads.add(head)
            return False, head, est
        self.lsh.insert(index, m, check_duplication=False)
        self.kept_minhash[index] = m
        return True, None, 0.0

    def _best_match(self, m) -> tuple[int | None, float]:
        # the earliest kept candidate at or over the threshold: clusters keep their first document
        for key in sorted(self.lsh.query(m)):
            est = m.jaccard(self.kept_minhash[key])
            if est >= self.cfg.threshold:
                return key, est
        return None, 0.0

    def note_pair(self, head: int, est: float) -> None:
        """Remember the first few (kept, removed) pairs; their true Jaccard comes after the pass."""
        if len(self.pairs) < self.max_pairs:
            self.pairs.append(Pair(head, self.documents - 1, est))


def _opener(path: str):
    return gzip.open if path.endswith(".gz") else open


def default_report_path(output: str) -> str:
    base = output[:-3] if output.endswith(".gz") else output
    base = os.path.splitext(base)[0] if base.endswith((".jsonl", ".json", ".txt")) else base
    return base + ".dedup_report.json"


def _write_kept(out, blob: bytes, sigs: ChunkSignatures, deduper: Deduper) -> None:
    lines = blob.split(b"\n")
    for row, digest, signature in zip(sigs.rows, sigs.digests, sigs.signatures):
        keep, head, est = deduper.keep(digest, signature)
        if keep:
            out.write(lines[row] + b"\n")  # the input line itself, byte for byte
        elif head is not None:
            deduper.note_pair(head, est)


def _fill_true_jaccard(paths: Sequence[str], cfg: DedupConfig, pairs: list, chunk_bytes: int) -> None:
    """Re-read the input up to the last document a pair names, for the pairs' true Jaccard (the pass
    kept no text)."""
    wanted = {p.kept for p in pairs} | {p.removed for p in pairs}
    texts, index = {}, 0
    for path in paths:
        for p, first, blob in iter_line_chunks(path, chunk_bytes, InputStats()):
            for doc in parse_chunk(p, first, blob, (cfg.json_key,), InputStats()):
                if index in wanted:
                    texts[index] = doc.texts[cfg.json_key]
                index += 1
            if len(texts) == len(wanted):
                break
        if len(texts) == len(wanted):
            break
    for pair in pairs:
        a = shingles(normalize(texts[pair.kept]), cfg.ngram, cfg.char_ngrams)
        b = shingles(normalize(texts[pair.removed]), cfg.ngram, cfg.char_ngrams)
        pair.true = jaccard(a, b)


def report_dict(dedup: Deduper, stats: InputStats, cfg: DedupConfig, seconds: float, output: str) -> dict:
    skipped = stats.skipped()
    removed = dedup.exact_removed + dedup.near_removed
    return {
        "output": output, "documents_read": dedup.documents, "bad_lines": sum(skipped.values()),
        "bad_input": {k: {"count": n, "first": stats.first[k]} for k, n in sorted(skipped.items())},
        "exact_duplicates_removed": dedup.exact_removed, "near_duplicates_removed": dedup.near_removed,
        "near_duplicate_clusters": len(dedup.cluster_heads), "documents_removed": removed,
        "documents_kept": dedup.documents - removed, "seconds": round(seconds, 3),
        "settings": {"json_key": cfg.json_key, "normalization": "NFC, lowercase, whitespace collapsed",
                     "near_dedup": not cfg.exact_only, "threshold": cfg.threshold, "num_perm": cfg.num_perm,
                     "bands": dedup.bands, "rows": dedup.rows, "ngram": cfg.ngram,
                     "shingles": "char" if cfg.char_ngrams else "word", "seed": cfg.seed},
        "pairs": [{"kept": p.kept, "removed": p.removed, "estimated_jaccard": p.estimated,
                   "true_jaccard": p.true} for p in dedup.pairs],
    }


def summary_line(report: dict) -> str:
    return (f"dedup: {report['documents_read']} documents read, {report['bad_lines']} bad lines skipped, "
            f"{report['exact_duplicates_removed']} exact and {report['near_duplicates_removed']} near duplicates "
            f"removed ({report['near_duplicate_clusters']} clusters), {report['documents_kept']} kept "
            f"-> {report['output']} in {report['seconds']:.2f} s")


def dedup(inputs: Sequence[str], output: str, cfg: DedupConfig = DedupConfig(), report_path: str | None = None,
          workers: int = 1, chunk_bytes: int = 1 << 20, max_pairs: int = 10) -> dict:
    """Write the kept lines of `inputs` to `output` (.gz: gzip) and the JSON report; returns the report.

    The output and report appear only when the whole run succeeds (written beside, then renamed).
    """
    start = time.perf_counter()
    paths = resolve_inputs(inputs)
    bands, rows = (0, 0) if cfg.exact_only else lsh_params(cfg.threshold, cfg.num_perm, cfg.bands, cfg.rows)
    if cfg.ngram < 1:
        raise ValueError(f"ngram {cfg.ngram} must be at least 1")
    deduper, stats = Deduper(cfg, bands, rows, max_pairs), InputStats()
    chunks = (c for p in paths for c in iter_line_chunks(p, chunk_bytes, stats))
    tmp = f"{output}.tmp{os.getpid()}"
    try:
        with _opener(output)(tmp, "wb") as out, closing(ordered_signatures(cfg, chunks, workers)) as results:
            for blob, sigs in results:
                _write_kept(out, blob, sigs, deduper)
                stats.merge(sigs.stats)
        _fill_true_jaccard(paths, cfg, deduper.pairs, chunk_bytes)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    report = report_dict(deduper, stats, cfg, time.perf_counter() - start, output)
    report_path = report_path or default_report_path(output)
    with open(report_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    return report
