"""The CUDA emulator itself (csrc/cuda/emu): CUDA semantics of shuffles,
barriers and atomics, and the limits a GPU enforces. Needs a build with
PYREG_CUDA_EMU=ON (CI makes one); the kernels' own tests on the emulator are
in test_cuda.py and test_ops.py (backend "cuda-emu")."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_emu

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def test_emulator_is_built_where_required():
    # CI builds with PYREG_CUDA_EMU=ON and says so: there, a build without the
    # emulator is a failure, not a reason to skip its tests.
    if os.environ.get("PYREG_REQUIRE_CUDA_EMU") != "1":
        pytest.skip("PYREG_REQUIRE_CUDA_EMU is not set")
    from pyreg import backends

    assert backends.cuda_emu.compiled(), backends.cuda_emu.unavailable_reason()
    assert backends.cuda_emu.available(), backends.cuda_emu.unavailable_reason()


def _selftest(name: str) -> str:
    from pyreg import _C

    return _C.cuda_emu_selftest(name)


@needs_emu
@pytest.mark.parametrize("name", ["shuffles", "barriers"])
def test_cuda_semantics(name):
    assert _selftest(name) == "ok"


@needs_emu
@pytest.mark.parametrize("name, error", [
    ("launch_max_grid_y", "cudaSuccess"),  # the largest grid.y runs
    ("launch_max_block", "cudaSuccess"),  # 1024 threads per block run
    ("launch_grid_x", "cudaErrorInvalidConfiguration"),
    ("launch_grid_y", "cudaErrorInvalidConfiguration"),
    ("launch_grid_z", "cudaErrorInvalidConfiguration"),
    ("launch_empty_grid", "cudaErrorInvalidConfiguration"),
    ("launch_block_1025", "cudaErrorInvalidConfiguration"),
    ("launch_block_z_65", "cudaErrorInvalidConfiguration"),
    ("launch_block_2048_as_2d", "cudaErrorInvalidConfiguration"),
    ("launch_dynamic_shared", "cudaErrorInvalidConfiguration"),
])
def test_launch_limits(name, error):
    assert _selftest(name) == error


@needs_emu
@pytest.mark.parametrize("name, message", [
    ("shared_too_big", "static shared memory of the block is 49168 bytes with 'big' (limit 49152)"),
    ("mask_inactive_lane", "__shfl_down_sync with mask 0xffffffff names inactive lanes 0xffff0000"),
    ("mask_excludes_caller", "__shfl_xor_sync with mask 0x0000ffff, which leaves out the calling lane"),
    ("mask_diverged", "diverged shuffle"),
    ("barrier_diverged", "thread returns while 32 threads of the block wait at __syncthreads"),
    ("barrier_vs_shuffle", "__syncthreads while lanes 0x00000001 of this warp wait in a shuffle"),
])
def test_undefined_behaviour_aborts_with_a_message(name, message, tmp_path):
    # On a GPU these hang or give undefined values; the emulator stops the
    # process and says where.
    p = _selftest_in_subprocess(name, tmp_path)
    assert p.returncode != 0
    assert "pyreg CUDA emulator: " + message in p.stderr, p.stderr
    assert "[kernel " in p.stderr  # names the kernel, block and thread


def _selftest_in_subprocess(name: str, cwd: Path, order: str | None = None):
    # A subprocess, run away from the source tree, that loads the compiled
    # module alone (no torch: quick).
    code = ("import glob, importlib.util as u, os; "
            "d = u.find_spec('pyreg').submodule_search_locations[0]; "
            "f = glob.glob(os.path.join(d, '_C*'))[0]; "
            "s = u.spec_from_file_location('pyreg._C', f); m = u.module_from_spec(s); "
            "s.loader.exec_module(m); "
            f"print(m.cuda_emu_selftest({name!r}))")
    env = dict(os.environ)
    env.pop("PYREG_EMU_ORDER", None)
    if order is not None:
        env["PYREG_EMU_ORDER"] = order
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                          timeout=120, env=env)


ORDERS = ["forward", "reverse", "random", "random:1", "random:12345"]


@needs_emu
@pytest.mark.parametrize("order", ORDERS)
def test_correct_kernels_pass_in_every_order(order, monkeypatch):
    # PYREG_EMU_ORDER is read at each launch: the CUDA semantics hold whatever
    # order the threads and blocks run in.
    monkeypatch.setenv("PYREG_EMU_ORDER", order)
    for name in ["neighbour_synced", "shuffles", "barriers", "vector_aligned"]:
        assert _selftest(name) == "ok", (name, order)


@needs_emu
def test_an_order_other_than_forward_finds_a_missing_barrier(monkeypatch):
    # Thread t reads shared memory that thread t-1 writes, with no barrier
    # between: forward order runs t-1 first and hides the race; a GPU does not
    # promise that order, and reverse and random orders show it.
    monkeypatch.setenv("PYREG_EMU_ORDER", "forward")
    assert _selftest("neighbour_racy") == "ok"
    monkeypatch.delenv("PYREG_EMU_ORDER")  # the default is forward
    assert _selftest("neighbour_racy") == "ok"
    for order in ["reverse", "random", "random:1", "random:12345"]:
        monkeypatch.setenv("PYREG_EMU_ORDER", order)
        got = _selftest("neighbour_racy")
        assert got != "ok" and "read" in got, (order, got)


@needs_emu
def test_random_order_is_reproducible_for_a_seed(tmp_path):
    first = _selftest_in_subprocess("neighbour_racy", tmp_path, "random:7")
    again = _selftest_in_subprocess("neighbour_racy", tmp_path, "random:7")
    assert first.returncode == 0 and first.stdout == again.stdout, (first.stdout, again.stdout)


@needs_emu
@pytest.mark.parametrize("order", ["sideways", "random:x", "random:"])
def test_an_unknown_order_stops_with_a_message(order, tmp_path):
    p = _selftest_in_subprocess("barriers", tmp_path, order)
    assert p.returncode != 0
    assert f"pyreg CUDA emulator: PYREG_EMU_ORDER={order}" in p.stderr, p.stderr


@needs_emu
@pytest.mark.parametrize("name, message", [
    ("misaligned_float4_load", "misaligned 16-byte float4 load at address 0x"),
    ("misaligned_uint4_store", "misaligned 16-byte uint4 store at address 0x"),
    ("misaligned_ldg_double2", "misaligned 16-byte double2 load at address 0x"),
    ("misaligned_float2_load", "misaligned 8-byte float2 load at address 0x"),
])
def test_misaligned_vector_access_aborts_with_a_message(name, message, tmp_path):
    # A GPU faults on a vector load or store at an address that is not a
    # multiple of its size ("misaligned address"); the emulator stops there.
    p = _selftest_in_subprocess(name, tmp_path)
    assert p.returncode != 0, p.stdout
    assert "pyreg CUDA emulator: " + message in p.stderr, p.stderr
    assert "[kernel vector_kernel, block (0,0,0), thread (0,0,0)" in p.stderr, p.stderr


def _compile(source: str, tmp_path: Path, *flags: str):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    f = tmp_path / "k.cpp"
    f.write_text(source)
    return subprocess.run([cxx, "-std=c++17", "-fsyntax-only", f"-I{CSRC}", *flags, str(f)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("small, nbytes, ok", [(False, 32700, True), (False, 32800, False),
                                             (True, 4000, True), (True, 4100, False)])
def test_kernel_arguments_over_the_parameter_space_do_not_compile(small, nbytes, ok, tmp_path):
    # As with nvcc: arguments beyond the parameter space are a compile error:
    # 32764 bytes (CUDA 12.1 and newer, sm_70 and newer), or 4 KB in a
    # PYREG_CUDA_SMALL_PARAMS build. launch.h sizes the batches to match.
    src = f"""
