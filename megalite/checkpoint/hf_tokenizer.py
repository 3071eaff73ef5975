"""The run's tokenizer in the form Hugging Face `AutoTokenizer` loads (tokenizer.json + tokenizer_config.json).

SentencePiece models (the demo's and most megalite runs') become a `tokenizers`
tokenizer.json with the same ids; a HuggingFace tokenizer.json is copied as is.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from megalite.checkpoint.io import CheckpointError
from megalite.data.tokenizer import SENTENCEPIECE_TYPES, build_tokenizer


def sentencepiece_to_tokenizer_json(model_file: str, out_path: Path) -> None:
    """A `tokenizers` tokenizer.json giving the same ids as the SentencePiece BPE model (AutoTokenizer loads it).

    SentencePiece BPE merges are implied by its pieces: every split of a piece into two known pieces is
    a merge, ranked by the merged piece's id (SentencePiece scores BPE pieces by creation order).
    Whitespace follows the model: optional dummy prefix, spaces as '▁', no other normalisation.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    pieces = [p.piece for p in proto.pieces]
    unk, spec = pieces[proto.trainer_spec.unk_id], proto.normalizer_spec
    if proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        model = models.Unigram([(p.piece, p.score) for p in proto.pieces], proto.trainer_spec.unk_id,
                               proto.trainer_spec.byte_fallback)
    elif proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        vocab = {p: i for i, p in enumerate(pieces)}
        merges = sorted((i, vocab[p[:k]], vocab[p[k:]]) for i, p in enumerate(pieces)
                        if proto.pieces[i].type == proto.pieces[i].NORMAL
                        for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab)
        model = models.BPE(vocab=vocab, merges=[(pieces[a], pieces[b]) for _, a, b in merges], unk_token=unk,
                           fuse_unk=True, byte_fallback=proto.trainer_spec.byte_fallback)
    else:
        raise CheckpointError(f"{model_file}: SentencePiece model type {proto.trainer_spec.model_type} cannot be "
                              "converted (only bpe and unigram)")
    tok = Tokenizer(model)
    prefix = [normalizers.Prepend("\u2581")] if spec.add_dummy_prefix else []
    tok.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", "\u2581")])
    strip = [decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix else []
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()] + strip)
    special = (proto.pieces[0].CONTROL, proto.pieces[0].UNKNOWN)
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in proto.pieces if p.type in special])
    tok.save(str(out_path))


def write_tokenizer(tokenizer_type: str, tokenizer_model: str | None, out_dir: Path) -> dict:
    """The run's tokenizer as tokenizer.json + tokenizer_config.json (AutoTokenizer loads them); the
    SentencePiece .model is copied too. Returns {'bos': id|None, 'eos': id|None}."""
    if not tokenizer_model:
        return {"bos": None, "eos": None}
    tok = build_tokenizer(tokenizer_type, tokenizer_model)
    if tokenizer_type in SENTENCEPIECE_TYPES:
        shutil.copyfile(tok.model_file, out_dir / "tokenizer.model")
        sentencepiece_to_tokenizer_json(tok.model_file, out_dir / "tokenizer.json")
        name = lambda i: None if i is None or i < 0 else tok.sp.id_to_piece(i)  # noqa: E731
        unk = tok.sp.unk_id()
    else:
        shutil.copyfile(tok.model_file, out_dir / "tokenizer.json")
        name = lambda i: None if i is None else tok.tok.id_to_token(i)  # noqa: E731
        unk = None
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 30, "eos_token": name(tok.eod), "bos_token": name(tok.bos),
            "pad_token": name(tok.pad), "unk_token": name(unk)}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(conf, indent=2), encoding="utf-8")
    return {"bos": tok.bos, "eos": tok.eod}
