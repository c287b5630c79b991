"""Decode threads follow the cores other processes leave free (infer/threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llamaworks.infer import threads


def _fake_cpus(monkeypatch: pytest.MonkeyPatch, busy_share: list[float], default: int) -> None:
    """Two /proc/stat readings 100 ticks apart in which CPU i was busy `busy_share[i]` of them."""
    cpus = set(range(len(busy_share)))
    readings = iter([{c: (0, 0) for c in cpus},
                     {c: (int(100 * s), 100) for c, s in enumerate(busy_share)}])
    monkeypatch.setattr(threads, "_allowed_cpus", lambda: cpus)
    monkeypatch.setattr(threads, "_cpu_times", lambda _: next(readings))
    monkeypatch.setattr(threads, "_state", {"default": default})


def test_decode_threads_leave_out_the_core_another_process_keeps_busy(monkeypatch):
    _fake_cpus(monkeypatch, [1.0, 0.02], default=2)
    assert threads.decode_threads(window=0) == 1


def test_decode_threads_use_every_core_of_an_idle_machine(monkeypatch):
    _fake_cpus(monkeypatch, [0.05, 0.1, 0.0, 0.05], default=4)
    assert threads.decode_threads(window=0) == 4


def test_decode_threads_count_a_further_core_only_when_three_quarters_of_it_is_idle(monkeypatch):
    _fake_cpus(monkeypatch, [0.5, 0.5], default=2)  # one core's worth of idle time
    assert threads.decode_threads(window=0) == 1
    _fake_cpus(monkeypatch, [0.3, 0.3], default=2)  # 1.4 cores idle
    assert threads.decode_threads(window=0) == 1
    _fake_cpus(monkeypatch, [0.1, 0.1], default=2)  # 1.8 cores idle
    assert threads.decode_threads(window=0) == 2


def test_decode_threads_stay_within_one_and_torchs_default(monkeypatch):
    _fake_cpus(monkeypatch, [1.0, 1.0], default=2)
    assert threads.decode_threads(window=0) == 1
    _fake_cpus(monkeypatch, [0.0] * 8, default=2)  # OMP_NUM_THREADS / physical cores cap it
    assert threads.decode_threads(window=0) == 2


def test_free_cores_sees_a_real_busy_process():
    n = len(os.sched_getaffinity(0))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        free = threads.free_cores(window=0.5)
    finally:
        busy.kill()
        busy.wait()
    assert free is not None and -0.05 <= free <= n - 0.5