#include "cuda/emu/cuda_runtime.h"
#include "cuda/launch.h"
struct Big {{ char bytes[{nbytes}]; }};
static_assert(pyreg::kParamBytes == {4096 if small else 32764}, "launch.h's parameter space");
__global__ void k(Big b, int* out) {{ out[threadIdx.x] = b.bytes[0]; }}
void go(Big b, int* out) {{ PYREG_LAUNCH(k, 1, 32, 0, nullptr, b, out); }}
"""
    p = _compile(src, tmp_path, *(["-DPYREG_CUDA_SMALL_PARAMS"] if small else []))
    assert (p.returncode == 0) == ok, p.stderr
    if not ok:
        assert "kernel arguments exceed the CUDA parameter space" in p.stderr


@needs_emu
def test_contracted_build_has_fused_multiply_adds():
    # PYREG_CUDA_EMU_FMA=ON must make the compiler emit FMAs (on x86-64 that
    # needs -mfma), or the build would not meet the roundings a GPU gives.
    from pyreg import _C

    if _selftest("contracted") != "on":
        pytest.skip("built without PYREG_CUDA_EMU_FMA=ON")
    objdump = shutil.which("objdump")
    if objdump is None or os.uname().machine != "x86_64":
        pytest.skip("objdump for x86-64 not found")
    asm = subprocess.run([objdump, "-d", "--no-show-raw-insn", _C.__file__], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    import re

    assert len(re.findall(r"\bvfn?m(add|sub)\d+[sp][sd]\b", asm)) > 0, "no FMA instruction in the module"
