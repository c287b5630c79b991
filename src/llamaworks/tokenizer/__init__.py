"""Tokenizers: GGUF vocabularies (llama.cpp-exact), tokenizer.json, SentencePiece models; chat
templates rendered as transformers renders them; streaming detokenization.

    from llamaworks.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf("model.gguf")
    ids = tok.encode("Hello", bos=None)          # None: follow the model's add_bos
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
"""

from llamaworks.tokenizer.core import END_OF_TURN_TOKENS, FIM_STOP_TOKENS, Tokenizer
from llamaworks.tokenizer.stream import StreamDecoder

__all__ = ["Tokenizer", "StreamDecoder", "END_OF_TURN_TOKENS", "FIM_STOP_TOKENS"]
