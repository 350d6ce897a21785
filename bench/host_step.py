"""Host time of one optimizer step on the demo's MLP (CPU): pyreg.Regularized
around torch's Adam (also with an l1_strength), pyreg.optim.AdamW with L1
(with a target_sparsity or an l1_strength instead, and with an l2_bound),
and the bare torch optimizers,
timed in interleaved rounds in one process (median and min over rounds of the
per-step time of ``opt.step()`` alone; the grads are set once). ``--cpu-time``
times the calling thread's CPU time instead of the wall clock (with one torch
thread: what the step itself costs, less sensitive to other load).

``--whole`` times a whole training step instead (zero_grad, the forward
and backward pass of a batch of 256, then the step) of torch's Adam, torch's
Adam on pyreg's two param groups, Regularized around it, and pyreg's fused
Adam with L1, with each one's ratio to torch's Adam: what a regularized
training loop costs over a plain one.

``--group`` times the group-lasso rows instead (group lasso over each
weight's input columns, with a given ``group_l1`` and with
``group_strength``, in both families), with torch's Adam.
``--preconditioned`` times pyreg.optim.AdamW with the prox in Adam's
metric instead, with L1 and with a ``target_sparsity`` (met in that
metric), with torch's Adam.

Each row with a base (the same step without the new key: ``over`` names
it) also gets the median over rounds of its time minus its base's, in µs:
the host cost of ``target_sparsity`` (plain and preconditioned),
``l2_bound``, ``l1_strength`` and ``group_strength`` per step, and of
``Regularized`` over torch's Adam on
the same param groups.
``--out PATH`` also writes the table to ``PATH.md`` (with the CPU, torch
and the command), as bench/results/ keeps it.

    python bench/host_step.py [--rounds 15] [--steps 200] [--cpu-time] [--whole | --group | --preconditioned]
                              [--out PATH]
"""
import argparse
import statistics
import sys
import time

import torch

import pyreg
from pyreg.demo.study import MLP


def build(kind: str, model: torch.nn.Module):
    groups = pyreg.param_groups(model, l1=1e-4)
    if kind == "torch Adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    if kind == "torch Adam, pyreg's groups":
        return torch.optim.Adam(groups, lr=1e-3)
    if kind == "pyreg.optim.Adam(l1)":
        return pyreg.optim.Adam(groups, lr=1e-3)
    if kind == "Regularized(torch Adam)":
        return pyreg.Regularized(torch.optim.Adam(groups, lr=1e-3))
    if kind == "torch AdamW(fused)":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    if kind == "pyreg.optim.AdamW(l1)":
        return pyreg.optim.AdamW(groups, lr=1e-3)
    if kind == "pyreg.optim.AdamW(target_sparsity)":
        return pyreg.optim.AdamW(pyreg.param_groups(model, overrides={"*": {"target_sparsity": 0.5}}), lr=1e-3)
    if kind == "pyreg.optim.AdamW(l1,l2_bound)":
        return pyreg.optim.AdamW(pyreg.param_groups(model, l1=1e-4, overrides={"*": {"l2_bound": 1.0}}), lr=1e-3)
    if kind == "pyreg.optim.AdamW(l1_strength)":
        return pyreg.optim.AdamW(pyreg.param_groups(model, l1_strength=0.8), lr=1e-3)
    if kind == "Regularized(torch Adam, l1_strength)":
        return pyreg.Regularized(torch.optim.Adam(pyreg.param_groups(model, l1_strength=0.8), lr=1e-3))
    if kind in PRECONDITIONED:  # the prox in Adam's metric
        keys = {"target_sparsity": 0.5} if "target_sparsity" in kind else {"l1": 1e-4}
        return pyreg.optim.AdamW(pyreg.param_groups(model, overrides={"*": keys}), lr=1e-3, preconditioned=True)
    if kind in GROUP:  # group lasso over each weight's input columns: a given group_l1, or group_strength
        key, value = ("group_strength", 0.5) if "group_strength" in kind else ("group_l1", 1e-4)
        groups = pyreg.param_groups(model, overrides={"*weight": {key: value, "group_dim": 1}})
        if kind.startswith("Regularized"):
            return pyreg.Regularized(torch.optim.Adam(groups, lr=1e-3))
        return pyreg.optim.AdamW(groups, lr=1e-3)
    raise ValueError(kind)


#: The group-lasso rows (``--group``): each weight's input columns.
GROUP = ("pyreg.optim.AdamW(group_l1)", "pyreg.optim.AdamW(group_strength)", "Regularized(torch Adam, group_l1)",
         "Regularized(torch Adam, group_strength)")


#: The rows of ``--preconditioned``.
PRECONDITIONED = ("pyreg.optim.AdamW(l1, preconditioned)", "pyreg.optim.AdamW(target_sparsity, preconditioned)")

