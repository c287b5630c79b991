"""`Tokenizer`: one wrapper over an HF `tokenizers.Tokenizer`, whatever the source.

Sources: a GGUF's vocabulary (byte-level BPE or SentencePiece, matching llama.cpp id for id), a
`tokenizer.json`, a `tokenizer.model` (SentencePiece, or Meta's Llama 3 tiktoken ranks), or a model
directory holding one of those.
BOS/EOS are added here (not by the backend's post-processor) so the flags mean the same for every
source; `save` writes files that `transformers.AutoTokenizer` loads with identical ids.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from llamaworks.errors import TokenizerError
from llamaworks.memory import return_freed_memory
from llamaworks.tokenizer import chat, gguf_vocab, hf_files, spm, tiktoken_bpe

if TYPE_CHECKING:
    from llamaworks.tokenizer.stream import StreamDecoder

# Token texts that end generation when present in the vocabulary: llama.cpp's end-of-generation
# list (end-of-turn/-text tokens, plus the FIM pad/repo/file-separator tokens it also stops on).
# Special tokens that spell tool calls (Mistral, Hermes/Qwen, Llama 3.1): kept in decoded text.
TOOL_CALL_MARKERS = ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "<tool_call>", "</tool_call>",
                     "<|python_tag|>")
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "</s>",
                      "<|endoftext|>", "<|end|>", "<end_of_turn>", "<EOT>", "<end_of_utterance>")
FIM_STOP_TOKENS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<|fim_repo|>", "<|repo_name|>",
                   "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>")


class Tokenizer:
    """Text <-> token ids, chat templates and saving, over an HF `tokenizers.Tokenizer`.

    Attributes: `backend` (the tokenizers.Tokenizer), `vocab_size`, `bos_id`, `eos_id`, `unk_id`,
    `pad_id`, `add_bos`/`add_eos` (the model's own flags), `chat_template`, `stop_ids`."""

    def __init__(self, backend: HFTokenizer, *, bos_id: int | None = None,
                 eos_id: int | None = None, unk_id: int | None = None, pad_id: int | None = None,
                 add_bos: bool = False, add_eos: bool = False, chat_template: str | None = None,
                 model_max_length: int | None = None, extra_stop_ids: Iterable[int] = (),
                 token_types: Sequence[int] | None = None,
                 piece_decoder: Callable[[list[int], bool], str] | None = None) -> None:
        self.backend = backend
        self._piece_decoder = piece_decoder  # replaces backend.decode (SentencePiece vocabs)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        for name, v in (("bos", bos_id), ("eos", eos_id), ("unk", unk_id), ("pad", pad_id)):
            if v is not None and not 0 <= v < self.vocab_size:
                raise TokenizerError(f"{name} token id {v} is outside the vocabulary "
                                     f"(size {self.vocab_size}); fix the tokenizer config")
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = bos_id, eos_id, unk_id, pad_id
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        if self.add_bos and bos_id is None:
            raise TokenizerError("the tokenizer asks to add BOS but defines no BOS token; set "
                                 "bos_token in tokenizer_config.json or add_bos_token: false")
        if self.add_eos and eos_id is None:
            raise TokenizerError("the tokenizer asks to add EOS but defines no EOS token; set "
                                 "eos_token in tokenizer_config.json or add_eos_token: false")
        self.chat_template = chat_template or None
        self.model_max_length = model_max_length
        self.token_types = list(token_types) if token_types is not None else None
        # GGUF "unused" tokens (type 5, e.g. vocabulary padding) decode to nothing in llama.cpp.
        self._unused = frozenset(i for i, t in enumerate(self.token_types or ()) if t == 5)
        stops = {i for i in extra_stop_ids if 0 <= i < self.vocab_size}
        if eos_id is not None:
            stops.add(eos_id)
        for text in END_OF_TURN_TOKENS + FIM_STOP_TOKENS:
            i = backend.token_to_id(text)
            if i is not None:
                stops.add(i)
        self.stop_ids: list[int] = sorted(stops)
        self._plain_backend: HFTokenizer | None = None
        self._lock = threading.Lock()
        self._sync_post_processor()

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_gguf(cls, path_or_metadata: str | os.PathLike[str] | Mapping[str, Any]
                  ) -> Tokenizer:
        """From a GGUF file (or its metadata dict from `checkpoint.gguf.read_metadata`)."""
        md = gguf_vocab.read_gguf_metadata(path_or_metadata)
        tok = cls(**gguf_vocab.tokenizer_kwargs_from_gguf(md))
        del md
        return_freed_memory()  # the vocabulary's lists and merge tables, built and dropped
        return tok

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """From a `tokenizer.json`, with bos/eos/add_bos_token/chat_template from the
        `tokenizer_config.json` / `special_tokens_map.json` beside it, if present."""
        p = Path(path)
        if not p.is_file():
            raise TokenizerError(f"{p}: no such tokenizer.json")
        try:
            backend = HFTokenizer.from_file(str(p))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise TokenizerError(f"{p}: not a valid tokenizer.json ({e})") from None
        return cls._from_backend_and_config(backend, hf_files.read_config(p.parent))

    @classmethod
    def from_sentencepiece(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """From a SentencePiece BPE `tokenizer.model` (Llama 1/2), plus a sibling
        `tokenizer_config.json` if present. Tokenizes like llama.cpp's SPM vocabulary."""
        p = Path(path)
        if tiktoken_bpe.is_tiktoken_file(p):
            raise TokenizerError(f"{p}: a tiktoken file (Llama 3), not SentencePiece; load it "
                                 "with Tokenizer.from_tiktoken or Tokenizer.load")
        info = spm.read_sentencepiece(p)
        backend = spm.build_spm_backend(info["pieces"], info["scores"], info["types"],
                                        add_space_prefix=info["add_space_prefix"],
                                        unk_id=info["unk_id"])
        cfg = hf_files.read_config(p.parent)
        defaults = {"bos_id": info["bos_id"], "eos_id": info["eos_id"], "unk_id": info["unk_id"],
                    "pad_id": info["pad_id"], "add_bos": True, "add_eos": False,
                    "token_types": info["types"],
                    "piece_decoder": spm.PieceDecoder(info["pieces"], info["types"],
                                                      info["add_space_prefix"])}
        return cls._from_backend_and_config(backend, cfg, defaults)

    @classmethod
    def from_tiktoken(cls, path: str | os.PathLike[str], version: str | None = None
                      ) -> Tokenizer:
        """From Meta's Llama 3 `tokenizer.model` (tiktoken `<base64> <rank>` lines) with Meta's
        256 special tokens after the ranks (<|begin_of_text|> = 128000, <|eot_id|> = 128009, and
        from Llama 3.1 on <|eom_id|> = 128008, <|python_tag|> = 128010, ...), plus a sibling
        `tokenizer_config.json` if present. `version` ("3" or "3.1") picks whose names; by
        default `tiktoken_bpe.llama3_version` decides (3.0's only when a params.json beside the
        file describes a 3.0 model). Adds BOS by default, as Meta's chat format and llama.cpp's
        Llama 3 vocabulary do."""
        p = Path(path)
        ranks = tiktoken_bpe.read_tiktoken_ranks(p)
        version = version or tiktoken_bpe.llama3_version(p)
        if version not in tiktoken_bpe.SPECIAL_TOKENS:
            raise TokenizerError(f"unknown Llama 3 special-token version {version!r}; use one of "
                                 f"{', '.join(tiktoken_bpe.SPECIAL_TOKENS)}")
        specials = tiktoken_bpe.SPECIAL_TOKENS[version]
        backend = tiktoken_bpe.build_tiktoken_backend(ranks, specials)
        n = len(ranks)
        defaults = {"bos_id": n + specials.index(tiktoken_bpe.BOS),
                    "eos_id": n + specials.index(tiktoken_bpe.EOS), "add_bos": True,
                    "add_eos": False}
        return cls._from_backend_and_config(backend, hf_files.read_config(p.parent), defaults)

    @classmethod
    def from_model_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """From a `tokenizer.model`: Meta's tiktoken ranks (Llama 3) or SentencePiece."""
        if tiktoken_bpe.is_tiktoken_file(path):
            return cls.from_tiktoken(path)
        return cls.from_sentencepiece(path)

    @classmethod
    def from_dir(cls, folder: str | os.PathLike[str]) -> Tokenizer:
        """From a model directory: tokenizer.json if present, else tokenizer.model."""
        d = Path(folder)
        if (d / "tokenizer.json").is_file():
            return cls.from_file(d / "tokenizer.json")
        if (d / "tokenizer.model").is_file():  # SentencePiece, or tiktoken in a Meta Llama 3 dir
            return cls.from_model_file(d / "tokenizer.model")
        raise TokenizerError(f"{d}: no tokenizer.json or tokenizer.model found; copy the model's "
                             "tokenizer files there, or load the tokenizer from its GGUF")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """From whatever `path` is: a model directory, a .gguf, a tokenizer.json or a
        tokenizer.model (SentencePiece or tiktoken)."""
        p = Path(path)
        if p.is_dir():
            return cls.from_dir(p)
        if not p.is_file():
            raise TokenizerError(f"{p}: no such file or directory; pass a model directory, a "
                                 ".gguf, a tokenizer.json or a tokenizer.model")
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return cls.from_gguf(p)
        if p.suffix == ".json":
            return cls.from_file(p)
        if p.suffix == ".model":
            return cls.from_model_file(p)
        raise TokenizerError(f"{p}: not a tokenizer file llamaworks knows; pass a model "
                             "directory, a .gguf, a tokenizer.json or a tokenizer.model")

    @classmethod
    def _from_backend_and_config(cls, backend: HFTokenizer, cfg: Mapping[str, Any],
                                 defaults: Mapping[str, Any] | None = None) -> Tokenizer:
        d = dict(defaults or {})

        def token_id(name: str) -> int | None:
            text = cfg.get(f"{name}_token")
            if text is None:
                return d.get(f"{name}_id")
            i = backend.token_to_id(text)
            if i is None:
                raise TokenizerError(f"{name}_token {text!r} from tokenizer_config.json is not in "
                                     "the vocabulary; fix the config")
            return i

        bos, eos = token_id("bos"), token_id("eos")
        found_bos, found_eos = _post_processor_flags(backend, bos, eos)
        add_bos = cfg.get("add_bos_token", d.get("add_bos", found_bos))
        add_eos = cfg.get("add_eos_token", d.get("add_eos", found_eos))
        return cls(backend, bos_id=bos, eos_id=eos, unk_id=token_id("unk"),
                   pad_id=token_id("pad"), add_bos=add_bos, add_eos=add_eos,
                   chat_template=cfg.get("chat_template"),
                   model_max_length=cfg.get("model_max_length"),
                   token_types=d.get("token_types"), piece_decoder=d.get("piece_decoder"))

    # ----------------------------------------------------------------- encode / decode
    def encode(self, text: str, bos: bool | None = False, eos: bool | None = False,
               special: bool = True) -> list[int]:
        """Token ids of `text`. bos/eos: add BOS/EOS (None = follow the model's add_bos/add_eos).
        special=True parses control tokens written in the text (llama.cpp's `special=True`);
        special=False tokenizes them as plain text."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes a str, got {type(text).__name__}")
        backend = self.backend if special else self._plain()
        ids = backend.encode(text, add_special_tokens=False).ids
        if self.add_bos if bos is None else bos:
            if self.bos_id is None:
                raise TokenizerError("bos=True but this tokenizer has no BOS token")
            ids.insert(0, self.bos_id)
        if self.add_eos if eos is None else eos:
            if self.eos_id is None:
                raise TokenizerError("eos=True but this tokenizer has no EOS token")
            ids.append(self.eos_id)
        return ids

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of the special (control) tokens, which skip_special_tokens leaves out."""
        added = self.backend.get_added_tokens_decoder()
        ids = {i for i, t in added.items() if t.special}
        return frozenset(ids | set(getattr(self._piece_decoder, "special", ())))

    @functools.cached_property
    def kept_specials(self) -> frozenset[int]:
        """Special tokens that are tool-call syntax (`TOOL_CALL_MARKERS`, e.g. Mistral's
        [TOOL_CALLS], Llama 3.1's <|python_tag|>): decoding keeps them even when skipping
        specials, so the tool-call parser sees the calls a model makes."""
        ids = (self.token_to_id(m) for m in TOOL_CALL_MARKERS)
        return frozenset(i for i in ids if i is not None and i in self.special_ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (special tokens written out unless skip_special_tokens, which still
        keeps tool-call markers; GGUF "unused" tokens such as vocabulary padding give no text, as
        in llama.cpp)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is outside the vocabulary "
                                 f"(size {self.vocab_size})")
        if skip_special_tokens and self.kept_specials.intersection(ids):
            drop = self.special_ids - self.kept_specials
            ids = [i for i in ids if i not in drop]
            skip_special_tokens = False
        if self._piece_decoder is not None:
            return self._piece_decoder(ids, skip_special_tokens)
        if self._unused:
            ids = [i for i in ids if i not in self._unused]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def uses_backend_decoder(self) -> bool:
        """True when `decode` is `backend.decode` (HF decoders); False for GGUF/SentencePiece
        vocabularies, which decode piece by piece as llama.cpp does."""
        return self._piece_decoder is None

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (as stored in the vocabulary), or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of an id, or None."""
        return self.backend.id_to_token(int(token_id))

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A `StreamDecoder` for this tokenizer."""
        from llamaworks.tokenizer.stream import StreamDecoder

        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, add_bos={self.add_bos})")

    # ----------------------------------------------------------------- chat
    def special_token_strings(self) -> dict[str, str]:
        """{"bos_token": ..., "eos_token": ..., ...} for the defined special tokens."""
        out = {}
        for name, i in (("bos", self.bos_id), ("eos", self.eos_id), ("unk", self.unk_id),
                        ("pad", self.pad_id)):
            text = self.id_to_token(i) if i is not None else None
            if text is not None:
                out[f"{name}_token"] = text
        return out

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None,
                            chat_template: str | None = None, **kwargs: Any) -> str:
        """Render a conversation to text exactly as transformers' `apply_chat_template(...,
        tokenize=False)` does. Extra keyword arguments become template variables."""
        return chat.render_chat(chat_template or self.chat_template, messages,
                                add_generation_prompt=add_generation_prompt, tools=tools,
                                special_tokens=self.special_token_strings(), **kwargs)

    # ----------------------------------------------------------------- save
    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write tokenizer.json + tokenizer_config.json (atomically) so that
        `transformers.AutoTokenizer.from_pretrained(folder)` loads the same tokenizer."""
        names = self.special_token_strings()
        cfg = hf_files.tokenizer_config(
            bos=names.get("bos_token"), eos=names.get("eos_token"), unk=names.get("unk_token"),
            pad=names.get("pad_token"), add_bos=self.add_bos, add_eos=self.add_eos,
            chat_template=self.chat_template, model_max_length=self.model_max_length)
        return hf_files.save_files(folder, self.backend.to_str(pretty=False), cfg)

    # ----------------------------------------------------------------- internals
    def _plain(self) -> HFTokenizer:
        """A copy of the backend that does not split special tokens out of the text."""
        with self._lock:
            if self._plain_backend is None:
                plain = HFTokenizer.from_str(self.backend.to_str())
                plain.encode_special_tokens = True
                self._plain_backend = plain
            return self._plain_backend

    def _sync_post_processor(self) -> None:
        """Make the backend's own BOS/EOS adding (used by transformers after `save`) match
        add_bos/add_eos."""
        if _post_processor_flags(self.backend, self.bos_id, self.eos_id) == (self.add_bos,
                                                                              self.add_eos):
            return
        bos = self.id_to_token(self.bos_id) if self.bos_id is not None else None
        eos = self.id_to_token(self.eos_id) if self.eos_id is not None else None
        head = [bos] if self.add_bos and bos is not None else []
        tail = [eos] if self.add_eos and eos is not None else []
        single = [*head, "$A", *tail]
        pair = [*single, *(f"{t}:1" for t in head), "$B:1", *(f"{t}:1" for t in tail)]
        special = list(dict.fromkeys(
            [(bos, self.bos_id)] * bool(head) + [(eos, self.eos_id)] * bool(tail)))
        self.backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=special)
        self._plain_backend = None


def _post_processor_flags(backend: HFTokenizer, bos_id: int | None, eos_id: int | None
                          ) -> tuple[bool, bool]:
    """Whether the backend's post-processor adds BOS / EOS to a single sequence."""
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    if full == plain:
        return False, False
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            head, tail = full[:k], full[k + len(plain):]
            return (head == [bos_id] and bos_id is not None,
                    tail == [eos_id] and eos_id is not None)
    return False, False
