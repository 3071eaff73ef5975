"""Streaming reader for raw text corpora, with bad-input accounting.

Inputs are files, several files or glob patterns (a directory means every
supported file in it). Two formats, each optionally gzip-compressed:

    .jsonl / .json / anything else   one JSON object per line; the text lives under `json_keys`
    .txt                             each line is one document (its newline removed)

Reading is done in raw byte chunks of whole lines (`iter_line_chunks`), which
the preprocessing pool ships to workers; `parse_chunk` turns a chunk into
documents. Bad input is counted per kind with the first file:line of each and
skipped, never crashes a long run half way:

    malformed_json    the line is not a JSON object (or nests too deeply for the parser)
    missing_key       a requested key is absent
    non_string        a requested key holds something other than a string
    invalid_utf8      the line is not valid UTF-8, or a JSON \\u escape gives a lone surrogate
                      (a text that no tokenizer can encode)
    blank_line        an empty line in a JSON-lines file
    truncated_gzip    a .gz file ends before its end-of-stream marker (file:line reached)

Empty documents are counted too (`empty_document`) but are not bad input: they
are kept, as Megatron keeps them (a document with no sequence).
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

SKIPPED_KINDS = ("malformed_json", "missing_key", "non_string", "invalid_utf8", "blank_line",
                 "truncated_gzip")
EMPTY = "empty_document"
_READ_PIECE = 256 * 1024  # small reads bound what a truncated .gz can take with it


class BadInputError(ValueError):
    """Bad input met under --strict; names the kind and its first file:line."""


@dataclass
class InputStats:
    """Counts of each bad-input kind and where each kind was first seen ("file:line")."""

    counts: dict[str, int] = field(default_factory=dict)
    first: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, where: str, n: int = 1) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n
        self.first.setdefault(kind, where)

    def merge(self, other: "InputStats") -> None:
        """Fold in counts from a later chunk (its first-seen places come later in input order)."""
        for kind, n in other.counts.items():
            self.add(kind, other.first[kind], n)

    def skipped(self) -> dict[str, int]:
        """Counts of the kinds that were dropped (everything but empty documents)."""
        return {k: n for k, n in self.counts.items() if k != EMPTY}

    def check_strict(self) -> None:
        """Raise BadInputError for the first skipped kind, as --strict asks."""
        for kind in self.skipped():
            raise BadInputError(
                f"--strict: bad input of kind '{kind}' ({self.counts[kind]} so far), first at "
                f"{self.first[kind]}; fix the input or run without --strict to skip and count it")

    def lines(self) -> list[str]:
        """One human-readable line per kind, for summaries."""
        return [f"{kind}: {n} (first at {self.first[kind]})" for kind, n in sorted(self.counts.items())]


@dataclass
class Document:
    """One document: a text per requested key, and where it came from."""

    texts: dict[str, str]
    path: str
    line: int

    @property
    def source(self) -> str:
        return f"{self.path}:{self.line}"


def _is_gzip(path: str) -> bool:
    return path.endswith(".gz")


def is_text_format(path: str) -> bool:
    """True for plain-text inputs (one document per line), False for JSON lines."""
    base = path[:-3] if _is_gzip(path) else path
    return base.endswith(".txt")


def resolve_inputs(patterns: Sequence[str]) -> list[str]:
    """Expand files, directories and globs, in the order given; each must match something."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    paths: list[str] = []
    for pattern in map(str, patterns):
        if os.path.isdir(pattern):
            found = sorted(os.path.join(pattern, n) for n in os.listdir(pattern)
                           if n.endswith((".jsonl", ".json", ".txt", ".jsonl.gz", ".json.gz", ".txt.gz")))
        elif glob.has_magic(pattern):
            found = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
        else:
            found = [pattern] if os.path.isfile(pattern) else []
        if not found:
            raise FileNotFoundError(f"input {pattern!r} matches no file; pass existing .jsonl, "
                                    ".jsonl.gz or .txt files, a directory of them, or a glob")
        paths.extend(found)
    return paths


