"""Run untrusted Python in a separate, limited process: `run_python(code, ...)`.

The code runs in `sandbox_child.py` (`python -I -B`: isolated mode, no user site, no PYTHON*
variables, no bytecode writes) with a scrubbed environment and a fresh, empty working directory
that is deleted afterwards, under these layers, each reported in `SandboxResult.isolation`:
- "pid namespace": the code is a child of PID 1 of a new PID namespace with its own /proc; it can
  see and signal only its own processes, and when it returns the kernel kills everything it left.
- "network namespace": no interface is up, not even loopback; abstract Unix sockets are private.
- "read-only filesystem": every mount but the workdir is read-only, nosuid and nodev; /dev holds
  only null, zero, full, random and urandom.
- "no capabilities": every capability dropped, no_new_privs set, even when the caller is root.
- "seccomp filter" (libseccomp): no socket of any family (so no filesystem Unix socket outside is
  reachable either), no program started (execve), no ptrace, pidfd signals, mounts, namespaces,
  io_uring, BPF, keyrings or modules.
- "process limit": at most `max_procs` processes and threads (a pids cgroup when the caller is
  root and one is writable; else RLIMIT_NPROC inside the user namespace).
- "disk limit": the workdir is a tmpfs of `disk_mb` MB.
Always: setrlimit CPU time, address space, file size, open files, no core dumps; a wall-clock
limit that kills the whole tree; output capped per stream; PEP 578 audit hooks refusing sockets,
DNS, processes and writes outside the workdir (and ctypes, when a kernel layer is missing).

Modes (`mode=` or the LLAMAWORKS_SANDBOX variable): "strict", the default, needs every layer above
and raises `SandboxUnavailableError` naming the missing ones before any code runs; "weak" runs with
whatever the kernel gives (seccomp then also confines signals to the process itself and refuses
writes relative to directory fds); "hooks" skips the namespaces (weak, for tests). Not provided
in any mode: hiding readable files outside the workdir, protection against kernel exploits.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from llamaworks.errors import LlamaworksError

LAYERS = ("pid namespace", "network namespace", "read-only filesystem", "no capabilities",
          "seccomp filter", "process limit", "disk limit")
MODES = ("strict", "weak", "hooks")
CHILD = Path(__file__).with_name("sandbox_child.py")


class SandboxUnavailableError(LlamaworksError):
    """The kernel cannot give the python sandbox every isolation layer and weak mode was not
    chosen."""


MEMORY_MARKERS = ("MemoryError", "Cannot allocate memory", "std::bad_alloc")


@dataclass
class SandboxResult:
    """What the code printed, its exit code (negative: killed by that signal), why it was killed
    (None if it was not), and which kernel isolation layers applied."""

    stdout: str
    stderr: str
    exit_code: int
    killed_reason: str | None = None
    isolation: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """True when the code ran to completion with exit code 0."""
        return self.exit_code == 0 and self.killed_reason is None


def _drain(pipe: IO[bytes], limit: int, out: list) -> None:
    """Read `pipe` to EOF keeping its first `limit` bytes and its last ones (where tracebacks
    end); out = [head, tail, total bytes]."""
    head, tail, total = bytearray(), bytearray(), 0
    keep_tail = min(limit // 2, 4096)
    while chunk := pipe.read1(65536):
        total += len(chunk)
        if len(head) < limit:
            head += chunk[:limit - len(head)]
        tail = (tail + chunk)[-keep_tail:] if keep_tail else tail
    out[:] = [bytes(head), bytes(tail), total]


def _text(head: bytes, tail: bytes, total: int, limit: int) -> str:
    """At most `limit` bytes of output: all of it, or its start and end around a marker."""
    if total <= limit:
        return head.decode("utf-8", errors="replace")
    start = head[:limit - len(tail)].decode("utf-8", errors="replace")
    end = tail.decode("utf-8", errors="replace")
    return f"{start}\n[... output truncated: {total - limit} bytes omitted ...]\n{end}"


def sandbox_mode(mode: str | None = None) -> str:
    """`mode`, else LLAMAWORKS_SANDBOX, else "strict"; a clear error for anything else."""
    mode = mode or os.environ.get("LLAMAWORKS_SANDBOX") or "strict"
    if mode not in MODES:
        raise ValueError(f"sandbox mode {mode!r}: choose one of {', '.join(MODES)} "
                         f"(LLAMAWORKS_SANDBOX or mode=)")
    return mode


@functools.cache
def _probe(mode: str) -> tuple[str, ...]:
    return run_python("pass", mode=mode).isolation


def check_isolation(mode: str | None = None) -> tuple[str, ...]:
    """The layers the sandbox gets here in `mode` (probed once per process); in strict mode a
    SandboxUnavailableError naming what is missing."""
    return _probe(sandbox_mode(mode))


class _PidsCgroup:
    """One call's pids cgroup (needs a writable cgroup: root, usually): pids.max caps processes
    and threads, and afterwards every process still in it is killed, even one that left the
    session. None where the host has no such cgroup to give."""

    _counter = itertools.count()

    def __init__(self, path: Path):
        self.path = path
        self.procs = str(path / "cgroup.procs")

    @classmethod
    def create(cls, limit: int) -> _PidsCgroup | None:
        parent = cls._parent()
        if parent is None:
            return None
        path = parent / f"llamaworks-sandbox-{os.getpid()}-{next(cls._counter)}"
        try:
            path.mkdir()
        except OSError:
            return None
        try:
            (path / "pids.max").write_text(str(limit))
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
            return None
        return cls(path)

    @staticmethod
    def _parent() -> Path | None:
        """The caller's own cgroup in the pids hierarchy (v1 controller or v2 with pids on)."""
        try:
            own = {}
            for line in Path("/proc/self/cgroup").read_text().splitlines():
                _, controllers, rel = line.split(":", 2)
                for c in controllers.split(",") if controllers else ["<v2>"]:
                    own[c] = rel.lstrip("/")
            mounts = []
            for line in Path("/proc/self/mountinfo").read_text().splitlines():
                left, right = line.split(" - ", 1)
                fstype, _, opts = right.split()[:3]
                mounts.append((fstype, set(opts.split(",")), left.split()[4]))
        except (OSError, ValueError):
            return None
        for fstype, opts, point in mounts:
            if fstype == "cgroup" and "pids" in opts and "pids" in own:
                return Path(point, own["pids"])
        for fstype, _, point in mounts:
            if fstype == "cgroup2" and "<v2>" in own:
                base = Path(point, own["<v2>"])
                control = base / "cgroup.subtree_control"
                with contextlib.suppress(OSError):
                    if "pids" not in control.read_text().split():
                        control.write_text("+pids")
                    return base
        return None

    def close(self) -> None:
        """Kill whatever is left in the cgroup, then remove it."""
        for _ in range(100):
            try:
                pids = [int(x) for x in Path(self.procs).read_text().split()]
            except OSError:
                pids = []
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
        for _ in range(100):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)


