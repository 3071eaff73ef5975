#!/usr/bin/env python
"""Benchmark preprocessing: ours at 1 and N workers against a Megatron-style pipeline.

    python tools/bench_preprocess.py                      # ~20 MB synthetic corpus, N = all cores
    python tools/bench_preprocess.py --mb 200 --workers 16 --tokenizer-model tok.model

The corpus is deterministic pseudo-English (Zipf-distributed made-up words).
Without --tokenizer-model a small SentencePiece BPE model is trained on it
first. The baseline mirrors Megatron-LM's own tools/preprocess_data.py: a
multiprocessing Pool.imap over single lines with chunksize 32, json.loads and
sp.encode_as_ids per document in the workers, and megatron.core's
IndexedDatasetBuilder.add_document per document in the main process (our
writer's add_document when megatron-core is not importable). Both outputs are
compared byte for byte. Last, the main process's own ceiling is measured for
both designs (unpickling results and writing them, no encoding): it is what
limits throughput once there are enough workers.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import warnings

import numpy as np

from megalite.data.preprocess import preprocess
from megalite.data.tokenizer import build_tokenizer, train_sentencepiece


def make_corpus(path: str, megabytes: float, seed: int = 0) -> int:
    """Write ~megabytes of JSON lines of pseudo-English documents; returns the document count."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    freq = 1.0 / np.arange(1, 27)
    words = ["".join(rng.choice(letters, size=rng.integers(1, 10), p=freq / freq.sum())) for _ in range(20_000)]
    zipf = 1.0 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()
    target, written, docs = int(megabytes * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            ids = rng.choice(len(words), size=int(rng.integers(20, 800)), p=zipf)
            sentences = np.array_split(ids, max(1, len(ids) // 15))
            text = " ".join(" ".join(words[i] for i in s).capitalize() + "." for s in sentences)
            line = json.dumps({"text": text, "id": docs}) + "\n"
            f.write(line)
            written += len(line)
            docs += 1
    return docs


_BASELINE = {}


def _baseline_init(model: str, key: str, append_eod: bool) -> None:
    import sentencepiece as spm

    _BASELINE.update(sp=spm.SentencePieceProcessor(model_file=model), key=key, append_eod=append_eod)


def _baseline_encode(json_line: str):
    """Megatron's Encoder.encode for one line, without sentence splitting."""
    sp, key = _BASELINE["sp"], _BASELINE["key"]
    data = json.loads(json_line)
    ids = sp.encode_as_ids(data[key])
    lens = [len(ids)] if ids else []
    if ids and _BASELINE["append_eod"]:
        ids.append(sp.eos_id())
        lens[-1] += 1
    return {key: ids}, {key: lens}, len(json_line)


def _builder(prefix: str, dtype):
    """(add_document, finalize, name): megatron.core's builder when importable, else ours (same bytes)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    except ImportError:
        from megalite.data.indexed import IndexedDatasetWriter

        writer = IndexedDatasetWriter(prefix, dtype)
        return writer.add_document, writer.finalize, "megalite IndexedDatasetWriter (megatron-core not importable)"
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    return builder.add_document, lambda: builder.finalize(prefix + ".idx"), "megatron.core IndexedDatasetBuilder"


def megatron_style(corpus: str, prefix: str, model: str, workers: int, key: str = "text") -> dict:
    """Run the Megatron-style pipeline; returns timing and token counts."""
    from megalite.data.indexed import optimal_dtype

    dtype = optimal_dtype(build_tokenizer("SentencePieceTokenizer", model).vocab_size)
    add_document, finalize, kind = _builder(prefix, dtype)
    start, docs, tokens = time.perf_counter(), 0, 0
    with open(corpus, encoding="utf-8") as fin, \
            mp.Pool(workers, initializer=_baseline_init, initargs=(model, key, True)) as pool:
        for ids, lens, _ in pool.imap(_baseline_encode, fin, 32):
            add_document(ids[key], lens[key])
            docs += 1
            tokens += len(ids[key])
    finalize()
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "documents": docs, "writer": kind}


def main_process_ceilings(corpus: str, model: str, tmp: str) -> tuple[float, float]:
    """Tokens/s the main process alone can absorb (unpickle results + write), ours vs Megatron-style.

    With enough workers this, not encoding, caps throughput; it is measured
    on pre-encoded, pre-pickled results so that no encoding time is counted.
    """
    import pickle

    from megalite.data.corpus import iter_line_chunks
    from megalite.data.indexed import IndexedDatasetWriter
    from megalite.data.preprocess import ChunkEncoder, PreprocessSummary

    encoder = ChunkEncoder("SentencePieceTokenizer", model, ("text",), True)
    ours = [pickle.dumps(encoder(c)) for c in iter_line_chunks(corpus)]
    _baseline_init(model, "text", True)
    with open(corpus, encoding="utf-8") as f:
        theirs = [pickle.dumps(_baseline_encode(line)) for line in f]
    start = time.perf_counter()
    summary = PreprocessSummary({"text": os.path.join(tmp, "ceil_ours")}, tokens={"text": 0})
    with IndexedDatasetWriter(summary.outputs["text"], encoder.dtype) as w:
        for blob in ours:
            summary.write_chunk({"text": w}, pickle.loads(blob))
    ours_s = time.perf_counter() - start
    add_document, finalize, _ = _builder(os.path.join(tmp, "ceil_megatron"), encoder.dtype.type)
    start = time.perf_counter()
    for blob in theirs:
        ids, lens, _ = pickle.loads(blob)
        add_document(ids["text"], lens["text"])
    finalize()
    return summary.total_tokens / ours_s, summary.total_tokens / (time.perf_counter() - start)


def _same_bytes(a: str, b: str) -> bool:
    for ext in (".bin", ".idx"):
        with open(a + ext, "rb") as fa, open(b + ext, "rb") as fb:
            if fa.read() != fb.read():
                return False
    return True


def _row(name: str, workers: int, seconds: float, tokens: int) -> str:
    rate = tokens / seconds
    return f"{name:<28} workers={workers:<3} {seconds:7.2f} s  {rate / 1e6:7.3f} M tokens/s  " \
           f"{rate / workers / 1e6:7.3f} M tokens/s/worker"


def run(args) -> None:
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        t = time.perf_counter()
        docs = make_corpus(corpus, args.mb, args.seed)
        size = os.path.getsize(corpus)
        print(f"corpus: {docs} documents, {size / 1e6:.1f} MB ({time.perf_counter() - t:.1f} s to write)")
        model = args.tokenizer_model
        if model is None:
            t = time.perf_counter()
            model = train_sentencepiece([corpus], os.path.join(tmp, "sp"), vocab_size=args.vocab_size,
                                        max_sentences=5000, seed=args.seed)
            print(f"tokenizer: SentencePiece BPE, vocab {args.vocab_size} ({time.perf_counter() - t:.1f} s to train)")
        rows, ours = [], {}
        for w in sorted({1, args.workers}):
            s = preprocess([corpus], os.path.join(tmp, f"ours{w}"), "SentencePieceTokenizer", model,
                           append_eod=True, workers=w, log_interval=0)
            ours[w] = s
            rows.append(_row("megalite preprocess", w, s.seconds, s.total_tokens))
        base = megatron_style(corpus, os.path.join(tmp, "megatron"), model, args.workers)
        rows.append(_row("Megatron-style baseline", args.workers, base["seconds"], base["tokens"]))
        identical = all(_same_bytes(os.path.join(tmp, "megatron"), s.outputs["text"]) for s in ours.values())
        print(f"baseline writer: {base['writer']}; outputs byte-identical: {identical}")
        print("\n".join(rows))
        ours_n = ours[args.workers]
        print(f"speedup at {args.workers} workers: {base['seconds'] / ours_n.seconds:.2f}x "
              f"({ours_n.total_tokens / size:.3f} tokens per input byte)")
        ours_cap, theirs_cap = main_process_ceilings(corpus, model, tmp)
        print(f"main-process ceiling (unpickle + write only, caps scaling with many workers): "
              f"ours {ours_cap / 1e6:.1f} M tokens/s, Megatron-style {theirs_cap / 1e6:.1f} M tokens/s "
              f"({ours_cap / theirs_cap:.1f}x)")
        if not identical:
            sys.exit("outputs differ from the Megatron-style baseline")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=20.0, help="synthetic corpus size in MB")
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--tokenizer-model", help="SentencePiece .model to use instead of training one")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="where the temporary corpus and outputs go (default: system temp)")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
