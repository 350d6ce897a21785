"""The CPU kernels' instruction-set variants (x86-64 baseline, AVX2, AVX-512;
chosen at load time, forced with PYREG_CPU_ISA) compute the same bits. Each
variant this CPU supports runs every op (kth_abs, push_kth and metric_target too) on every dtype in a process of its own."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyreg

TESTS = Path(__file__).resolve().parent
VARIANTS = ["x86_64", "avx2", "avx512"]

_RUN = """
import sys, torch, pyreg
sys.path.insert(0, {tests!r})
from conftest import DTYPES, random_list
from test_structured import dims_for, group_list
from test_fused_optim import kernel_case
from test_kth_abs import KINDS, clustered
from pyreg.backends import torch_ref as spec
out = {{"archs": pyreg.backends.cpu.archs()}}
with pyreg.use_backend("cpu"):
    for k, dt in enumerate(DTYPES):
        ts = random_list(dt, seed=100 + k, more_layouts=True)
        gs = random_list(dt, seed=200 + k, more_layouts=True)
        rs = [t.flip(0) if t.dim() else t.neg() for t in ts]
        st = pyreg.weight_stats(ts)
        p = pyreg.penalty(ts, 0.37, [0.11] * len(ts))
        pr = pyreg.penalty(ts, 0.37, 0.11, ref=rs)
        v = pyreg.add_penalty_grad_(ts, gs, 0.3, 0.7)
        nnz = pyreg.prox_(ts, 0.21, 0.13, 0.9)
        nnz_r = pyreg.prox_(ts, 0.21, 0.13, 0.9, ref=rs)
        g = torch.Generator().manual_seed(500 + k)
        cs = [clustered(n, dt, kind, g) for n in (17, 1000, 4097) for kind in KINDS]
        kth = [pyreg.kth_abs(xs, [(x.numel() * j) // 4 for x in xs], closest=c)
               for xs in (ts, cs) for j in range(5) for c in (False, True)]
        out[str(dt)] = [*st, p, pr, v, nnz, nnz_r] + gs + ts + kth
        if dt in (torch.float32, torch.float64):  # l1_strength's Adam push, selected in one call
            ms = [t.contiguous() for t in ts]
            vs = [m * m + 1e-6 for m in ms]
            for second in (vs, None):
                q = torch.empty(len(ms), dtype=torch.float64)
                pyreg.backends.cpu.push_kth(ms, second, [3e-8] * len(ms), [0.7] * len(ms),
                                                 [(m.numel() * 3) // 4 for m in ms], q)
                out[str(dt)].append(q)
            # target_sparsity in an adaptive optimizer's metric, in one call
            from pyreg.backends._marshal import plain_list
            ws2, l1m, n = [m.clone() for m in ms], torch.empty(len(ms), dtype=torch.float64), len(ms)
            pyreg.backends.cpu.metric_target_ptrs(plain_list(ws2 + vs, True), n, [3e-8] * n, [1.3] * n,
                                                  [(m.numel() * 2) // 5 for m in ms], [0.01] * n, [0.05] * n, l1m)
            out[str(dt)] += ws2 + [l1m]
        ws = group_list(dt, seed=300 + k)
        for which in ("rows", "cols"):
            dims = dims_for(ws, which)
            ggs = [w.clone() for w in ws]
            res = [*pyreg.group_norms(ws, dim=dims), pyreg.group_penalty(ws, 0.3, dim=dims),
                   pyreg.add_group_penalty_grad_(ws, ggs, 0.3, dim=dims),
                   pyreg.group_prox_(ws, 0.5, 0.9, dim=dims, element_l1=0.1, l2=0.2),
                   pyreg.max_norm_(ws, 1.0, dim=dims)]
            out[str(dt) + which] = res + ggs + ws
        for algo, make, flags in ((spec.SGD, dict(sgd_state="mixed"), dict(nesterov=True)),
                                  (spec.ADAM, dict(amsgrad=True), dict(amsgrad=True, decoupled=True)),
                                  (spec.ADAGRAD, dict(), dict(maximize=True)),
                                  (spec.RMSPROP, dict(rms_momentum=True, centered=True),
                                   dict(centered=True, maximize=True))):
            for prox in (spec.PLAIN_PROX, spec.METRIC_PROX):
                c = kernel_case(algo, dt, seed=400 + k, **make)
                f = dict(decoupled=False, amsgrad=False, maximize=False, nesterov=False, prox=prox)
                f.update(flags)
                pyreg.backends.cpu.optim_step(algo, c["params"], c["grads"], c["s1"], c["s2"], c["s3"],
                                              c["steps"], c["group"], c["fresh"], c["hyper"], **f)
                out[str(dt) + f"optim{{algo}}-{{prox}}"] = c["params"] + c["s1"] + c["s2"] + c["s3"] + c["steps"]
torch.save(out, {path!r})
"""


def _bits(x):
    x = x.contiguous()
    if x.is_floating_point():
        return x.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[x.element_size()])
    return x


def test_variants_compute_the_same_bits(tmp_path):
    if "chosen at load time" not in pyreg.backends.cpu.archs():
        pytest.skip(f"a single-variant build: {pyreg.backends.cpu.archs()}")
    results = {}
    for v in VARIANTS:
        path = str(tmp_path / f"{v}.pt")
        env = dict(os.environ, PYREG_CPU_ISA=v)
        subprocess.run([sys.executable, "-c", _RUN.format(tests=str(TESTS), path=path)], env=env,
                       cwd=tmp_path, check=True, timeout=300)
        out = torch.load(path)
        if f"forced by PYREG_CPU_ISA={v}" not in out["archs"]:
            assert v != "x86_64", out["archs"]  # every x86-64 CPU runs the baseline
            continue  # this CPU lacks the variant
        results[v] = out
    assert "x86_64" in results
    base = results["x86_64"]
    for v, out in results.items():
        for key, tensors in base.items():
            if key == "archs":
                continue
            for i, (a, b) in enumerate(zip(tensors, out[key])):
                assert torch.equal(_bits(a), _bits(b)), f"{v} differs from x86_64: {key}, result {i}"
    assert len(results) >= 2 or "avx2" not in pyreg.backends.cpu.archs().split(" (")[0]


def test_forcing_an_unknown_variant_falls_back(tmp_path):
    if "chosen at load time" not in pyreg.backends.cpu.archs():
        pytest.skip(f"a single-variant build: {pyreg.backends.cpu.archs()}")
    env = dict(os.environ, PYREG_CPU_ISA="sse9")
    out = subprocess.run([sys.executable, "-c", "import pyreg; print(pyreg.backends.cpu.archs())"],
                         env=env, cwd=tmp_path, check=True, capture_output=True, text=True, timeout=120)
    assert "PYREG_CPU_ISA=sse9 ignored" in out.stdout


def test_the_variant_is_named_as_the_variable_names_it_in_any_case(tmp_path):
    """``archs()`` (``pyreg info``) starts with the variant's name as
    PYREG_CPU_ISA takes it; the variable's value is read in any case, and a
    known variant this CPU lacks is told apart from an unknown name."""
    if "chosen at load time" not in pyreg.backends.cpu.archs():
        pytest.skip(f"a single-variant build: {pyreg.backends.cpu.archs()}")
    assert pyreg.backends.cpu.archs().split(":")[0] in VARIANTS

    def archs(value):
        env = dict(os.environ, PYREG_CPU_ISA=value)
        return subprocess.run([sys.executable, "-c", "import pyreg; print(pyreg.backends.cpu.archs())"], env=env,
                              cwd=tmp_path, check=True, capture_output=True, text=True, timeout=120).stdout
    out = archs("X86_64")
    assert out.startswith("x86_64: ") and "forced by PYREG_CPU_ISA=X86_64" in out
    assert "not one of x86_64, avx2, avx512" in archs("sse9")
    for v in ("avx2", "avx512"):
        out = archs(v.upper())
        assert out.startswith(f"{v}: ") or "this CPU does not support it" in out, out
