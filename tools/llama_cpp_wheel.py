"""Build (once) and install llama-cpp-python, the test reference for tokenization and speed.

llama-cpp-python has no CPU wheel on PyPI, so it is built from its source distribution (about six
minutes on two cores). The wheel is cached in `.cache/wheels-native` (git-ignored) and in a per-user
cache, so later runs and fresh clones on the same machine install it in seconds. The same source
distribution also ships llama.cpp's vocabulary-only GGUFs (`models/ggml-vocab-*.gguf`), which the
tokenizer tests use as real Llama-1/2 (SentencePiece), Llama-3, GPT-2 and Qwen2 vocabularies, and
llama.cpp's own HF -> GGUF converter (`convert_hf_to_gguf.py` with its `conversion/` and `gguf-py/`
packages), which the family tests use to make GGUF files we did not write, and the models' own
chat templates (`models/templates/*.jinja`, those in TEMPLATES), which the chat-format tests render.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VOCABS = ("llama-spm", "llama-bpe", "gpt-2", "qwen2")


def _pip(*args: str) -> None:
    subprocess.check_call([sys.executable, "-m", "pip", "--disable-pip-version-check", *args])


def find_sdist(version: str, dirs: list[Path]) -> Path:
    name = f"llama_cpp_python-{version}.tar.gz"
    for d in dirs:
        if (d / "sdist" / name).exists():
            return d / "sdist" / name
    dest = dirs[-1] / "sdist"  # the per-user cache, so fresh clones reuse the download
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError:
        dest = dirs[0] / "sdist"
        dest.mkdir(parents=True, exist_ok=True)
    print(f"downloading the llama-cpp-python {version} source distribution ...", flush=True)
    _pip("download", "-q", "--no-deps", "--no-binary", ":all:",
         f"llama-cpp-python=={version}", "-d", str(dest))
    found = sorted(dest.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        sys.exit(f"error: pip did not produce {name} in {dest}")
    return found[0]


def extract_vocab(sdist: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    wanted = {f"ggml-vocab-{v}.gguf{ext}" for v in VOCABS for ext in ("", ".inp", ".out")}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            base = os.path.basename(member.name)
            if base in wanted and "/vendor/llama.cpp/models/" in member.name:
                src = tar.extractfile(member)
                assert src is not None
                tmp = out / (base + ".tmp")
                with open(tmp, "wb") as f:
                    shutil.copyfileobj(src, f)
                os.replace(tmp, out / base)
                wanted.discard(base)
    if any(w.endswith(".gguf") for w in wanted):
        sys.exit(f"error: {sdist} lacks vocab files: {sorted(wanted)}")


CONVERTER = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def extract_converter(sdist: Path, out: Path) -> None:
    """llama.cpp's convert_hf_to_gguf.py and the packages it imports, into `out` (atomically: a
    temporary folder renamed into place)."""
    prefix = "/vendor/llama.cpp/"
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            at = member.name.find(prefix)
            rel = member.name[at + len(prefix):] if at >= 0 else ""
            if member.isfile() and rel.startswith(CONVERTER) and ".." not in rel:
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None
                with open(dest, "wb") as f:
                    shutil.copyfileobj(src, f)
    if not (tmp / CONVERTER[0]).exists():
        shutil.rmtree(tmp)
        sys.exit(f"error: {sdist} lacks vendor/llama.cpp/{CONVERTER[0]}")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


# The models' own chat templates (as published with their tokenizers) that the chat tests use.
TEMPLATES = ("Qwen-Qwen2.5-7B-Instruct", "Qwen-Qwen3-0.6B", "mistralai-Mistral-Nemo-Instruct-2407",
             "Mistral-Small-3.2-24B-Instruct-2506", "meta-llama-Llama-3.1-8B-Instruct",
             "meta-llama-Llama-3.2-3B-Instruct", "google-gemma-2-2b-it",
             "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B")


def extract_templates(sdist: Path, out: Path) -> None:
    """The TEMPLATES' `.jinja` files from vendor/llama.cpp/models/templates/ into `out` (each
    written atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    wanted = {t + ".jinja" for t in TEMPLATES}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            base = os.path.basename(member.name)
            if member.isfile() and base in wanted and \
                    "/vendor/llama.cpp/models/templates/" in member.name:
                src = tar.extractfile(member)
                assert src is not None
                with open(out / (base + ".tmp"), "wb") as f:
                    shutil.copyfileobj(src, f)
                os.replace(out / (base + ".tmp"), out / base)
                wanted.discard(base)
    if wanted:
        sys.exit(f"error: {sdist} lacks chat templates: {sorted(wanted)}")


# The reference build: native (every instruction set of this CPU) but without AMX. llama.cpp's AMX
# matmuls segfault on the first decode on some AMX machines (llama.cpp#20824; seen here on a
# virtualized Xeon with AMX, which crashed every test that runs llama.cpp), so its AMX code is
# left out by the compiler. It keeps the AVX-512 / AVX-VNNI kernels and the CPU_REPACK buffers;
# the wheels live in their own folder, so a build with AMX cached by an earlier version of this
# script is never reused. (The flags go through CFLAGS / CXXFLAGS, CMake's initial flags;
# -march=native after them does not turn back on what they turn off.)
NATIVE_CMAKE_ARGS = "-DGGML_NATIVE=ON"
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
NATIVE_FOLDER = "wheels-native"


