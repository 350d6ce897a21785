"""``pyreg demo``: a regularization study on data that needs no download.

Two tasks, each trained with no penalty and with L1, L2, elastic net, a
per-layer-alpha variant and group lasso on the input layer over a grid of
alphas, all through pyreg's fused optimizers (``pyreg.optim.SGD`` and
``pyreg.optim.Adam``: the update and the proximal step in one pass; exact zeros
for L1, whole zero input columns for group lasso):

* ``mlp``: an MLP on a classification set with 8 informative inputs and 120
  pure-noise inputs, few training samples (the unregularized net over-fits).
  Which inputs does the first layer still use?
* ``lstm``: a small LSTM on generated sequences (10 steps, 6 channels) whose
  label depends on two channels, with 10% label noise and 200 training
  sequences.

Each task also runs ``strength`` once: ``pyreg.param_groups(model,
l1_strength=STRENGTH)``, every layer's ``l1`` set from its own push (the
optimizer's step) every 10 steps, the same strength for every task; and
``group-strength`` once: ``group_strength=GROUP_STRENGTH`` on the input
layer's columns; and ``path``: :func:`pyreg.path` over the task's L1 grid
from the smallest alpha up in a fifth of the grid's training steps (at
least one run's): with 8 alphas or more, a path in what one run leaves,
then that run at the alpha the path picked (the largest within one standard
error of the best validation accuracy); else the path in one run's steps,
its best fit kept. A table compares them with the L1 and group-lasso grid
searches and the runs each took.

Then a fine-tuning task: an MLP pre-trained on one generated task is
fine-tuned, with a new head, on a small related task (same inputs, one class
split in two) with no penalty, L2 toward 0 and L2-SP (L2 toward the
pre-trained weights, ``pyreg.param_groups(ref=...)``) over ``FINETUNE_ALPHAS``;
it reports new-task accuracy and old-task accuracy with the old head
(retention).

Then two real data sets that ship with scikit-learn (``CANCER``, ``DIGITS``):

* ``cancer-raw`` / ``cancer-std``: breast cancer (30 features whose scales
  span five orders of magnitude) plus 30 noise inputs (shuffled copies of
  the real features), on raw and on standardized inputs, with no penalty,
  L1 and group lasso: on raw inputs what a penalty keeps follows the
  inputs' scale, on standardized inputs group lasso removes the noise.
* ``digits``: 8 x 8 images; L1 and group lasso (which pixels the first
  layer still reads, drawn in ``digits_pixels.png``), and ``target_sparsity``
  per layer (``target``: the fraction of exact zeros asked, and achieved).

Then, when the ``sequences`` extra is installed (``pip install
"pyreg[sequences]"``: the aeon package, whose wheel ships the data; aeon is
not imported, its ``.ts`` files are read directly), a real sequence set for
the LSTM (``VOWELS``):

* ``vowels``: JapaneseVowels (12 channels of speech features per frame, 9
  speakers) plus 12 pure-noise channels, with no penalty, L1 and group lasso
  over the LSTM's input channels. Without the data it prints one line and
  skips it.

Output: a results table, the grid-search winner per method (by validation
accuracy; ties to the larger alpha) with its test accuracy, the fine-tuning
table, the real-data tables, and CSV, JSON and PNG files in ``--out``. See
``pyreg demo --help``.

On the CPU the demo trains with one thread (``torch.set_num_threads(1)``,
restored afterwards): its models are so small that splitting their matrix
products over threads costs more than it gains. So that its numbers are the
same on every x86-64 CPU with AVX2, Intel or AMD, it fixes, before its first
tensor operation, the code paths of torch that round differently from one CPU
to another (:func:`fixed_cpu_paths`), and it trains without oneDNN.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence

import torch

from .. import optim
from .._argtypes import OutputError, choice_list, int_in, output_error, output_folder
from .._validate import nonneg_real
from .study import METHODS

DEFAULT_ALPHAS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # up to under-fitting
QUICK_ALPHAS = (0.003, 0.03, 0.3)
SETTINGS = {  # steps of full-batch training per run
    False: {"mlp_steps": 500, "lstm_steps": 150},
    True: {"mlp_steps": 200, "lstm_steps": 80},
}
#: The fine-tuning task (the same with and without --quick: it is cheap).
FINETUNE = {"old_sizes": (1000, 400, 1000), "new_sizes": (50, 400, 1000), "pretrain_steps": 300,
            "finetune_steps": 200, "finetune_lr": 0.01}
FINETUNE_ALPHAS = (0.1, 1.0, 10.0)
#: ``--full``: the exhaustive per-layer grid on the mlp task, these alphas on each of its 3 weights (125 runs)
LAYER_GRID_ALPHAS = (0.01, 0.03, 0.1, 0.3, 1.0)
#: The real-data tasks, scikit-learn's bundled sets (the same with and without
#: --quick, and not limited by --methods / --alphas: they are cheap). Full
#: batch, SGD with momentum 0.9, ``steps`` steps; the same MLP as ``mlp``.
#: ``cancer``: breast cancer with ``num_noise`` shuffled copies of its
#: features, on raw and on standardized inputs (raw inputs need a 100x smaller
#: learning rate: 0.01 already diverges).
CANCER = {"sizes": (250, 150, 169), "num_noise": 30, "steps": 300, "lr_raw": 1e-3, "lr_std": 0.1,
          "methods": ("none", "l1", "group", "strength", "group-strength", "path"),
          "alphas": (0.03, 0.1, 0.3, 1.0, 3.0)}
#: ``digits``: 8 x 8 images; ``target``: target_sparsity per layer.
DIGITS = {"sizes": (500, 400, 897), "steps": 300, "lr": 0.1,
          "methods": ("none", "l1", "group", "target", "strength", "group-strength", "path"),
          "alphas": (0.01, 0.03, 0.1, 0.3, 1.0), "targets": {"0": 0.9, "2": 0.5}}
#: ``vowels``: the JapaneseVowels sequences (read from the aeon package, the
#: ``sequences`` extra) plus ``num_noise`` N(0, 1) channels; the LSTM
#: (``hidden`` units), full batch, SGD with momentum 0.9 (with Adam, whose
#: steps have the same size on every column, group lasso zeroes either no
#: channel or all of them).
VOWELS = {"data": "JapaneseVowels", "num_noise": 12, "hidden": 16, "steps": 300, "lr": 0.3,
          "methods": ("none", "l1", "group"), "alphas": (0.003, 0.01, 0.03)}
#: What the demo prints instead of the ``vowels`` task when the data is not installed.
VOWELS_SKIPPED = 'vowels: skipped (needs the sequence data: pip install "pyreg[sequences]")'


def _avx2_fma() -> bool:
    """Whether this CPU has AVX2 and FMA (numpy's record of its features)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy < 2
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return False
    return bool(features.get("AVX2") and features.get("FMA3"))


@contextlib.contextmanager
def fixed_cpu_paths() -> Iterator[dict]:
    """Fixes, before the demo's first tensor operation, the code paths of torch
    whose rounding depends on the CPU, so that the demo's numbers do not
    (on x86-64; an environment variable already set is kept):

    * ``ATEN_CPU_CAPABILITY=avx2`` (on a CPU with AVX2 and FMA): torch's
      vectorized kernels at 8 float lanes, also on a CPU with AVX-512, whose
      16 lanes sum in another order;
    * ``MKL_CBWR=COMPATIBLE``: MKL's matrix products on the branch that gives
      the same results on Intel and AMD CPUs (MKL picks its other branches by
      vendor).

    torch reads each of them once, at a process's first use: in a process
    that has already run tensor operations they may not apply, and the
    record yielded says which capability is in effect. It goes into the
    results' config, with what :func:`cpu_training` fixes around the training
    (oneDNN off: its LSTM kernels are also chosen by instruction set; one
    thread). The variables are restored on exit (what torch read stays), so
    that processes started later do not inherit them."""
    saved = {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    if platform.machine().lower() in ("x86_64", "amd64"):
        if _avx2_fma():
            os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
        os.environ.setdefault("MKL_CBWR", "COMPATIBLE")
    try:
        yield {"capability": torch.backends.cpu.get_cpu_capability(), "mkl_cbwr": os.environ.get("MKL_CBWR"),
               "onednn": False, "threads": 1}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def cpu_training(device: torch.device | str) -> Iterator[None]:
    """Around the demo's training on the CPU: one thread (tiny models) and
    oneDNN off, both restored afterwards (see :func:`fixed_cpu_paths`)."""
    if torch.device(device).type != "cpu":
        yield
        return
    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False  # (not its flags(): they also set a TF32 switch, with a warning)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = onednn


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    try:
        return nonneg_real(value, "alpha")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _alphas(text: str) -> list[float]:
    parts = [p for p in text.replace(",", " ").split()]
    if not parts:
        raise argparse.ArgumentTypeError("give at least one alpha, e.g. --alphas 0.01,0.1")
    return sorted({_alpha(p) for p in parts})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyreg demo",
        description="Regularization study on data that needs no download: an MLP on inputs of "
                    "which only a few are informative, and a small LSTM; no penalty, L1, L2, "
                    "elastic net, per-layer alpha and group lasso over a grid of alphas, via "
                    "pyreg's fused optimizers (pyreg.optim). Then fine-tuning a pre-trained MLP on a small related task "
                    "with no penalty, L2 and L2-SP (toward the pre-trained weights, alphas "
                    f"{','.join(f'{a:g}' for a in FINETUNE_ALPHAS)}). Then two real data sets that ship with "
                    "scikit-learn: breast cancer with added noise inputs, raw and standardized, and "
                    "handwritten digits (L1, group lasso, target_sparsity). With the sequences extra "
                    '(pip install "pyreg[sequences]"), also a real sequence set for the LSTM: '
                    "JapaneseVowels plus noise channels, with group lasso over the input channels.")
    p.add_argument("--quick", action="store_true",
                   help="fewer steps and 3 alphas for the generated tasks (well under a minute on 2 CPU "
                        "cores)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--out", default="pyreg-demo", metavar="DIR",
                   help="output folder for CSV, JSON and PNG files (default: ./pyreg-demo)")
    p.add_argument("--methods", type=choice_list(METHODS, "methods", lower=True), default=list(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (default: all; the "
                        "fine-tuning and real-data tasks always run their own)")
    p.add_argument("--alphas", type=_alphas, default=None,
                   help="comma-separated alpha grid of the mlp and lstm tasks (default: "
                        f"{','.join(map(str, DEFAULT_ALPHAS))}; --quick: {','.join(map(str, QUICK_ALPHAS))})")
    p.add_argument("--full", action="store_true",
                   help="also the exhaustive per-layer grid on the mlp task (L1 with alphas "
                        f"{','.join(f'{a:g}' for a in LAYER_GRID_ALPHAS)} on each of its 3 weights: "
                        f"{len(LAYER_GRID_ALPHAS) ** 3} runs, under a minute on 2 CPU cores), against the one-alpha "
                        "grid and one l1_strength run; written to layer_grid.json")
    p.add_argument("--seed", type=int_in(0, 2 ** 32, "2**32"), default=0,
                   help="seed of data and initial weights (default 0; below 2**32, as scikit-learn's)")
    return p


def _device(parser: argparse.ArgumentParser, text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        parser.error(f"argument --device: unknown device {text!r} (use auto, cpu, cuda or cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("argument --device: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            parser.error(f"argument --device: {text!r} does not exist "
                         f"({torch.cuda.device_count()} CUDA device(s))")
    elif dev.type != "cpu":
        parser.error(f"argument --device: {text!r} is not supported (use auto, cpu, cuda or cuda:N)")
    return dev


def make_tasks(quick: bool, seed: int):
    """The study's two tasks (data generated from ``seed``)."""
    from .data import informative_features, noisy_sequences
    from .study import MLP, LSTMClassifier, Task

    s = SETTINGS[quick]
    mlp_data = informative_features(num_informative=8, num_noise=120, sizes=(400, 400, 1000), seed=seed)
    seq_data = noisy_sequences(num_channels=6, length=10, sizes=(200, 400, 1000), seed=seed)
    return [
        Task("mlp", mlp_data, lambda: MLP(mlp_data.num_features, mlp_data.num_classes),
             lambda groups: optim.SGD(groups, lr=0.1, momentum=0.9), s["mlp_steps"]),
        Task("lstm", seq_data, lambda: LSTMClassifier(seq_data.num_features, seq_data.num_classes, hidden=16),
             lambda groups: optim.Adam(groups, lr=0.02), s["lstm_steps"]),
    ]


def make_finetune_task(seed: int):
    """The fine-tuning task (data generated from ``seed``)."""
    from .data import related_tasks
    from .study import FineTuneTask

    old, new = related_tasks(num_informative=8, num_noise=120, old_sizes=FINETUNE["old_sizes"],
                             new_sizes=FINETUNE["new_sizes"], seed=seed)
    return FineTuneTask(old, new, FINETUNE["pretrain_steps"], FINETUNE["finetune_steps"],
                        FINETUNE["finetune_lr"])


def make_real_tasks(seed: int):
    """The real-data tasks: (cancer tasks [raw, standardized], digits task)."""
    from .data import breast_cancer, digits
    from .study import MLP, Task

    def sgd(lr):
        return lambda groups: optim.SGD(groups, lr=lr, momentum=0.9)

    cancer = []
    for std in (False, True):
        d = breast_cancer(CANCER["num_noise"], CANCER["sizes"], seed, standardize=std)
        cancer.append(Task(d.name, d, lambda d=d: MLP(d.num_features, d.num_classes),
                           sgd(CANCER["lr_std" if std else "lr_raw"]), CANCER["steps"]))
    dg = digits(DIGITS["sizes"], seed)
    return cancer, Task("digits", dg, lambda: MLP(dg.num_features, dg.num_classes), sgd(DIGITS["lr"]),
                        DIGITS["steps"], dict(DIGITS["targets"]))


def run_real(seed: int, device: torch.device, progress) -> tuple[list[dict], list[dict], list[dict]]:
    """Every run of the real-data tasks: (rows, grid winners, the digits runs
    to draw: none, each method's winner, target)."""
    from .data import feature_scales
    from .report import STRENGTH_GRIDS
    from .study import grid_winners, mark_input_scales, run_study

    cancer, digits = make_real_tasks(seed)
    scales = feature_scales(cancer[0].data)  # raw inputs
    cancer = [t.to(device) for t in cancer]
    rows = run_study(cancer, CANCER["methods"], CANCER["alphas"], seed, device, progress)
    mark_input_scales(rows, scales)
    digit_rows = run_study([digits.to(device)], DIGITS["methods"], DIGITS["alphas"], seed, device, progress)
    rows += digit_rows
    winners = grid_winners(rows)
    panels = [w for m in DIGITS["methods"] if m not in STRENGTH_GRIDS  # the one-run methods: in the tables only
              for w in winners if w["task"] == "digits" and w["method"] == m]
    return rows, winners, panels


def make_vowels_task(seed: int, root=None):
    """The ``vowels`` task, or None when the data is not found (``root``: the
    aeon package folder; default: the installed one's)."""
    from .data import japanese_vowels, sequence_data_dir
    from .study import LSTMClassifier, Task

    if sequence_data_dir(VOWELS["data"], root) is None:
        return None
    d = japanese_vowels(VOWELS["num_noise"], seed, root=root, name=VOWELS["data"])
    return Task("vowels", d, lambda: LSTMClassifier(d.num_features, d.num_classes, hidden=VOWELS["hidden"]),
                lambda groups: optim.SGD(groups, lr=VOWELS["lr"], momentum=0.9), VOWELS["steps"])


def run_vowels(seed: int, device: torch.device, progress, root=None) -> tuple[list[dict], list[dict]] | None:
    """Every run of the ``vowels`` task and its grid winners, or None when
    the data is not found."""
    from .study import grid_winners, run_study

    task = make_vowels_task(seed, root)
    if task is None:
        return None
    rows = run_study([task.to(device)], VOWELS["methods"], VOWELS["alphas"], seed, device, progress)
    return rows, grid_winners(rows)


def print_vowels(rows: Sequence[dict], winners: Sequence[dict]) -> None:
    from . import report

    r0 = rows[0]
    print()
    print(f"JapaneseVowels (the UCI set, as shipped with aeon): {r0['num_informative']} real channels per frame, "
          f"the speaker as class, plus {r0['num_noise']}\nnoise channels (N(0, 1)); group lasso over the LSTM's "
          "input channels (the columns of weight_ih_l0).\nreal: real channels kept; noise 0: noise channels "
          "whose whole column is exactly zero.")
    print(report.format_table(rows, report.VOWELS_COLUMNS))
    print()
    print("Sequence winners (best validation accuracy per method):")
    for w in winners:
        print(f"  {w['task']:10s} {w['method']:14s} " + _setting(w)
              + f"val {w['val_acc']:.3f}, test {w['test_acc']:.3f}, sparsity {w['sparsity']:.1%}, real channels "
              f"kept {w['informative_kept']}/{w['num_informative']}, noise channels zeroed "
              f"{w['noise_zeroed']}/{w['num_noise']}")


def _setting(w: dict) -> str:
    """A winner's setting, as its method reads it: an alpha, or a strength."""
    if w["method"] in ("none", "target"):
        return ""
    return f"{'strength' if w['method'].endswith('strength') else 'alpha'} {w['alpha']:g}: "


def print_real(rows: Sequence[dict], winners: Sequence[dict]) -> None:
    from . import report

    cancer = [r for r in rows if r["task"].startswith("cancer")]
    print()
    print(f"Breast cancer (scikit-learn): 30 real features whose scales span five orders of magnitude, plus "
          f"{CANCER['num_noise']} noise inputs\n(shuffled copies of real features: same scales, no "
          "signal), on raw and on standardized inputs. prec: real features among\nthe inputs kept; "
          "large: inputs kept that are among the larger-scale half (raw standard deviation).")
    print(report.format_table(cancer, report.CANCER_COLUMNS))
    digits = [r for r in rows if r["task"] == "digits"]
    print()
    print("Digits (scikit-learn, 8 x 8 images, 10 classes): pixels the first layer still reads.")
    print(report.format_table(digits, report.DIGITS_COLUMNS))
    print()
    print("target_sparsity on the digits MLP: the fraction of exact zeros per layer, asked and achieved.")
    print(report.format_target_table([r for r in digits if r["method"] == "target"]))
    print()
    print("Real-data winners (best validation accuracy per task and method):")
    for w in winners:
        line = (f"  {w['task']:10s} {w['method']:14s} " + _setting(w)
                + f"val {w['val_acc']:.3f}, test {w['test_acc']:.3f}, inputs kept {w['inputs_used']}/"
                f"{w['num_informative'] + w['num_noise']}")
        if w["task"].startswith("cancer"):
            line += f", noise inputs zeroed {w['noise_zeroed']}/{w['num_noise']}"
        print(line)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        with fixed_cpu_paths() as cpu_paths:  # before any tensor operation
            return _study(parser, args, cpu_paths)
    except OutputError as e:
        print(f"pyreg demo: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        out = os.path.abspath(args.out)
        print(f"\ninterrupted: the run is incomplete; any files it had written in {out} may sit beside an "
              "earlier run's", file=sys.stderr, flush=True)
        return 130


def _study(parser: argparse.ArgumentParser, args: argparse.Namespace, cpu_paths: dict) -> int:
    """The demo's run, from its parsed arguments (see :func:`main`)."""
    device = _device(parser, args.device)
    alphas = args.alphas if args.alphas is not None else list(QUICK_ALPHAS if args.quick else DEFAULT_ALPHAS)
    try:
        from . import report

        report.load_pyplot()
        import sklearn  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as e:
        parser.error(f"the demo needs matplotlib, scikit-learn and tqdm ({e}); "
                     'install them with: pip install "pyreg[demo]"')
    output_folder(parser, args.out)
    from .study import (
        FINETUNE_METHODS,
        compact_winner,
        grid_winners,
        run_finetune,
        run_study,
    )

    t0 = time.perf_counter()
    tasks = [t.to(device) for t in make_tasks(args.quick, args.seed)]
    finetune_task = make_finetune_task(args.seed).to(device)
    print(f"pyreg demo: {len(tasks)} tasks, methods {', '.join(args.methods)}, "
          f"alphas {', '.join(f'{a:g}' for a in alphas)}, device {device}, seed {args.seed}"
          + (" (quick)" if args.quick else "") + "; then fine-tuning and the real-data tasks "
          "(breast cancer, digits)", flush=True)
    progress = report.Progress()
    with cpu_training(device):
        results = run_study(tasks, args.methods, alphas, args.seed, device, progress)
        finetune = run_finetune(finetune_task, FINETUNE_METHODS, FINETUNE_ALPHAS, args.seed, device, progress)
        real, real_winners, panels = run_real(args.seed, device, progress)
        vowels = run_vowels(args.seed, device, progress)
        layer_grid = None
        if args.full:
            from .study import run_layer_grid

            mlp = next(t for t in tasks if t.name == "mlp")
            layer_grid = run_layer_grid(mlp, LAYER_GRID_ALPHAS, args.seed, device, progress)
    winners = grid_winners(results)
    print()
    print(report.format_table(results))
    print()
    print("Grid-search winner per method (best validation accuracy; ties to the larger alpha):")
    print(report.format_table(winners))
    compacted = []
    by_name = {t.name: t for t in tasks}
    for w in winners:
        if w["method"] != "group":
            continue
        with cpu_training(device):
            c = compact_winner(by_name[w["task"]], w, args.seed, device)
        compacted.append(c)
        print()
        print(f"pyreg.compact on the {w['task']} group-lasso winner (alpha {w['alpha']:g}), "
              f"batch {c['batch']}: parameters {c['params_before']:,} -> {c['params_after']:,}, "
              f"inputs {c['num_inputs']} -> {len(c['inputs_kept'])}")
        print(c["report"])
    print()
    print(f"Fine-tuning: an MLP pre-trained on {FINETUNE['old_sizes'][0]} samples, fine-tuned with a new head on\n"
          f"{FINETUNE['new_sizes'][0]} samples of a related task (one class split in two). new: accuracy on that "
          "task;\nold test: old-task accuracy with the old head (retention); drift: distance of the shared "
          "layers\nfrom the pre-trained ones, relative; winner: best new val per method (ties to the larger alpha).")
    print(report.format_finetune_table(finetune))
    print_real(real, real_winners)
    if vowels is None:
        print()
        print(VOWELS_SKIPPED)
    else:
        print_vowels(*vowels)
        real, real_winners = real + vowels[0], real_winners + vowels[1]
    if any(r["method"] in report.STRENGTH_GRIDS for r in results + real):
        print()
        print("How much regularization: one run of a strength (l1_strength: each layer's l1 from its own push;\n"
              "group-strength: the input layer's group_l1 from its columns' push; the same strength for every\n"
              "task), and path (pyreg.path over the L1 grid, smallest alpha first, in a fifth of the grid's steps:\n"
              "with 8 alphas or more a path, then one run at the largest alpha within one standard error of its\n"
              "best; else the path in one run, its best fit), against the grid search of the same penalty (L1;\n"
              "group lasso), its winner by validation accuracy and the runs it took. val diff: the method minus\n"
              "the grid winner, in points.")
        print(report.format_strength_table(results + real))
    if layer_grid is not None:
        print()
        print(f"The mlp task's exhaustive per-layer grid (--full): L1 at each of {len(LAYER_GRID_ALPHAS)} alphas on each "
              "weight,\nagainst the one-alpha grids and the one-run strengths (winners by validation accuracy).")
        print(report.format_layer_grid_table(results, layer_grid))
    config = {"quick": args.quick, "device": str(device), "methods": args.methods, "alphas": alphas,
              "seed": args.seed, **SETTINGS[args.quick],
              "finetune": {**FINETUNE, "alphas": list(FINETUNE_ALPHAS), "methods": list(FINETUNE_METHODS)},
              "cancer": CANCER, "digits": DIGITS}
    if device.type == "cpu":
        config["cpu_paths"] = cpu_paths
    if vowels is not None:  # only when it ran: a run without the data writes what it did before
        config["vowels"] = VOWELS
    try:
        paths = report.write_all(args.out, config, results, winners, finetune, compacted, real, real_winners,
                                 panels)
        if layer_grid is None:
            report.drop_stale(os.path.join(args.out, "layer_grid.json"))
        else:
            import json

            path = os.path.join(args.out, "layer_grid.json")
            with open(path, "w") as f:
                json.dump({"task": "mlp", "alphas": list(LAYER_GRID_ALPHAS), "results": layer_grid}, f, indent=1)
            paths.append(path)
    except OSError as e:
        raise output_error(e) from e
    print()
    print(f"Wrote {len(paths)} files to {os.path.abspath(args.out)}: "
          + ", ".join(os.path.basename(p) for p in paths))
    print(f"Done in {time.perf_counter() - t0:.1f} s.")
    return 0
