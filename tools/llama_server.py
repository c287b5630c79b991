"""Build (once) llama.cpp's own `llama-server`, the reference for serving throughput.

Issue "one inference engine": our server's throughput is measured against llama.cpp's server on
the same GGUF model and workload (`bench/serve.py --vs-llama-server BIN`). llama-cpp-python's
wheel ships only the libraries, not the server, so this extracts `vendor/llama.cpp` from the same
llama-cpp-python source distribution the tests use (found, or downloaded, as
tools/llama_cpp_wheel.py does), configures it with cmake (Release, GGML_NATIVE, static libraries,
no web UI: the build has no internet) and builds only the `llama-server` target (tools/server;
about 10-20 minutes on two cores). The binary lands in `<out>/bin/llama-server` (default
`.cache/llama-server`, git-ignored); the build runs in a temporary folder next to it that is
renamed into place, so an interrupted build leaves nothing half-made. An existing binary is
reused. Prints the binary's path.

    .venv/bin/python tools/llama_server.py [--out .cache/llama-server] [--version 0.3.36]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_cpp_wheel import find_sdist  # noqa: E402

VERSION = "0.3.36"  # the Makefile's LLAMA_CPP_VERSION

# LLAMA_CURL is deprecated in this llama.cpp (downloads go through cpp-httplib), so it is not
# passed. The server lives under tools/server, added only with LLAMA_BUILD_TOOLS (and COMMON).
CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary: it survives the move out of the build
    "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",  # no npm build of the web UI ...
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # ... and no download of it: the server runs without one
    "-DLLAMA_OPENSSL=OFF",  # plain HTTP on 127.0.0.1 is all the benchmark needs
)
PREFIX = "/vendor/llama.cpp/"


def extract_llama_cpp(sdist: Path, dest: Path) -> Path:
    """vendor/llama.cpp of the sdist into dest (a fresh folder); returns its source root."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if PREFIX in m.name + "/"]
        if not members:
            sys.exit(f"error: {sdist} has no vendor/llama.cpp")
        tar.extractall(dest, members=members, filter="data")
    roots = sorted(dest.glob("*/vendor/llama.cpp"))
    if not roots or not (roots[0] / "CMakeLists.txt").exists():
        sys.exit(f"error: {sdist} lacks vendor/llama.cpp/CMakeLists.txt")
    return roots[0]


def build(sdist: Path, out: Path, jobs: int) -> Path:
    """Build llama-server from the sdist into out/bin/llama-server (via a temporary folder)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
    try:
        src = extract_llama_cpp(sdist, tmp / "src")
        bdir = tmp / "build"
        print(f"building llama-server from {sdist.name} (10-20 minutes on 2 cores) ...",
              flush=True)
        subprocess.check_call(["cmake", "-S", str(src), "-B", str(bdir), *CMAKE_ARGS])
        subprocess.check_call(["cmake", "--build", str(bdir), "--config", "Release",
                               "--target", "llama-server", "-j", str(jobs)])
        built = bdir / "bin" / "llama-server"
        if not built.exists():
            sys.exit(f"error: the build produced no {built}")
        staged = tmp / "out"
        (staged / "bin").mkdir(parents=True)
        shutil.copy2(built, staged / "bin" / "llama-server")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(staged, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "bin" / "llama-server"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(".cache") / "llama-server",
                    help="install folder; the binary is OUT/bin/llama-server")
    ap.add_argument("--version", default=VERSION, help="llama-cpp-python sdist version")
    ap.add_argument("--cache", type=Path, default=Path(".cache"))
    ap.add_argument("--user-cache", type=Path, default=Path.home() / ".cache" / "llamaworks")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    a = ap.parse_args()
    binary = a.out / "bin" / "llama-server"
    if not binary.exists():
        binary = build(find_sdist(a.version, [a.cache, a.user_cache]), a.out, a.jobs)
    print(binary)


if __name__ == "__main__":
    main()
