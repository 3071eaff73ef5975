#!/usr/bin/env python
"""Train a SentencePiece tokenizer on a (sampled) corpus.

    python tools/train_tokenizer.py --input corpus/*.jsonl.gz --output-prefix tok \\
        --vocab-size 32000 --model-type bpe --byte-fallback

writes tok.model and tok.vocab (text kept exactly: no normalization, whitespace
and newlines preserved, digits split). The corpus is streamed once and sampled
uniformly over documents, keeping at most --max-sentences of them and --max-mb
of text, so neither the corpus nor a few huge documents have to fit in memory.
Bad input lines (as in preprocess_data.py) are skipped and counted with their
first file:line; --strict makes them fatal. Ids: unk 0, <s> 1, </s> 2 (end of
document), <pad> 3.
"""
from __future__ import annotations

import argparse
import sys

from megalite.data.corpus import BadInputError, InputStats
from megalite.data.tokenizer import DEFAULT_SAMPLE_BYTES, train_sentencepiece


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help=".jsonl, .jsonl.gz or .txt files, dirs or globs")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--byte-fallback", action="store_true", help="unknown characters become byte tokens")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--user-defined-symbols", default="", help="comma-separated pieces kept whole, e.g. <tab>,<code>")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--max-sentences", type=int, default=1_000_000, help="documents sampled for training")
    p.add_argument("--max-mb", type=float, default=DEFAULT_SAMPLE_BYTES / (1 << 20),
                   help="MB (MiB) of text the sample may hold in memory, whatever the documents' sizes")
    p.add_argument("--strict", action="store_true", help="fail on the first bad input instead of skipping it")
    p.add_argument("--max-sentence-length", type=int, default=4192, help="bytes; longer lines are cut")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--normalization", default="identity", choices=["identity", "nmt_nfkc", "nfkc"],
                   help="identity keeps text as is, so decoding gives back the exact input")
    p.add_argument("--no-split-digits", action="store_true", help="let digits merge into longer pieces")
    args = p.parse_args(argv)
    symbols = [s for s in args.user_defined_symbols.split(",") if s]
    stats = InputStats()
    try:
        model = train_sentencepiece(args.input, args.output_prefix, args.vocab_size, model_type=args.model_type,
                                    json_keys=args.json_keys, byte_fallback=args.byte_fallback,
                                    character_coverage=args.character_coverage, user_defined_symbols=symbols,
                                    max_sentences=args.max_sentences, seed=args.seed,
                                    max_sentence_length=args.max_sentence_length,
                                    split_digits=not args.no_split_digits, normalization=args.normalization,
                                    max_bytes=max(1, int(args.max_mb * (1 << 20))), stats=stats,
                                    strict=args.strict)
    except (BadInputError, FileNotFoundError, ValueError, RuntimeError) as e:  # RuntimeError: trainer's own
        model, error = None, e
    for line in InputStats(stats.skipped(), stats.first).lines():
        print(f"skipped {line}", file=sys.stderr)
    if model is None:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {model}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