def run_python(code: str, *, cpu_s: int = 5, mem_mb: int = 256, wall_s: float = 10.0,
               max_output: int = 10_000, fsize_mb: int = 16, disk_mb: int = 64,
               max_procs: int = 16, mode: str | None = None) -> SandboxResult:
    """Run `code` in a sandboxed Python process (see the module docstring for exactly what holds
    in each mode). Strict mode raises SandboxUnavailableError, having run nothing, when a layer
    is missing."""
    mode = sandbox_mode(mode)
    if cpu_s < 1 or mem_mb < 32 or wall_s <= 0 or max_output < 0 or disk_mb < 1 or max_procs < 1:
        raise ValueError("sandbox limits: cpu_s >= 1, mem_mb >= 32, wall_s > 0, "
                         "max_output >= 0, disk_mb >= 1, max_procs >= 1")
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="llamaworks-sandbox-"))
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
           "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    tasks = max_procs + 2  # the two supervising processes of a PID namespace count too
    cgroup = _PidsCgroup.create(tasks)
    info_r = info_w = -1
    proc: subprocess.Popen | None = None
    try:
        info_r, info_w = os.pipe()
        cfg = {"wd": workdir, "namespaces": mode != "hooks", "cpu_s": int(cpu_s),
               "mem_mb": int(mem_mb), "fsize_mb": int(fsize_mb), "disk_mb": int(disk_mb),
               "disk_inodes": 4096, "max_tasks": tasks, "info_fd": info_w,
               "cgroup_procs": cgroup.procs if cgroup else None,
               "required": list(LAYERS) if mode == "strict" else []}
        argv = [sys.executable, "-I", "-B", str(CHILD), json.dumps(cfg)]
        proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, pass_fds=(info_w,))
        os.close(info_w)
        info_w = -1
        outs: list = [b"", b"", 0]
        errs: list = [b"", b"", 0]
        readers = [threading.Thread(target=_drain, args=(proc.stdout, max_output, outs),
                                    daemon=True),
                   threading.Thread(target=_drain, args=(proc.stderr, max_output, errs),
                                    daemon=True)]
        for t in readers:
            t.start()
        try:
            assert proc.stdin is not None
            proc.stdin.write(code.encode("utf-8", errors="surrogatepass"))
            proc.stdin.close()
        except BrokenPipeError:
            pass
        killed = None
        try:
            proc.wait(timeout=wall_s)
        except subprocess.TimeoutExpired:
            killed = f"wall-clock limit exceeded ({wall_s:g} s)"
        with contextlib.suppress(ProcessLookupError):  # stray children die with the group
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if cgroup is not None:
            cgroup.close()
            cgroup = None
        for t in readers:
            t.join(timeout=5)
        with os.fdopen(info_r, "rb") as f:
            info_r = -1
            info = dict((line + " ").split(" ", 1) for line in f.read().decode().splitlines())
        got = set(info.get("layers", "").strip().split(","))
        isolation = tuple(x for x in LAYERS if x in got)
        if "refused" in info or (mode == "strict" and "layers" not in info):
            missing = [x for x in LAYERS if x not in isolation]
            raise SandboxUnavailableError(
                f"the python sandbox cannot isolate code on this machine: missing "
                f"{', '.join(missing)} (the namespaces need root or unprivileged user "
                f"namespaces; the filter needs libseccomp; the process limit a writable pids "
                f"cgroup or a user namespace). Set LLAMAWORKS_SANDBOX=weak to run tool code "
                f"anyway with only: {', '.join(isolation) or 'audit hooks and rlimits'}.")
        rc = int(info["status"]) if "status" in info and killed is None else proc.returncode
        stderr = _text(*errs, max_output)
        if killed is None and rc in (-signal.SIGXCPU, -signal.SIGKILL):
            killed = f"CPU time limit exceeded ({cpu_s} s)"
        if killed is None and rc != 0 and any(m in stderr for m in MEMORY_MARKERS):
            killed = f"memory limit exceeded ({mem_mb} MB)"
        return SandboxResult(_text(*outs, max_output), stderr, rc, killed, isolation)
    finally:
        if proc is not None and proc.returncode is None:  # the caller was interrupted
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if cgroup is not None:
            cgroup.close()
        for fd in (info_r, info_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)
