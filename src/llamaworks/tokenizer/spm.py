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
import struct
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


def _fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """Decode one protobuf message level: (field number, wire type, value) triples."""
    out, i, n = [], 0, len(buf)

    def varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            if i >= n:
                raise ValueError("truncated varint")
            b = buf[i]
            i += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    while i < n:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            out.append((field, wire, varint()))
        elif wire == 1:
            out.append((field, wire, buf[i:i + 8]))
            i += 8
        elif wire == 2:
            size = varint()
            if i + size > n:
                raise ValueError("truncated field")
            out.append((field, wire, buf[i:i + size]))
            i += size
        elif wire == 5:
            out.append((field, wire, buf[i:i + 4]))
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return out


def _int32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def read_sentencepiece(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Pieces, scores, types and settings of a sentencepiece `tokenizer.model` (the ModelProto is
    decoded directly, so protobuf is not needed)."""
    p = Path(path)
    if not p.is_file():
        raise TokenizerError(f"{p}: no such SentencePiece model file")
    pieces: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    trainer = {3: 1, 40: 0, 41: 1, 42: 2, 43: -1}  # model_type UNIGRAM, unk/bos/eos/pad ids
    norm: dict[int, Any] = {1: "", 3: 1, 4: 1}  # name, add_dummy_prefix, remove_extra_whitespaces
    try:
        for field, wire, value in _fields(p.read_bytes()):
            if field == 1 and wire == 2:
                piece, score, kind = "", 0.0, TYPE_NORMAL
                for f, w, v in _fields(value):
                    if f == 1 and w == 2:
                        piece = v.decode("utf-8")
                    elif f == 2 and w == 5:
                        score = struct.unpack("<f", v)[0]
                    elif f == 3 and w == 0:
                        kind = v
                pieces.append(piece)
                scores.append(score)
                types.append(kind)
            elif field == 2 and wire == 2:
                trainer.update({f: v for f, w, v in _fields(value) if w == 0 and f in trainer})
            elif field == 3 and wire == 2:
                for f, w, v in _fields(value):
                    if f == 1 and w == 2:
                        norm[1] = v.decode("utf-8")
                    elif f in (3, 4) and w == 0:
                        norm[f] = v
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise TokenizerError(f"{p}: not a SentencePiece model ({e})") from None
    if not pieces:
        raise TokenizerError(f"{p}: not a SentencePiece model (no pieces)")
    if trainer[3] != 2:  # 1 UNIGRAM, 2 BPE, 3 WORD, 4 CHAR
        kind = {1: "unigram", 3: "word", 4: "char"}.get(trainer[3], str(trainer[3]))
        raise TokenizerError(f"{p}: SentencePiece model type {kind!r} is not supported (only BPE "
                             "models, as Llama uses); convert it to a tokenizer.json with "
                             "transformers and load that with Tokenizer.from_file")
    if norm[1] not in ("identity", "") or norm[4]:
        raise TokenizerError(
            f"{p}: SentencePiece normalizer {norm[1]!r} (remove_extra_whitespaces="
            f"{bool(norm[4])}) is not supported; llamaworks reproduces Llama's identity "
            "normalizer only. Convert the model to tokenizer.json with transformers and load that "
            "with Tokenizer.from_file")

    def opt_id(field: int) -> int | None:
        v = _int32(trainer[field])
        return v if 0 <= v < len(pieces) else None

    return {"pieces": pieces, "scores": scores, "types": types,
            "add_space_prefix": bool(norm[3]), "unk_id": opt_id(40), "bos_id": opt_id(41),
            "eos_id": opt_id(42), "pad_id": opt_id(43)}
