"""pyreg's ops once each on a model's shapes, for a kernel profiler.

    ncu --clock-control none --section SpeedOfLight --section Occupancy \
        python bench/profile_ops.py --shapes gpt2 --ops group_prox_,max_norm_

Each op runs once on fresh random float32 tensors of the shape set (the group
ops on its tensors of 2+ dims, as ``pyreg bench`` does), with a synchronize
after each, so that a profiler sees each op's kernels in order and alone:
``group_prox_`` with ``dim=1`` (columns), ``max_norm_`` with ``dim=0`` (rows),
the element-wise ops and one ``pyreg.optim.AdamW(l1=...)`` step.
"""
import argparse
import sys

import torch

import pyreg
from pyreg.bench import shapes as S

OPS = ("weight_stats", "add_penalty_grad_", "prox_", "group_prox_", "max_norm_", "step")


def tensors(shape_list, dev, seed):
    g = torch.Generator(device=dev).manual_seed(seed)
    return [torch.randn(s, generator=g, device=dev) for _, s in shape_list]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="gpt2", choices=list(S.ORDER))
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    ops = args.ops.split(",")
    bad = [o for o in ops if o not in OPS]
    if bad:
        p.error(f"unknown ops {bad}; choose from {','.join(OPS)}")
    dev = torch.device(args.device)
    sset = S.get(args.shapes)
    ws = tensors(sset.shapes, dev, 0)
    mats = tensors(S.matrices(sset).shapes, dev, 1)
    for op in ops:
        if op == "weight_stats":
            pyreg.weight_stats(ws)
        elif op == "add_penalty_grad_":
            pyreg.add_penalty_grad_(ws, tensors(sset.shapes, dev, 2), 1e-3, 1e-2)
        elif op == "prox_":
            pyreg.prox_(ws, 1e-3, 1e-2, 1e-2)
        elif op == "group_prox_":
            pyreg.group_prox_(mats, 0.5, 1e-2, dim=1)
        elif op == "max_norm_":
            pyreg.max_norm_(mats, 1.0, dim=0)
        else:
            ps = [torch.nn.Parameter(w) for w in ws]
            for q, gr in zip(ps, tensors(sset.shapes, dev, 3)):
                q.grad = gr
            pyreg.optim.AdamW(ps, lr=1e-3, l1=1e-3).step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        print(f"profile_ops: {op} on {args.shapes} ({sset.count} tensors) done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
