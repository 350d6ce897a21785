"""What the build compiles (CMakeLists.txt, configured only): with the default
PYREG_CUDA=AUTO, the CUDA kernels only when nvcc is found and a GPU is
visible, and then for that GPU's architecture only; PYREG_CUDA=ON, for every
listed architecture; a bad value, an error. The visible GPU is a stand-in
``nvidia-smi`` that reports a compute capability."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or not (ROOT / "CMakeLists.txt").exists(),
                                reason="needs cmake and the source tree")


def _pybind11_dir() -> str:
    try:
        return subprocess.run([sys.executable, "-m", "pybind11", "--cmakedir"], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("pybind11 is not installed")


def _configure(tmp_path, *defs, gpu=None):
    path = os.environ.get("PATH", "")
    if gpu is not None:
        fake = tmp_path / "bin"
        fake.mkdir()
        smi = fake / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\necho {gpu}\n")
        smi.chmod(0o755)
        path = f"{fake}{os.pathsep}{path}"
    else:  # no nvidia-smi at all: leave out every folder that has one
        path = os.pathsep.join(p for p in path.split(os.pathsep) if not (Path(p) / "nvidia-smi").exists())
    r = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build"), f"-Dpybind11_DIR={_pybind11_dir()}",
                        *defs], capture_output=True, text=True, env=dict(os.environ, PATH=path))
    return r.returncode, r.stdout + r.stderr


needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")


def test_auto_without_a_gpu_builds_cpu_kernels_only(tmp_path):
    rc, out = _configure(tmp_path)
    assert rc == 0, out
    assert "CUDA kernels OFF" in out and "no GPU visible" in out


@needs_nvcc
def test_auto_with_a_gpu_builds_its_architecture_only(tmp_path):
    rc, out = _configure(tmp_path, gpu="9.0")
    assert rc == 0, out
    assert "CUDA kernels ON (90-real)" in out


@needs_nvcc
def test_auto_with_given_architectures_builds_those(tmp_path):
    rc, out = _configure(tmp_path, "-DPYREG_CUDA_ARCHS=80-real", gpu="9.0")
    assert rc == 0, out
    assert "CUDA kernels ON (80-real)" in out


@needs_nvcc
def test_on_builds_every_listed_architecture_without_a_gpu(tmp_path):
    rc, out = _configure(tmp_path, "-DPYREG_CUDA=ON")
    assert rc == 0, out
    assert "CUDA kernels ON (80-real;90-real;90-virtual)" in out


def test_a_bad_setting_is_an_error(tmp_path):
    rc, out = _configure(tmp_path, "-DPYREG_CUDA=maybe")
    assert rc != 0 and "PYREG_CUDA must be AUTO, ON or OFF" in out
