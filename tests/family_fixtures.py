"""Random tiny checkpoints of any family, made by transformers itself, with weights drawn wide
(std 0.25; Llama-style norms around 1, Gemma's 1 + w norms around 0) so a wrong detail shows;
our model loaded from the directory transformers saves, and llama.cpp's logits on a GGUF."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


def widen(model: torch.nn.Module, gemma: bool, std: float = 0.25) -> torch.nn.Module:
    """Redraw every parameter of a transformers model N(0, std); norms get 1 added unless they
    are Gemma's (1 + w) norms; DeepSeek's expert-choice biases N(0, 2 std)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, std)
            if "norm" in name and not gemma:
                p.add_(1.0)
        for name, b in model.named_buffers():  # DeepSeek's routing bias: a stored buffer
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 2 * std)
    return model


def hf_family_model(cls_name: str, config: dict[str, Any], seed: int = 0,
                    std: float = 0.25) -> torch.nn.Module:
    """transformers' CausalLM for `transformers.<cls_name>(**config)`, SDPA attention, weights
    widened to `std`, float32, eval mode."""
    import transformers

    cfg = getattr(transformers, cls_name)(**config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return widen(model, cls_name.startswith("Gemma"), std).float().eval()


# The shape the family tests' cases fill in (a vocabulary of 96: ByteTokenizer decodes every id)
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=4,
            max_position_embeddings=64, rms_norm_eps=1e-6)


def tiny_family_model(case: tuple[str, dict[str, Any]], seed: int = 0) -> torch.nn.Module:
    """`hf_family_model` of a case: its config class's name and the keys it sets over TINY."""
    cls_name, kw = case
    return hf_family_model(cls_name, {**TINY, **kw}, seed)


def load_saved(hf: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """Our model, loaded from the directory `hf.save_pretrained` writes into `folder`."""
    from llamaworks.checkpoint import load_model

    hf.save_pretrained(folder)
    return load_model(folder).model


def llama_cpp_logits(llama_cpp: Any, path: Path, toks: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `toks` on the GGUF file at `path` (F32 KV cache,
    so F32 files compare tightly)."""
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_batch=64,
                          verbose=False, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(toks)
    out = np.array(llm.scores[: len(toks)], dtype=np.float32)
    llm.close()
    return out


# Qwen2's tokenizer as transformers builds it (transformers' Qwen2Converter / Qwen2Tokenizer; the
# `tokenizer.json` Qwen ships): NFC, this one split regex, GPT-2 bytes, plain BPE.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_VOCAB_SIZE = 151936  # Qwen1.5 / Qwen2's config.json vocab_size (151646 tokens, padded)


def write_qwen2_tokenizer(vocab_gguf: Path, folder: Path) -> Path:
    """Write Qwen2's HF tokenizer (tokenizer.json + tokenizer_config.json, as Qwen/Qwen1.5-7B
    ships them) into `folder`, from llama.cpp's vocab-only GGUF of that repository
    (ggml-vocab-qwen2.gguf): its 151643 byte-level tokens and 151387 merges in rank order, the
    three control tokens (<|endoftext|>, <|im_start|>, <|im_end|>) as special added tokens, its
    chat template. The [PAD151646]... tokens llama.cpp's converter padded the vocabulary with up
    to vocab_size are no part of the HF tokenizer and are left out."""
    import json

    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    from llamaworks.checkpoint.gguf import read_metadata

    md = read_metadata(vocab_gguf)
    assert (md["tokenizer.ggml.model"], md["tokenizer.ggml.pre"]) == ("gpt2", "qwen2")
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    normal = [t for t, ty in zip(tokens, types, strict=True) if ty == 1]
    special = [(i, t) for i, (t, ty) in enumerate(zip(tokens, types, strict=True)) if ty == 3]
    padding = [(i, t) for i, (t, ty) in enumerate(zip(tokens, types, strict=True)) if ty == 4]
    assert tokens[:len(normal)] == normal  # the BPE vocabulary first, then the added tokens
    assert [i for i, _ in special] == list(range(len(normal), len(normal) + len(special)))
    assert all(t == f"[PAD{i}]" for i, t in padding) and len(tokens) == QWEN2_VOCAB_SIZE
    merges = [tuple(m.split(" ")) for m in md["tokenizer.ggml.merges"]]
    assert all(len(m) == 2 for m in merges)

    tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(normal)}, merges=merges,
                                 dropout=None, unk_token=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([t for _, t in special])
    assert [tok.token_to_id(t) for _, t in special] == [i for i, _ in special]

    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    added = {str(i): dict(content=t, lstrip=False, normalized=False, rstrip=False,
                          single_word=False, special=True) for i, t in special}
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": md["tokenizer.chat_template"],
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2,
                                                             ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
    return folder
