"""torch.compile of the decode step: same greedy tokens as eager, a clean eager fallback, and never
in place of the faster fused step (these tests turn the fused step off where they compile)."""

from __future__ import annotations

import pytest
import torch
from infer_fixtures import ByteTokenizer, tiny_model

from llamaworks import LLM, SamplingParams

PARAMS = SamplingParams(max_tokens=20, ignore_eos=True)


@pytest.fixture
def no_fused(monkeypatch):
    monkeypatch.setenv("LLAMAWORKS_NO_FUSED", "1")


def test_compile_keeps_the_fused_step_where_it_runs():
    from llamaworks.infer import kernels

    if not kernels.preferred():
        pytest.fail("the kernels must build on the test machines")
    llm = LLM(tiny_model(), ByteTokenizer(), compile=True)
    assert llm.step.kind == "fused" and llm.step.compiled is None


@pytest.mark.slow
def test_compiled_greedy_equals_eager_greedy_on_a_tiny_model(no_fused):
    model = tiny_model()
    eager = LLM(model, ByteTokenizer()).generate(["hello", "ab"], PARAMS)
    llm = LLM(model, ByteTokenizer(), compile=True)
    assert llm.step.kind == "compiled"  # compiled, not fallen back
    got = llm.generate(["hello", "ab"], PARAMS)
    assert [o.token_ids for o in got] == [o.token_ids for o in eager]


def test_a_failing_compile_warns_and_decodes_eagerly(monkeypatch, no_fused):
    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("inductor exploded")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    model = tiny_model()
    with pytest.warns(RuntimeWarning, match="inductor exploded.*eagerly"):
        llm = LLM(model, ByteTokenizer(), compile=True)  # the warm-up finds the failure
    assert llm.step.compiled is None
    ref = LLM(model, ByteTokenizer()).generate("hello", PARAMS)[0].token_ids
    assert llm.generate("hello", PARAMS)[0].token_ids == ref


def test_compile_refused_at_wrap_time_also_falls_back(monkeypatch, no_fused):
    def refuse(fn, **kw):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", refuse)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        llm = LLM(tiny_model(), ByteTokenizer(), compile=True)
    assert llm.generate("hi", SamplingParams(max_tokens=3))[0].token_ids
