"""Tensor-parallel decoding under torchrun (`llamaworks generate|serve --tensor-parallel N`,
launched with `torchrun --nproc-per-node N`): the pretraining TP plan (`train.tensor_parallel`:
q/k/v and gate/up column-parallel, o and down row-parallel, DTensors over a 1-D mesh of the N
processes; gloo on CPU, NCCL on CUDA) applied to the checkpoint, the engine run on every rank.

Memory per rank: each rank keeps 1/N of every block's attention and MLP matrices (and their
column-parallel biases) in its own storage, the rest whole (embeddings, norms, the output head),
and a KV cache of n_kv_heads / N heads per layer (`shard_for_inference` gives the config the
local head count the engine's `KVPool` allocates from). Per rank: embeddings + head + (block
matrices + cache) / N. An HF safetensors directory (one file or shards) is read that way too
(`train.tensor_parallel.load_split`: the model built on the meta device, each rank reading only
its rows or columns of each split matrix, `safe_open(...).get_slice`), so the load's peak is
that share as well. GGUF files (F32/F16/BF16), Meta directories and `.bin` pickles are read whole
on every rank first (the peak is one process's float32 model), then split.

Decode runs on the eager forward: the fused C++ step takes no DTensors (`FusedDecoder.build`
declines them) and `--compile` is refused rather than tried on them. Every rank takes the same
engine steps, so every forward issues the same collectives; the token each step keeps is rank 0's,
broadcast to the others (`RankZeroTokens`: one integer per token), so ranks whose replicated float
math could differ (unlike CPUs, seeds drawn per process) still feed identical tokens. The server
(`LockstepEngine`) adds to that the requests rank 0 receives: broadcast before each step.

Weights are split as float32 nn.Linear layers: bf16/F16 checkpoints are widened on load (each
rank's share is then 2/N of the file), `--quant` and GGUF files with quantized matrices are
refused by name (dequantized, a Q4 file's share would be about 8/N of it: more than the one
device the split is for).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llamaworks.checkpoint import detect_format, load_model, resolve
from llamaworks.infer.engine import Engine
from llamaworks.infer.load import stored_types
from llamaworks.infer.sequence import Sequence as SeqState
from llamaworks.model import Llama

FLOAT_TYPES = {"F32", "F16", "BF16"}


def check_launch(tp: int, *, compile: bool = False, quant: str | None = None) -> None:
    """Raise ValueError for a `--tensor-parallel tp` run that cannot work, before any weight is
    read: a world size other than `tp`, or an option the split model does not take."""
    if tp < 1:
        raise ValueError(f"--tensor-parallel must be >= 1, not {tp}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp:
        raise ValueError(f"--tensor-parallel {tp} needs as many processes: torchrun "
                         f"--nproc-per-node {tp} (this run has {world})")
    if quant is not None:
        raise ValueError("--quant does not combine with --tensor-parallel: the split layers are "
                         "float nn.Linear matrices (omit --quant)")
    if compile:
        raise ValueError("--compile does not combine with --tensor-parallel: the split model "
                         "decodes on the eager forward (neither the fused C++ step nor "
                         "torch.compile takes its DTensors here)")


def load_float(path: str | Path) -> Llama:
    """The checkpoint at `path` as a float32 model for splitting (bf16 and F16 matrices widened
    exactly, the float32 model's math); a GGUF with quantized matrices raises ValueError naming
    its types."""
    p = Path(path)
    quantized = stored_types(p) - FLOAT_TYPES
    if quantized:
        raise ValueError(f"{p.name} stores {', '.join(sorted(quantized))} matrices: "
                         "--tensor-parallel splits float weights only (quantized GGUFs are not "
                         "dequantized for it); use an F32/F16/BF16 GGUF or an HF directory, e.g. "
                         "`llamaworks convert FILE.gguf DIR`")
    return load_model(p).model.eval()


class RankZeroTokens:
    """The engine's `agree` hook: every rank passes the token it sampled and gets rank 0's."""

    def __init__(self, device: torch.device):
        self.buf = torch.zeros(1, dtype=torch.int64, device=device)

    def __call__(self, token: int) -> int:
        self.buf.fill_(token)
        dist.broadcast(self.buf, src=0)
        return int(self.buf.item())


def reads_slices(path: str | Path) -> bool:
    """Whether `path` is an HF directory of safetensors files, which `tensor_parallel` reads
    rank by rank (each its own rows / columns) instead of whole on every rank."""
    from llamaworks.checkpoint.hf import weight_files

    p = Path(path)
    if detect_format(p) != "hf":
        return False
    return all(f.suffix == ".safetensors" for f in weight_files(resolve(p, "hf")))


@contextmanager
def tensor_parallel(path: str | Path, tp: int) -> Iterator[tuple[Llama, bool, RankZeroTokens]]:
    """The checkpoint at `path` as a float32 model split over the `tp` torchrun processes;
    yields (the model, whether this rank prints, the token hook to give the engine), and ends
    the process group on exit. An HF safetensors directory is read rank by rank, each its own
    share (`load_split`); other checkpoints whole on every rank, then split (`load_float`).
    ValueError for a world of another size or a model that does not split in `tp`, raised the
    same on each rank."""
    from llamaworks.checkpoint.hf import read_config
    from llamaworks.train.tensor_parallel import (
        check_splittable,
        inference_mesh,
        load_split,
        shard_for_inference,
    )

    p = Path(path)
    model = None if reads_slices(p) else load_float(p)
    check_splittable(read_config(resolve(p, "hf")) if model is None else model.config, tp)
    mesh = inference_mesh(tp, torch.device("cpu") if model is None else model.device)
    try:
        if model is None:
            model = load_split(resolve(p, "hf"), mesh)
        main = shard_for_inference(model, mesh)
        yield model, main, RankZeroTokens(model.device)
    finally:
        dist.destroy_process_group()


class LockstepEngine(Engine):
    """An engine every rank steps alike (`serve --tensor-parallel`): on rank 0 the server's
    scheduler adds, aborts and steps as usual, and each step first broadcasts what was added
    (prompt ids and sampling params) and aborted since the last one; the other ranks `follow`,
    replaying those calls on their own engine (built with the same arguments) before each same
    step. Sequences of rank 0 are matched to the followers' by rank 0's ids."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._pending: list[tuple[Any, ...]] = []
        self._copies: dict[int, SeqState] = {}  # follower: rank 0's sequence id -> its copy

    def add(self, group: list[SeqState]) -> None:
        self._pending.append(("add", [s.id for s in group], group[0].prompt_ids,
                              group[0].params))
        super().add(group)

    def abort(self, seqs: Iterable[SeqState], reason: str = "cancelled") -> None:
        seqs = list(seqs)
        self._pending.append(("abort", [s.id for s in seqs], reason))
        super().abort(seqs, reason)

    def step(self) -> list[SeqState]:
        self._send("step")
        return super().step()

    def stop_followers(self) -> None:
        """Rank 0: let the followers' `follow` return."""
        self._send("stop")

    def _send(self, what: str) -> None:
        msg = [[*self._pending, (what,)]]
        self._pending = []
        dist.broadcast_object_list(msg, src=0)

    def follow(self) -> None:
        """Ranks other than 0: replay rank 0's calls and steps until it stops."""
        while True:
            msg: list[Any] = [None]
            dist.broadcast_object_list(msg, src=0)
            for op in msg[0]:
                if op[0] == "add":
                    group = self.sequences(op[2], op[3])
                    self._copies.update(zip(op[1], group, strict=True))
                    Engine.add(self, group)
                elif op[0] == "abort":
                    Engine.abort(self, [self._copies[i] for i in op[1] if i in self._copies],
                                 op[2])
                elif op[0] == "step":
                    Engine.step(self)
                    self._copies = {i: s for i, s in self._copies.items() if not s.finish}
                else:
                    return
