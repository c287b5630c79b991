"""Run untrusted Python in a separate, limited process: `run_python(code, ...)`.

What is guaranteed (enforced by the kernel, on every Linux):
- A separate process (`python -I -B`: isolated mode, no user site, no PYTHON* variables, no
  bytecode writes) in its own session, with a scrubbed environment (PATH, HOME/TMPDIR = workdir,
  LANG) and a fresh, empty temporary working directory that is deleted afterwards.
- Resource limits (setrlimit): CPU time (RLIMIT_CPU, then SIGXCPU/SIGKILL), address space
  (RLIMIT_AS: allocations beyond it fail with MemoryError), largest file written (RLIMIT_FSIZE),
  open files (RLIMIT_NOFILE), no core dumps. A wall-clock limit kills the whole process group.
- Output capture capped at `max_output` bytes per stream (the rest is read and dropped), so a
  flood of output costs the caller no memory.

Kernel isolation, applied when the kernel allows it (as root, or with unprivileged user
namespaces), reported in `SandboxResult.isolation`:
- "network namespace": the code runs in a fresh network namespace with no interfaces up (not even
  loopback), so no socket can reach anything, on this host or elsewhere.
- "read-only filesystem": in a private mount namespace every mount is remounted read-only except
  the working directory, so nothing outside it can be created, changed or deleted.
- "no capabilities": every capability is dropped (bounding, permitted, effective, inheritable
  sets) with no_new_privs set, so the code cannot remount, re-enter the host's namespaces or
  regain privileges through setuid programs, even when the caller runs as root.

Always, inside the child, PEP 578 audit hooks refuse: socket creation/connection and name
lookups (DNS), starting processes (fork, exec, spawn, subprocess, os.system), and opening files
for writing / creating, renaming or deleting paths outside the working directory. When any of the
three kernel layers is missing, ctypes is refused too (it would bypass the hooks); with all three
it is allowed, so numpy and friends import. Audit hooks are a best-effort layer, not a security
boundary (CPython documents that determined code can evade them): where the namespaces are
unavailable they are the only network and filesystem protection.

Not provided at all: a limit on threads (and on processes beyond the audit hook; RLIMIT_NPROC is
per-user and ignored for root), hiding files outside the workdir from reading (the code can read
what the calling user can read), and protection against kernel exploits.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import IO

# Stage 1 (may use ctypes): namespaces and rlimits, then exec a fresh interpreter for stage 2 so
# no ctypes handle survives into the user's process image.
_STAGE1 = r'''
import ctypes, os, resource, sys
wd, use_ns, cpu_s, mem_mb, fsize_mb, info_fd = sys.argv[1], sys.argv[2] == "1", \
    int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
stage2 = sys.argv[7]
isolation = []
if use_ns:
    libc = ctypes.CDLL(None, use_errno=True)
    NEWNS, NEWNET, NEWUSER = 0x00020000, 0x40000000, 0x10000000
    ok = libc.unshare(NEWNS | NEWNET) == 0
    if not ok:
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(NEWUSER | NEWNS | NEWNET) == 0:
            ok = True
            try:
                for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                                   ("gid_map", f"{gid} {gid} 1")):
                    with open(f"/proc/self/{name}", "w") as f:
                        f.write(text)
            except OSError:
                pass
    if ok:
        isolation.append("network namespace")
        MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
        MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
        MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
        opt_flags = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
                     "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME,
                     "relatime": MS_RELATIME}
        if (libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0
                and libc.mount(wd.encode(), wd.encode(), None, MS_BIND, None) == 0):
            failed = 0
            with open("/proc/self/mountinfo") as f:
                rows = [line.split() for line in f]
            for row in rows:
                mp = row[4].encode().decode("unicode_escape").encode("latin-1")
                if mp == wd.encode():
                    continue
                flags = MS_REMOUNT | MS_BIND | MS_RDONLY
                for opt in row[5].split(","):
                    flags |= opt_flags.get(opt, 0)
                if libc.mount(None, mp, None, flags, None) != 0:
                    failed += 1
            if not failed:
                isolation.append("read-only filesystem")
        os.chdir(wd)  # onto the writable bind mount (the old cwd is the read-only one below)
    # Drop every capability (bounding set, then permitted/effective/inheritable) and forbid
    # regaining any, so the code cannot undo the namespaces (remount, setns, ...).
    import platform
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
    nnp = libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    nr = {"x86_64": 126, "aarch64": 91}.get(platform.machine())
    if nr is not None and nnp and libc.syscall(nr, hdr, data) == 0:
        with open("/proc/self/status") as f:
            eff = [line.split()[1] for line in f if line.startswith(("CapEff", "CapBnd"))]
        if all(int(v, 16) == 0 for v in eff):
            isolation.append("no capabilities")
for res, soft, hard in ((resource.RLIMIT_CPU, cpu_s, cpu_s + 1),
                        (resource.RLIMIT_AS, mem_mb << 20, mem_mb << 20),
                        (resource.RLIMIT_FSIZE, fsize_mb << 20, fsize_mb << 20),
                        (resource.RLIMIT_NOFILE, 256, 256), (resource.RLIMIT_CORE, 0, 0)):
    resource.setrlimit(res, (soft, hard))
os.write(info_fd, (",".join(isolation) + "\n").encode())
os.close(info_fd)
full = {"network namespace", "read-only filesystem", "no capabilities"} <= set(isolation)
os.execv(sys.executable, [sys.executable, "-I", "-B", "-c", stage2, wd, "0" if full else "1"])
'''

# Stage 2: audit hooks, then run the code from stdin; a final expression's value is printed.
_STAGE2 = r'''
import ast, os, sys
WD = os.path.realpath(sys.argv[1])
STRICT = sys.argv[2] == "1"  # no kernel isolation: ctypes would bypass every hook
_realpath, _fsdecode = os.path.realpath, os.fsdecode
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
BLOCKED = {"socket.__new__", "socket.connect", "socket.bind", "socket.sendto",
           "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
           "socket.getnameinfo",
           "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
           "subprocess.Popen", "pty.spawn", "os.chroot", "os.kill", "os.killpg"}
if STRICT:
    BLOCKED |= {"ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function"}
PATHS = {"os.remove": (0,), "os.rename": (0, 1), "os.mkdir": (0,), "os.rmdir": (0,),
         "os.symlink": (1,), "os.link": (1,), "os.chmod": (0,), "os.chown": (0,),
         "os.truncate": (0,), "os.utime": (0,), "os.mkfifo": (0,), "os.mknod": (0,),
         "os.setxattr": (0,), "os.removexattr": (0,), "shutil.rmtree": (0,),
         "shutil.copyfile": (1,), "shutil.move": (0, 1)}

def _inside(p):
    if isinstance(p, int):
        return True
    p = _realpath(_fsdecode(p))
    return p == WD or p.startswith(WD + os.sep)

def _hook(event, args):
    if event == "open":
        if args[2] & WRITE and not _inside(args[0]):
            raise PermissionError(f"sandbox: writing outside the working directory is not "
                                  f"allowed: {args[0]!r}")
    elif event in BLOCKED:
        raise PermissionError(f"sandbox: {event} is not allowed")
    elif event in PATHS:
        for i in PATHS[event]:
            if i < len(args) and not _inside(args[i]):
                raise PermissionError(f"sandbox: changing paths outside the working directory "
                                      f"is not allowed: {args[i]!r}")

code = sys.stdin.read()
sys.stdin.close()
sys.addaudithook(_hook)
tree = compile(code, "<tool>", "exec", ast.PyCF_ONLY_AST)
last = None
if tree.body and isinstance(tree.body[-1], ast.Expr):
    last = ast.Expression(tree.body.pop().value)
g = {"__name__": "__main__", "__builtins__": __builtins__}
del sys.argv[1:]
try:
    exec(compile(tree, "<tool>", "exec"), g)
    if last is not None:
        value = eval(compile(last, "<tool>", "eval"), g)
        if value is not None:
            print(repr(value))
except SystemExit:
    raise
except BaseException:
    import traceback
    etype, e, tb = sys.exc_info()
    traceback.print_exception(etype, e, tb.tb_next)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
'''

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


def run_python(code: str, *, cpu_s: int = 5, mem_mb: int = 256, wall_s: float = 10.0,
               max_output: int = 10_000, fsize_mb: int = 16,
               namespaces: bool = True) -> SandboxResult:
    """Run `code` in a sandboxed Python process (see the module docstring for exactly what is and
    is not guaranteed). `namespaces=False` skips the kernel namespaces (audit hooks only)."""
    if cpu_s < 1 or mem_mb < 32 or wall_s <= 0 or max_output < 0:
        raise ValueError("sandbox limits: cpu_s >= 1, mem_mb >= 32, wall_s > 0, "
                         "max_output >= 0")
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="llamaworks-sandbox-"))
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
           "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    info_r, info_w = os.pipe()
    try:
        argv = [sys.executable, "-I", "-B", "-c", _STAGE1, workdir, "1" if namespaces else "0",
                str(int(cpu_s)), str(int(mem_mb)), str(int(fsize_mb)), str(info_w), _STAGE2]
        proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, pass_fds=(info_w,))
        os.close(info_w)
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
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        else:
            try:  # stray children (if any escaped the hooks) die with the group
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for t in readers:
            t.join(timeout=5)
        with os.fdopen(info_r, "rb") as f:
            info_r = -1
            isolation = tuple(s for s in f.read().decode().strip().split(",") if s)
        rc = proc.returncode
        stderr = _text(*errs, max_output)
        if killed is None and rc in (-signal.SIGXCPU, -signal.SIGKILL):
            killed = f"CPU time limit exceeded ({cpu_s} s)"
        if killed is None and rc != 0 and any(m in stderr for m in MEMORY_MARKERS):
            killed = f"memory limit exceeded ({mem_mb} MB)"
        return SandboxResult(_text(*outs, max_output), stderr, rc, killed, isolation)
    finally:
        if info_r >= 0:
            os.close(info_r)
        shutil.rmtree(workdir, ignore_errors=True)
