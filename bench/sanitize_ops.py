"""Every pyreg kernel once, on small tensor lists, for compute-sanitizer.

    compute-sanitizer --tool memcheck python bench/sanitize_ops.py [--device cuda]

Under a sanitizer each launch (torch's own too) runs tens to hundreds of times
slower, and importing pytest and collecting the suite costs minutes: this
script is the sanitizers' workload instead of the test suite. For each dtype it
builds one list that spans what the launch planners split on:

* an empty tensor, 0-dim tensors and odd sizes;
* a tensor over a chunk (the large-tensor chunk of 65536 elements and the
  small one of 16384), so one tensor spans several blocks;
* more tensors than one launch's batch holds (the largest batch, 800, plus
  some), so every op runs over a batch boundary;
* non-contiguous inputs are not passed: the ops copy them to contiguous
  buffers first (the kernels only ever see contiguous memory).

It then calls every op (element-wise, prox toward a reference, the group ops
along both dims, max-norm, the selection) and two fused steps of every optimizer (AdamW over a launch batch) with L1 and
L2 (AdamW then a step with an l2_bound and one with a target_sparsity), and checks the results against the float64 specification loosely (a
wrong result is not the sanitizer's business, but a NaN or an unwritten
output shows up here too). Exit status 0 when every result is finite and
close; the sanitizer's own exit code reports memory errors and races.
"""
import argparse
import math
import sys
import time

import torch

import pyreg
from pyreg.backends import torch_ref

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}
BATCH_TENSORS = 801   # one more than the largest launch batch (element-wise ops)
OPTIM_TENSORS = 445   # over the optimizer's batch (440 parameters)


def shapes() -> list:
    out = [(0,), (), (1,), (7,), (3, 5), (17, 33), (65536 + 3,), (129, 130), (16384 * 2 + 1,)]
    out += [(i % 5 + 1,) for i in range(BATCH_TENSORS - len(out))]
    return out


def make(dtype, dev, seed, shape_list=None):
    """Tensors of ``shape_list`` (default: ``shapes()``) filled with random
    values: views of one buffer, made with one copy to the device (under a
    sanitizer every torch launch and copy is slow too)."""
    shape_list = shapes() if shape_list is None else shape_list
    sizes = [math.prod(s) for s in shape_list]
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(sum(sizes), generator=g, dtype=torch.float64).to(dtype).to(dev)
    return [v.view(s) for v, s in zip(flat.split(sizes), shape_list)]


def copy(ts):
    """A copy of a list from ``make`` (again views of one buffer)."""
    if not ts:
        return []
    base = ts[0]._base if ts[0]._base is not None else ts[0]
    flat = base.clone()
    sizes = [t.numel() for t in ts]
    return [v.view(t.shape) for v, t in zip(flat.split(sizes), ts)]


def copy_each(ts):
    return [t.clone() for t in ts]


def close(got, want, what, tol):
    got = got.double().cpu()
    want = want.double().cpu()
    if not torch.isfinite(got).all():
        raise AssertionError(f"{what}: not finite")
    err = float((got - want).abs().max()) if got.numel() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    if err > tol * max(scale, 1.0):
        raise AssertionError(f"{what}: max abs error {err:.3g} (scale {scale:.3g})")