def iter_line_chunks(path: str, chunk_bytes: int = 2 << 20, stats: InputStats | None = None
                     ) -> Iterator[tuple[str, int, bytes]]:
    """Yield (path, first_line_number, blob) with blob holding whole lines, about chunk_bytes each.

    Lines keep their b"\\n"; a last line without one is completed. A truncated
    or corrupt .gz stops the file: it is counted in `stats` as truncated_gzip
    at the line reached, or raised (naming file and line) when stats is None.
    """
    opener = gzip.open if _is_gzip(path) else open
    line_no, carry, want = 1, b"", chunk_bytes
    with opener(path, "rb") as f:
        while True:
            blob, eof, damage = _read_about(f, want, carry)
            if damage is not None:
                # keep every whole line decompressed before the damage; the line it cut is the one reported
                cut = blob.rfind(b"\n") + 1
                if cut:
                    yield path, line_no, blob[:cut]
                damaged_line = line_no + blob.count(b"\n", 0, cut)
                _report_damage(f"{path}:{damaged_line}", damage, stats)
                return
            if eof:
                if blob:
                    yield path, line_no, blob if blob.endswith(b"\n") else blob + b"\n"
                return
            cut = blob.rfind(b"\n") + 1
            if cut == 0:  # one line longer than the chunk: read on until it ends
                carry, want = blob, len(blob) + chunk_bytes
                continue
            carry, want = blob[cut:], chunk_bytes
            yield path, line_no, blob[:cut]
            line_no += blob.count(b"\n", 0, cut)


def _report_damage(where: str, damage: Exception, stats: InputStats | None) -> None:
    if stats is None:
        raise BadInputError(f"{where}: compressed input is truncated or corrupt ({damage}); "
                            "re-create or re-download the file") from damage
    stats.add("truncated_gzip", where)


def _read_about(f, chunk_bytes: int, carry: bytes) -> tuple[bytes, bool, Exception | None]:
    """Read roughly chunk_bytes more after `carry`: (data, reached_eof, damage). A truncated or corrupt
    .gz ends the read with its error as `damage`, keeping what was decompressed before it."""
    pieces, size = [carry], len(carry)
    while size < chunk_bytes:
        try:
            # read1: one decompression step per call, so the step that meets the damage loses only its own bytes
            piece = f.read1(min(_READ_PIECE, chunk_bytes - size))
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            return b"".join(pieces), True, e
        if not piece:
            return b"".join(pieces), True, None
        pieces.append(piece)
        size += len(piece)
    return b"".join(pieces), False, None


def _document_text(raw: bytes, text_format: bool, keys: Sequence[str]) -> tuple[dict | None, str | None]:
    """(texts per key, None) for a good line, else (None, bad-input kind)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    if text_format:
        line = line[:-1] if line.endswith("\r") else line
        return {k: line for k in keys}, None
    if not line.strip():
        return None, "blank_line"
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: arrays/objects nested thousands deep
        return None, "malformed_json"
    if not isinstance(obj, dict):
        return None, "malformed_json"
    texts = {}
    for k in keys:
        if k not in obj:
            return None, "missing_key"
        if not isinstance(obj[k], str):
            return None, "non_string"
        texts[k] = obj[k]
    # Only a \uD800-\uDFFF escape can put a surrogate into a str decoded from valid UTF-8.
    if (b"\\ud" in raw or b"\\uD" in raw) and not all(map(_encodable, texts.values())):
        return None, "invalid_utf8"
    return texts, None


def _encodable(text: str) -> bool:
    """False for a text holding a lone surrogate (from JSON like "\\ud800"), which UTF-8 cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_chunk(path: str, first_line: int, blob: bytes, keys: Sequence[str],
                stats: InputStats) -> list[Document]:
    """Documents of one chunk, in order; bad lines are counted in `stats` and left out."""
    text_format = is_text_format(path)
    docs = []
    lines = blob.split(b"\n")
    lines.pop()  # the blob ends with b"\n": the last piece is always empty
    for i, raw in enumerate(lines):
        texts, bad = _document_text(raw, text_format, keys)
        if bad is not None:
            stats.add(bad, f"{path}:{first_line + i}")
        else:
            docs.append(Document(texts, path, first_line + i))
    return docs


def iter_documents(inputs: Sequence[str], json_keys: Sequence[str] = ("text",),
                   stats: InputStats | None = None, strict: bool = False,
                   chunk_bytes: int = 2 << 20) -> Iterator[Document]:
    """Stream every good document of `inputs` in order, counting bad input in `stats`.

    With strict=True the first bad input raises BadInputError instead.
    """
    stats = stats if stats is not None else InputStats()
    for path in resolve_inputs(inputs):
        for p, first, blob in iter_line_chunks(path, chunk_bytes, stats):
            docs = parse_chunk(p, first, blob, json_keys, stats)
            if strict:
                stats.check_strict()
            yield from docs
        if strict:
            stats.check_strict()
