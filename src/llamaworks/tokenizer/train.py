"""Byte-level BPE training with HF `tokenizers`: digits split one by one (as Llama's tokenizer
does), a byte-level alphabet so no text is unrepresentable, special tokens incl. chat markers."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llamaworks.tokenizer import Tokenizer

# ids 0, 1, 2 = unk, BOS, EOS, as in Llama's vocabulary (and our presets' bos/eos ids).
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
              special_tokens: tuple[str, ...] = SPECIAL_TOKENS,
              model_max_length: int | None = None) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (special tokens and the 256 bytes
    included) and wrap it as our `Tokenizer` (BOS added, ChatML template)."""
    n_min = len(special_tokens) + 256
    if vocab_size < n_min:
        raise ValueError(f"vocab_size {vocab_size} is too small: the byte alphabet and special "
                         f"tokens alone need {n_min}")
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    ids = {t: backend.token_to_id(t) for t in special_tokens}
    return Tokenizer(backend, bos_id=ids.get("<s>"), eos_id=ids.get("</s>"),
                     unk_id=ids.get("<unk>"), pad_id=ids.get("<pad>"), add_bos=True,
                     chat_template=CHATML_TEMPLATE, model_max_length=model_max_length)
