"""What the study shows the user: a progress bar, the results table, the
grid-search winners, CSV / JSON files and PNG plots."""
from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Sequence
from typing import IO

# --------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------


class Progress:
    """tqdm's progress bar (steps, rate, ETA, the run and its loss) on a
    terminal; otherwise one line per finished run, for logs."""

    def __init__(self, stream: IO[str] = sys.stderr, mininterval: float = 0.1):
        self.stream, self.mininterval = stream, mininterval
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.total, self.done, self.bar = 1, 0, None

    @property
    def wants_loss(self) -> bool:
        """Whether the bar shows the training loss (a host read per tick)."""
        return self.tty

    def start(self, total_steps: int) -> None:
        self.total, self.done = max(1, total_steps), 0
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit="step", file=self.stream, dynamic_ncols=True,
                            leave=False, mininterval=self.mininterval)

    def advance(self, steps: int, label: str, loss: float | None) -> None:
        self.done += steps
        if self.bar is not None:
            self.bar.set_description(label, refresh=False)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            self.bar.update(steps)

    def run_done(self, label: str, result: dict, seconds: float) -> None:
        if self.bar is None:
            self.stream.write(f"[{self.done * 100 // self.total:3d}%] {label}: "
                              f"val acc {result['val_acc']:.3f} ({seconds:.1f} s)\n")
            self.stream.flush()

    def note(self, message: str, seconds: float) -> None:
        """One line for a step outside the bar (the fine-tuning runs)."""
        if self.bar is not None:
            self.bar.write(f"{message} ({seconds:.1f} s)", file=self.stream)
        else:
            self.stream.write(f"{message} ({seconds:.1f} s)\n")
            self.stream.flush()

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------
TABLE_COLUMNS = [  # (header, key, format)
    ("task", "task", "{}"), ("method", "method", "{}"), ("alpha", "alpha", "{:g}"),
    ("train", "train_acc", "{:.3f}"), ("val", "val_acc", "{:.3f}"), ("gap", "gap", "{:+.3f}"),
    ("test", "test_acc", "{:.3f}"), ("sparsity", "sparsity", "{:.1%}"),
    ("inputs", "inputs_used", "{}"), ("noise 0", "noise_zeroed", "{}"),
    ("prec", "precision", "{:.2f}"), ("recall", "recall", "{:.2f}"),
]


FINETUNE_COLUMNS = [
    ("task", "task", "{}"), ("method", "method", "{}"), ("alpha", "alpha", "{:g}"),
    ("new train", "new_train_acc", "{:.3f}"), ("new val", "new_val_acc", "{:.3f}"),
    ("new test", "new_test_acc", "{:.3f}"), ("old test", "old_test_acc", "{:.3f}"),
    ("drift", "drift", "{:.3f}"), ("winner", "selected", "{}"),
]


#: The breast cancer task: inputs kept, noise inputs zeroed, the share of real
#: features among the kept inputs (prec) and how many kept inputs are of the
#: larger-scale half (large).
CANCER_COLUMNS = [
    ("task", "task", "{}"), ("method", "method", "{}"), ("alpha", "alpha", "{:g}"),
    ("train", "train_acc", "{:.3f}"), ("val", "val_acc", "{:.3f}"), ("test", "test_acc", "{:.3f}"),
    ("sparsity", "sparsity", "{:.1%}"), ("inputs", "inputs_used", "{}"), ("noise 0", "noise_zeroed", "{}"),
    ("prec", "precision", "{:.2f}"), ("large", "kept_large_scale", "{}"),
]

#: The vowels task: real channels kept and noise channels zeroed (whole columns
#: of the LSTM's input weight).
VOWELS_COLUMNS = [
    ("task", "task", "{}"), ("method", "method", "{}"), ("alpha", "alpha", "{:g}"),
    ("train", "train_acc", "{:.3f}"), ("val", "val_acc", "{:.3f}"), ("test", "test_acc", "{:.3f}"),
    ("sparsity", "sparsity", "{:.1%}"), ("real", "informative_kept", "{}"), ("noise 0", "noise_zeroed", "{}"),
]