def run(dev: str, dtype_names) -> int:
    n_checks = 0
    for name in dtype_names:
        dt = DTYPES[name]
        tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dt, 5e-2)
        ws = make(dt, dev, 1)
        gs = make(dt, dev, 2)
        ref = make(dt, dev, 3)
        w64 = [w.double().cpu() for w in ws]

        st = pyreg.weight_stats(ws)
        want = torch_ref.weight_stats(w64)
        close(st[0], want[0], f"{name} weight_stats l1", tol)
        close(st[1], want[1], f"{name} weight_stats l2", tol)
        close(pyreg.penalty(ws, 1e-3, 1e-2), torch_ref.penalty(w64, 1e-3, 1e-2), f"{name} penalty", tol)

        g = copy(gs)
        pyreg.add_penalty_grad_(ws, g, 1e-3, 1e-2)
        g64 = [x.double().cpu() for x in gs]
        torch_ref.add_penalty_grad_(w64, g64, 1e-3, 1e-2)
        for i in (0, 6, len(g) - 1):
            close(g[i], g64[i], f"{name} add_penalty_grad_[{i}]", tol)

        pyreg.prox_(copy(ws), 0.3, 0.01, 0.5)
        pyreg.prox_(copy(ws), 0.3, 0.01, 0.5, ref=ref)

        ks = [(t.numel() + 1) // 2 for t in ws]
        for closest in (False, True):
            close(pyreg.kth_abs(ws, ks, closest=closest), torch_ref.kth_abs(w64, ks, closest),
                  f"{name} kth_abs closest={closest}", 0.0)  # a selection: exact

        mats = [x.clone() for x in ws if x.dim() == 2] + [make(dt, dev, 4, [(0, 5)])[0]]
        for dim in (0, 1):
            norms = pyreg.group_norms(mats, dim=dim)
            want_n = torch_ref.group_norms([m.double().cpu() for m in mats], [dim] * len(mats))
            close(torch.cat([x.reshape(-1) for x in norms]), want_n.reshape(-1), f"{name} group_norms dim={dim}", tol)
            pyreg.group_penalty(mats, 0.1, dim=dim)
            gm = copy_each(mats)
            pyreg.add_group_penalty_grad_(mats, gm, 0.1, dim=dim)
            pyreg.group_prox_(copy_each(mats), 0.5, 0.5, dim=dim)
            pyreg.max_norm_(copy_each(mats), 1.0, dim=dim)
        n_checks += 1

        # every fused optimizer, two steps with L1 and L2 (the second with state);
        # AdamW over more parameters than one launch's batch (440) holds
        for cls, kw, count in ((pyreg.optim.SGD, dict(lr=0.1, momentum=0.9), 24),
                               (pyreg.optim.Adam, dict(lr=1e-2), 24),
                               (pyreg.optim.AdamW, dict(lr=1e-2), OPTIM_TENSORS),
                               (pyreg.optim.Adagrad, dict(lr=1e-2), 24),
                               (pyreg.optim.RMSprop, dict(lr=1e-2, momentum=0.9, centered=True), 24)):
            sh = [s for s in shapes() if math.prod(s)][:count]
            ps = [torch.nn.Parameter(x) for x in make(dt, dev, 5, sh)]
            for p, gr in zip(ps, make(dt, dev, 6, sh)):
                p.grad = gr
            opt = cls(ps, l1=1e-3, l2=1e-2, **kw)
            opt.step()
            opt.step()
            if cls is pyreg.optim.AdamW:  # l2_bound's kernels over the same launch batch, then target_sparsity
                opt.param_groups[0].update(l2_bound=0.5, l2_mu=0.1)
                opt.step()
                opt.param_groups[0].update(l1=0.0, l2_bound=None, target_sparsity=0.5)
                opt.step()
            for p in (ps[0], ps[5], ps[-1]):
                if not torch.isfinite(p.detach().double()).all():
                    raise AssertionError(f"{name} {cls.__name__}: not finite")
    if dev == "cuda":
        torch.cuda.synchronize()
    return n_checks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated: " + ",".join(DTYPES))
    p.add_argument("--backend", default=None, help="force a pyreg backend (e.g. cuda-emu)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    names = args.dtypes.split(",")
    if args.backend:
        with pyreg.use_backend(args.backend):
            n = run(args.device, names)
    else:
        n = run(args.device, names)
    print(f"sanitize_ops: {n} dtypes, every op and optimizer, {len(shapes())} tensors per list, "
          f"{time.perf_counter() - t0:.1f} s: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
