"""The methods of ``pyreg demo`` that stand in for the L1 grid search,
against it, over several initial weights: on each of the demo's tasks (mlp,
lstm, cancer-raw, cancer-std, digits; their data as the demo makes it with
seed 0), for each seed of the model's initial weights, the L1 grid's winner
(the task's alphas; the best validation accuracy, ties to the larger alpha),
``l1_strength`` at the demo's strength (one run) and the demo's ``path``
method (``pyreg.path`` in a fifth of the grid's steps: with 8 alphas or
more a path, then one run at its one-standard-error alpha; else the path in
one run). It reports, per task and method, the runs it took and the mean
and standard error over the seeds of its validation and test accuracy minus
the grid winner's, in points.

One seed compares a single draw: the grid winner's validation accuracy is
the best of several runs, each a few points apart from run to run, so the
difference of one seed says little. Writes
``bench/results/strength-seeds.{json,md}``.

    python bench/strength_seeds.py [--seeds 10] [--out bench/results/strength-seeds]
"""
import argparse
import json
import math
import platform
import statistics
import time

import torch

from pyreg.demo import CANCER, DEFAULT_ALPHAS, DIGITS, cpu_training, fixed_cpu_paths, make_real_tasks, make_tasks

METHODS = ("strength", "path")


def grids():
    return {"mlp": DEFAULT_ALPHAS, "lstm": DEFAULT_ALPHAS, "cancer-raw": CANCER["alphas"],
            "cancer-std": CANCER["alphas"], "digits": DIGITS["alphas"]}


def one_seed(task, alphas, seed, device):
    """{method: (val, test)} for the grid winner ("grid") and each one-run method."""
    from pyreg.demo.study import STRENGTH, train_one

    runs = [train_one(task, "l1", a, seed, device) for a in alphas]
    win = max(runs, key=lambda r: (r["val_acc"], r["alpha"]))
    out = {"grid": (win["val_acc"], win["test_acc"], win["alpha"])}
    r = train_one(task, "strength", STRENGTH, seed, device)
    out["strength"] = (r["val_acc"], r["test_acc"], STRENGTH)
    r = train_one(task, "path", 0.0, seed, device, alphas=alphas)
    out["path"] = (r["val_acc"], r["test_acc"], r["alpha"], r["runs"])
    return out


def summary(diffs):
    """(mean, standard error) of a list of differences, in points."""
    m = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return 100 * m, 100 * se


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--out", default="bench/results/strength-seeds")
    args = ap.parse_args()
    if args.seeds < 2:
        ap.error("--seeds must be >= 2 (a standard error needs two)")
    t0 = time.perf_counter()
    device = torch.device("cpu")
    with fixed_cpu_paths():
        tasks = make_tasks(False, 0)
        cancer, digits = make_real_tasks(0)
        alphas = grids()
        per_task = {}
        with cpu_training(device):
            for task in tasks + cancer + [digits]:
                seeds = [one_seed(task, alphas[task.name], s, device) for s in range(args.seeds)]
                per_task[task.name] = seeds
                print(task.name, [(round(s["grid"][0], 3), round(s["strength"][0], 3), round(s["path"][0], 3))
                                  for s in seeds], flush=True)
    from pyreg.demo.study import STRENGTH

    rows = []
    for name, seeds in per_task.items():
        row = {"task": name, "runs_grid": len(alphas[name]), "grid_val": statistics.fmean(s["grid"][0] for s in seeds),
               "grid_test": statistics.fmean(s["grid"][1] for s in seeds), "runs_path": seeds[0]["path"][3]}
        for m in METHODS:
            row[m] = {"val": summary([s[m][0] - s["grid"][0] for s in seeds]),
                      "test": summary([s[m][1] - s["grid"][1] for s in seeds])}
        rows.append(row)
    meta = {"seeds": args.seeds, "strength": STRENGTH, "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "seconds": round(time.perf_counter() - t0, 1)}
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "runs": per_task}, f, indent=1)
    lines = ["| task | grid runs | grid val | grid test | strength val | strength test | path runs | path val | "
             "path test |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [f"{r[m][k][0]:+.1f} ± {r[m][k][1]:.1f}" for m in METHODS for k in ("val", "test")]
        cells.insert(2, f"{round(r['runs_path'], 2):g}")
        lines.append(f"| {r['task']} | {r['runs_grid']} | {r['grid_val']:.3f} | {r['grid_test']:.3f} | "
                     + " | ".join(cells) + " |")
    with open(args.out + ".md", "w") as f:
        f.write(f"The demo's methods that stand in for the L1 grid, against its winner (best validation "
                f"accuracy), over {args.seeds} seeds of the initial weights (the data of seed 0): the mean over "
                f"the seeds of each method's accuracy minus the grid winner's, in points, ± its standard error; "
                f"`l1_strength` {STRENGTH} (one run), `path` in a fifth of the grid's steps (path runs: with 8 "
                f"alphas or more a path, then one run at its one-standard-error alpha; else the path in one "
                f"run). torch {meta['torch']}, "
                f"{meta['seconds']} s. Regenerate: `python bench/strength_seeds.py --seeds {args.seeds}`.\n\n")
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