#: The digits task: pixels (inputs) the first layer still reads.
DIGITS_COLUMNS = [
    ("task", "task", "{}"), ("method", "method", "{}"), ("alpha", "alpha", "{:g}"),
    ("train", "train_acc", "{:.3f}"), ("val", "val_acc", "{:.3f}"), ("test", "test_acc", "{:.3f}"),
    ("sparsity", "sparsity", "{:.1%}"), ("pixels", "inputs_used", "{}"),
]


def _cell(r: dict, key: str, fmt: str) -> str:
    if key == "alpha" and r["method"] in ("none", "pretrained", "target"):  # strength: alpha is the strength
        return "-"
    if key == "selected":
        return "*" if r[key] and r["method"] != "pretrained" else ""
    if key not in r:
        return "-"
    if key == "inputs_used":
        return f"{r['inputs_used']}/{r['num_informative'] + r['num_noise']}"
    if key == "noise_zeroed":
        return f"{r['noise_zeroed']}/{r['num_noise']}"
    if key == "informative_kept":
        return f"{r['informative_kept']}/{r['num_informative']}"
    if key == "kept_large_scale":
        return f"{r['kept_large_scale']}/{r['inputs_used']}"
    return fmt.format(r[key])


def format_table(rows: Sequence[dict], columns=TABLE_COLUMNS) -> str:
    """A plain-text table, one line per result."""
    cells = [[h for h, _, _ in columns]] + [[_cell(r, k, f) for _, k, f in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(ln.rstrip() for ln in lines)


def format_target_table(rows: Sequence[dict]) -> str:
    """Per layer of each ``target`` run: the target sparsity and the achieved one."""
    lines = []
    for r in rows:
        for name, t in r.get("targets", {}).items():
            got = r["layers"][name]["sparsity"]
            lines.append([r["task"], name, f"{t:.1%}", f"{got:.1%}", f"{r['val_acc']:.3f}", f"{r['test_acc']:.3f}"])
    cells = [["task", "layer", "target", "achieved", "val", "test"]] + lines
    widths = [max(len(c[i]) for c in cells) for i in range(6)]
    out = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
           for row in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(ln.rstrip() for ln in out)


#: The demo's methods that stand in for a grid search, and the grid-searched method of each.
STRENGTH_GRIDS = {"strength": "l1", "group-strength": "group", "path": "l1"}


def format_strength_table(rows: Sequence[dict]) -> str:
    """Per task and method that stands in for a grid search (``strength``,
    ``group-strength``: one run; ``path``: the runs its ``runs`` says)
    against the grid search of the same penalty (``l1``, ``group``; its
    winner by validation accuracy, ties to the larger alpha, and the number
    of runs it took): the method's setting (the strength, or the alpha the
    path picked), its runs, accuracies, inputs used, and the difference in
    validation accuracy (points)."""
    lines = []
    for rule in [r for r in rows if r["method"] in STRENGTH_GRIDS]:
        grid = [r for r in rows if r["task"] == rule["task"] and r["method"] == STRENGTH_GRIDS[rule["method"]]]
        setting = f"alpha {rule['alpha']:g}" if rule["method"] == "path" else f"{rule['alpha']:g}"
        own = [rule["task"], rule["method"], setting, f"{round(rule.get('runs', 1), 2):g}",
               f"{rule['val_acc']:.3f}", f"{rule['test_acc']:.3f}", _cell(rule, "inputs_used", "{}")]
        if not grid:  # the grid was not run: the method's own columns
            lines.append(own + [STRENGTH_GRIDS[rule["method"]] + " (not run)"] + ["-"] * 6)
            continue
        best = max(grid, key=lambda r: (r["val_acc"], r["alpha"]))
        lines.append(own + [best["method"], f"{best['alpha']:g}", str(len(grid)), f"{best['val_acc']:.3f}",
                            f"{best['test_acc']:.3f}", _cell(best, "inputs_used", "{}"),
                            f"{100 * (rule['val_acc'] - best['val_acc']):+.1f}"])
    head = ["task", "method", "setting", "runs", "val", "test", "inputs", "grid", "alpha", "runs", "val", "test",
            "inputs", "val diff"]
    cells = [head] + lines
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) if i in (0, 1, 7) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
           for row in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(ln.rstrip() for ln in out)


def format_layer_grid_table(rows: Sequence[dict], layer_rows: Sequence[dict], task: str = "mlp") -> str:
    """``--full``: on ``task``, the winner (best validation accuracy, ties to
    the larger alphas) of the L1 grid with one alpha, of the exhaustive grid
    with an alpha per layer (``layer_rows``), the one ``strength`` and ``path`` runs, and
    (where they ran) the group-lasso grid's winner and the one
    ``group-strength`` run: alphas, runs, accuracies, sparsity, inputs used."""
    def best(rs):
        return max(rs, key=lambda r: (r["val_acc"], tuple(r.get("layer_alphas", {}).values()) or (r["alpha"],)))

    lines = []
    grid = [r for r in rows if r["task"] == task and r["method"] == "l1"]
    if grid:
        lines.append(("L1, one alpha", f"{best(grid)['alpha']:g}", len(grid), best(grid)))
    if layer_rows:
        b = best(layer_rows)
        lines.append(("L1, alpha per layer", ",".join(f"{a:g}" for a in b["layer_alphas"].values()), len(layer_rows), b))
    rule = [r for r in rows if r["task"] == task and r["method"] == "strength"]
    if rule:
        lines.append(("l1_strength", f"{rule[0]['alpha']:g}", 1, rule[0]))
    path = [r for r in rows if r["task"] == task and r["method"] == "path"]
    if path:
        lines.append(("L1 path", f"{path[0]['alpha']:g}", f"{round(path[0].get('runs', 1), 2):g}", path[0]))
    ggrid = [r for r in rows if r["task"] == task and r["method"] == "group"]
    if ggrid:
        lines.append(("group lasso, one alpha", f"{best(ggrid)['alpha']:g}", len(ggrid), best(ggrid)))
    grule = [r for r in rows if r["task"] == task and r["method"] == "group-strength"]
    if grule:
        lines.append(("group_strength", f"{grule[0]['alpha']:g}", 1, grule[0]))
    head = ["search", "alphas", "runs", "val", "test", "sparsity", "inputs"]
    cells = [head] + [[name, a, str(n), f"{r['val_acc']:.3f}", f"{r['test_acc']:.3f}", f"{r['sparsity']:.1%}",
                       _cell(r, "inputs_used", "{}")] for name, a, n, r in lines]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    out = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
           for row in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(ln.rstrip() for ln in out)


def format_finetune_table(rows: Sequence[dict]) -> str:
    """The fine-tuning table: the pre-trained model, then one line per run."""
    return format_table(rows, FINETUNE_COLUMNS)


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------
CSV_FIELDS = ["task", "method", "alpha", "l1", "l2", "group_l1", "train_acc", "val_acc", "test_acc", "gap",
              "train_loss", "val_loss", "test_loss", "sparsity", "inputs_used", "informative_kept",
              "noise_zeroed", "num_informative", "num_noise", "precision", "recall", "kept_large_scale"]


def write_csv(path: str, results: Sequence[dict]) -> None:
    """One row per run (scalar fields) plus ``<layer>.l1_norm`` / ``.l2_norm`` /
    ``.sparsity`` columns per layer of the run's task."""
    layer_names: list[str] = []
    for r in results:
        for name in r["layers"]:
            if name not in layer_names:
                layer_names.append(name)
    fields = CSV_FIELDS + [f"{n}.{k}" for n in layer_names for k in ("l1_norm", "l2_norm", "sparsity")]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        for r in results:
            row = {k: r[k] for k in CSV_FIELDS if k in r}
            for n, v in r["layers"].items():
                row.update({f"{n}.{k}": v[k] for k in ("l1_norm", "l2_norm", "sparsity")})
            w.writerow(row)


FINETUNE_CSV_FIELDS = ["task", "method", "alpha", "l2", "new_train_acc", "new_val_acc", "new_test_acc",
                       "old_val_acc", "old_test_acc", "drift", "selected"]


def write_finetune_csv(path: str, rows: Sequence[dict]) -> None:
    """One row per fine-tuning run (the first: the pre-trained model)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FINETUNE_CSV_FIELDS, restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in FINETUNE_CSV_FIELDS if k in r})


def write_json(path: str, config: dict, results: Sequence[dict], winners: Sequence[dict],
               finetune: Sequence[dict] = (), compacted: Sequence[dict] = ()) -> None:
    with open(path, "w") as f:
        json.dump({"config": config, "results": list(results),
                   "winners": [{"task": w["task"], "method": w["method"], "alpha": w["alpha"],
                                "val_acc": w["val_acc"], "test_acc": w["test_acc"]} for w in winners],
                   "finetune": list(finetune), "compact": list(compacted)},
                  f, indent=1)


# --------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------
def load_pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_method(results, task):
    out = {}
    for r in results:
        if r["task"] == task:
            out.setdefault(r["method"], []).append(r)
    return out


def plot_path(plt, path: str, results: Sequence[dict], tasks: Sequence[str]) -> None:
    """Validation accuracy and sparsity against alpha, one line per method
    (``none`` as a dashed horizontal line; ``path`` a point at the alpha it
    picked; the strengths, which have no alpha, are left out)."""
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 7), squeeze=False)
    for col, task in enumerate(tasks):
        groups = _by_method(results, task)
        for row, (key, label) in enumerate((("val_acc", "validation accuracy"), ("sparsity", "sparsity"))):
            ax = axes[row][col]
            alphas = []
            for method, rs in groups.items():
                if method in ("strength", "group-strength"):  # a strength in [0, 1], not an alpha
                    continue
                if method == "none":
                    ax.axhline(rs[0][key], color="k", ls="--", lw=1, label="none")
                    continue
                rs = sorted(rs, key=lambda r: r["alpha"])
                alphas += [r["alpha"] for r in rs]
                ax.plot([r["alpha"] for r in rs], [r[key] for r in rs], "o-", label=method)
            positive = [a for a in alphas if a > 0]
            if positive and len(positive) < len(alphas):  # alpha 0 too: linear around it
                ax.set_xscale("symlog", linthresh=min(positive))
            elif positive:
                ax.set_xscale("log")
            ax.set_xlabel("alpha")
            ax.set_ylabel(label)
            ax.set_title(f"{task}: {label}")
            ax.grid(alpha=0.3)
        if axes[0][col].get_legend_handles_labels()[0]:
            axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_layer_norms(plt, path: str, winners: Sequence[dict], tasks: Sequence[str]) -> None:
    """Per-layer L1 and L2 norms of each method's grid-search winner."""
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 7), squeeze=False)
    for col, task in enumerate(tasks):
        ws = [w for w in winners if w["task"] == task]
        if not ws:
            continue
        names = [n for n in ws[0]["layers"] if ws[0]["layers"][n]["numel"] > 0 and not n.endswith("bias")
                 and "bias_" not in n]
        width = 0.8 / max(1, len(ws))
        for row, key in enumerate(("l1_norm", "l2_norm")):
            ax = axes[row][col]
            for i, w in enumerate(ws):
                xs = [j + i * width for j in range(len(names))]
                label = w["method"] + ("" if w["method"] == "none" else f" ({w['alpha']:g})")
                ax.bar(xs, [w["layers"][n][key] for n in names], width, label=label)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))])
            ax.set_xticklabels(names, rotation=20, fontsize=8)
            if any(w["layers"][n][key] > 0 for w in ws for n in names):
                ax.set_yscale("log")
            ax.set_ylabel(key.replace("_", " "))
            ax.set_title(f"{task}: per-layer {key.split('_')[0].upper()} norm (winners)")
        axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_input_weights(plt, path: str, winners: Sequence[dict], task: str) -> None:
    """L2 norm of each input feature's column of the first layer, per
    method's winner; informative inputs shaded, exact zeros marked."""
    ws = [w for w in winners if w["task"] == task]
    if not ws:
        return
    fig, axes = plt.subplots(len(ws), 1, figsize=(10, 1.8 * len(ws) + 0.6), sharex=True, squeeze=False)
    for ax, w in zip(axes[:, 0], ws):
        norms = w["input_weight_norms"]
        n_inf = w["num_informative"]
        ax.axvspan(-0.5, n_inf - 0.5, color="tab:green", alpha=0.15)
        colors = ["tab:green" if j < n_inf else "tab:gray" for j in range(len(norms))]
        ax.bar(range(len(norms)), norms, color=colors, width=1.0)
        zeros = [j for j, v in enumerate(norms) if v == 0]
        ax.plot(zeros, [0] * len(zeros), "|", color="tab:red", ms=6)
        label = w["method"] + ("" if w["method"] == "none" else f" alpha={w['alpha']:g}")
        ax.set_title(f"{label}: {w['inputs_used']} inputs used, {w['noise_zeroed']}/{w['num_noise']} "
                     f"noise inputs exactly 0 (red), "
                     f"precision {w['precision']:.2f}, recall {w['recall']:.2f}", fontsize=9)
        ax.set_ylabel("column norm", fontsize=8)
    axes[-1][0].set_xlabel(f"input feature (green: informative 0..{ws[0]['num_informative'] - 1}, gray: noise)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PANEL_INCHES, PNG_DPI = 2.2, 110  # digits_pixels.png: width of one panel, resolution


def plot_digit_pixels(plt, path: str, rows: Sequence[dict], side: int = 8) -> list[str]:
    """One 8 x 8 image per run, side by side: the norm of each pixel's column
    of the first layer (darker: larger), exact zeros marked with a red dot.
    Returns the panels' labels, left to right."""
    import numpy as np

    fig, axes = plt.subplots(1, len(rows), figsize=(PANEL_INCHES * len(rows), PANEL_INCHES + 0.45), squeeze=False)
    labels = []
    for ax, r in zip(axes[0], rows):
        norms = np.asarray(r["input_weight_norms"], dtype=float).reshape(side, side)
        ax.imshow(norms, cmap="Greys", interpolation="nearest")
        zeros = sorted(set(range(side * side)) - set(r["inputs_kept"]))  # whole column exactly 0
        ax.plot([j % side for j in zeros], [j // side for j in zeros], "o", color="tab:red", ms=4)
        label = r["method"] + ("" if r["method"] in ("none", "target") else f" alpha={r['alpha']:g}")
        labels.append(label)
        ax.set_title(f"{label}\n{r['inputs_used']}/{side * side} pixels, test {r['test_acc']:.3f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=PNG_DPI)
    plt.close(fig)
    return labels


def write_all(out_dir: str, config: dict, results: Sequence[dict], winners: Sequence[dict],
              finetune: Sequence[dict] = (), compacted: Sequence[dict] = (), real: Sequence[dict] = (),
              real_winners: Sequence[dict] = (), pixel_panels: Sequence[dict] = ()) -> list[str]:
    """Every output file; returns their paths. ``real`` / ``real_winners``:
    the real-data tasks' runs and winners (in the CSV and JSON after the
    study's; not in the study's plots); ``pixel_panels``: the digits runs
    drawn in ``digits_pixels.png``."""
    os.makedirs(out_dir, exist_ok=True)
    plt = load_pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in results))
    paths = {name: os.path.join(out_dir, name) for name in
             ("results.csv", "results.json", "finetune.csv", "regularization_path.png", "layer_norms.png",
              "input_weights.png", "digits_pixels.png")}
    write_csv(paths["results.csv"], list(results) + list(real))
    if pixel_panels:
        config = {**config, "digits_pixels_panels": plot_digit_pixels(plt, paths["digits_pixels.png"], pixel_panels)}
    else:
        del paths["digits_pixels.png"]
    write_json(paths["results.json"], config, list(results) + list(real), list(winners) + list(real_winners),
               finetune, compacted)
    if finetune:
        write_finetune_csv(paths["finetune.csv"], finetune)
    else:
        del paths["finetune.csv"]
    if any(r["method"] not in ("none", "strength", "group-strength") for r in results):
        plot_path(plt, paths["regularization_path.png"], results, tasks)
    else:  # no method with an alpha: nothing to draw against it
        del paths["regularization_path.png"]
    plot_layer_norms(plt, paths["layer_norms.png"], winners, tasks)
    if "mlp" in tasks:
        plot_input_weights(plt, paths["input_weights.png"], winners, "mlp")
    else:
        del paths["input_weights.png"]
    for name in ("finetune.csv", "regularization_path.png", "input_weights.png", "digits_pixels.png"):
        if name not in paths:
            drop_stale(os.path.join(out_dir, name))
    return list(paths.values())


def drop_stale(path: str) -> None:
    """Remove an output file of the demo's that this run did not write (an
    earlier run's, which would pass for this one's)."""
    if os.path.isfile(path):
        os.remove(path)
