"""`llamaworks data prepare` throughput: one process, the local process pool, and a Dask
LocalCluster (`--executor dask-local:N`), on the demo recipe (the bundled corpus, 3.5k documents).

Each mode runs in a fresh process (as the CLI would), modes interleaved `--rounds` times; the
numbers are medians. The BPE is trained once beforehand and given to every run (the recipe's
`[tokenizer] path`), so what is timed is the work the executors share out: cleaning, quality
rules, dedup (in the parent), tokenizing, mixing and shards; start-up of the pool or cluster is
included (and shown on its own), as a user meets it. Every mode's shards and manifest are
checked to be the same bytes as the one-process run's.
Usage: python bench/data_prepare.py [--recipe recipes/demo.toml] [--workers 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(recipe_path: str, tokenizer: str, out: str, mode: str) -> dict:
    """One `prepare` in this process; `mode` is `workers:N` or an executor string."""
    from llamaworks.data import parallel
    from llamaworks.data.pipeline import prepare
    from llamaworks.data.recipe import load_recipe

    started: list[float] = []
    for cls in (parallel.WorkerPool, parallel.DaskPool):
        real = cls.start

        def timed(self, real=real) -> None:
            t = time.perf_counter()
            real(self)
            started.append(time.perf_counter() - t)
        cls.start = timed  # type: ignore[method-assign]
    recipe = dataclasses.replace(load_recipe(recipe_path), tokenizer=tokenizer)
    kw = ({"workers": int(mode.split(":")[1])} if mode.startswith("workers:")
          else {"executor": mode})
    t0 = time.perf_counter()
    m = prepare(recipe, out, progress=False, **kw)
    wall = time.perf_counter() - t0
    docs = sum(s["read"] for s in m["sources"].values())
    tokens = sum(s["available_tokens"] + s["val_tokens"] for s in m["sources"].values())
    digest = hashlib.sha256()
    for f in sorted(Path(out).glob("*.bin")) + [Path(out) / "manifest.json"]:
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return {"wall_s": wall, "start_s": sum(started), "docs": docs, "tokens": tokens,
            "sha256": digest.hexdigest()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/demo.toml")
    ap.add_argument("--workers", type=int, default=2, help="the parallel modes' worker count")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--one", nargs=4, metavar=("RECIPE", "TOKENIZER", "OUT", "MODE"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(*a.one)))
        return
    n = a.workers
    modes = ["workers:1", f"workers:{n}", "dask-local:1", f"dask-local:{n}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        from llamaworks.data.pipeline import _docs
        from llamaworks.data.recipe import load_recipe
        from llamaworks.tokenizer.train import train_bpe

        # the recipe's own BPE, trained on its kept train documents once (a 1-worker run)
        base = Path(tmp) / "base"
        subprocess.run([sys.executable, "-m", "llamaworks.cli", "data", "prepare", "--config",
                        a.recipe, "--out", str(base), "--workers", "1", "--no-progress"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        recipe = load_recipe(a.recipe)
        tok = train_bpe((t for s in recipe.sources for t in _docs(base, s.name, "train")),
                        recipe.vocab_size)
        tok.save(Path(tmp) / "tokenizer")
        for r in range(a.rounds):
            for mode in (modes if r % 2 == 0 else modes[::-1]):
                out = Path(tmp) / f"out-{r}-{mode.replace(':', '-')}"
                res = subprocess.run([sys.executable, __file__, "--one", a.recipe,
                                      str(Path(tmp) / "tokenizer"), str(out), mode],
                                     check=True, env=env, capture_output=True, text=True)
                runs[mode].append(json.loads(res.stdout.strip().splitlines()[-1]))
    ref = runs["workers:1"][0]
    same = all(x["sha256"] == ref["sha256"] for rs in runs.values() for x in rs)
    print(f"data prepare on {a.recipe}: {ref['docs']} documents read, {ref['tokens']} tokens; "
          f"{a.rounds} rounds, medians; cluster/pool start-up included and shown alone")
    print(f"{'mode':<16}{'wall s':>8}{'start s':>9}{'docs/s':>9}{'tokens/s':>11}"
          f"{'vs 1 proc':>11}{'vs pool':>9}")
    med = {m: statistics.median(x["wall_s"] for x in rs) for m, rs in runs.items()}
    for m, rs in runs.items():
        w = med[m]
        start = statistics.median(x["start_s"] for x in rs)
        label = {"workers:1": "1 process", f"workers:{n}": f"pool {n}"}.get(m, m)
        print(f"{label:<16}{w:>8.2f}{start:>9.2f}{ref['docs'] / w:>9.0f}{ref['tokens'] / w:>11.0f}"
              f"{med['workers:1'] / w:>10.2f}x{med[f'workers:{n}'] / w:>8.2f}x")
    print("outputs byte-identical across modes:", "yes" if same else "NO")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
