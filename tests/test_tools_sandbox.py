"""The python sandbox keeps every promise its docstring makes: fresh empty workdir, no writes
outside it, no sockets, no processes, CPU / memory / wall-clock / output limits reported as tool
errors. Each check runs with the kernel namespaces (where the kernel allows them) and with the
audit-hook layer alone."""

from __future__ import annotations

import os
import socket

import pytest

from llamaworks.tools.registry import default_registry
from llamaworks.tools.sandbox import run_python

MODES = [pytest.param(True, id="namespaces"), pytest.param(False, id="hooks-only")]


def test_code_runs_in_a_fresh_empty_workdir_that_is_removed():
    r = run_python("import os\nprint(os.getcwd())\nprint(os.listdir('.'))\n"
                   "open('a.txt', 'w').write('hi')\nprint(open('a.txt').read())")
    assert r.ok, r.stderr
    cwd, listing, content = r.stdout.splitlines()
    assert (listing, content) == ("[]", "hi")
    assert os.path.basename(cwd).startswith("llamaworks-sandbox-")
    assert not os.path.exists(cwd)


def test_final_expression_value_is_printed():
    assert run_python("x = 6\nx * 7").stdout == "42\n"


@pytest.mark.parametrize("namespaces", MODES)
def test_writing_outside_the_workdir_fails(tmp_path, namespaces):
    target = tmp_path / "escape.txt"
    os.chmod(tmp_path, 0o777)
    code = (f"import os\ntry:\n    open({str(target)!r}, 'w').write('x')\n    print('wrote')\n"
            f"except OSError as e:\n    print('refused', e)\n"
            f"try:\n    os.mkdir({str(tmp_path / 'd')!r})\n    print('made dir')\n"
            f"except OSError as e:\n    print('refused', e)")
    r = run_python(code, namespaces=namespaces)
    assert r.stdout.count("refused") == 2, r.stdout + r.stderr
    assert list(tmp_path.iterdir()) == []


def test_kernel_or_hooks_stop_raw_libc_writes_outside(tmp_path):
    """Writes through libc (ctypes, bypassing Python's audit events) are stopped by the kernel's
    read-only mounts when those apply; otherwise ctypes itself is refused."""
    target = str(tmp_path / "escape.txt").encode()
    code = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            f"fd = libc.open({target!r}, os.O_WRONLY | os.O_CREAT, 0o644)\n"
            "print(fd, os.strerror(ctypes.get_errno()))")
    r = run_python(code)
    if "read-only filesystem" in r.isolation:
        assert r.stdout.startswith("-1 Read-only file system"), r.stdout + r.stderr
    else:
        assert "ctypes.dlopen is not allowed" in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("namespaces", MODES)
def test_sockets_fail_even_to_a_listening_local_port(namespaces):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        code = ("import socket\ntry:\n"
                f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                "    s.sendall(b'leak')\n    print('connected')\n"
                "except OSError as e:\n    print('refused', e)")
        r = run_python(code, namespaces=namespaces)
        assert r.stdout.startswith("refused"), r.stdout + r.stderr
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


@pytest.mark.parametrize("namespaces", MODES)
def test_starting_processes_is_refused(namespaces):
    r = run_python("import subprocess\nsubprocess.run(['echo', 'escaped'])",
                   namespaces=namespaces)
    assert not r.ok and "escaped" not in r.stdout
    assert "subprocess.Popen is not allowed" in r.stderr


def test_infinite_loop_is_killed_by_the_cpu_limit():
    r = run_python("while True:\n    pass", cpu_s=1, wall_s=30)
    assert r.killed_reason == "CPU time limit exceeded (1 s)"
    assert r.exit_code < 0


def test_sleeping_code_is_killed_by_the_wall_clock_limit():
    r = run_python("import time\nprint('start', flush=True)\ntime.sleep(60)", wall_s=1)
    assert r.killed_reason == "wall-clock limit exceeded (1 s)"
    assert r.stdout == "start\n"


def test_memory_bomb_is_stopped_by_the_memory_limit():
    r = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))", mem_mb=128,
                   wall_s=30)
    assert r.killed_reason == "memory limit exceeded (128 MB)"
    assert "MemoryError" in r.stderr


def test_huge_output_is_truncated():
    r = run_python("print('x' * 10**7)\nprint('end')", max_output=1000)
    assert r.ok
    assert len(r.stdout) < 1100
    assert "output truncated" in r.stdout and r.stdout.endswith("end\n")


def test_python_tool_reports_limits_and_exceptions_as_error_text():
    reg = default_registry("python")
    assert reg.call("python", {"code": "print(2**10)"}) == "1024"
    bomb = reg.call("python", {"code": "x = bytearray(10**10)"})
    assert "MemoryError" in bomb and bomb.endswith("error: killed: memory limit exceeded "
                                                   "(256 MB)")
    err = reg.call("python", {"code": "1/0"})
    assert "ZeroDivisionError" in err and err.endswith("error: exit code 1")


def test_code_cannot_undo_the_read_only_mounts():
    """With capabilities dropped, even root code cannot remount the filesystem read-write."""
    code = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "print(libc.mount(None, b'/', None, 32 | 4096, None), "
            "os.strerror(ctypes.get_errno()))")
    r = run_python(code)
    if "no capabilities" in r.isolation:
        assert r.stdout == "-1 Operation not permitted\n", r.stdout + r.stderr
    else:
        assert "ctypes.dlopen is not allowed" in r.stderr


@pytest.mark.parametrize("namespaces", MODES)
def test_name_lookups_are_refused(namespaces):
    r = run_python("import socket\nsocket.getaddrinfo('localhost', 80)", namespaces=namespaces)
    assert not r.ok and "socket.getaddrinfo is not allowed" in r.stderr
