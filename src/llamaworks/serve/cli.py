"""`llamaworks serve`: the OpenAI-compatible server (FastAPI + uvicorn) with the web chat at `/`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from llamaworks.errors import LlamaworksError

KEY_ENV = "LLAMAWORKS_API_KEY"


def build_engine(args: argparse.Namespace, model: Any = None, agree: Any = None
                 ) -> tuple[Any, str]:
    """Load the model (+ adapter, + quantization) into a ContinuousEngine; returns it and the
    model name clients send. With `model` (split over the ranks) and `agree` (its token hook):
    that model on a `LockstepEngine`, without --max-gap's timed chunks."""

    from llamaworks.checkpoint import load_tokenizer
    from llamaworks.cli import _model_path
    from llamaworks.infer.continuous import ContinuousEngine
    from llamaworks.infer.llm import LLM
    from llamaworks.infer.load import load_for_use
    from llamaworks.infer.threads import use_threads

    use_threads(args.threads)  # the cores other processes leave free at start (no per-step check)
    path = _model_path(args)
    extra: dict[str, Any] = {"max_gap": args.max_gap}
    if model is None:
        model = load_for_use(path, (args.adapter,) if args.adapter else (), args.quant,
                             args.group_size)
        extra["drafter"] = _drafter(args, model)
    else:
        from functools import partial

        from llamaworks.infer.tensor_parallel import LockstepEngine

        extra.update(make_engine=partial(LockstepEngine, agree=agree), max_gap=None)
    llm = LLM(model, load_tokenizer(path))
    engine = ContinuousEngine(llm, max_batch=args.max_batch, max_queue=args.max_queue,
                              context=args.context, cache_mb=args.cache_mb, reserve=True,
                              **extra)
    name = args.model_name or path.name.removesuffix(".gguf")
    return engine, name


@contextmanager
def _split_engine(args: argparse.Namespace) -> Iterator[tuple[Any, str, bool]]:
    """--tensor-parallel N under torchrun: the float32 model split over the ranks (each reading
    only its share of an HF safetensors directory) on a `LockstepEngine`; yields (engine, name,
    whether this rank serves). Rank 0 stops the followers when it leaves."""
    from llamaworks.cli import _model_path
    from llamaworks.infer import tensor_parallel as tp
    from llamaworks.infer.threads import use_threads

    with ExitStack() as stack:
        try:
            tp.check_launch(args.tensor_parallel, quant=args.quant)
            for flag, given in (("--adapter", args.adapter), ("--draft", args.draft)):
                if given is not None:
                    raise ValueError(f"{flag} does not combine with --tensor-parallel")
            use_threads(args.threads)
            model, main, agree = stack.enter_context(
                tp.tensor_parallel(_model_path(args), args.tensor_parallel))
        except ValueError as e:
            raise LlamaworksError(str(e)) from None
        engine, name = build_engine(args, model, agree)
        try:
            yield engine, name, main
        finally:
            if main:
                engine.engine.stop_followers()


def _drafter(args: argparse.Namespace, target: Any) -> Any:
    """--draft ngram (prompt lookup) or --draft MODEL (a smaller model with the same vocabulary,
    loaded like the main one), drafting --draft-k tokens per step; None without --draft."""
    from llamaworks.infer.speculative import ModelDrafter, NgramDrafter

    if args.draft is None:
        return None
    if args.draft_k < 1:
        raise LlamaworksError("--draft-k must be >= 1")
    if args.draft == "ngram":
        return NgramDrafter(k=args.draft_k)
    from llamaworks.checkpoint.discovery import model_path
    from llamaworks.infer.load import load_for_use

    drafter = ModelDrafter(load_for_use(model_path(args.draft)), k=args.draft_k)
    try:
        drafter.check(target)
    except ValueError as e:
        raise LlamaworksError(f"--draft {args.draft}: {e}") from None
    return drafter


