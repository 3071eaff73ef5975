"""Corpus -> Megatron .bin/.idx token files, byte-identical to Megatron-LM's preprocess_data.py.

Per document and key: tokens = encode(text); a non-empty document gets EOD
appended with append_eod and becomes one sequence; an empty one stays a
document with no sequence and no EOD. Documents keep input order. Output is
PREFIX_{KEY}_document.bin/.idx with dtype optimal_dtype(vocab_size).

Speed and memory: the main process reads raw line chunks (~2 MB) and keeps a
bounded window of them in flight on a pool of `workers` processes. A worker
parses and batch-encodes a whole chunk and returns one numpy token buffer with
its lengths and document boundaries, which is cheap to pickle (Megatron ships
a Python list per document). Results come back in order and go straight to
IndexedDatasetWriter.add_raw; the window keeps memory constant however big the
corpus is.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from megalite.data.corpus import EMPTY, BadInputError, InputStats, iter_line_chunks, parse_chunk, resolve_inputs
from megalite.data.indexed import IndexedDatasetWriter, optimal_dtype
from megalite.data.tokenizer import build_tokenizer


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron's naming: PREFIX_{KEY}_document (documents are not split into sentences)."""
    return f"{output_prefix}_{key}_document"


@dataclass
class KeyBuffer:
    """One chunk's encoded documents for one key, ready for IndexedDatasetWriter.add_raw."""

    tokens: np.ndarray          # all tokens back to back, in the output dtype
    sequence_lengths: np.ndarray  # int32, one per non-empty document
    document_ends: np.ndarray     # int64, per document: sequences so far in this chunk


@dataclass
class ChunkResult:
    buffers: dict[str, KeyBuffer]
    documents: int
    input_bytes: int
    stats: InputStats


class ChunkEncoder:
    """Parses and encodes one raw chunk; runs in the main process or in a pool worker."""

    def __init__(self, tokenizer_type: str, tokenizer_model: str, json_keys: Sequence[str],
                 append_eod: bool):
        self.tokenizer = build_tokenizer(tokenizer_type, tokenizer_model, num_threads=1)
        self.json_keys = tuple(json_keys)
        self.append_eod = append_eod
        self.dtype = np.dtype(optimal_dtype(self.tokenizer.vocab_size))

    def __call__(self, chunk: tuple[str, int, bytes]) -> ChunkResult:
        path, first_line, blob = chunk
        stats = InputStats()
        docs = parse_chunk(path, first_line, blob, self.json_keys, stats)
        buffers = {}
        for key in self.json_keys:
            ids = self.tokenizer.encode_batch([d.texts[key] for d in docs])
            buffers[key] = self._pack(ids)
            for d, t in zip(docs, ids):
                if not t:
                    stats.add(EMPTY, d.source)
        return ChunkResult(buffers, len(docs), len(blob), stats)

    def _pack(self, ids: list[list[int]]) -> KeyBuffer:
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        nonempty = lengths > 0
        if self.append_eod:
            eod = self.tokenizer.eod
            for t in ids:
                if t:  # Megatron: no EOD for an empty document
                    t.append(eod)
            lengths += nonempty
        total = int(lengths.sum())
        tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=total)
        return KeyBuffer(tokens, lengths[nonempty].astype(np.int32), np.cumsum(nonempty, dtype=np.int64))


_WORKER_ENCODER: ChunkEncoder | None = None


def _init_worker(*encoder_args) -> None:
    global _WORKER_ENCODER
    # one core per worker: HF tokenizers would otherwise start a thread per core in every worker
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER_ENCODER = ChunkEncoder(*encoder_args)


def _encode_in_worker(chunk) -> ChunkResult:
    return _WORKER_ENCODER(chunk)


def ordered_results(encoder_args: tuple, chunks: Iterator, workers: int) -> Iterator[ChunkResult]:
    """Encode chunks on `workers` processes, yielding results in input order.

    At most 2 * workers chunks are in flight, so reading never runs ahead of
    encoding (Pool.imap would pull the whole input into its task queue).
    workers <= 1 encodes in this process.
    """
    if workers <= 1:
        encoder = ChunkEncoder(*encoder_args)
        for chunk in chunks:
            yield encoder(chunk)
        return
    with mp.Pool(workers, initializer=_init_worker, initargs=encoder_args) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@dataclass
