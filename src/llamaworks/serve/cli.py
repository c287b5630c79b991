"""`llamaworks serve`: the OpenAI-compatible server (FastAPI + uvicorn) with the web chat at `/`."""

from __future__ import annotations

import argparse
from typing import Any

from llamaworks.errors import LlamaworksError


def build_engine(args: argparse.Namespace) -> tuple[Any, str]:
    """Load the model (+ adapter, + quantization) into a ContinuousEngine; returns it and the
    model name clients send."""
    import torch

    from llamaworks.checkpoint import load_tokenizer
    from llamaworks.cli import _model_path
    from llamaworks.infer.continuous import ContinuousEngine
    from llamaworks.infer.engine import LLM
    from llamaworks.infer.load import load_for_use

    if args.threads:
        torch.set_num_threads(args.threads)
    path = _model_path(args)
    model = load_for_use(path, (args.adapter,) if args.adapter else (), args.quant,
                         args.group_size)
    llm = LLM(model, load_tokenizer(path))
    engine = ContinuousEngine(llm, max_batch=args.max_batch, max_queue=args.max_queue,
                              context=args.context)
    name = args.model_name or path.name.removesuffix(".gguf")
    return engine, name


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from llamaworks.serve.app import create_app

    if args.max_batch < 1 or args.max_queue < 0:
        raise LlamaworksError("--max-batch must be >= 1 and --max-queue >= 0")
    engine, name = build_engine(args)
    app = create_app(engine, name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                     request_timeout=args.timeout)
    print(f"serving {name} on http://{args.host}:{args.port} (web chat at /, OpenAI API at "
          f"/v1; {args.max_batch} rows, queue {args.max_queue}, context {engine.context})",
          flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.shutdown()
    return 0


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
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: open)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="sequences decoded together (KV-cache rows)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a row before new ones get 429")
    p.add_argument("--context", type=int, default=None,
                   help="tokens per sequence (default: min(model context, 4096))")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="larger request bodies get 413")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds before a request is cancelled")
    p.add_argument("--log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(fn=cmd_serve)
