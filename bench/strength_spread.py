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
  l1): the rule with its push summed at every step;
* ``target_sparsity`` (the fraction of exact zeros itself, on every
  regularized weight; with ``preconditioned``, in the optimizer's metric).

For each setting: the fraction of exact zeros of the weights per
configuration, and the spread (largest over smallest), and each run's
validation accuracy. Writes ``bench/results/strength-spread.{json,md}``.

``--steps N`` trains N steps instead of 500, and ``--batch B`` draws a
minibatch of B training samples at each step (seeded, the same draws for
every run) instead of the full batch: both run the fixed ``l1`` and the
``l1_strength`` settings only, and write ``strength-spread-{N}steps`` or
``strength-spread-batch{B}`` (both in the name where both are given).

    python bench/strength_spread.py [--steps N] [--batch B] [--out PATH]
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
    + [("push averaged over 10 steps", v) for v in (0.3, 0.5, 0.7, 0.8, 0.9)] \
    + [("target_sparsity", v) for v in (0.3, 0.5, 0.7, 0.8, 0.9)]


def push_of(opt, p, before):
    """The push of p by the optimizer's last step, read as the rule does
    (``before``: p before the step, for a decay's term)."""
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    return opt._push(p, opt.state[p], group, group["preconditioned"],
                     before if opt._push_needs_before(group) else None)


def run(data, cls, kw, pre, kind, value, steps=STEPS, batch=None):
    """(fraction of exact zeros of the weights, validation accuracy, phi) after training."""
    torch.manual_seed(0)
    model = MLP(data.num_features, data.num_classes)
    if kind == "fixed l1":
        groups = pyreg.param_groups(model, l1=value)
    elif kind == "l1_strength":
        groups = pyreg.param_groups(model, l1_strength=value)
    elif kind == "target_sparsity":
        groups = pyreg.param_groups(model, overrides={"*": {"target_sparsity": value}})
    else:
        groups = pyreg.param_groups(model)
    opt = cls(groups, preconditioned=pre, **kw)
    weights = [p for g in opt.param_groups for p in g["params"] if p.dim() > 1]
    seen = [[] for _ in weights]
    summed = None
    draws = torch.Generator().manual_seed(1)
    n = data.x_train.shape[0]
    for step in range(steps):
        opt.zero_grad()
        x, y = data.x_train, data.y_train
        if batch is not None:
            idx = torch.randint(0, n, (batch,), generator=draws)
            x, y = x[idx], y[idx]
        nn.functional.cross_entropy(model(x), y).backward()
        before = [p.detach().clone() for p in weights] if kind != "fixed l1" else [None] * len(weights)
        opt.step()
        if kind == "strength measured once" and 25 <= step < 50:
            for i, (p, b) in enumerate(zip(weights, before)):
                a = push_of(opt, p, b).abs().flatten()
                seen[i].append(float(a.kthvalue(max(1, math.ceil(value * a.numel()))).values))
            if step == 49:
                opt.param_groups[0]["l1"] = [sum(v) / len(v) for v in seen]
        elif kind == "push/pull RMS" and (step + 1) % 10 == 0:
            opt.param_groups[0]["l1"] = [value * float(push_of(opt, p, b).square().mean().sqrt())
                                         for p, b in zip(weights, before)]
        elif kind == "push averaged over 10 steps":
            pushes = [push_of(opt, p, b).double() for p, b in zip(weights, before)]
            summed = pushes if summed is None else [a + b for a, b in zip(summed, pushes)]
            if (step + 1) % 10 == 0:
                means = [(a / 10).abs().flatten() for a in summed]
                opt.param_groups[0]["l1"] = [float(a.kthvalue(max(1, math.ceil(value * a.numel()))).values)
                                             for a in means]
                summed = None
    zeros = sum(int((p == 0).sum()) for p in weights)
    with torch.no_grad():
        val = float((model(data.x_val).argmax(1) == data.y_val).double().mean())
    phi = None
    if kind == "l1_strength" and steps % 10 == 0:  # (the last step refreshed each l1 from its push)
        below = live = 0
        for p, b in zip(weights, before):
            on = p.detach() != 0
            below += int((on & (push_of(opt, p, b).abs() < float(opt.state[p]["strength_l1"]))).sum())
            live += int(on.sum())
        phi = below / live if live else None
    return zeros / sum(p.numel() for p in weights), val, phi


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=STEPS, help="training steps per run")
    ap.add_argument("--batch", type=int, default=None, help="minibatch size (default: the full batch)")
    ap.add_argument("--out", default=None, help="output path without extension")
    args = ap.parse_args()
    if args.steps < 1 or (args.batch is not None and args.batch < 1):
        ap.error("--steps and --batch take positive integers")
    variant = args.steps != STEPS or args.batch is not None
    suffix = (f"-{args.steps}steps" if args.steps != STEPS else "") + (f"-batch{args.batch}" if args.batch else "")
    out = args.out or "bench/results/strength-spread" + suffix
    settings = [s for s in SETTINGS if s[0] in ("fixed l1", "l1_strength")] if variant else SETTINGS
    torch.set_num_threads(1)
    data = informative_features(num_informative=8, num_noise=120, sizes=(400, 400, 1000), seed=0)
    names = [f"{n}{'-pre' if pre else ''}" for n, _, _, pres in CONFIGS for pre in pres]
    rows = []
    for kind, value in settings:
        got = [run(data, cls, kw, pre, kind, value, args.steps, args.batch)
               for _, cls, kw, pres in CONFIGS for pre in pres]
        zeros = [z for z, _, _ in got]
        lo, hi = min(zeros), max(zeros)
        rows.append({"setting": kind, "value": value, "sparsity": dict(zip(names, zeros)),
                     "val_acc": dict(zip(names, [v for _, v, _ in got])),
                     "phi": dict(zip(names, [f for _, _, f in got])),
                     "spread": (hi / lo) if lo > 0 else None})
        print(f"{kind:24s} {value:<6g} spread {rows[-1]['spread'] if lo > 0 else 'inf'}", flush=True)
    how = "full-batch" if args.batch is None else f"minibatch ({args.batch} samples)"
    meta = {"task": f"demo mlp (seed 0), {args.steps} {how} steps", "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "steps": args.steps, "batch": args.batch}
    with open(out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    head = "| setting | value | spread | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (len(names) + 3)]
    for r in rows:
        sp = "inf (some 0)" if r["spread"] is None else f"{r['spread']:.1f}x"
        lines.append(f"| {r['setting']} | {r['value']:g} | {sp} | "
                     + " | ".join(f"{100 * r['sparsity'][n]:.1f}%" for n in names) + " |")
    acc = ["| setting | value | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    acc += [f"| {r['setting']} | {r['value']:g} | " + " | ".join(f"{r['val_acc'][n]:.3f}" for n in names) + " |"
            for r in rows]
    flags = (f" --steps {args.steps}" if args.steps != STEPS else "") + (
        f" --batch {args.batch}" if args.batch is not None else "")
    phi = ["| strength | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    phi += [f"| {r['value']:g} | " + " | ".join("-" if r["phi"][n] is None else f"{r['phi'][n]:.2f}" for n in names)
            + " |" for r in rows if r["setting"] == "l1_strength"]
    with open(out + ".md", "w") as f:
        f.write(f"Fraction of exact zeros of the weights, {meta['task']}, torch {meta['torch']}; "
                f"spread: largest over smallest. Regenerate: `python bench/strength_spread.py{flags}`.\n\n")
        f.write("\n".join(lines) + "\n\nValidation accuracy of the same runs:\n\n" + "\n".join(acc) + "\n")
        f.write("\nl1_strength: the share of the nonzero weights pushed less than their tensor's l1 at the last "
                "step (a refresh), phi; a refresh sets l1 so that a fraction s of the weights is pushed less, the "
                "zeros and that share of the others, so the sparsity is about (s - phi) / (1 - phi):\n\n"
                + "\n".join(phi) + "\n")


if __name__ == "__main__":
    main()
