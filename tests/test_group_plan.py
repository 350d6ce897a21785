"""The group ops' tiling arithmetic (csrc/common/group_plan.h), compiled as
host C++ and checked against Python's exact integer division: the tiling
divides without 64-bit divides (a GPU has none: nvcc calls a subroutine whose
register saves spill), by long division in 32-bit steps, which must give the
exact quotient for every dividend up to 2^63 - 1 and divisor up to 2^17."""
from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"

_PROGRAM = r"""
#include <cstdio>
#include "common/group_plan.h"
int main() {
  long long a, b;
  while (std::scanf("%lld %lld", &a, &b) == 2) {
    const long long q = pyreg::div_small(a, b);
    const long long q32 = a < (1LL << 31) && b < (1LL << 31) ? pyreg::div32(a, b) : -1;
    const long long r32 = a < (1LL << 31) && b < (1LL << 31) ? pyreg::mod32(a, b) : -1;
    std::printf("%lld %lld %lld\n", q, q32, r32);
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    d = tmp_path_factory.mktemp("group_plan")
    (d / "p.cpp").write_text(_PROGRAM)
    subprocess.run([cxx, "-std=c++17", "-O2", f"-I{CSRC}", "-o", str(d / "p"), str(d / "p.cpp")],
                   check=True, capture_output=True, text=True, timeout=120)
    return d / "p"


def test_divisions_are_exact(program):
    rng = random.Random(5)
    top = 2**63 - 1
    divisors = [1, 2, 3, 7, 2047, 2048, 2049, 32767, 32768, 65535, 65536, 65537, 131071, 131072]
    divisors += [rng.randint(1, 2**17) for _ in range(40)]
    dividends = [0, 1, 2**15 - 1, 2**15, 2**31 - 1, 2**31, 2**32, 2**45 + 12345, 2**60 - 1, 2**60, top - 1, top]
    dividends += [rng.randint(0, top) for _ in range(40)] + [rng.randint(0, 2**31 - 1) for _ in range(40)]
    pairs = [(a, b) for a in dividends for b in divisors]
    out = subprocess.run([str(program)], input="".join(f"{a} {b}\n" for a, b in pairs), capture_output=True,
                         text=True, timeout=120, check=True).stdout.split("\n")
    bad = []
    for (a, b), line in zip(pairs, out):
        q, q32, r32 = map(int, line.split())
        if q != a // b:
            bad.append(f"div_small({a}, {b}) = {q}, not {a // b}")
        if a < 2**31 and (q32, r32) != (a // b, a % b):
            bad.append(f"div32/mod32({a}, {b}) = {q32}, {r32}")
    assert len(out) >= len(pairs) and not bad, "\n".join(bad[:20])
