"""How comparable one strength is across optimizers: the demo's MLP task
(8 informative and 120 noise inputs, 400 training samples, full batch, 500
steps, seed 0) trained with SGD (momentum 0.9), Adam, AdamW, Adagrad and
RMSprop, each plain and preconditioned (SGD's metric is the plain one), at
one setting each of

* a fixed ``l1`` (the same number for every optimizer);
* ``l1_strength`` (each tensor's l1 the strength-quantile of its push,
  refreshed every 10 steps);
* ``l1_strength`` measured once (the quantile of the push averaged over
  steps 25..50, then fixed): the rule without its refresh;
* a push/pull ratio, ``l1 = strength * RMS(push)`` refreshed every 10 steps
  (the element-wise analogue of adaptive weight decay, Ghiasi et al. 2023:
  the penalty's pull a fixed fraction of the gradient's push);
* the quantile of the push averaged over the 10 steps before each refresh
  (signed, then its magnitude: a weight oscillating around zero pushes both
  ways, and its mean push is what the optimality condition compares with
  l1): the rule with its push summed at every step.

For each setting: the fraction of exact zeros of the weights per
configuration, and the spread (largest over smallest). Writes
``bench/results/strength-spread.{json,md}``.

    python bench/strength_spread.py [--out bench/results/strength-spread]
"""
import argparse
import json
import math
import platform

import torch
from torch import nn

import pyreg
from pyreg.demo.data import informative_features
from pyreg.demo.study import MLP

CONFIGS = [("SGD", pyreg.optim.SGD, dict(lr=0.1, momentum=0.9), (False,)),
           ("Adam", pyreg.optim.Adam, dict(lr=1e-2), (False, True)),
           ("AdamW", pyreg.optim.AdamW, dict(lr=1e-2), (False, True)),
           ("Adagrad", pyreg.optim.Adagrad, dict(lr=0.1), (False, True)),
           ("RMSprop", pyreg.optim.RMSprop, dict(lr=1e-3), (False, True))]
STEPS = 500
SETTINGS = [("fixed l1", v) for v in (1e-3, 1e-2, 1e-1)] + [("l1_strength", v) for v in (0.3, 0.5, 0.7, 0.8, 0.9)] \
    + [("strength measured once", v) for v in (0.5, 0.8, 0.9)] + [("push/pull RMS", v) for v in (0.3, 1.0)] \
    + [("push averaged over 10 steps", v) for v in (0.3, 0.5, 0.7, 0.8, 0.9)]


def push_of(opt, p):
    """The push of p by the optimizer's last step, read as the rule does."""
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    return opt._push(p, opt.state[p], group, group["preconditioned"], None)


def run(data, cls, kw, pre, kind, value):
    torch.manual_seed(0)
    model = MLP(data.num_features, data.num_classes)
    if kind == "fixed l1":
        groups = pyreg.param_groups(model, l1=value)
    elif kind == "l1_strength":
        groups = pyreg.param_groups(model, l1_strength=value)
    else:
        groups = pyreg.param_groups(model)
    opt = cls(groups, preconditioned=pre, **kw)
    weights = [p for g in opt.param_groups for p in g["params"] if p.dim() > 1]
    seen = [[] for _ in weights]
    summed = None
    for step in range(STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.x_train), data.y_train).backward()
        opt.step()
        if kind == "strength measured once" and 25 <= step < 50:
            for i, p in enumerate(weights):
                a = push_of(opt, p).abs().flatten()
                seen[i].append(float(a.kthvalue(max(1, math.ceil(value * a.numel()))).values))
            if step == 49:
                opt.param_groups[0]["l1"] = [sum(v) / len(v) for v in seen]
        elif kind == "push/pull RMS" and (step + 1) % 10 == 0:
            opt.param_groups[0]["l1"] = [value * float(push_of(opt, p).square().mean().sqrt()) for p in weights]
        elif kind == "push averaged over 10 steps":
            pushes = [push_of(opt, p).double() for p in weights]
            summed = pushes if summed is None else [a + b for a, b in zip(summed, pushes)]
            if (step + 1) % 10 == 0:
                means = [(a / 10).abs().flatten() for a in summed]
                opt.param_groups[0]["l1"] = [float(a.kthvalue(max(1, math.ceil(value * a.numel()))).values)
                                             for a in means]
                summed = None
    zeros = sum(int((p == 0).sum()) for p in weights)
    return zeros / sum(p.numel() for p in weights)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/strength-spread")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = informative_features(num_informative=8, num_noise=120, sizes=(400, 400, 1000), seed=0)
    names = [f"{n}{'-pre' if pre else ''}" for n, _, _, pres in CONFIGS for pre in pres]
    rows = []
    for kind, value in SETTINGS:
        got = [run(data, cls, kw, pre, kind, value) for _, cls, kw, pres in CONFIGS for pre in pres]
        lo, hi = min(got), max(got)
        rows.append({"setting": kind, "value": value, "sparsity": dict(zip(names, got)),
                     "spread": (hi / lo) if lo > 0 else None})
        print(f"{kind:24s} {value:<6g} spread {rows[-1]['spread'] if lo > 0 else 'inf'}", flush=True)
    meta = {"task": "demo mlp (seed 0), 500 full-batch steps", "torch": torch.__version__,
            "machine": platform.processor() or platform.machine()}
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    head = "| setting | value | spread | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (len(names) + 3)]
    for r in rows:
        sp = "inf (some 0)" if r["spread"] is None else f"{r['spread']:.1f}x"
        lines.append(f"| {r['setting']} | {r['value']:g} | {sp} | "
                     + " | ".join(f"{100 * r['sparsity'][n]:.1f}%" for n in names) + " |")
    with open(args.out + ".md", "w") as f:
        f.write(f"Fraction of exact zeros of the weights, {meta['task']}, torch {meta['torch']}; "
                "spread: largest over smallest. Regenerate: `python bench/strength_spread.py`.\n\n")
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
