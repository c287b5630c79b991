"""The one log-likelihood scorer: batching/packing never changes a number, sliding windows score
each token with the context the stride promises, and a single window is `llamaworks score`."""

from __future__ import annotations

import random

import pytest
import torch
from infer_fixtures import tiny_model

from llamaworks.eval.loglik import (
    Span,
    continuation_span,
    rolling_nll,
    rolling_spans,
    score_spans,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny forward passes: a second intra-op thread only adds spin time on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model(seed=3)


def _logp(model, ctx: list[int], target: int) -> float:
    """log p(target | ctx) from one plain forward pass over exactly `ctx`."""
    with torch.inference_mode():
        logits = model(torch.tensor([ctx]))[0, -1]
    return float(torch.log_softmax(logits.double(), -1)[target])


def _spans(seed: int = 0) -> list[Span]:
    """Multiple-choice-like spans: shared contexts, continuations of different lengths, plus
    loose spans with no shared prefix."""
    r = random.Random(seed)
    spans = []
    for _ in range(6):
        ctx = [r.randrange(3, 259) for _ in range(r.randrange(1, 30))]
        for _ in range(r.randrange(1, 5)):
            cont = [r.randrange(3, 259) for _ in range(r.randrange(1, 6))]
            spans.append(continuation_span(ctx, cont, 10_000))
    spans.append(Span([5, 6, 7, 8], [6, 7, 8]))
    return spans


def test_batched_and_packed_scores_equal_one_span_at_a_time(model):
    spans = _spans()
    ref = score_spans(model, spans, batch_size=1, share_prefix=False, pack_tokens=0)
    for bs, share, pack in ((1, True, 0), (3, True, 0), (64, True, 0), (64, False, 0),
                            (1, True, 40), (2, True, 64), (64, False, 256), (64, True, 256)):
        got = score_spans(model, spans, batch_size=bs, share_prefix=share, pack_tokens=pack)
        for a, b in zip(got, ref, strict=True):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
            assert a.greedy == b.greedy


def test_span_scores_are_next_token_log_probs(model):
    """Each target's score is log p(target | every input token before its position)."""
    s = continuation_span([10, 20, 30, 40], [50, 60, 70], 10_000)
    got = score_spans(model, [s])[0].logprobs
    want = [_logp(model, [10, 20, 30, 40], 50), _logp(model, [10, 20, 30, 40, 50], 60),
            _logp(model, [10, 20, 30, 40, 50, 60], 70)]
    assert got == pytest.approx(want, abs=1e-4)


def test_continuation_span_truncates_context_from_the_left_like_lm_eval():
    # lm-eval: (context + continuation)[-(max_length + 1):][:-1] predicts the continuation
    s = continuation_span([1, 2, 3, 4, 5], [6, 7], max_len=4)
    assert s.input_ids == [3, 4, 5, 6] and s.targets == [6, 7]
    s = continuation_span([1], [2, 3, 4, 5, 6], max_len=3)  # longer than the window
    assert s.input_ids == [3, 4, 5] and s.targets == [4, 5, 6]


@pytest.mark.parametrize("window,stride", [(8, 8), (8, 3), (8, 1), (5, 4)])
def test_rolling_windows_give_each_token_the_promised_context(model, window, stride):
    ids = [random.Random(1).randrange(3, 259) for _ in range(23)]
    nll = rolling_nll(model, ids, window, stride)
    assert len(nll) == len(ids) - 1  # every token but the first, exactly once
    # reference: token t >= 1 sees ids[start:t] with start fixed by the window schedule
    want, t = [], 1
    while t < len(ids):
        end = min(len(ids), (1 + window) if t == 1 else t + stride)
        for u in range(t, end):
            want.append(-_logp(model, ids[max(0, end - 1 - window):u], ids[u]))
        t = end
    assert nll == pytest.approx(want, abs=1e-4)


def test_rolling_with_stride_equal_window_is_lm_evals_disjoint_windows():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    ids = list(range(100, 123))
    ref = [make_disjoint_window(w) for w in get_rolling_token_windows(
        token_list=ids, prefix_token=1, max_seq_len=8, context_len=1)]
    ours = rolling_spans(ids, window=8, prefix_id=1)
    assert [(s.input_ids, s.targets) for s in ours] == [
        ((c + x)[:-1], x) for c, x in ref]


def test_single_window_equals_a_full_forward_cross_entropy(model):
    import torch

    ids = [random.Random(2).randrange(3, 259) for _ in range(40)]
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, :-1]
    want = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
    assert rolling_nll(model, ids) == pytest.approx(want.tolist(), abs=1e-4)


def test_bad_spans_and_strides_are_refused(model):
    with pytest.raises(ValueError, match="targets"):
        score_spans(model, [Span([1, 2], [])])
    with pytest.raises(ValueError, match="stride"):
        rolling_spans([1, 2, 3], window=4, stride=5)
    with pytest.raises(ValueError, match="context"):
        score_spans(model, [Span(list(range(3, 3 + model.config.max_seq_len + 1)), [4])])