class PreprocessSummary:
    """What a preprocessing run wrote and met."""

    outputs: dict[str, str]
    documents: int = 0
    tokens: dict[str, int] = field(default_factory=dict)
    input_bytes: int = 0
    seconds: float = 0.0
    stats: InputStats = field(default_factory=InputStats)

    def write_chunk(self, writers: dict, result: ChunkResult) -> None:
        """Write one encoded chunk with `writers` ({key: IndexedDatasetWriter}) and fold its counts in.

        This is the main process's whole share of the work per chunk (the workers parse and
        encode), so its speed caps preprocessing however many workers there are.
        """
        for key, buf in result.buffers.items():
            writers[key].add_raw(buf.tokens.tobytes(), buf.sequence_lengths, buf.document_ends)
            self.tokens[key] += len(buf.tokens)
        self.documents += result.documents
        self.input_bytes += result.input_bytes
        self.stats.merge(result.stats)

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    @property
    def empty_documents(self) -> int:
        return self.stats.counts.get(EMPTY, 0)

    def to_dict(self) -> dict:
        return {"outputs": dict(self.outputs), "documents": self.documents, "tokens": dict(self.tokens),
                "empty_documents": self.empty_documents, "first_empty_document": self.stats.first.get(EMPTY),
                "input_bytes": self.input_bytes,
                "seconds": self.seconds, "tokens_per_s": self.total_tokens / max(self.seconds, 1e-9),
                "bad_input": {k: {"count": n, "first": self.stats.first[k]}
                              for k, n in self.stats.skipped().items()}}

    def progress_line(self) -> str:
        s = max(self.seconds, 1e-9)
        return (f"{self.documents} docs, {self.total_tokens} tokens, {self.documents / s:.0f} docs/s, "
                f"{self.total_tokens / s:.0f} tokens/s, {self.input_bytes / s / 1e6:.2f} MB/s")

    def __str__(self) -> str:
        return self.progress_line() + f" in {self.seconds:.2f} s"

    def report(self) -> str:
        empty = f"empty documents (kept, no sequence): {self.empty_documents}"
        if self.empty_documents:
            empty += f" (first at {self.stats.first[EMPTY]})"
        lines = [f"done in {self.seconds:.2f} s: " + self.progress_line(), empty]
        lines += [f"skipped {line}" for line in InputStats(self.stats.skipped(), self.stats.first).lines()]
        lines += [f"wrote {prefix}.bin/.idx" for prefix in self.outputs.values()]
        return "\n".join(lines)


def no_documents_message(paths: Sequence[str], json_keys: Sequence[str], stats: InputStats) -> str:
    skipped = "; ".join(InputStats(stats.skipped(), stats.first).lines()) or "the input holds no lines"
    return (f"no document found in {', '.join(paths)} (skipped {skipped}); nothing was written. Check --input "
            f"and --json-keys {' '.join(json_keys)}, or pass --allow-empty to write empty outputs")


def preprocess(inputs: Sequence[str], output_prefix: str, tokenizer_type: str, tokenizer_model: str,
               json_keys: Sequence[str] = ("text",), append_eod: bool = False, workers: int = 1,
               log_interval: int = 100_000, strict: bool = False, chunk_bytes: int = 2 << 20,
               log=None, allow_empty: bool = False) -> PreprocessSummary:
    """Tokenize `inputs` into PREFIX_{KEY}_document.bin/.idx per key; returns the summary.

    Bad input is skipped and counted (see megalite.data.corpus); with strict
    the first bad input raises BadInputError and nothing is written. Outputs
    appear atomically, only when the whole run succeeds; a run in which no
    document survives (an empty or binary input, the wrong --json-keys) raises
    BadInputError and writes nothing, unless allow_empty. Progress goes to
    `log` (default stderr) every log_interval documents (0: never).
    """
    log = log or sys.stderr
    if not json_keys or len(set(json_keys)) != len(json_keys):
        raise ValueError(f"json keys {list(json_keys)} must be non-empty and distinct")
    paths = resolve_inputs(inputs)
    encoder_args = (tokenizer_type, str(tokenizer_model), tuple(json_keys), append_eod)
    dtype = optimal_dtype(build_tokenizer(tokenizer_type, tokenizer_model).vocab_size)
    summary = PreprocessSummary({k: output_prefix_for(output_prefix, k) for k in json_keys},
                                tokens={k: 0 for k in json_keys})
    read_stats = InputStats()  # truncated .gz files are found by the reader, in this process
    chunks = (c for p in paths for c in iter_line_chunks(p, chunk_bytes, read_stats))
    start, next_log = time.perf_counter(), log_interval
    with ExitStack() as stack:
        writers = {k: stack.enter_context(IndexedDatasetWriter(summary.outputs[k], dtype)) for k in json_keys}
        # closing() stops the pool at once if writing fails or the run is interrupted
        results = stack.enter_context(closing(ordered_results(encoder_args, chunks, workers)))
        for result in results:
            summary.write_chunk(writers, result)
            if strict:
                read_stats.check_strict()
                summary.stats.check_strict()
            summary.seconds = time.perf_counter() - start
            if log_interval and summary.documents >= next_log:
                print(summary.progress_line(), file=log, flush=True)
                next_log = (summary.documents // log_interval + 1) * log_interval
        summary.stats.merge(read_stats)
        if strict:
            summary.stats.check_strict()
        if summary.documents == 0 and not allow_empty:
            raise BadInputError(no_documents_message(paths, json_keys, summary.stats))
    summary.seconds = time.perf_counter() - start
    return summary

