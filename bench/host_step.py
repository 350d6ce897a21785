"""Host time of one optimizer step on the demo's MLP (CPU): pyreg.Regularized
around torch's Adam (also with an l1_strength), pyreg.optim.AdamW with L1
(with a target_sparsity or an l1_strength instead, and with an l2_bound),
and the bare torch optimizers,
timed in interleaved rounds in one process (median and min over rounds of the
per-step time of ``opt.step()`` alone; the grads are set once). ``--cpu-time``
times the calling thread's CPU time instead of the wall clock (with one torch
thread: what the step itself costs, less sensitive to other load).

    python bench/host_step.py [--rounds 15] [--steps 200] [--cpu-time]
"""
import argparse
import statistics
import time

import torch

import pyreg
from pyreg.demo.study import MLP


def build(kind: str, model: torch.nn.Module):
    groups = pyreg.param_groups(model, l1=1e-4)
    if kind == "torch Adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3)
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
    raise ValueError(kind)


KINDS = ("torch Adam", "Regularized(torch Adam)", "torch AdamW(fused)", "pyreg.optim.AdamW(l1)",
         "pyreg.optim.AdamW(target_sparsity)", "pyreg.optim.AdamW(l1,l2_bound)", "pyreg.optim.AdamW(l1_strength)",
         "Regularized(torch Adam, l1_strength)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--cpu-time", action="store_true", help="thread CPU time, one torch thread")
    args = ap.parse_args()
    clock = time.perf_counter
    if args.cpu_time:
        torch.set_num_threads(1)
        clock = time.thread_time
    torch.manual_seed(0)
    runs = {}
    for kind in KINDS:
        model = MLP(128, 2)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-2
        opt = build(kind, model)
        for _ in range(20):
            opt.step()
        runs[kind] = (opt, [])
    for _ in range(args.rounds):
        for kind, (opt, times) in runs.items():
            t0 = clock()
            for _ in range(args.steps):
                opt.step()
            times.append((clock() - t0) / args.steps * 1e6)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.steps} steps, µs per step ({'thread CPU time' if args.cpu_time else 'wall'})")
    print(f"{'optimizer':36s} {'min':>8s} {'median':>8s} {'max':>8s}")
    for kind, (_, t) in runs.items():
        print(f"{kind:36s} {min(t):8.1f} {statistics.median(t):8.1f} {max(t):8.1f}")


if __name__ == "__main__":
    main()
