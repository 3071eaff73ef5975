"""Tokenizers for preprocessing and generation, and SentencePiece training.

`build_tokenizer(type, model)` gives an object with encode / encode_batch /
decode / vocab_size / eod / bos / pad. The SentencePiece flavour behaves
exactly like Megatron-LM's GPTSentencePieceTokenizer (no BOS added, eod is
`</s>`), so token files match Megatron's byte for byte. The Hugging Face
flavour reads a `tokenizer.json` with the `tokenizers` library only.
"""
from __future__ import annotations

import heapq
import json
import os
import random
from typing import Iterable, Sequence

from megalite.config import choices

# data.tokenizer_type's choices, plus the name Megatron-LM's preprocess_data.py gives SentencePiece models
MEGATRON_NAMES = {"GPTSentencePieceTokenizer": "SentencePieceTokenizer"}
TOKENIZER_TYPES = choices("data.tokenizer_type") + tuple(MEGATRON_NAMES)
SENTENCEPIECE_TYPES = tuple(t for t in TOKENIZER_TYPES if MEGATRON_NAMES.get(t, t) == "SentencePieceTokenizer")
HUGGINGFACE_TYPES = tuple(t for t in TOKENIZER_TYPES if MEGATRON_NAMES.get(t, t) == "HuggingFaceTokenizer")
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]")


