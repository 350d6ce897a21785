"""The compiled GPU code, checked without a GPU: every CUDA source
(csrc/cuda/*.cu) compiled for sm_90 with the flags of CMakeLists.txt, and
ptxas's report of each kernel checked:

* no hot kernel (HOT) spills registers to local memory (``bytes spill
  stores/loads``), beyond the known spills listed in KNOWN_SPILLS, which may
  only shrink;
* each kernel's registers allow the blocks per SM its ``__launch_bounds__``
  asks for (maxThreadsPerBlock, minBlocksPerMultiprocessor; 1 when not given),
  in the SM's 64K registers with the hardware's allocation granularity;
* the vector paths of the elementwise kernel, of every optimizer's kernel and
  of the group ops' second pass load and store 128 bits at a time: ``ld.global``/``st.global`` of
  ``.v4.u32`` in the PTX, and ``LDG.E.128`` in the SASS where cuobjdump is
  installed.

Needs nvcc (skips without); the cubins are cached in the temporary directory,
keyed by the sources and flags, so a second run costs nothing.
``python tests/test_sass.py`` prints the table of registers and spills."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA = ROOT / "csrc" / "cuda"
ARCH = "sm_90"
# As CMakeLists.txt compiles the .cu sources (CMAKE_CUDA_STANDARD 17, -O3
# --expt-relaxed-constexpr -maxrregcount=128, csrc on the include path).
FLAGS = ["-O3", "--expt-relaxed-constexpr", "-maxrregcount=128", "-std=c++17", f"-I{ROOT / 'csrc'}"]
#: The kernels every op runs through; a spill in one of them costs every call.
HOT = ["chunk_kernel", "finish_kernel", "group_tile_kernel", "group_finish_kernel", "optim_kernel"]
#: Spills ptxas reports for sm_90 in these instantiations (kernel, template
#: arguments as mangled): (spill store bytes, spill load bytes) at most. None
#: today. A spill usually comes with a stack frame: registers saved around a
#: call that is not inlined (a GPU has no 64-bit integer divide, and a float64
#: division or square root keeps a slow path out of line). Adding an entry is a
#: regression.
KNOWN_SPILLS: dict = {}
#: The units whose kernels have a 16-byte vector path, and those kernels.
VECTOR_UNITS = {"elementwise": "chunk_kernel", "optim_sgd": "optim_kernel", "optim_adam": "optim_kernel",
                "optim_adagrad": "optim_kernel", "optim_rmsprop": "optim_kernel",
                "group": "group_tile_kernelILi2"}  # the group ops' second pass
#: Of those, the instances that only read (weight_stats, penalty, l2_bound's sums): no stores to check.
READ_ONLY = ("chunk_kernelILi0E", "chunk_kernelILi1E", "chunk_kernelILi4E")
REGS_PER_SM = 65536
REG_UNIT = 256  # registers are allocated per warp in units of 256
MAX_REGS = 255


def _nvcc() -> str | None:
    return shutil.which("nvcc")


def _sources() -> list[Path]:
    return sorted(CUDA.glob("*.cu"))


def _key() -> str:
    h = hashlib.sha256()
    for f in sorted(CUDA.glob("*.cu*")) + sorted(CUDA.glob("*.h")) + sorted((ROOT / "csrc" / "common").glob("*")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    h.update(" ".join(FLAGS[:-1] + [ARCH]).encode())
    return h.hexdigest()[:16]


def _compile_one(nvcc: str, src: Path, out: Path) -> str:
    """ptxas's -v report for src (compiled once into out/<name>.cubin and .ptx)."""
    log = out / f"{src.stem}.log"
    if log.exists() and (src.stem not in VECTOR_UNITS or (out / f"{src.stem}.ptx").exists()):
        return log.read_text()
    cubin = out / f"{src.stem}.cubin"
    p = subprocess.run([nvcc, "-cubin", f"-arch={ARCH}", *FLAGS, "-Xptxas", "-v", "-o", str(cubin), str(src)],
                       capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise AssertionError(f"nvcc failed on {src.name}:\n{p.stderr[-4000:]}")
    if src.stem in VECTOR_UNITS:
        q = subprocess.run([nvcc, "-ptx", f"-arch={ARCH}", *FLAGS, "-o", str(out / f"{src.stem}.ptx"), str(src)],
                           capture_output=True, text=True, timeout=900)
        if q.returncode != 0:
            raise AssertionError(f"nvcc -ptx failed on {src.name}:\n{q.stderr[-4000:]}")
    tmp = log.with_suffix(".tmp")
    tmp.write_text(p.stderr + p.stdout)
    tmp.replace(log)  # complete logs only: the cache never holds a half
    return log.read_text()


def build() -> Path:
    """Compiles every csrc/cuda/*.cu for sm_90 (in parallel, cached); returns the directory."""
    nvcc = _nvcc()
    assert nvcc is not None
    out = Path(tempfile.gettempdir()) / f"pyreg-sass-{_key()}"
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as ex:
        list(ex.map(lambda s: _compile_one(nvcc, s, out), _sources()))
    return out


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def ptxas_table(out: Path) -> dict[str, dict]:
    """{mangled kernel name: dict(file, regs, stack, spill_stores, spill_loads)}."""
    table: dict[str, dict] = {}
    for log in sorted(out.glob("*.log")):
        cur = None
        for line in log.read_text().splitlines():
            if m := _ENTRY.search(line):
                cur = table.setdefault(m.group(1), dict(file=log.stem + ".cu"))
            elif cur is not None and (m := _SPILL.search(line)):
                cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            elif cur is not None and (m := _REGS.search(line)):
                cur.update(regs=int(m.group(1)))
    return table


def launch_bounds() -> dict[str, tuple[int, int]]:
    """{kernel name: (maxThreadsPerBlock, minBlocksPerSM)} from the sources' __launch_bounds__."""
    text = "\n".join(f.read_text() for f in sorted(CUDA.glob("*.cu*")))
    consts = {m.group(1): int(m.group(2)) for m in re.finditer(r"constexpr\s+int\s+(\w+)\s*=\s*(\d+)\s*;", text)}

    def value(expr: str) -> int:
        expr = expr.strip()
        return int(expr) if expr.isdigit() else consts[expr]

    out = {}
    for m in re.finditer(r"__global__\s+void\s+__launch_bounds__\(([^)]*)\)\s*(\w+)\s*\(", text):
        args = [a for a in m.group(1).split(",") if a.strip()]
        out[m.group(2)] = (value(args[0]), value(args[1]) if len(args) > 1 else 1)
    return out


def kernel_of(mangled: str, names) -> str | None:
    """The source name of a mangled kernel (its <length><name> component)."""
    for n in names:
        if f"{len(n)}{n}" in mangled:
            return n
    return None


def blocks_per_sm(regs: int, threads: int) -> int:
    warps = (threads + 31) // 32
    per_warp = -(-max(regs, 1) * 32 // REG_UNIT) * REG_UNIT
    return REGS_PER_SM // (warps * per_warp)


needs_nvcc = pytest.mark.skipif(_nvcc() is None, reason="nvcc not found: the GPU code is not compiled here")


@pytest.fixture(scope="module")
def compiled():
    return build()


def test_flags_are_cmakes():
    """The flags compiled here are the ones CMakeLists.txt gives nvcc."""
    cmake = (ROOT / "CMakeLists.txt").read_text()
    line = re.search(r"COMPILE_LANGUAGE:CUDA>:([^>]*)>", cmake)
    assert line, "no CUDA compile options in CMakeLists.txt"
    assert line.group(1).split() == [f for f in FLAGS if not f.startswith(("-std=", "-I"))]


@needs_nvcc
def test_every_kernel_is_reported(compiled):
    table = ptxas_table(compiled)
    bounds = launch_bounds()
    assert bounds, "no __launch_bounds__ found in csrc/cuda"
    found = {kernel_of(k, bounds) for k in table}
    missing = set(bounds) - found
    assert not missing, f"kernels with launch bounds that ptxas did not report: {missing}"
    for k, v in table.items():
        assert {"regs", "spill_stores", "spill_loads"} <= set(v), (k, v)


def _known_spill(mangled: str, name: str) -> tuple[int, int]:
    for (kernel, args), limit in KNOWN_SPILLS.items():
        if kernel == name and f"{len(name)}{name}{args}" in mangled:
            return limit
    return (0, 0)


@needs_nvcc
def test_hot_kernels_do_not_spill_registers(compiled):
    spills = []
    for k, v in ptxas_table(compiled).items():
        name = kernel_of(k, HOT)
        if name is None:
            continue
        st, ld = _known_spill(k, name)
        if v["spill_stores"] > st or v["spill_loads"] > ld:
            spills.append(f"  {name} ({k}, {v['file']}): {v['regs']} registers, {v['spill_stores']} bytes spill "
                          f"stores, {v['spill_loads']} bytes spill loads (allowed: {st}, {ld})")
    assert not spills, "hot kernels that spill registers to local memory:\n" + "\n".join(spills)


@needs_nvcc
def test_registers_allow_the_launch_bounds(compiled):
    bounds = launch_bounds()
    bad = []
    for k, v in ptxas_table(compiled).items():
        name = kernel_of(k, bounds)
        if name is None:
            continue
        threads, min_blocks = bounds[name]
        fit = blocks_per_sm(v["regs"], threads)
        if v["regs"] > MAX_REGS or fit < min_blocks:
            bad.append(f"  {name} ({k}): {v['regs']} registers x {threads} threads: {fit} blocks per SM, "
                       f"__launch_bounds__ asks for {min_blocks}")
    assert not bad, "kernels whose registers do not fit their launch bounds:\n" + "\n".join(bad)


@needs_nvcc
@pytest.mark.parametrize("unit", list(VECTOR_UNITS))
def test_vector_path_moves_128_bits_ptx(compiled, unit):
    # run_chunk (elementwise), optim_chunk (optim_kernel.cuh) and group_tile's
    # second pass (group.cu) move 16-byte vectors (uint4) when aligned.
    ptx = (compiled / f"{unit}.ptx").read_text()
    assert re.search(r"ld\.global(\.\w+)*\.v4\.(u32|b32)", ptx), f"no 128-bit global load in {unit}'s PTX"
    assert re.search(r"st\.global(\.\w+)*\.v4\.(u32|b32)", ptx), f"no 128-bit global store in {unit}'s PTX"


@needs_nvcc
@pytest.mark.parametrize("unit", list(VECTOR_UNITS))
def test_vector_path_moves_128_bits_sass(compiled, unit):
    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (the PTX test checks the vector accesses)")
    sass = subprocess.run([cuobjdump, "-sass", str(compiled / f"{unit}.cubin")], capture_output=True,
                          text=True, timeout=300, check=True).stdout
    per_kernel = re.split(r"\n\s*Function : ", sass)
    kernels = [s for s in per_kernel if VECTOR_UNITS[unit] in s.split("\n", 1)[0]]
    assert kernels, f"no {VECTOR_UNITS[unit]} in the SASS of {unit}"
    for s in kernels:
        name = s.split("\n", 1)[0]
        assert re.search(r"LDG\.E\.128", s), f"no LDG.E.128 in {name}"
        if not any(r in name for r in READ_ONLY):
            assert re.search(r"STG\.E\.128", s), f"no STG.E.128 in {name}"


def main() -> int:
    if _nvcc() is None:
        print("nvcc not found")
        return 1
    out = build()
    bounds = launch_bounds()
    print(f"{'kernel':<58} {'file':<16} {'regs':>4} {'spill st/ld':>11} {'bounds':>9} {'blocks/SM':>9}")
    for k, v in sorted(ptxas_table(out).items(), key=lambda kv: (kv[1]["file"], kv[0])):
        name = kernel_of(k, bounds) or "?"
        inst = re.search(r"I(Li\w+?E)+E", k)
        label = name + (inst.group(0)[1:-1] if inst and name != "?" else "")
        threads, mb = bounds.get(name, (0, 0))
        fit = blocks_per_sm(v["regs"], threads) if threads else 0
        print(f"{label[:58]:<58} {v['file']:<16} {v['regs']:>4} {v['spill_stores']:>5}/{v['spill_loads']:<5} "
              f"{threads:>5},{mb:<3} {fit:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