KINDS = ("torch Adam", "torch Adam, pyreg's groups", "Regularized(torch Adam)", "torch AdamW(fused)",
         "pyreg.optim.AdamW(l1)", "pyreg.optim.AdamW(target_sparsity)", "pyreg.optim.AdamW(l1,l2_bound)",
         "pyreg.optim.AdamW(l1_strength)", "Regularized(torch Adam, l1_strength)")

#: The row each row's extra host time is taken over (the same step without what the row adds).
BASES = {"torch Adam, pyreg's groups": "torch Adam",
         "Regularized(torch Adam)": "torch Adam, pyreg's groups",
         "pyreg.optim.AdamW(target_sparsity)": "pyreg.optim.AdamW(l1)",
         "pyreg.optim.AdamW(l1,l2_bound)": "pyreg.optim.AdamW(l1)",
         "pyreg.optim.AdamW(l1_strength)": "pyreg.optim.AdamW(l1)",
         "Regularized(torch Adam, l1_strength)": "Regularized(torch Adam)",
         "pyreg.optim.AdamW(group_strength)": "pyreg.optim.AdamW(group_l1)",
         "Regularized(torch Adam, group_strength)": "Regularized(torch Adam, group_l1)",
         "pyreg.optim.AdamW(target_sparsity, preconditioned)": "pyreg.optim.AdamW(l1, preconditioned)"}


WHOLE = ("torch Adam", "torch Adam, pyreg's groups", "Regularized(torch Adam)", "pyreg.optim.Adam(l1)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--cpu-time", action="store_true", help="thread CPU time, one torch thread")
    ap.add_argument("--whole", action="store_true", help="a whole training step: zero_grad, forward, backward, step")
    ap.add_argument("--group", action="store_true",
                    help="the group-lasso rows (a given group_l1, group_strength) with torch's Adam, in place of "
                         "the others")
    ap.add_argument("--preconditioned", action="store_true",
                    help="pyreg.optim.AdamW with the prox in Adam's metric, with l1 and with target_sparsity, with "
                         "torch's Adam, in place of the others")
    ap.add_argument("--out", help="also write the table to OUT.md")
    args = ap.parse_args()
    if args.rounds < 1 or args.steps < 1:
        ap.error("--rounds and --steps must be >= 1")
    clock = time.perf_counter
    if args.cpu_time:
        torch.set_num_threads(1)
        clock = time.thread_time
    torch.manual_seed(0)
    x, y = torch.randn(256, 128), torch.randint(0, 2, (256,))
    runs = {}
    if args.whole + args.group + args.preconditioned > 1:
        ap.error("--whole, --group and --preconditioned are exclusive")
    for kind in (WHOLE if args.whole else ("torch Adam",) + GROUP if args.group
                 else ("torch Adam",) + PRECONDITIONED if args.preconditioned else KINDS):
        model = MLP(128, 2)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-2
        opt = build(kind, model)
        if args.whole:
            def step(model=model, opt=opt):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        else:
            step = opt.step
        for _ in range(20):
            step()
        runs[kind] = (step, [])
    for _ in range(args.rounds):
        for kind, (step, times) in runs.items():
            t0 = clock()
            for _ in range(args.steps):
                step()
            times.append((clock() - t0) / args.steps * 1e6)
    what = "whole training step" if args.whole else "step"
    head = (f"torch {torch.__version__}, {torch.get_num_threads()} thread{'' if torch.get_num_threads() == 1 else 's'}, {args.rounds} rounds x {args.steps} "
            f"steps, µs per {what} ({'thread CPU time' if args.cpu_time else 'wall'})")
    base = runs["torch Adam"][1]
    lines = ["| optimizer | min | median | max | / Adam | over | µs over it |", "|---|---:|---:|---:|---:|---|---:|"]
    print(head)
    print(f"{'optimizer':38s} {'min':>7s} {'median':>7s} {'max':>7s} {'/ Adam':>7s}  {'µs over':>8s}  (ratios and "
          "differences: medians over the rounds)")
    for kind, (_, t) in runs.items():
        ratio = statistics.median(a / b for a, b in zip(t, base))
        over = BASES.get(kind) if BASES.get(kind) in runs else None
        extra = statistics.median(a - b for a, b in zip(t, runs[over][1])) if over else None
        print(f"{kind:38s} {min(t):7.1f} {statistics.median(t):7.1f} {max(t):7.1f} {ratio:7.3f}  "
              + (f"{extra:+8.1f}  over {over}" if over else ""))
        lines.append(f"| {kind} | {min(t):.1f} | {statistics.median(t):.1f} | {max(t):.1f} | {ratio:.3f} | "
                     + (f"{over} | {extra:+.1f} |" if over else "| |"))
    if args.out:
        from pyreg.bench.suite import cpu_name  # noqa: PLC0415 (only for --out)
        cpu = cpu_name()
        with open(args.out + ".md", "w") as f:
            f.write(f"Host time per optimizer {what} on the demo's MLP (128-32-32-2, 6 tensors), {cpu}; {head}. "
                    f"Regenerate: `python bench/host_step.py {' '.join(sys.argv[1:])}`.\n\n")
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
