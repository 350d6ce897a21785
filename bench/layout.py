"""Where the tensors lie, and what it costs a CPU pass: ``weight_stats`` and
``prox_`` over GPT-2's 148 tensors (fp32), each allocated on its own (as a
model's parameters are, and as ``pyreg bench`` makes them) and as views of
one buffer (the same shapes, one allocation), each cut from an allocation
4 KB larger than itself, and as the process's first allocations, against
the same-traffic op over one flat buffer (``a.sum()``, ``a.mul_(c)``: the
bench's roofline) and torch's own per-tensor loop of that op over the
separately allocated tensors. Three rotated copies of each, so that no call
finds its data in cache; after the first allocations, each copy of every
variant is made at the same time, so that they lie in memory of the same
kind. Every variant takes its turn call by call, and each percentage is the
median over calls of (roofline time / its time).

    python bench/layout.py [--rounds 6] [--threads N]
"""
import argparse
import statistics
import time

import torch

import pyreg
from pyreg.bench.shapes import SETS

COPIES = 3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.rounds < 1 or args.threads < 0:
        ap.error("--rounds must be >= 1 and --threads >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [s for _, s in SETS["gpt2"].shapes]
    n = sum(int(torch.Size(s).numel()) for s in shapes)
    torch.manual_seed(0)
    # The process's first allocations: on a machine whose free memory is
    # fragmented, the kernel hands them its scattered small blocks first.
    first = [[torch.randn(s) for s in shapes] for _ in range(COPIES)]
    # Then every variant's copy i together, so that each lies in memory of the same kind.
    apart, larger, flat, views = [], [], [], []
    for _ in range(COPIES):
        apart.append([torch.randn(s) for s in shapes])
        # the same tensors, each cut from an allocation 4 KB larger than itself
        larger.append([torch.randn(int(torch.Size(s).numel()) + 1024)[:int(torch.Size(s).numel())].view(s)
                       for s in shapes])
        flat.append(torch.randn(n))
        b, out, at = torch.randn(n), [], 0
        for s in shapes:
            k = int(torch.Size(s).numel())
            out.append(b[at:at + k].view(s))
            at += k
        views.append(out)
    # prox_ with a threshold below every |w| and no L2: it rewrites every value as it was
    cases = {
        "weight_stats": {"roofline": lambda i: flat[i].sum(),
                         "pyreg, separate tensors": lambda i: pyreg.weight_stats(apart[i]),
                         "pyreg, separate, allocated first": lambda i: pyreg.weight_stats(first[i]),
                         "pyreg, separate, 4 KB larger": lambda i: pyreg.weight_stats(larger[i]),
                         "pyreg, views of one buffer": lambda i: pyreg.weight_stats(views[i]),
                         "torch loop, separate tensors": lambda i: [t.sum() for t in apart[i]]},
        "prox_": {"roofline": lambda i: flat[i].mul_(1.0),
                  "pyreg, separate tensors": lambda i: pyreg.prox_(apart[i], 1e-12, 0.0, 1e-12),
                  "pyreg, separate, allocated first": lambda i: pyreg.prox_(first[i], 1e-12, 0.0, 1e-12),
                  "pyreg, separate, 4 KB larger": lambda i: pyreg.prox_(larger[i], 1e-12, 0.0, 1e-12),
                  "pyreg, views of one buffer": lambda i: pyreg.prox_(views[i], 1e-12, 0.0, 1e-12),
                  "torch loop, separate tensors": lambda i: [t.mul_(1.0) for t in apart[i]]},
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, GPT-2 shapes ({n:,} fp32 elements), "
          f"{args.rounds} rounds x {COPIES} copies")
    print(f"{'op':14s} {'variant':34s} {'median ms':>10s} {'% roofline':>11s}")
    for op, variants in cases.items():
        times = {k: [] for k in variants}
        for _ in range(args.rounds):
            for i in range(COPIES):
                for k, f in variants.items():
                    t0 = time.perf_counter()
                    f(i)
                    times[k].append(time.perf_counter() - t0)
        base = times["roofline"]
        for k, t in times.items():
            pct = 100 * statistics.median(b / a for a, b in zip(t, base))
            print(f"{op:14s} {k:34s} {statistics.median(t) * 1e3:10.2f} {pct:11.1f}")


if __name__ == "__main__":
    main()
