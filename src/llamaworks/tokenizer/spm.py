"""SentencePiece (Llama 1/2) vocabularies as an HF `tokenizers` BPE with byte fallback.

llama.cpp's SPM tokenizer (and sentencepiece's own BPE model) starts from the UTF-8 characters of
each text fragment and repeatedly merges the adjacent pair whose concatenation is the vocabulary
piece with the highest score, the leftmost pair on ties; characters left without a piece become
`<0xXX>` byte tokens. An HF BPE reproduces that when its merge list is every (left, right) split of
every piece, ranked by the score of the merged piece. Spaces become "▁", and a "▁" is prepended to
every fragment that starts the text or follows a special token (llama.cpp's `add_space_prefix`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, normalizers
from tokenizers import Tokenizer as HFTokenizer

from llamaworks.errors import TokenizerError

SPIECE_UNDERLINE = "▁"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")

# GGUF / sentencepiece piece types (the numbering is the same in both).
TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED = 1, 2, 3, 4
TYPE_UNUSED, TYPE_BYTE = 5, 6


def merges_from_scores(pieces: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Every (left, right) split of every piece whose halves are pieces too, best merge first.

    Rank = the merged piece's score, highest first. llama.cpp breaks score ties by position
    (leftmost first); a static rank cannot, so among equal scores longer results and longer left
    halves come first, which reproduces the leftmost-first growth of runs like Llama's "▁▁▁▁"
    pieces (all scored -1e9)."""
    index = {p: i for i, p in enumerate(pieces)}
    ranked: list[tuple[float, int, int, int, str, str]] = []
    for merged, i in index.items():
        if len(merged) < 2:
            continue
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in index and right in index:
                ranked.append((-float(scores[i]), -len(merged), -cut, i, left, right))
    ranked.sort()
    return [(r[4], r[5]) for r in ranked]


def add_typed_tokens(tok: HFTokenizer, pieces: Sequence[str], types: Sequence[int] | None) -> None:
    """Register control/unknown pieces as special added tokens (split out of the text only when
    special tokens are parsed) and user-defined pieces as plain added tokens (always split out),
    as llama.cpp does. (HF's `add_special_tokens` marks everything special, so the user-defined
    ones go through `add_tokens`.)"""
    if types is None:
        return
    special, user = [], []
    for piece, t in zip(pieces, types, strict=False):
        if t in (TYPE_CONTROL, TYPE_UNKNOWN, TYPE_USER_DEFINED):
            is_special = t != TYPE_USER_DEFINED
            token = AddedToken(piece, special=is_special, normalized=False, lstrip=False,
                               rstrip=False, single_word=False)
            (special if is_special else user).append(token)
    tok.add_special_tokens(special)
    tok.add_tokens(user)


