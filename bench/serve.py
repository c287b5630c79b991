"""Serving throughput: the same requests from 1 client (one at a time) vs C concurrent clients,
and (with --vs-llama-server) llamaworks vs llama.cpp's own server on the same workload.

Starts `llamaworks serve`'s app in-process on a free port (or uses `--url`), sends `--requests`
greedy /v1/completions requests of `--max-tokens` tokens through the official `openai` client,
first sequentially, then from each of the `--concurrency` client counts at once, and prints
generated tokens/s for each and their ratio to 1 client (continuous batching should give >= 2x
at 8 clients).

With `--vs-llama-server BIN` (built by `tools/llama_server.py`) it also starts llama-server on the
same GGUF file (`-np MAX_BATCH -c MAX_BATCH*CONTEXT --cont-batching -t THREADS`, a free port) and
at each client count runs the same requests against both servers in `--rounds` interleaved rounds
(the order swapped each round, so the machine's drift cancels), then prints clients, llamaworks
tok/s, llama-server tok/s and the median of the rounds' ratios. Both count generated tokens
by `usage.completion_tokens`; every request asks for `ignore_eos` (both honour it: exactly
max_tokens tokens each), and the table gives each server's tokens per request so that a run
where they differ shows. The clients run in this process, so with the in-process
llamaworks server they share its interpreter (and GIL); llama-server runs in its own process.

    .venv/bin/python bench/serve.py [--model PATH] [--requests 16] [--concurrency 8 [32 ...]]
        [--max-tokens 64] [--max-batch 8] [--context 1024] [--threads 2]
        [--url http://127.0.0.1:8000] [--vs-llama-server .cache/llama-server/bin/llama-server]
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from decode import _machine  # bench/decode.py's header helper (CPU model, cores, OS)

PROMPTS = ["The history of the printing press begins", "Once upon a time in a small village",
           "The three laws of thermodynamics are", "A recipe for bread starts with",
           "The largest planets in the solar system", "In the year 1900, the city of London",
           "The main ideas of the theory of evolution", "To build a wooden boat, you first"]


def _run(client: Any, model: str, n: int, concurrency: int,
         max_tokens: int) -> tuple[list[int], float]:
    """(completion tokens of each request, seconds) for n requests from `concurrency` clients."""
    def one(i: int) -> int:
        r = client.completions.create(model=model, prompt=PROMPTS[i % len(PROMPTS)],
                                      max_tokens=max_tokens, temperature=0,
                                      extra_body={"n_predict": max_tokens, "ignore_eos": True})
        return r.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = list(pool.map(one, range(n)))
    return tokens, time.perf_counter() - start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """llama.cpp's llama-server as a subprocess on a free port, its log in a temporary file."""

    def __init__(self, binary: str, model: Path, slots: int, context: int, threads: int) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                    "-np", str(slots), "-c", str(slots * context), "--cont-batching",
                    "-t", str(threads)]
        self.log = tempfile.NamedTemporaryFile(prefix="llama-server.", suffix=".log", delete=False)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 300.0) -> str:
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}:\n"
                                   f"{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self.url
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or 503 while the model loads
            time.sleep(0.2)
        raise RuntimeError(f"llama-server not healthy after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 20) -> str:
        self.log.flush()
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


def _serve_args(args: argparse.Namespace) -> argparse.Namespace:
    """`llamaworks serve`'s own defaults with this run's model, threads, batch and context."""
    from llamaworks.serve.cli import serve_args

    argv = ["--model", str(args.model), "--max-batch", str(args.max_batch),
            "--context", str(args.context)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return serve_args(*argv)


def _tokens(counts: list[int]) -> str:
    lo, hi = min(counts), max(counts)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None,
                    help="GGUF file (or a name / folder `llamaworks serve` takes; default: the "
                    "default model)")
    ap.add_argument("--url", default=None, help="benchmark a running server instead")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8], metavar="C",
                    help="concurrent client counts, one run each")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3,
                    help="with --vs-llama-server: interleaved rounds per client count")
    ap.add_argument("--max-batch", type=int, default=8,
                    help="our batch rows, and llama-server's slots (-np)")
    ap.add_argument("--context", type=int, default=1024,
                    help="tokens per sequence: ours --context, llama-server -c CONTEXT*MAX_BATCH")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (with --vs-llama-server default: all cores, for both)")
    ap.add_argument("--vs-llama-server", default=None, metavar="BIN",
                    help="also run llama.cpp's llama-server binary BIN on the same GGUF and "
                    "workload (build it with tools/llama_server.py)")
    args = ap.parse_args()
    if args.vs_llama_server and args.url:
        ap.error("--vs-llama-server runs our server in-process; it does not take --url")

    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} · {_machine()}")
    print(f"# {shlex.join([Path(sys.executable).name, *sys.argv])}", flush=True)

    import openai

    server = engine = rival = None
    if args.url:
        url = args.url
        model = openai.OpenAI(base_url=url + "/v1", api_key="x").models.list().data[0].id
    else:
        from llamaworks.checkpoint.discovery import model_path
        from llamaworks.serve.app import create_app
        from llamaworks.serve.background import BackgroundServer
        from llamaworks.serve.cli import build_engine

        args.model = model_path(args.model)
        if args.vs_llama_server:
            if args.model.suffix != ".gguf":
                ap.error(f"--vs-llama-server needs a GGUF model, not {args.model}")
            args.threads = args.threads or os.cpu_count() or 1
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        engine, model = build_engine(_serve_args(args))
        server = BackgroundServer(create_app(engine, model))
        url = server.start()
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    results: dict[int, tuple[list[int], float]] = {}
    theirs: dict[int, tuple[list[int], float]] = {}
    ratios: dict[int, list[float]] = {}
    try:
        _run(client, model, 2, 2, 4)  # warm-up
        if args.vs_llama_server:
            rival = LlamaServer(args.vs_llama_server, args.model, args.max_batch, args.context,
                                args.threads)
            print(f"# llama-server: {shlex.join(rival.cmd)}", flush=True)
            rival_client = openai.OpenAI(base_url=rival.start() + "/v1", api_key="x",
                                         max_retries=0, timeout=600)
            rival_model = rival_client.models.list().data[0].id
            _run(rival_client, rival_model, 2, 2, 4)  # warm-up
            for c in args.concurrency:  # interleaved rounds, the order swapped each round,
                runs: list[tuple[tuple[list[int], float], tuple[list[int], float]]] = []
                for r in range(args.rounds):  # so that the machine's drift cancels
                    pair = [(client, model), (rival_client, rival_model)]
                    got = [_run(cl, m, args.requests, c, args.max_tokens)
                           for cl, m in (pair if r % 2 == 0 else pair[::-1])]
                    runs.append((got[0], got[1]) if r % 2 == 0 else (got[1], got[0]))
                ratios[c] = [sum(a[0]) / a[1] / (sum(b[0]) / b[1]) for a, b in runs]
                results[c] = min((a for a, _ in runs), key=lambda x: x[1])  # (reported: the
                theirs[c] = min((b for _, b in runs), key=lambda x: x[1])  # best of each)
        else:
            for c in [1, *args.concurrency]:
                results[c] = _run(client, model, args.requests, c, args.max_tokens)
    finally:
        if rival is not None:
            rival.stop()
        if server is not None:
            server.stop()
            engine.shutdown()

    print(f"model {model}, {args.requests} requests x {args.max_tokens} tokens (greedy), "
          f"max batch {args.max_batch}, {args.threads or 'default'} threads")
    if args.vs_llama_server:
        print(f"{args.rounds} interleaved rounds per client count; tok/s: the best round of "
              "each; ratio: the median of the rounds' ratios")
        print("| clients | llamaworks tok/s | llama-server tok/s | ratio (median) | ratios | "
              "tokens/request (ours / theirs) |")
        print("|---|---|---|---|---|---|")
        for c in args.concurrency:
            (ours, our_s), (their, their_s) = results[c], theirs[c]
            a, b = sum(ours) / our_s, sum(their) / their_s
            each = " ".join(f"{x:.2f}" for x in ratios[c])
            print(f"| {c} | {a:.1f} | {b:.1f} | {statistics.median(ratios[c]):.2f}x | {each} | "
                  f"{_tokens(ours)} / {_tokens(their)} |")
        if any(t != args.max_tokens for c in args.concurrency for t in results[c][0] +
               theirs[c][0]):
            print(f"note: not every request generated {args.max_tokens} tokens; tok/s counts the "
                  "tokens each generated")
        return
    seq_tokens, seq_s = results[1]
    seq = sum(seq_tokens) / seq_s
    print("| clients | requests | tokens | seconds | tokens/s | vs 1 client |")
    print("|---|---|---|---|---|---|")
    print(f"| 1 (sequential) | {args.requests} | {sum(seq_tokens)} | {seq_s:.1f} | {seq:.1f} | "
          "1.00x |")
    for c in args.concurrency:
        tokens, s = results[c]
        rate = sum(tokens) / s
        print(f"| {c} (concurrent) | {args.requests} | {sum(tokens)} | {s:.1f} | {rate:.1f} | "
              f"{rate / seq:.2f}x |")


if __name__ == "__main__":
    main()
