"""`llamaworks data prepare|report` and `llamaworks tokenizer train`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from llamaworks.errors import LlamaworksError


def cmd_prepare(args: argparse.Namespace) -> int:
    from llamaworks.data.pipeline import format_report, prepare
    from llamaworks.data.recipe import load_recipe

    paths = dict(p.split("=", 1) for p in args.path or [])
    m = prepare(load_recipe(args.config, paths), args.out, progress=not args.no_progress,
                workers=args.workers, checkpoint_docs=args.checkpoint_docs,
                executor=args.executor)
    print(format_report(m))
    print(f"wrote {args.out}/manifest.json")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from llamaworks.data.pipeline import format_report
    from llamaworks.data.shards import read_manifest

    m = read_manifest(args.dir)
    print(json.dumps(m["sources"], indent=2) if args.json else format_report(m))
    return 0


def _texts(inputs: list[str], text_field: str) -> Any:
    from llamaworks.data.clean import clean_text
    from llamaworks.data.readers import read_jsonl, read_parquet, read_source, read_txt_dir

    for spec in inputs:
        if spec.startswith("bundled:"):
            docs = read_source("bundled", spec.split(":", 1)[1])
        else:
            p = Path(spec)
            if not p.exists():
                raise LlamaworksError(f"--input {p}: no such file or directory")
            name = p.name
            if ".jsonl" in name or name.endswith(".json.gz"):
                docs = read_jsonl(p, text_field)
            elif name.endswith(".parquet"):
                docs = read_parquet(p, text_field)
            else:
                docs = read_txt_dir(p)
        for d in docs:
            yield clean_text(d["text"])


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from llamaworks.tokenizer.train import train_bpe

    try:
        tok = train_bpe(_texts(args.input, args.text_field), args.vocab_size,
                        min_frequency=args.min_frequency)
    except ValueError as e:
        raise LlamaworksError(str(e)) from None
    tok.save(args.out)
    print(f"wrote {args.out}/tokenizer.json (vocab {tok.vocab_size}, bos {tok.bos_id}, "
          f"eos {tok.eos_id}); transformers' AutoTokenizer.from_pretrained opens it")
    return 0


def register(sub: Any) -> None:
    from llamaworks.data.resume import CHECKPOINT_DOCS

    p = sub.add_parser("data", help="prepare token shards from a mixture recipe")
    dsub = p.add_subparsers(dest="data_verb", required=True, metavar="ACTION")
    q = dsub.add_parser("prepare", help="read, clean, filter, dedup, tokenize, mix, shard")
    q.add_argument("--config", required=True, help="recipe TOML, e.g. recipes/demo.toml")
    q.add_argument("--out", required=True, help="output folder (resumes if it exists)")
    q.add_argument("--path", action="append", metavar="NAME=PATH",
                   help="override a source's path, e.g. --path wikipedia=/data/enwiki.xml.bz2")
    q.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes for cleaning, filters, dedup keys and tokenizing (default: "
                        "usable CPUs, at most 8; 1 = in-process); outputs are identical for any N")
    q.add_argument("--executor", default=None, metavar="URL",
                   help="run the per-document work on a Dask cluster instead of local "
                        "processes: dask://HOST[:PORT] (an existing scheduler) or dask-local:N "
                        "(N local worker processes for this run); outputs are the same bytes")
    q.add_argument("--checkpoint-docs", type=int, default=CHECKPOINT_DOCS, metavar="N",
                   help="documents between progress records inside a source (the most work an "
                        f"interruption loses; default {CHECKPOINT_DOCS})")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(fn=cmd_prepare)
    q = dsub.add_parser("report", help="documents kept/dropped per rule, tokens per source")
    q.add_argument("dir")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_report)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tok_verb", required=True, metavar="ACTION")
    q = tsub.add_parser("train", help="train a byte-level BPE (digits split, chat markers)")
    q.add_argument("--input", action="append", required=True,
                   help="text dir/file, .jsonl[.gz|.zst], .parquet, or bundled:kjv (repeatable)")
    q.add_argument("--vocab-size", type=int, required=True)
    q.add_argument("--min-frequency", type=int, default=2)
    q.add_argument("--text-field", default="text")
    q.add_argument("--out", required=True, help="output folder for tokenizer.json")
    q.set_defaults(fn=cmd_tokenizer_train)
