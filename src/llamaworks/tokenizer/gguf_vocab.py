"""Build a tokenizer from a GGUF file's `tokenizer.ggml.*` metadata, the way llama.cpp reads it.

`tokenizer.ggml.model` picks the algorithm: "gpt2" = byte-level BPE with the merges list and a
pre-tokenizer regex chosen by `tokenizer.ggml.pre`; "llama" = SentencePiece BPE from scores
(see `spm.py`). Token types (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte)
decide which tokens are added/special. Defaults for bos/eos/add_bos follow llama-vocab.cpp.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from llamaworks.errors import TokenizerError
from llamaworks.tokenizer import pretokenize, spm

SUPPORTED_MODELS = ("gpt2", "llama")
# Token ids llama.cpp treats as end of generation besides EOS.
_STOP_ID_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id",
                 "tokenizer.ggml.fim_pad_token_id", "tokenizer.ggml.fim_rep_token_id",
                 "tokenizer.ggml.fim_sep_token_id")

# Token texts llama.cpp makes control tokens whatever type the GGUF gives them (llama-vocab.cpp's
# "auto-detect special tokens by text"): per kind, the texts it looks for when the GGUF has no id
# key for that kind (the end-of-generation list always applies). So e.g. Qwen2's plain "</s>"
# (id 128247) is split out of the text as a special token.
_CONTROL_BY_TEXT: tuple[tuple[str | None, tuple[str, ...]], ...] = (
    ("tokenizer.ggml.eot_token_id", (
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
        "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
        "<end_of_utterance>")),
    ("tokenizer.ggml.eom_token_id", ("<|eom_id|>",)),
    ("tokenizer.ggml.fim_pre_token_id", (
        "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
        "<|code_prefix|>", "<|prefix|>")),
    ("tokenizer.ggml.fim_suf_token_id", (
        "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
        "<|code_suffix|>", "<|suffix|>")),
    ("tokenizer.ggml.fim_mid_token_id", (
        "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
        "<|code_middle|>", "<|middle|>")),
    ("tokenizer.ggml.fim_pad_token_id", ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>",
                                         "[PAD]")),
    ("tokenizer.ggml.fim_rep_token_id", ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>",
                                         "<reponame>")),
    ("tokenizer.ggml.fim_sep_token_id", ("<|file_sep|>",)),
    (None, (  # end of generation
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>",
        "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>",
        "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>",
        "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[")),
)


def read_gguf_metadata(path_or_metadata: str | os.PathLike[str] | Mapping[str, Any]
                       ) -> Mapping[str, Any]:
    """The GGUF key/values (a path is read with `checkpoint.gguf.read_metadata`)."""
    if isinstance(path_or_metadata, Mapping):
        return path_or_metadata
    from llamaworks.checkpoint.gguf import read_metadata
    from llamaworks.errors import CheckpointError

    try:
        return read_metadata(path_or_metadata)
    except CheckpointError as e:
        raise TokenizerError(f"cannot read the tokenizer from GGUF: {e}") from None


def parse_merges(merges: Sequence[str]) -> list[tuple[str, str]]:
    """GGUF "a b" merge strings -> pairs (split at the first space after position 0, like
    llama.cpp); a repeated pair keeps its first rank."""
    out: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for m in merges:
        cut = m.find(" ", 1)
        if cut < 0:
            raise TokenizerError(f"malformed BPE merge {m!r} in tokenizer.ggml.merges (expected "
                                 "'left right'); the GGUF is corrupt, re-convert it")
        pair = (m[:cut], m[cut + 1:])
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


def build_bpe_backend(tokens: Sequence[str], types: Sequence[int] | None,
                      merges: Sequence[str], pre: str | None) -> HFTokenizer:
    """An HF byte-level BPE tokenizer equal to llama.cpp's "gpt2" vocabulary type."""
    name = pretokenize.normalize_pre_type(pre)
    pre_tok = pretokenize.byte_level_pre_tokenizer(name)  # raises for unknown pre types
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TokenizerError("BPE vocabulary has duplicate tokens; re-convert the GGUF")
    pairs = parse_merges(merges)
    missing = [a + b for a, b in pairs if a + b not in vocab]
    if missing:
        raise TokenizerError(f"{len(missing)} BPE merges produce tokens missing from the "
                             f"vocabulary (first: {missing[0]!r}); the GGUF is corrupt")
    model = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
                       ignore_merges=name in pretokenize.IGNORE_MERGES)
    tok = HFTokenizer(model)
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    spm.add_typed_tokens(tok, tokens, types)
    return tok


