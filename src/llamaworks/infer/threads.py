"""How many CPU threads decoding uses when the user does not say: the cores other processes leave
free, checked just before each generation.

Decode runs one OpenMP team per step with a barrier per layer, so one of its threads losing its
core to another process stalls all of them. Measured on a 2-core machine (BENCHMARKS.md): with a
busy loop on one core, 2 threads fell from up to 174 to 36-61 tok/s (6.6 at worst with
OMP_WAIT_POLICY=ACTIVE) while 1 thread kept 42-127; OMP_WAIT_POLICY=PASSIVE made 2 threads
steadier under load (53-108) but cost about half the speed on a free machine (61-95), so the wait
policy is left to the OpenMP default and the thread count follows the free cores instead.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

WINDOW_S = 0.1  # how long CPU use is watched (/proc/stat counts in 10 ms ticks)
_state: dict[str, int] = {}  # "default": torch's own thread count, read before we change it


def _cpu_times(cpus: set[int]) -> dict[int, tuple[int, int]] | None:
    """{cpu: (busy ticks, total ticks)} from /proc/stat for `cpus`, or None where there is none."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            out[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    return out or None


def _allowed_cpus() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def free_cores(window: float = WINDOW_S) -> float | None:
    """How many of this process's CPUs other processes left idle over the next `window` seconds
    (this process sleeps meanwhile), or None where the OS does not say."""
    cpus = _allowed_cpus()
    before = _cpu_times(cpus)
    time.sleep(window)
    after = _cpu_times(cpus)
    if before is None or after is None:
        return None
    busy = 0.0
    for cpu, (b1, t1) in after.items():
        b0, t0 = before.get(cpu, (b1, t1))
        busy += (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
    return len(after) - busy


def decode_threads(window: float = WINDOW_S) -> int:
    """Threads for the next generation: torch's default (one per core), less the cores other
    processes keep busy: the idle core-time summed over this process's CPUs, rounded down unless
3/4 of a further core is idle; at least 1."""
    default = _state.setdefault("default", torch.get_num_threads())
    free = free_cores(window)
    if free is None:
        return default
    return max(1, min(default, math.floor(free + 0.25)))


def use_threads(requested: int | None) -> int:
    """Set torch's thread count to `requested`, or to `decode_threads()` when None; returns it."""
    n = requested or decode_threads()
    torch.set_num_threads(n)
    return n
