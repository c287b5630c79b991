"""The pretraining loss: cross-entropy fused with the output projection (train/loss.py) gives
PyTorch's `F.cross_entropy` loss and gradients, and transformers' training loss and gradients on
the same model; and the CPU allocator setting really keeps freed memory mapped."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from test_model import hf_twin, random_model

from llamaworks.train.allocator import _libc
from llamaworks.train.loss import linear_cross_entropy


def _inputs(n: int = 300, d: int = 24, v: int = 97, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.5).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    return h, w, y


def _grads(loss: torch.Tensor, *ts: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, ts))


@pytest.mark.parametrize("chunk", [1, 64, 77, 300, 1000])
def test_loss_and_gradients_equal_cross_entropy_for_any_chunking(chunk):
    h, w, y = _inputs()
    y[::5] = -100  # ignored targets count neither in the loss nor in the mean
    ours = linear_cross_entropy(h, w, y, chunk=chunk)
    ref = F.cross_entropy(h @ w.t(), y)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(_grads(ours * 0.37, h, w), _grads(ref * 0.37, h, w), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_batched_hidden_states_and_extreme_logits_stay_finite():
    h, w, y = _inputs(n=64)
    h3, y3 = (h.detach() * 200).view(4, 16, -1).requires_grad_(), y.view(4, 16)
    ours = linear_cross_entropy(h3, w, y3, chunk=10)
    ref = F.cross_entropy((h3 @ w.t()).flatten(0, 1), y3.flatten())
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(_grads(ours, h3)[0], _grads(ref, h3)[0], rtol=1e-4, atol=1e-6)


def test_tied_weight_gets_projection_and_embedding_gradients():
    emb = torch.nn.Embedding(50, 16)
    x = torch.randint(0, 50, (40,), generator=torch.Generator().manual_seed(3))
    y = torch.roll(x, -1)
    ours = linear_cross_entropy(torch.tanh(emb(x)), emb.weight, y, chunk=16)
    g_ours = _grads(ours, emb.weight)[0]
    ref = F.cross_entropy(torch.tanh(emb(x)) @ emb.weight.t(), y)
    torch.testing.assert_close(g_ours, _grads(ref, emb.weight)[0], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_matches_cross_entropy_over_autocast_logits():
    h, w, y = _inputs(n=200, d=64, v=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, w, y, chunk=64)
        ref = F.cross_entropy((h @ w.t()).float(), y)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    go, gr = _grads(ours, h, w), _grads(ref, h, w)
    assert go[0].dtype == torch.float32 and go[1].dtype == torch.float32
    for a, b in zip(go, gr, strict=True):  # both use bf16 matmuls; only rounding order differs
        torch.testing.assert_close(a, b, rtol=0.02, atol=2e-4)


def test_without_grad_only_the_loss_is_computed():
    h, w, y = _inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, y, chunk=50)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.t(), y).detach())


def test_no_counted_target_gives_zero_loss_and_zero_gradients_not_nan():
    h, w, y = _inputs(n=8)
    for hh, yy in ((h, torch.full_like(y, -100)), (h[:0], y[:0])):
        loss = linear_cross_entropy(hh, w, yy)
        gh, gw = _grads(loss, h, w)
        assert loss.item() == 0.0 and not gh.any() and not gw.any()


def test_mismatched_targets_or_chunk_are_clear_errors():
    h, w, y = _inputs()
    with pytest.raises(ValueError, match="do not match targets"):
        linear_cross_entropy(h, w, y[:-1])
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(h, w, y, chunk=0)


@pytest.mark.parametrize("name", ["gqa", "mqa_tied"])
def test_training_loss_and_gradients_equal_transformers_labels_loss(name):
    """What the pretrain loop computes (hidden states + fused loss) equals HF's own training
    loss (`labels=`, shifted inside transformers) and its parameter gradients."""
    m = random_model(name).train()
    hf = hf_twin(m).train()
    x = torch.randint(0, m.config.vocab_size, (2, 65), generator=torch.Generator().manual_seed(4))
    ours = linear_cross_entropy(m(x[:, :-1], hidden_only=True), m.lm_head.weight, x[:, 1:],
                                chunk=32)
    ref = hf(input_ids=x, labels=x).loss
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    ours.backward()
    ref.backward()
    hf_params = dict(hf.named_parameters())
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[n].grad, rtol=1e-4, atol=1e-6, msg=n)


_FAULTS_SCRIPT = """
import resource, torch
from llamaworks.train.allocator import reuse_freed_memory

def step():  # what a training step does to the heap: large temporaries, all freed at the end
    a = torch.ones(16 << 20)  # 64 MiB: above glibc's mmap threshold (32 MiB at most)
    b = a * 2
    c = torch.ones(3 << 20) + b[: 3 << 20]
    return float(c[-1])

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

step()
default = faults()
with reuse_freed_memory() as active:
    kept = [faults() for _ in range(20)]
after = faults()
with reuse_freed_memory(enabled=False) as off:
    pass
print(default, active, sum(kept[1:]), after, off)
"""


@pytest.mark.slow
@pytest.mark.skipif(_libc() is None, reason="malloc tuning applies to glibc only")
def test_reused_memory_is_not_page_faulted_again_and_defaults_come_back():
    # a fresh interpreter (one thread): the test process's heap depends on what ran before
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.split()
    default, active, kept, after, off = out
    assert int(default) > 30000  # glibc's default: 134 MiB of pages faulted in every step
    # after the first step the kept memory serves the steps; glibc's memalign leaves fragments,
    # so now and then the heap grows once more (measured: 27-49k faults over the 19 steps)
    assert active == "True" and int(kept) < 19 * int(default) // 5
    assert int(after) > int(default) // 2 and off == "False"  # the defaults are back