def api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key, --api-key-file (first line) or $LLAMAWORKS_API_KEY, in that
    order; the last two keep it out of the process list."""
    if args.api_key is not None and args.api_key_file is not None:
        raise LlamaworksError("give --api-key or --api-key-file, not both")
    if args.api_key_file is not None:
        try:
            lines = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise LlamaworksError(f"cannot read the API key file {args.api_key_file}: "
                                  f"{e}") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise LlamaworksError(f"the API key file {args.api_key_file} is empty")
        return key
    return args.api_key if args.api_key is not None else os.environ.get(KEY_ENV) or None


def _names(values: list[str] | None) -> list[str]:
    """Repeated and comma-separated option values as one list."""
    return [v.strip() for arg in values or [] for v in arg.split(",") if v.strip()]


def cmd_serve(args: argparse.Namespace) -> int:
    if args.max_batch < 1 or args.max_queue < 0:
        raise LlamaworksError("--max-batch must be >= 1 and --max-queue >= 0")
    key, hosts, origins = api_key(args), _names(args.allowed_hosts), _names(args.cors_origin)
    with ExitStack() as stack:
        if args.tensor_parallel == 1:
            engine, name = build_engine(args)
        else:
            engine, name, main = stack.enter_context(_split_engine(args))
            if not main:  # the other ranks step with rank 0, serving nothing
                engine.engine.follow()
                return 0
        return _serve(args, engine, name, key, hosts, origins)


def _serve(args: argparse.Namespace, engine: Any, name: str, key: str | None,
           hosts: list[str], origins: list[str]) -> int:
    """Run the HTTP server on `engine` until it is stopped."""
    import uvicorn

    from llamaworks.serve.app import create_app
    from llamaworks.serve.exposure import allowed_hosts, warnings

    app = create_app(engine, name, api_key=key, max_body_bytes=args.max_body_bytes,
                     request_timeout=args.timeout, host=args.host, extra_hosts=hosts,
                     cors_origins=origins, reasoning_format=args.reasoning_format,
                     max_audio_bytes=int(args.max_audio_mb * (1 << 20)))
    for line in warnings(args.host, key, allowed_hosts(args.host, hosts)):
        print(line, file=sys.stderr, flush=True)
    pool = engine.engine.pool
    kv_mb = pool.bytes_at(pool.rows, pool.context) / 2**20
    ring = f", sliding layers in rings of {pool.ring}" if pool.ring else ""
    print(f"serving {name} on http://{args.host}:{args.port} (web chat at /, OpenAI API at "
          f"/v1; {args.max_batch} rows, queue {args.max_queue}, context {engine.context}, KV "
          f"cache {kv_mb:.0f} MB{ring} + prefix cache up to {args.cache_mb:g} MB)", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.shutdown()
    return 0


def serve_args(*argv: str) -> argparse.Namespace:
    """`llamaworks serve ARGV` parsed with every default, for scripts and tests that build the
    server in-process (`build_engine(serve_args("--max-batch", "2"))`)."""
    root = argparse.ArgumentParser(prog="llamaworks")
    register(root.add_subparsers())
    return root.parse_args(["serve", *argv])


def register(sub: Any) -> None:
    from llamaworks.cli import _add_model, _add_quant

    p = sub.add_parser("serve", help="OpenAI-compatible API server with continuous batching "
                       "and a web chat page")
    _add_model(p)
    _add_quant(p, compile=False)
    p.add_argument("--adapter", default=None, help="LoRA adapter directory merged into the model")
    p.add_argument("--model-name", default=None,
                   help="the model id clients send (default: the checkpoint's file name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: open, or "
                   f"${KEY_ENV})")
    p.add_argument("--api-key-file", default=None,
                   help="read the key from this file's first line (keeps it out of `ps`)")
    p.add_argument("--allowed-hosts", action="append", default=None, metavar="NAMES",
                   help="Host names the server answers to besides its address (and localhost "
                   "when on loopback); comma-separated or repeated; '*' = any")
    p.add_argument("--cors-origin", action="append", default=None, metavar="ORIGINS",
                   help="web origins (e.g. https://app.example) whose pages may call the API "
                   "from a browser; comma-separated or repeated; '*' = any")
    p.add_argument("--max-batch", type=int, default=8,
                   help="sequences decoded together (KV-cache rows)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a row before new ones get 429")
    p.add_argument("--context", type=int, default=None,
                   help="tokens per sequence (default: min(model context, 4096)); the KV cache "
                   "of --max-batch x --context tokens is allocated at start, as llama.cpp's -c")
    p.add_argument("--cache-mb", type=float, default=256,
                   help="memory for the prefix cache (keys/values of prompt blocks shared "
                   "between requests: system prompts, tool lists, chat history); 0 = off")
    p.add_argument("--max-gap", type=float, default=2.0,
                   help="while sequences decode, a step that also feeds a prompt chunk takes "
                   "about this many plain steps (chunked prefill); larger = long prompts start "
                   "sooner, streams stutter more")
    p.add_argument("--draft", default=None, metavar="MODEL|ngram",
                   help="speculative decoding: a smaller model with the same vocabulary, or "
                   "'ngram' for prompt lookup (no second model)")
    p.add_argument("--draft-k", type=int, default=4, help="tokens drafted per step")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="under torchrun --nproc-per-node N: split every block's heads and MLP "
                   "over the N processes (float weights, dense models, eager decode, no "
                   "--quant/--adapter/--draft/--max-gap); rank 0 serves HTTP and sends each "
                   "step's new requests to the others")
    p.add_argument("--reasoning-format", choices=["auto", "deepseek", "none"], default="auto",
                   help="split <think> blocks into message.reasoning_content: deepseek = always, "
                   "auto = when the chat template uses them, none = leave them in the content")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="larger request bodies get 413")
    p.add_argument("--max-audio-mb", type=float, default=25.0,
                   help="larger uploads to /v1/audio/* get 413 (default 25, as OpenAI)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds before a request is cancelled")
    p.add_argument("--log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(fn=cmd_serve)
