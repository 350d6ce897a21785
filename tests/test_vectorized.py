"""The CPU kernels' hot element loops vectorize for every storage type,
checked from the compiler's own report: csrc/cpu/sweep.h compiled with the
CPU flags of CMakeLists.txt (the AVX2 variant's -march) and
``-fopt-info-vec``, each loop of LOOPS instantiated for float32, float64,
float16 and bfloat16, and the report must say "loop vectorized" at that
loop for each. A scalar 16-bit loop runs about ten times slower than a
vector one (a struct copied out of a value the simd loop privatized does not
vectorize: csrc/common/dtype.h's ``put``). Needs g++ on x86-64 (skips
without)."""
from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "csrc" / "cpu" / "sweep.h"
CXX = shutil.which("g++")
FLAGS = ["-std=c++17", "-O3", "-fno-trapping-math", "-fno-math-errno", "-fopenmp-simd", "-march=x86-64-v3",
         "-ffp-contract=off"]
TYPES = ["float", "double", "half_t", "bf16_t"]

#: (function of sweep.h, a line inside its loop, the call that instantiates it for storage type T)
LOOPS = [
    ("prox_step", "const T y = store<T>(prox_value(load<A>(xs[k]), pp));",
     "prox_step(x, int(n), prox_params<opmath_t<T>>(0.1, 0.2, 0.5))"),
]

pytestmark = pytest.mark.skipif(CXX is None or not SWEEP.exists() or platform.machine() not in ("x86_64", "AMD64"),
                                reason="needs g++ on x86-64 and the sources")


def _report(tmp_path, t: str) -> str:
    """The vectorizer's report of the loops instantiated for storage type ``t`` (one per file)."""
    calls = [f"int64_t {name}_{t}(int64_t n, {t}* x) {{ using T = {t}; return {call}; }}" for name, _, call in LOOPS]
    src = tmp_path / f"loops_{t}.cpp"
    src.write_text('#include "cpu/sweep.h"\nnamespace pyreg::cpu { namespace PYREG_ISA_NS {\n' + "\n".join(calls)
                   + "\n}}\n")
    r = subprocess.run([CXX, *FLAGS, f"-I{ROOT / 'csrc'}", "-c", str(src), "-o", str(tmp_path / f"{t}.o"),
                        "-fopt-info-vec-optimized"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr


@pytest.mark.parametrize("t", TYPES)
def test_hot_loops_vectorize(tmp_path, t):
    report = _report(tmp_path, t)
    lines = SWEEP.read_text().splitlines()
    for name, line_text, _ in LOOPS:
        at = next(i + 1 for i, ln in enumerate(lines) if line_text in ln)
        assert re.search(rf"sweep\.h:{at}:\d+: optimized: loop vectorized", report), (name, t, at, report[-3000:])
