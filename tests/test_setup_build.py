"""setup.py's OpenMP probe: a compiler without OpenMP (or DDPM_FAST_NO_OPENMP=1) builds the extension
without -fopenmp and warns, rather than failing the install; one with OpenMP gets -fopenmp.

The full no-OpenMP build (python setup.py build_ext with DDPM_FAST_NO_OPENMP=1, ~25 s of compiling on the
dev VM) is checked by hand, not here: CI must stay fast (see benchmarks/PERF_NOTES.md for that run).
"""
import importlib.util
import shutil
import stat
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_mod():
    # setup.py only calls setup() under __main__, so importing it just defines openmp_flags.
    spec = importlib.util.spec_from_file_location("ddpm_fast_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_compiler(tmp_path, exit_code):
    """An executable standing in for CXX that exits with `exit_code` whatever it is asked."""
    exe = tmp_path / f"cxx{exit_code}"
    exe.write_text(f"#!/bin/sh\nexit {exit_code}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return str(exe)


def test_env_override_builds_without_openmp_and_warns(setup_mod, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DDPM_FAST_NO_OPENMP", "1")
    # Even a compiler that accepts everything: the override skips the probe.
    assert setup_mod.openmp_flags(_fake_compiler(tmp_path, 0)) == []
    err = capsys.readouterr().err
    assert "WARNING" in err and "single-threaded" in err


def test_a_compiler_without_openmp_gives_no_flag_and_a_warning(setup_mod, monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("DDPM_FAST_NO_OPENMP", raising=False)
    assert setup_mod.openmp_flags(_fake_compiler(tmp_path, 1)) == []
    assert "no usable OpenMP" in capsys.readouterr().err
    assert setup_mod.openmp_flags(str(tmp_path / "no-such-compiler")) == []  # OSError: not an exception


def test_a_compiler_with_openmp_gets_the_flag(setup_mod, monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("DDPM_FAST_NO_OPENMP", raising=False)
    assert setup_mod.openmp_flags(_fake_compiler(tmp_path, 0)) == ["-fopenmp"]
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_the_real_probe_compiles_an_openmp_program(setup_mod, monkeypatch):
    # The machine's own compiler (g++ with libgomp here): the probe itself must work, not only its fakes.
    monkeypatch.delenv("DDPM_FAST_NO_OPENMP", raising=False)
    assert setup_mod.openmp_flags("c++") == ["-fopenmp"]
