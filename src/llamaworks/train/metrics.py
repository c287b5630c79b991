"""Training metrics: bits per byte, a unigram baseline, FLOPs/MFU, metrics.jsonl and loss.png."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamaworks.atomic import atomic_path, atomic_write_text
from llamaworks.config import ModelConfig


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode (the byte-level BPE alphabet)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def token_byte_lengths(tok: Any) -> np.ndarray:
    """UTF-8 bytes each token id stands for; special tokens (BOS/EOS/chat markers) count 0."""
    dec = _byte_decoder()
    special = {t.content for t in tok.backend.get_added_tokens_decoder().values() if t.special}
    out = np.zeros(tok.vocab_size, dtype=np.int64)
    for i in range(tok.vocab_size):
        s = tok.id_to_token(i)
        if s is None or s in special:
            continue
        if all(c in dec for c in s):
            out[i] = len(s)
        else:
            out[i] = len(tok.decode([i]).encode("utf-8"))
    return out


def unigram_bpb(train: Sequence[np.ndarray], targets: torch.Tensor, byte_len: np.ndarray
                ) -> float:
    """Bits per byte of a unigram model (add-one smoothed counts of the train tokens) on
    `targets`, the same positions the model's val_bpb is measured on."""
    counts = np.ones(len(byte_len), dtype=np.float64)
    for s in train:
        counts += np.bincount(np.asarray(s), minlength=len(byte_len))[:len(byte_len)]
    logp = np.log2(counts / counts.sum())
    t = targets.reshape(-1).numpy()
    return float(-logp[t].sum() / max(1, byte_len[t].sum()))


def nats_to_bpb(nll_sum: float, n_bytes: int) -> float:
    return nll_sum / math.log(2) / max(1, n_bytes)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters + attention (PaLM appendix B: 6 per
    query-key and per probability-value product, each head_dim wide; latent attention's are
    qk_nope_dim + head_dim and v_head_dim); for a mixture of experts the parameters one token
    uses (its k experts)."""
    n = cfg.num_params(include_embeddings=False, active=True)
    qk, v = (cfg.qk_nope_dim + cfg.head_dim, cfg.v_head_dim) if cfg.mla else (cfg.head_dim,) * 2
    return 6 * n + 6 * cfg.n_layers * cfg.n_heads * (qk + v) * seq_len


def peak_flops(device: torch.device) -> float:
    """Dense peak FLOP/s for MFU: bf16 tensor-core peak on known GPUs, else an AVX-512 FP32
    estimate (threads x 2.5 GHz x 64 FLOP/cycle)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in (("H200", 989), ("H100", 989), ("A100", 312), ("L4", 121), ("A10", 125)):
            if key in name:
                return tf * 1e12
        return 312e12
    return torch.get_num_threads() * 2.5e9 * 64


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a line that is no step's row (the half-written last line a
    kill -9 mid-append leaves) is dropped with a warning naming it."""
    import warnings

    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            row = json.loads(line)
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
                continue
        except json.JSONDecodeError:
            pass
        warnings.warn(f"{path}:{n}: not a metrics row ({line[:40]!r}); dropped", stacklevel=3)
    return rows


class MetricsLog:
    """Appends one JSON object per logged step to `metrics.jsonl`; on resume, lines after the
    resumed step are dropped so the file reads like one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and path.exists():
            self.rows = [r for r in _read_rows(path) if r["step"] <= resume_step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        moe = [r for r in self.rows if "load_imbalance" in r]
        if moe:  # mixture of experts: a second panel with each MoE layer's load imbalance
            fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
            _plot_load(ax2, moe)
        else:
            fig, ax = plt.subplots(figsize=(7, 4))
        tr = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        va = [(r["step"], r["val_loss"]) for r in self.rows if "val_loss" in r]
        if tr:
            ax.plot(*zip(*tr, strict=True), label="train loss", lw=1)
        if va:
            ax.plot(*zip(*va, strict=True), "o-", label="val loss")
        if not moe:  # else the load panel below carries the step axis
            ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)


def _plot_load(ax: Any, rows: list[dict[str, Any]]) -> None:
    """Max/mean expert load per MoE layer over the run (1.0 = perfectly balanced)."""
    for layer in rows[-1]["load_imbalance"]:
        pts = [(r["step"], r["load_imbalance"][layer]) for r in rows
               if layer in r["load_imbalance"]]
        ax.plot(*zip(*pts, strict=True), lw=1, label=f"layer {layer}")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_ylabel("expert load max/mean")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=4)
