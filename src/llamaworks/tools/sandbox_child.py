"""The sandboxed side of `llamaworks.tools.sandbox.run_python`.

Run by path as `python -I -B sandbox_child.py CONFIG_JSON` (isolated mode: neither this folder nor
the user's site is on sys.path) with the code on stdin. Standalone on purpose: it imports nothing
from llamaworks, so the code it runs finds no package state.

With a PID namespace the process tree is
  P0 (the caller's PID namespace: unshares, then only waits)
  -> P1 (PID 1 of the new namespace: mounts, limits, reaps; when it exits the kernel kills every
         process left in the namespace, so nothing outlives the call)
  -> P2 (seccomp filter, audit hooks, then the user's code).
Without namespaces P0 is all three. P0/P1 report on the info pipe, which P2 closes before the
user's code starts: `layers a,b,...`, then `refused` (a required layer is missing, nothing ran) or,
from P1, `status N` (P2's exit code, negative for a signal).
"""

import ctypes
import errno
import json
import os
import platform
import resource
import signal
import sys

CFG = json.loads(sys.argv[1])
WD = CFG["wd"]
INFO = CFG["info_fd"]

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x2000000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_MOVE, MS_REC, MS_PRIVATE, MS_RELATIME = 8192, 16384, 1 << 18, 1 << 21
MNT_DETACH = 2
KEEP_OPTS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
             "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
DEVICES = ("null", "zero", "full", "random", "urandom")  # the whole /dev the code sees
X86_ONLY = ("iopl", "ioperm")  # denied where they exist

libc = ctypes.CDLL(None, use_errno=True)
layers: list[str] = []


def report(line: str) -> None:
    os.write(INFO, (line + "\n").encode())


def mount(src, target, fstype, flags, data=None) -> bool:
    enc = lambda s: s if s is None or isinstance(s, bytes) else os.fsencode(s)
    return libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) == 0


def join_cgroup() -> None:
    """Enter the pids cgroup the caller made (its pids.max is the process limit)."""
    procs = CFG.get("cgroup_procs")
    if procs:
        try:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
            layers.append("process limit")
        except OSError:
            pass


def unshare() -> tuple[bool, bool]:
    """New mount, network, PID, IPC and UTS namespaces; through a user namespace where the caller
    lacks the privilege. Returns (namespaces made, user namespace used)."""
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if libc.unshare(flags) == 0:
        return True, False
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | flags) != 0:
        return False, False
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                       ("gid_map", f"{gid} {gid} 1")):
        try:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        except OSError:
            pass
    return True, True


def mountinfo() -> list[tuple[bytes, str]]:
    with open("/proc/self/mountinfo") as f:
        rows = [line.split() for line in f]
    return [(r[4].encode().decode("unicode_escape").encode("latin-1"), r[5]) for r in rows]


def remount_read_only(skip: bytes) -> bool:
    """Every mount but `skip` read-only and nosuid, and nodev except the few device nodes of the
    fresh /dev; True when all of them took. A mount point under /dev that no longer resolves lies
    beneath the fresh /dev, out of reach."""
    devices = {f"/dev/{name}".encode() for name in DEVICES}
    failed = 0
    for mp, opts in mountinfo():
        if mp == skip:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | (0 if mp in devices else MS_NODEV)
        for opt in opts.split(","):
            flags |= KEEP_OPTS.get(opt, 0)
        if not mount(None, mp, None, flags):
            if ctypes.get_errno() == errno.ENOENT and mp.startswith(b"/dev/"):
                continue
            failed += 1
    return failed == 0