def build_spm_backend(pieces: Sequence[str], scores: Sequence[float], types: Sequence[int] | None,
                      *, add_space_prefix: bool = True, unk_id: int | None = 0) -> HFTokenizer:
    """An HF tokenizer that tokenizes like llama.cpp's SPM vocabulary type."""
    if len(scores) != len(pieces):
        raise TokenizerError(f"SentencePiece vocabulary has {len(pieces)} pieces but "
                             f"{len(scores)} scores; the GGUF/model file is corrupt, re-convert it")
    vocab = {p: i for i, p in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise TokenizerError("SentencePiece vocabulary has duplicate pieces; re-convert the model")
    unk = pieces[unk_id] if unk_id is not None and 0 <= unk_id < len(pieces) else None
    model = models.BPE(vocab=vocab, merges=merges_from_scores(pieces, scores), unk_token=unk,
                       fuse_unk=False, byte_fallback=True)
    tok = HFTokenizer(model)
    steps: list[normalizers.Normalizer] = []
    if add_space_prefix:
        steps.append(normalizers.Prepend(SPIECE_UNDERLINE))
    steps.append(normalizers.Replace(" ", SPIECE_UNDERLINE))
    tok.normalizer = normalizers.Sequence(steps)
    dec: list[decoders.Decoder] = [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(),
                                   decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    add_typed_tokens(tok, pieces, types)
    return tok


class PieceDecoder:
    """llama.cpp's detokenizer for a SentencePiece vocabulary: every token's piece as bytes
    (normal pieces with "▁" -> " ", `<0xXX>` byte pieces as that byte, control/unknown/user-defined
    pieces verbatim, unused pieces as nothing), concatenated and decoded as UTF-8 with U+FFFD for
    invalid sequences; the prefix space of the first piece is dropped (add_space_prefix).

    HF's ByteFallback decoder agrees on valid text but turns a whole run of byte tokens into
    U+FFFD when any byte in it is invalid, where llama.cpp keeps the valid bytes."""

    def __init__(self, pieces: Sequence[str], types: Sequence[int] | None,
                 add_space_prefix: bool = True) -> None:
        self.add_space_prefix = add_space_prefix
        self.pieces: list[bytes] = []
        special = []
        for i, piece in enumerate(pieces):
            t = types[i] if types is not None else None
            if t in (TYPE_CONTROL, TYPE_UNKNOWN):
                special.append(i)
                data = piece.encode("utf-8")
            elif t == TYPE_USER_DEFINED:
                data = piece.encode("utf-8")
            elif t == TYPE_UNUSED:
                data = b""
            elif (t == TYPE_BYTE or t is None) and _BYTE_PIECE.fullmatch(piece):
                data = bytes([int(piece[3:5], 16)])
            else:
                data = piece.replace(SPIECE_UNDERLINE, " ").encode("utf-8")
            self.pieces.append(data)
        self.special = frozenset(special)

    def __call__(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        pieces, special = self.pieces, self.special
        if skip_special_tokens:
            data = b"".join(pieces[i] for i in ids if i not in special)
        else:
            data = b"".join(pieces[i] for i in ids)
        text = data.decode("utf-8", errors="replace")
        if self.add_space_prefix and text.startswith(" "):
            text = text[1:]
        return text


def read_sentencepiece(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Pieces, scores, types and settings of a sentencepiece `tokenizer.model`, read with
    sentencepiece's own `ModelProto`."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    p = Path(path)
    if not p.is_file():
        raise TokenizerError(f"{p}: no such SentencePiece model file")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(p.read_bytes())
    except DecodeError as e:
        raise TokenizerError(f"{p}: not a SentencePiece model ({e})") from None
    if not proto.pieces:
        raise TokenizerError(f"{p}: not a SentencePiece model (no pieces)")
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != trainer.BPE:
        kind = trainer.ModelType.Name(trainer.model_type).lower()
        raise TokenizerError(f"{p}: SentencePiece model type {kind!r} is not supported (only BPE "
                             "models, as Llama uses); convert it to a tokenizer.json with "
                             "transformers and load that with Tokenizer.from_file")
    if norm.name not in ("identity", "") or norm.remove_extra_whitespaces:
        raise TokenizerError(
            f"{p}: SentencePiece normalizer {norm.name!r} (remove_extra_whitespaces="
            f"{norm.remove_extra_whitespaces}) is not supported; llamaworks reproduces Llama's "
            "identity normalizer only. Convert the model to tokenizer.json with transformers and "
            "load that with Tokenizer.from_file")
    n = len(proto.pieces)

    def opt_id(v: int) -> int | None:
        return v if 0 <= v < n else None

    return {"pieces": [x.piece for x in proto.pieces], "scores": [x.score for x in proto.pieces],
            "types": [x.type for x in proto.pieces], "add_space_prefix": norm.add_dummy_prefix,
            "unk_id": opt_id(trainer.unk_id), "bos_id": opt_id(trainer.bos_id),
            "eos_id": opt_id(trainer.eos_id), "pad_id": opt_id(trainer.pad_id)}