def find_wheel(version: str, dirs: list[Path], folder: str = NATIVE_FOLDER) -> Path | None:
    for d in dirs:
        hits = sorted(glob.glob(str(d / folder / f"llama_cpp_python-{version}-*.whl")))
        if hits:
            return Path(hits[-1])
    return None


# A llama.cpp that uses no AVX-512 even on an AVX-512 host: what an AVX2-only CPU runs, for the
# benchmarks of our AVX2 tier (bench/decode.py with LLAMA_CPP_LIB_PATH).
AVX2_CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
                   "-DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF "
                   "-DGGML_AVX_VNNI=OFF")


def build_wheel(sdist: Path, version: str, dirs: list[Path], folder: str = NATIVE_FOLDER,
                cmake_args: str = NATIVE_CMAKE_ARGS) -> Path:
    out = dirs[0] / folder
    out.mkdir(parents=True, exist_ok=True)
    print(f"building llama-cpp-python {version} from source (about 6 minutes on 2 cores) ...",
          flush=True)
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    env["CMAKE_ARGS"] = cmake_args
    for var in ("CFLAGS", "CXXFLAGS"):
        env[var] = f"{env.get(var, '')} {NO_AMX_FLAGS}".strip()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.check_call([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                               "-w", tmp, str(sdist)], env=env)
        built = next(Path(tmp).glob("*.whl"))
        target = out / built.name
        shutil.copy(built, str(target) + ".tmp")
        os.replace(str(target) + ".tmp", target)
    for d in dirs[1:]:
        try:
            (d / folder).mkdir(parents=True, exist_ok=True)
            shutil.copy(target, d / folder / target.name)
        except OSError as e:  # the per-user cache is an optimisation only
            print(f"note: could not copy the wheel to {d}: {e}")
    return target


def installed_version() -> str | None:
    """The installed llama-cpp-python's version, or None when absent or when it is a build with
    AMX (an earlier build of this script's, to be replaced: see NATIVE_CMAKE_ARGS)."""
    try:
        version = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None
    probe = subprocess.run([sys.executable, "-c", "import llama_cpp; "
                            "print(llama_cpp.llama_print_system_info().decode())"],
                           capture_output=True, text=True)
    return None if probe.returncode or "AMX_INT8 = 1" in probe.stdout else version


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", required=True)
    ap.add_argument("--cache", type=Path, default=Path(".cache"))
    ap.add_argument("--user-cache", type=Path, default=Path.home() / ".cache" / "llamaworks")
    ap.add_argument("--vocab-only", action="store_true", help="only extract the vocab GGUFs")
    ap.add_argument("--converter", type=Path, default=None, metavar="DIR",
                    help="only extract llama.cpp's convert_hf_to_gguf.py (and its packages) to DIR")
    ap.add_argument("--templates", type=Path, default=None, metavar="DIR",
                    help="only extract the chat templates in TEMPLATES (models/templates/) to DIR")
    ap.add_argument("--install", action="store_true", help="build if needed, then install")
    ap.add_argument("--avx2-lib", type=Path, default=None, metavar="DIR",
                    help="build (if needed) a llama.cpp without AVX-512 and put its shared "
                    "libraries in DIR, for LLAMA_CPP_LIB_PATH=DIR (benchmarks of the AVX2 tier)")
    a = ap.parse_args()
    dirs = [a.cache, a.user_cache]
    if a.avx2_lib:
        import zipfile

        wheel = find_wheel(a.version, dirs, "wheels-avx2") or build_wheel(
            find_sdist(a.version, dirs), a.version, dirs, "wheels-avx2", AVX2_CMAKE_ARGS)
        a.avx2_lib.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.startswith("llama_cpp/lib/") and not name.endswith("/"):
                    (a.avx2_lib / Path(name).name).write_bytes(z.read(name))
        print(a.avx2_lib)
        return
    if a.converter:
        a.converter.parent.mkdir(parents=True, exist_ok=True)
        extract_converter(find_sdist(a.version, dirs), a.converter)
        return
    if a.templates:
        extract_templates(find_sdist(a.version, dirs), a.templates)
        return
    if a.vocab_only:
        if not all((a.cache / "vocab" / f"ggml-vocab-{v}.gguf").exists() for v in VOCABS):
            extract_vocab(find_sdist(a.version, dirs), a.cache / "vocab")
        return
    if a.install:
        if installed_version() == a.version:
            return
        wheel = find_wheel(a.version, dirs) or build_wheel(find_sdist(a.version, dirs), a.version,
                                                           dirs)
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):  # another build
            importlib.metadata.version("llama_cpp_python")
            _pip("uninstall", "-y", "-q", "llama_cpp_python")
        _pip("install", "-q", str(wheel))  # with its dependencies (diskcache, ...)


if __name__ == "__main__":
    main()
