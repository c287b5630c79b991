"""Meta's Llama 3 `tokenizer.model` (tiktoken format) as an HF `tokenizers` byte-level BPE.

The file is one `<base64 token bytes> <rank>` line per token, ranks 0..n-1 (128000 for Llama 3).
tiktoken merges, inside each pre-token, the adjacent pair whose concatenation has the lowest rank;
an HF BPE does the same when its merges are every (left, right) split of every token whose halves
are tokens too, ordered by the merged token's rank (the derivation of transformers'
`TikTokenConverter`), with `ignore_merges` (a pre-token that is a token is taken whole, as tiktoken
does). Token strings are the GPT-2 byte-to-unicode spelling of the bytes, as in Llama 3's
tokenizer.json and GGUF. The pre-tokenizer is Llama 3's regex as llama.cpp applies it.

Meta's 256 special tokens follow the ranks (ids n..n+255). The ranks file is the same for Llama
3.0, 3.1, 3.2 and 3.3; the names of the special tokens are not, and the file does not say which
it is. Llama 3.0 (Meta's llama3 `tokenizer.py`) names only begin/end_of_text, start/end_header_id
and eot_id; Llama 3.1 onwards (meta-llama/llama-models' `models/llama3_1/api/tokenizer.py` from
its first commit, then `models/llama3/`) also name 128004 `<|finetune_right_pad_id|>`, 128005
`<|step_id|>`, 128008 `<|eom_id|>` (end of message: a stop token) and 128010 `<|python_tag|>`
(a tool call follows), and number the reserved tokens from 2 again at 128011
(`LLAMA31_SPECIAL_TOKENS`). They only rename slots that 3.0 never emits, so 3.1's names are the
default; 3.0's are used when a `params.json` beside the file describes a Llama 3.0 model (it does
not set `use_scaled_rope`, which every 3.1/3.2/3.3 model's sets: Meta's `sku_list.py`). Llama
Guard 3 8B's params leave it unset too, so it gets 3.0's names (it emits neither eom_id nor
python_tag). HF's converted tokenizer.json for 3.1/3.2 names 128005 `<|reserved_special_token_2|>`
and numbers the reserved tokens from 3 at 128011 (transformers' `convert_llama_weights_to_hf`);
the named tokens have the same ids in both.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, decoders, models
from tokenizers import Tokenizer as HFTokenizer

from llamaworks.errors import TokenizerError
from llamaworks.tokenizer import pretokenize

NUM_RESERVED_SPECIAL_TOKENS = 256
# Meta's llama3 tokenizer.py (Llama 3.0): the named special tokens, then reserved ones up to 256.
LLAMA3_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|reserved_special_token_4|>", "<|eot_id|>",  # end of turn
    *(f"<|reserved_special_token_{i}|>" for i in range(5, NUM_RESERVED_SPECIAL_TOKENS - 5)))
_LLAMA31_NAMED = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",  # end of message
    "<|eot_id|>",  # end of turn
    "<|python_tag|>")
# meta-llama/llama-models' Llama 3.1 tokenizer.py (also 3.2/3.3 text models): the reserved
# tokens after the named ones are numbered from 2.
LLAMA31_SPECIAL_TOKENS: tuple[str, ...] = (
    *_LLAMA31_NAMED, *(f"<|reserved_special_token_{2 + i}|>"
                       for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(_LLAMA31_NAMED))))
SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {"3": LLAMA3_SPECIAL_TOKENS,
                                               "3.1": LLAMA31_SPECIAL_TOKENS}
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"

_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+\r?\n?")


@lru_cache(maxsize=1)
def byte_to_unicode() -> tuple[str, ...]:
    """GPT-2's printable spelling of each byte value (what byte-level BPE vocabularies store)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    out: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return tuple(out[b] for b in range(256))


def token_string(data: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in data)


def is_tiktoken_file(path: str | os.PathLike[str]) -> bool:
    """True when the file starts with a `<base64> <rank>` line (a SentencePiece model is a
    binary protobuf)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    first = head.split(b"\n", 1)[0] + (b"\n" if b"\n" in head else b"")
    return bool(first) and _LINE.fullmatch(first) is not None


def read_tiktoken_ranks(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """{token bytes: rank} of a tiktoken file; the ranks must be 0..n-1 (they become the ids)."""
    p = Path(path)
    if not p.is_file():
        raise TokenizerError(f"{p}: no such tiktoken tokenizer.model")
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(p.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error):
            raise TokenizerError(f"{p}:{n}: not a tiktoken line (expected '<base64 bytes> "
                                 f"<rank>'): {line[:60]!r}") from None
        if token in ranks:
            raise TokenizerError(f"{p}:{n}: token {token!r} appears twice; the file is corrupt")
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{p}: ranks are not 0..{len(ranks) - 1} without gaps or repeats; "
                             "llamaworks uses the ranks as token ids")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{p}: {len(missing)} single bytes have no token (first: "
                             f"{missing[0]:#04x}); a byte-level BPE needs all 256")
    return ranks


def llama3_version(path: str | os.PathLike[str]) -> str:
    """Whose special-token names a Llama 3 `tokenizer.model` gets (a key of SPECIAL_TOKENS): "3"
    when a `params.json` beside it describes a Llama 3.0 model (no `use_scaled_rope`), else
    "3.1" (the names of 3.1, 3.2 and 3.3; see the module docstring)."""
    params = Path(path).parent / "params.json"
    if not params.is_file():
        return "3.1"
    try:
        p = json.loads(params.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{params}: not valid JSON ({e}); it is read to tell Llama 3.0 "
                             "from 3.1+") from None
    p = p.get("model", p) if isinstance(p, dict) else p  # some releases nest the arguments
    if not isinstance(p, dict):
        raise TokenizerError(f"{params}: expected a JSON object")
    return "3.1" if p.get("use_scaled_rope") else "3"


def merges_from_ranks(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every (left, right) split of every token whose halves are tokens, ordered by the merged
    token's rank, then by the halves' ranks (as transformers' TikTokenConverter orders them)."""
    out: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            lr, rr = ranks.get(left), ranks.get(right)
            if lr is not None and rr is not None:
                out.append((rank, lr, rr, left, right))
    out.sort()
    return [(m[3], m[4]) for m in out]


def build_tiktoken_backend(ranks: Mapping[bytes, int], special_tokens: Sequence[str],
                           pre: str = "llama-bpe") -> HFTokenizer:
    """An HF tokenizer equal to tiktoken's encoding of `ranks` with Llama 3's regex; the
    special tokens get ids len(ranks), len(ranks)+1, ..."""
    vocab = {token_string(t): r for t, r in ranks.items()}
    merges = [(token_string(a), token_string(b)) for a, b in merges_from_ranks(ranks)]
    model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                       ignore_merges=True)
    tok = HFTokenizer(model)
    tok.pre_tokenizer = pretokenize.byte_level_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, lstrip=False,
                                       rstrip=False, single_word=False) for t in special_tokens])
    n = len(ranks)
    for i, t in enumerate(special_tokens):
        if tok.token_to_id(t) != n + i:
            raise TokenizerError(f"special token {t!r} would not get id {n + i}; is it also one "
                                 "of the file's ranked tokens?")
    return tok