class SentencePieceTokenizer:
    """A SentencePiece model, with Megatron's GPTSentencePieceTokenizer semantics.

    `num_threads` is for encode_batch; keep it 1 inside worker processes so
    that N workers use N cores, not N * cores.
    """

    def __init__(self, model_file: str, num_threads: int = 1):
        import sentencepiece as spm

        self.model_file = str(model_file)
        self.num_threads = num_threads
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.model_file)
        except (RuntimeError, OSError) as e:  # e.g. "could not parse ModelProto": not a SentencePiece model
            raise ValueError(f"tokenizer model {self.model_file} is not a SentencePiece .model ({e}); pass the "
                             "PREFIX.model that `megalite train-tokenizer` (or spm_train) wrote") from e
        self.vocab_size = len(self.sp)
        self.eod = self.sp.eos_id()
        if self.eod < 0:
            raise ValueError(f"{self.model_file}: the SentencePiece model has no eos piece (eos_id=-1), "
                             "so documents cannot be ended; retrain it with eos_id set "
                             "(`megalite train-tokenizer` does so)")
        self.bos = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.pad = self.sp.pad_id() if self.sp.pad_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode_as_ids(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Same ids as encode() per text, encoded by SentencePiece's own batch path."""
        return self.sp.encode(list(texts), out_type=int, num_threads=self.num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode_ids([int(i) for i in ids])


class HuggingFaceTokenizer:
    """A `tokenizer.json` loaded with the `tokenizers` library; encodes without special tokens."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self.model_file = _tokenizer_json_path(path)
        try:
            self.tok = Tokenizer.from_file(self.model_file)
        except Exception as e:  # noqa: BLE001 - tokenizers raises a plain Exception for a broken file
            raise ValueError(f"tokenizer model {self.model_file} is not a Hugging Face tokenizer.json ({e})") from e
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        configured = _configured_eos(os.path.dirname(self.model_file)) if os.path.isdir(path) else None
        self.eod = self._find((configured,) if configured else EOS_CANDIDATES)
        if self.eod is None:
            raise ValueError(
                f"{self.model_file}: no end-of-document token found (looked for "
                f"{configured or ', '.join(EOS_CANDIDATES)}); add one of {', '.join(EOS_CANDIDATES)} "
                "as a special token to the tokenizer (tokenizer.add_special_tokens) and save it again")
        self.bos = self._find(BOS_CANDIDATES)
        self.pad = self._find(PAD_CANDIDATES)

    def _find(self, candidates) -> int | None:
        for token in candidates:
            idx = self.tok.token_to_id(token)
            if idx is not None:
                return idx
        return None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        fast = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)  # skips offsets
        return [e.ids for e in fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _tokenizer_json_path(path: str) -> str:
    if os.path.isdir(path):
        candidate = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(candidate):
            raise FileNotFoundError(f"{path} is a directory without tokenizer.json; pass a tokenizer.json "
                                    "file or a directory that holds one")
        return candidate
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer model {path} not found; pass a tokenizer.json file or its directory")
    return path


def _configured_eos(directory: str) -> str | None:
    """The eos_token named by a tokenizer_config.json next to tokenizer.json, if any."""
    cfg = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(cfg):
        return None
    with open(cfg, encoding="utf-8") as f:
        eos = json.load(f).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def build_tokenizer(tokenizer_type: str, tokenizer_model: str, num_threads: int = 1):
    """Build a tokenizer by Megatron's type name from a model file (or HF directory)."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; valid types: {', '.join(TOKENIZER_TYPES)}")
    if tokenizer_model is None or not os.path.exists(str(tokenizer_model)):
        raise FileNotFoundError(f"tokenizer model {tokenizer_model} not found; pass --tokenizer-model "
                                "with an existing file (a .model for SentencePiece, tokenizer.json for HF)")
    if tokenizer_type in SENTENCEPIECE_TYPES:
        if os.path.isdir(str(tokenizer_model)):
            raise ValueError(f"tokenizer model {tokenizer_model} is a directory; SentencePiece needs "
                             "the .model file itself")
        return SentencePieceTokenizer(str(tokenizer_model), num_threads=num_threads)
    return HuggingFaceTokenizer(str(tokenizer_model))


def _truncate_utf8(text: str, max_bytes: int) -> str:
    data = text.encode("utf-8")
    return text if len(data) <= max_bytes else data[:max_bytes].decode("utf-8", "ignore")


def training_pieces(text: str, max_bytes: int) -> list[str]:
    """Cut a document at line ends into pieces of at most max_bytes, newlines kept.

    Keeping newlines inside pieces lets the model learn pieces like "):\n";
    a single line longer than max_bytes is truncated (the trainer would
    otherwise drop the whole piece).
    """
    pieces, cur, size = [], [], 0
    for line in text.splitlines(keepends=True):
        line = _truncate_utf8(line, max_bytes)
        n = len(line.encode("utf-8"))
        if cur and size + n > max_bytes:
            pieces.append("".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += n
    if cur:
        pieces.append("".join(cur))
    return [p for p in pieces if p.strip()]


DEFAULT_SAMPLE_BYTES = 1 << 30  # 1 GiB of sampled text: ample for a 32k-256k vocabulary


def text_bytes(text: str) -> int:
    """UTF-8 size of `text`; O(1) for ASCII (CPython knows a str is ASCII without scanning it)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def sample_documents(documents: Iterable, max_docs: int, seed: int, max_doc_chars: int,
                     max_bytes: int = DEFAULT_SAMPLE_BYTES) -> list[str]:
    """Uniform sample of texts in one pass, at most max_docs of them and max_bytes (UTF-8) in all.

    Each document gets a random key; the sample is the documents taken in key
    order (a uniformly random order of the whole stream) until the next one
    would break either bound. A heap keeps just those (bottom-k sampling), so
    memory holds at most max_bytes of text however large the corpus or its
    documents; with room for everything, everything is kept. Each text is
    first cut to max_doc_chars. The sample comes back in stream order.
    """
    if max_docs < 1 or max_bytes < 1:
        raise ValueError(f"max_docs={max_docs} and max_bytes={max_bytes} must both be >= 1")
    rng = random.Random(seed)
    heap: list[tuple[float, int, str, int]] = []  # (-key, position, text, bytes): the largest key on top
    threshold, held = 1.0, 0  # keys >= threshold can never be in the sample again
    for position, text in enumerate(documents):
        key = rng.random()
        if key >= threshold:
            continue
        text = text[:max_doc_chars]
        size = text_bytes(text)
        heapq.heappush(heap, (-key, position, text, size))
        held += size
        while held > max_bytes or len(heap) > max_docs:
            neg_key, _, _, dropped = heapq.heappop(heap)
            held -= dropped
            threshold = -neg_key
    return [text for _, _, text, _ in sorted(heap, key=lambda item: item[1])]


def train_sentencepiece(inputs: Sequence[str], output_prefix: str, vocab_size: int,
                        model_type: str = "bpe", json_keys: Sequence[str] = ("text",),
                        byte_fallback: bool = False, character_coverage: float = 0.9995,
                        user_defined_symbols: Sequence[str] = (), max_sentences: int = 1_000_000,
                        seed: int = 1234, max_sentence_length: int = 4192, split_digits: bool = True,
                        normalization: str = "identity", num_threads: int | None = None,
                        max_bytes: int = DEFAULT_SAMPLE_BYTES, stats=None, strict: bool = False) -> str:
    """Train a SentencePiece model on a uniform sample of the corpus; returns PREFIX.model.

    The sample holds at most max_sentences documents and max_bytes of text
    (see sample_documents). Ids are unk=0, bos=1 (`<s>`), eos=2 (`</s>`, the
    end-of-document token), pad=3 (`<pad>`). Each sampled document is cut at
    line ends into pieces of at most max_sentence_length bytes (see
    training_pieces). The defaults suit LLM pretraining as Llama's tokenizer
    does: no normalization and whitespace kept, so decode(encode(text)) ==
    text; digits split one by one. Bad input lines are skipped and counted in
    `stats` (a megalite.data.corpus.InputStats), or raise with strict=True.
    """
    import sentencepiece as spm

    from megalite.data.corpus import iter_documents

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model type {model_type!r} is not supported; use bpe or unigram")
    docs = (text for doc in iter_documents(inputs, json_keys, stats=stats, strict=strict)
            for text in doc.texts.values())
    sample = sample_documents(docs, max_sentences, seed, max_doc_chars=64 * max_sentence_length,
                              max_bytes=max_bytes)
    sentences = [piece for text in sample for piece in training_pieces(text, max_sentence_length)]
    if not sentences:
        raise ValueError(f"no text found in {list(inputs)} under keys {list(json_keys)}; "
                         "check --input and --json-keys")
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    spm.set_random_generator_seed(seed)  # the trainer's own sentence shuffle
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_prefix=str(output_prefix), vocab_size=vocab_size,
            model_type=model_type, byte_fallback=byte_fallback, character_coverage=character_coverage,
            user_defined_symbols=list(user_defined_symbols), unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            normalization_rule_name=normalization, remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, split_digits=split_digits,
            input_sentence_size=max_sentences, shuffle_input_sentence=True, seed_sentencepiece_size=1_000_000,
            max_sentence_length=max_sentence_length, num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2)
    except RuntimeError as e:  # SentencePiece's own refusals, e.g. "Vocabulary size too high (8000). ..."
        raise ValueError(f"SentencePiece refused to train {output_prefix}.model: {e}") from e
    return f"{output_prefix}.model"