def llamacpp_token_types(md: Mapping[str, Any], tokens: Sequence[str],
                         types: Sequence[int] | None) -> list[int] | None:
    """The GGUF token types as llama.cpp uses them: control-looking texts made control tokens
    (`_CONTROL_BY_TEXT`), then its exceptions: o200k_harmony's / solar-open's "<|end|>" and the
    gpt-oss channel tokens user-defined, and "</s>" normal next to Gemma 4's or PLaMo's
    end-of-generation markers. (llama.cpp looks for the first text of a kind only; vocabularies
    with two spellings of one kind are not reproduced.)"""
    if types is None:
        return None
    out = list(types)
    index = {t: i for i, t in enumerate(tokens)}
    for key, texts in _CONTROL_BY_TEXT:
        if key is not None and key in md:
            continue
        for text in texts:
            i = index.get(text)
            if i is not None and out[i] != spm.TYPE_CONTROL:
                out[i] = spm.TYPE_CONTROL
    have = set(index)
    if "<|end|>" in have and have & {"<|call|>", "<|calls|>"} and have & {"<|return|>",
                                                                        "<|flush|>"}:
        out[index["<|end|>"]] = spm.TYPE_USER_DEFINED
    if "</s>" in have and have & {"<|tool_response>", "<|plamo:eos|>"}:
        out[index["</s>"]] = spm.TYPE_NORMAL
    for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
        if text in index:
            out[index[text]] = spm.TYPE_USER_DEFINED
    return out


def _opt_id(md: Mapping[str, Any], key: str, default: int | None, n: int) -> int | None:
    v = md.get(key, default)
    if v is None:
        return None
    v = int(v)
    if 0 <= v < n:
        return v
    return default if default is not None and 0 <= default < n else None


def tokenizer_kwargs_from_gguf(md: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for `Tokenizer(...)`: backend, special ids, flags, chat template."""
    model = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise TokenizerError("the GGUF has no tokenizer (tokenizer.ggml.model / tokens missing); "
                             "pass a tokenizer.json or tokenizer.model with --tokenizer")
    types = llamacpp_token_types(md, tokens, md.get("tokenizer.ggml.token_type"))
    n = len(tokens)
    pre = md.get("tokenizer.ggml.pre")
    if model == "gpt2":
        merges = md.get("tokenizer.ggml.merges")
        if merges is None:
            raise TokenizerError("GGUF BPE tokenizer has no tokenizer.ggml.merges; re-convert it")
        backend = build_bpe_backend(tokens, types, merges, pre)
        piece_decoder = None
        defaults = {"bos": 11, "eos": 11, "unk": None, "add_bos": (
            pretokenize.normalize_pre_type(pre) in pretokenize.ADD_BOS_BY_DEFAULT)}
    elif model == "llama":
        scores = md.get("tokenizer.ggml.scores")
        if scores is None:
            raise TokenizerError("GGUF SentencePiece tokenizer has no tokenizer.ggml.scores; "
                                 "re-convert it")
        add_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
        unk = _opt_id(md, "tokenizer.ggml.unknown_token_id", 0, n)
        backend = spm.build_spm_backend(tokens, scores, types, add_space_prefix=add_prefix,
                                        unk_id=unk)
        piece_decoder = spm.PieceDecoder(tokens, types, add_prefix)
        defaults = {"bos": 1, "eos": 2, "unk": 0, "add_bos": True}
    else:
        raise TokenizerError(
            f"unknown tokenizer model {model!r} (tokenizer.ggml.model); llamaworks supports "
            f"{', '.join(repr(m) for m in SUPPORTED_MODELS)} (byte-level BPE and SentencePiece). "
            "Load the model's tokenizer.json with Tokenizer.from_file instead")
    extra_stop = [int(md[k]) for k in _STOP_ID_KEYS if k in md and 0 <= int(md[k]) < n]
    return {
        "backend": backend,
        "bos_id": _opt_id(md, "tokenizer.ggml.bos_token_id", defaults["bos"], n),
        "eos_id": _opt_id(md, "tokenizer.ggml.eos_token_id", defaults["eos"], n),
        "unk_id": _opt_id(md, "tokenizer.ggml.unknown_token_id", defaults["unk"], n),
        "pad_id": _opt_id(md, "tokenizer.ggml.padding_token_id", None, n),
        "add_bos": bool(md.get("tokenizer.ggml.add_bos_token", defaults["add_bos"])),
        "add_eos": bool(md.get("tokenizer.ggml.add_eos_token", False)),
        "chat_template": md.get("tokenizer.chat_template") or _shipped_template(md),
        "model_max_length": _context_length(md),
        "extra_stop_ids": extra_stop,
        "token_types": list(types) if types is not None else None,
        "piece_decoder": piece_decoder,
    }


def _context_length(md: Mapping[str, Any]) -> int | None:
    arch = md.get("general.architecture")
    v = md.get(f"{arch}.context_length") if arch else None
    return int(v) if v is not None else None


def _shipped_template(md: dict[str, Any]) -> str | None:
    """Gemma's published chat template (its tokenizer_config.json's), for Gemma 3 GGUF files,
    which carry none."""
    if md.get("general.architecture") != "gemma3":
        return None
    from importlib.resources import files

    return files("llamaworks.tokenizer").joinpath("templates/gemma3.jinja").read_text()