def fresh_dev() -> bool:
    """Replace /dev by a tmpfs holding only null, zero, full, random and urandom (bound from the
    real ones), built in the workdir and moved over /dev; the old /dev is detached where the
    kernel allows (else it lies hidden beneath)."""
    stage = os.path.join(WD, ".dev")
    os.mkdir(stage)
    try:
        if not mount("tmpfs", stage, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=755"):
            return False
        for name in DEVICES:
            open(os.path.join(stage, name), "w").close()
            if not mount(f"/dev/{name}", os.path.join(stage, name), None, MS_BIND):
                return False
        os.symlink("/proc/self/fd", os.path.join(stage, "fd"))
        for i, name in enumerate(("stdin", "stdout", "stderr")):
            os.symlink(f"/proc/self/fd/{i}", os.path.join(stage, name))
        libc.umount2(b"/dev", MNT_DETACH)
        return mount(stage, "/dev", None, MS_MOVE)
    finally:
        libc.umount2(os.fsencode(stage), MNT_DETACH)  # nothing left there once moved
        os.rmdir(stage)


def isolate_filesystem(pid_ns: bool) -> None:
    """Private mounts; the workdir a size-limited tmpfs; everything else read-only; a minimal /dev;
    a /proc that shows only this PID namespace."""
    if not mount(None, "/", None, MS_REC | MS_PRIVATE):
        return
    if mount("tmpfs", WD, "tmpfs", MS_NOSUID | MS_NODEV,
             f"size={CFG['disk_mb']}m,nr_inodes={CFG['disk_inodes']},mode=700"):
        layers.append("disk limit")
    dev = fresh_dev()
    if remount_read_only(skip=WD.encode()) and dev:
        layers.append("read-only filesystem")
    if pid_ns and mount("proc", "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC):
        layers.append("pid namespace")


def drop_capabilities() -> None:
    """Bounding set, then permitted/effective/inheritable; no_new_privs so none comes back."""
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
    nnp = libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    nr = {"x86_64": 126, "aarch64": 91}.get(platform.machine())  # capset
    if nr is not None and nnp and libc.syscall(nr, hdr, data) == 0:
        with open("/proc/self/status") as f:
            caps = [line.split()[1] for line in f if line.startswith(("CapEff", "CapBnd"))]
        if all(int(v, 16) == 0 for v in caps):
            layers.append("no capabilities")


def set_limits(nproc: bool) -> None:
    mb = 1 << 20
    limits = [(resource.RLIMIT_CPU, CFG["cpu_s"], CFG["cpu_s"] + 1),
              (resource.RLIMIT_AS, CFG["mem_mb"] * mb, CFG["mem_mb"] * mb),
              (resource.RLIMIT_FSIZE, CFG["fsize_mb"] * mb, CFG["fsize_mb"] * mb),
              (resource.RLIMIT_NOFILE, 256, 256), (resource.RLIMIT_CORE, 0, 0)]
    if nproc:  # counted per user namespace: only this sandbox's processes and threads
        limits.append((resource.RLIMIT_NPROC, CFG["max_tasks"], CFG["max_tasks"]))
        if "process limit" not in layers:
            layers.append("process limit")
    for res, soft, hard in limits:
        resource.setrlimit(res, (soft, hard))


def seccomp(pid_ns: bool, read_only: bool) -> None:
    """Deny what no tool needs, with EPERM (ENOSYS for clone3, so glibc falls back to clone, whose
    flags the filter can see): starting programs, every socket, tracing or signalling by pidfd,
    mounts and namespaces, io_uring (it would bypass the socket rule), kernel keyrings, BPF,
    modules. Without a PID namespace: signals only to itself; without read-only mounts: no writes
    relative to a directory fd (the audit hook sees only the path)."""
    try:
        import pyseccomp as sc
    except (ImportError, OSError):  # libseccomp missing: the layer is missing
        return
    eperm = sc.ERRNO(errno.EPERM)
    f = sc.SyscallFilter(sc.ALLOW)
    missing: list[str] = []  # rules that should have loaded and did not

    def deny(name, *args, action=eperm):
        if sc.resolve_syscall(sc.Arch.NATIVE, name) < 0:
            if name not in X86_ONLY:  # unknown to this libseccomp: the filter would have a hole
                missing.append(name)
            return
        try:
            f.add_rule(action, name, *args)
        except (OSError, ValueError, RuntimeError):
            missing.append(name)

    for name in ("execve", "execveat", "socket", "ptrace", "process_vm_readv",
                 "process_vm_writev", "pidfd_open", "pidfd_send_signal", "pidfd_getfd", "kcmp",
                 "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "fsopen",
                 "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
                 "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf",
                 "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
                 "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
                 "reboot", "swapon", "swapoff", "acct", "quotactl", "syslog", "open_by_handle_at",
                 "name_to_handle_at", "fanotify_init", "iopl", "ioperm", "vhangup"):
        deny(name)
    deny("clone3", action=sc.ERRNO(errno.ENOSYS))
    for flag in (CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER,
                 CLONE_NEWPID, CLONE_NEWNET):
        deny("clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    deny("ioctl", sc.Arg(1, sc.EQ, 0x5412))  # TIOCSTI: typing into a terminal
    if not pid_ns:
        me = os.getpid()
        for name in ("kill", "tgkill"):
            deny(name, sc.Arg(0, sc.GT, me))  # also every negative (process group) target
            deny(name, sc.Arg(0, sc.LT, me))
        deny("tkill")
    if not read_only:
        # A real directory fd is a non-negative int: bit 31 clear. AT_FDCWD (-100) reaches the
        # filter zero-extended (0xffffff9c) or sign-extended; either way bit 31 is set.
        real_fd = sc.Arg(0, sc.MASKED_EQ, 0x80000000, 0)
        deny("openat2", action=sc.ERRNO(errno.ENOSYS))
        for bit in (os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC, os.O_APPEND):
            deny("openat", real_fd, sc.Arg(2, sc.MASKED_EQ, bit, bit))
        for name, arg in (("mkdirat", 0), ("unlinkat", 0), ("renameat", 0), ("renameat", 2),
                          ("renameat2", 0), ("renameat2", 2), ("linkat", 2), ("symlinkat", 1),
                          ("fchmodat", 0), ("fchownat", 0), ("utimensat", 0), ("mknodat", 0)):
            deny(name, sc.Arg(arg, sc.MASKED_EQ, 0x80000000, 0))
    if missing:  # e.g. a libseccomp too old to know clone3: the filter would have holes
        return
    try:
        f.load()
    except OSError:
        return
    layers.append("seccomp filter")


def reap(child: int) -> None:
    """PID 1's loop: reap everything until the code's process exits, then report its status and
    exit, which makes the kernel kill whatever the code left running."""
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(0)
        if pid == child:
            rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            report(f"status {rc}")
            os._exit(0)


def main() -> None:
    join_cgroup()
    use_ns = CFG["namespaces"]
    root = os.getuid() == 0
    made, user_ns = unshare() if use_ns else (False, False)
    if made:
        layers.append("network namespace")
        pid = os.fork()
        if pid:  # P0: wait for P1 and pass its exit on
            os.close(INFO)
            _, status = os.waitpid(pid, 0)
            os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with P0
        isolate_filesystem(pid_ns=True)
        os.chdir(WD)  # onto the tmpfs mounted over it
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: /proc/1/fd is not reachable from the code
    drop_capabilities()
    set_limits(nproc=made and user_ns and not root)
    pid_ns = "pid namespace" in layers
    child = os.fork() if pid_ns else 0
    if child:  # P1
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.close(0)
        reap(child)
    seccomp(pid_ns, read_only="read-only filesystem" in layers)
    report("layers " + ",".join(layers))
    missing = [x for x in CFG["required"] if x not in layers]
    if missing:
        report("refused")
        os._exit(0)
    os.close(INFO)
    run_code(strict=not {"network namespace", "read-only filesystem", "no capabilities",
                         "pid namespace", "seccomp filter"} <= set(layers))


def run_code(strict: bool) -> None:
    """Audit hooks (a second layer over the kernel's), then the code from stdin; the value of a
    final expression is printed."""
    import ast

    wd = os.path.realpath(WD)
    realpath, fsdecode = os.path.realpath, os.fsdecode
    write = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    blocked = {"socket.__new__", "socket.connect", "socket.bind", "socket.sendto",
               "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
               "socket.getnameinfo", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
               "os.fork", "os.forkpty", "subprocess.Popen", "pty.spawn", "os.chroot", "os.kill",
               "os.killpg"}
    if strict:  # without every kernel layer, ctypes would bypass the hooks
        blocked |= {"ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function"}
    paths = {"os.remove": (0,), "os.rename": (0, 1), "os.mkdir": (0,), "os.rmdir": (0,),
             "os.symlink": (1,), "os.link": (1,), "os.chmod": (0,), "os.chown": (0,),
             "os.truncate": (0,), "os.utime": (0,), "os.mkfifo": (0,), "os.mknod": (0,),
             "os.setxattr": (0,), "os.removexattr": (0,), "shutil.rmtree": (0,),
             "shutil.copyfile": (1,), "shutil.move": (0, 1)}

    def inside(p) -> bool:
        if isinstance(p, int):
            return True
        p = realpath(fsdecode(p))
        return p == wd or p.startswith(wd + os.sep)

    def hook(event, args):
        if event == "open":
            if args[2] & write and not inside(args[0]):
                raise PermissionError(f"sandbox: writing outside the working directory is not "
                                      f"allowed: {args[0]!r}")
        elif event in blocked:
            raise PermissionError(f"sandbox: {event} is not allowed")
        elif event in paths:
            for i in paths[event]:
                if i < len(args) and not inside(args[i]):
                    raise PermissionError(f"sandbox: changing paths outside the working "
                                          f"directory is not allowed: {args[i]!r}")

    code = sys.stdin.read()
    sys.stdin.close()
    globals().pop("libc", None)
    sys.addaudithook(hook)
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


if __name__ == "__main__":
    main()
