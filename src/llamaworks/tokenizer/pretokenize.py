"""Pre-tokenizer regexes per GGUF `tokenizer.ggml.pre` type, as llama.cpp's llama-vocab.cpp has
them.

llama.cpp splits the text with a *sequence* of regexes: each one splits every piece the previous
one left, keeping both the matches and the text between them ("isolated"). HF `tokenizers` does the
same with a `Sequence` of `Split(..., "isolated")` pre-tokenizers, then the GPT-2 byte mapping.
Unicode categories in the regexes use llama.cpp's own tables (see `unicode_classes.py`).
"""

from __future__ import annotations

from tokenizers import Regex, pre_tokenizers

from llamaworks.errors import TokenizerError
from llamaworks.tokenizer.unicode_classes import expand_categories

# GPT-2's regex (also the regex HF's ByteLevel pre-tokenizer applies when use_regex=True).
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3's regex as llama.cpp adapted it: the case-insensitive contractions spelled out, so only
# ASCII letters match (Oniguruma's (?i) would also let "'ſ" match "'s").
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2-style: like Llama 3 but every digit alone.
QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
         r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# pre type -> the regex sequence llama.cpp applies (llm_tokenizer_bpe's constructor).
PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    # llama.cpp's DEFAULT (also used when the GGUF names no pre type)
    "default": (r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt-2": (GPT2,),
    "phi-2": (GPT2,),
    "roberta-bpe": (GPT2,),
    "mpt": (GPT2,),
    "olmo": (GPT2,),
    "jais": (GPT2,),
    "exaone4": (GPT2,),
    "smollm": (r"\p{N}", GPT2),
    "starcoder": (r"\p{N}", GPT2),
    "refact": (r"\p{N}", GPT2),
    "command-r": (r"\p{N}", GPT2),
    "codeshell": (r"\p{N}", GPT2),
    "exaone": (r"\p{N}", GPT2),
    "minerva-7b": (r"\p{N}", GPT2),
    "llama3": (LLAMA3,),
    "llama-v3": (LLAMA3,),
    "llama-bpe": (LLAMA3,),
    "falcon3": (LLAMA3,),
    "falcon-h1": (LLAMA3,),
    "pixtral": (LLAMA3,),
    "midm-2.0": (LLAMA3,),
    "dbrx": (LLAMA3,),
    "smaug-bpe": (LLAMA3,),
    "chatglm-bpe": (LLAMA3,),
    "qwen2": (QWEN2,),
    "deepseek-r1-qwen": (QWEN2,),
    "megrez": (QWEN2,),
    "stablelm2": (QWEN2,),
    "hunyuan": (QWEN2,),
}

# pre types whose BPE looks a whole pre-token up in the vocabulary before merging (llama.cpp's
# `ignore_merges`, HF BPE's `ignore_merges`).
_LLAMA3_FAMILY = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                            "midm-2.0"})
IGNORE_MERGES = _LLAMA3_FAMILY
# pre types for which llama.cpp adds BOS by default (when the GGUF has no add_bos_token key).
ADD_BOS_BY_DEFAULT = _LLAMA3_FAMILY


def normalize_pre_type(pre: str | None) -> str:
    """The pre type llama.cpp would use: a missing key means 'default'."""
    return "default" if not pre else pre


def byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """HF pre-tokenizer equal to llama.cpp's regex split for `pre`, then the GPT-2 byte mapping."""
    name = normalize_pre_type(pre)
    regexes = PRE_TOKENIZER_REGEXES.get(name)
    if regexes is None:
        known = ", ".join(sorted(PRE_TOKENIZER_REGEXES))
        raise TokenizerError(
            f"unknown BPE pre-tokenizer type {name!r} (tokenizer.ggml.pre); llamaworks supports: "
            f"{known}. Use a GGUF converted for one of these, or load the model's tokenizer.json "
            "with Tokenizer.from_file")
    steps: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Split(Regex(expand_categories(r)), behavior="isolated") for r in regexes]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                          use_regex=False))
    return pre_tokenizers.Sequence(steps)
