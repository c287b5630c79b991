"""How the C++ kernels get built: with this environment's ninja whatever PATH holds, once per
cache folder, and a hint naming this interpreter's pip when no ninja exists at all."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import llamaworks
from llamaworks.infer import kernels

SRC = Path(llamaworks.__file__).resolve().parents[1]
TIER = "scalar"  # every CPU has it; the build is the same code path for every tier


def _run(code: str, cache: Path, fake_bin: Path) -> subprocess.CompletedProcess[str]:
    """`code` in a fresh interpreter whose PATH lacks the venv's bin folder and starts with a
    folder whose `ninja` always fails (a foreign ninja that must not be used)."""
    venv_bin = str(Path(sys.executable).parent)
    path = [str(fake_bin)] + [p for p in os.environ.get("PATH", "").split(os.pathsep)
                              if p and Path(p).resolve() != Path(venv_bin).resolve()]
    env = {**os.environ, "PATH": os.pathsep.join(path), "LLAMAWORKS_CACHE": str(cache),
           "LLAMAWORKS_ISA": TIER, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    env.pop("LLAMAWORKS_NO_KERNELS", None)
    return subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def fake_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bin")
    (d / "ninja").write_text("#!/bin/sh\necho 'not the ninja to use' >&2\nexit 1\n")
    (d / "ninja").chmod(0o755)
    return d


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory: pytest.TempPathFactory, fake_bin: Path) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    r = _run("from llamaworks.infer import kernels; print(kernels.tier())", cache, fake_bin)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-1] == TIER
    return cache


@pytest.mark.slow
def test_kernels_build_with_the_environments_ninja_not_the_one_on_path(built_cache: Path) -> None:
    libs = list((built_cache / "kernels").glob(f"{TIER}-*/llamaworks_kernels_{TIER}.so"))
    assert len(libs) == 1


@pytest.mark.slow
def test_a_finished_build_loads_in_a_new_process_without_building(built_cache: Path,
                                                                  fake_bin: Path) -> None:
    # cpp_extension.load is what runs ninja (and rebuilds when another ninja wrote the log)
    code = ("import torch.utils.cpp_extension as c; c.load = None\n"
            "from llamaworks.infer import kernels; print(kernels.tier())")
    r = _run(code, built_cache, fake_bin)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-1] == TIER


def test_without_any_ninja_the_hint_names_this_interpreters_pip(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setitem(sys.modules, "ninja", None)  # no ninja package
    monkeypatch.setattr(sys, "executable", str(empty / "python"))  # nor one beside python
    monkeypatch.setenv("PATH", str(empty))  # nor on PATH
    monkeypatch.setenv("LLAMAWORKS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "_state", {})
    with pytest.warns(RuntimeWarning) as got:
        assert kernels.build(TIER) is False
    message = " ".join(str(w.message) for w in got)
    assert f"{empty / 'python'} -m pip install ninja" in message
