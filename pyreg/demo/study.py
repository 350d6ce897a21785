"""The study: train one model per (task, method, alpha) with pyreg's fused
optimizers (``pyreg.optim.SGD`` / ``pyreg.optim.Adam``: the update and the
proximal step in one pass) and measure what regularization did to it.

Methods (strength ``alpha``, converted with :func:`pyreg.from_sklearn`, i.e.
scikit-learn's ``ElasticNet(alpha, l1_ratio)`` penalty):

* ``none``: no penalty (one run, alpha = 0);
* ``l1``: ``l1_ratio = 1`` (Lasso): exact zeros from the proximal step;
* ``l2``: ``l1_ratio = 0`` (ridge / decoupled weight decay);
* ``elastic``: ``l1_ratio = 0.5``;
* ``layer``: per-layer alpha: L1 ``alpha`` on the input layer (input
  selection) and ``alpha / 10`` on every other weight;
* ``strength``: no alpha grid: one run with ``l1_strength`` =
  :data:`STRENGTH` (``pyreg.param_groups(model, l1_strength=...)``): every
  10 steps each weight's ``l1`` becomes that quantile of the magnitudes of
  its push, the optimizer's step divided by lr; not ramped (the rule's l1
  is 0 until its first refresh, then follows the push);
* ``group-strength``: the same for group lasso: one run with
  ``group_strength`` = :data:`GROUP_STRENGTH` on the input layer's columns
  (the input weight's ``group_l1`` that quantile of its columns' push
  norms), no other penalty;
* ``path``: the L1 grid in a fifth of the grid's training steps (at least
  one run's; :func:`path_budget`): :func:`pyreg.path` over the task's
  alphas from the smallest up (``order="increasing"``), each alpha
  warm-started from the previous fit and trained for the same number of
  steps with a fresh optimizer. Where the budget holds one run more (8
  alphas or more), the path takes what that run leaves and picks the
  largest alpha whose validation accuracy is within one standard error of
  the best (``select="1se"``), and the result is one run at that alpha (as
  scikit-learn's ``LassoCV`` refits); else the path takes one run's steps
  and its fit with the best validation accuracy (ties to the larger alpha)
  is the result. It uses the validation set as the grid search does;
* ``target`` (the digits task only): no strength; ``target_sparsity`` per
  layer (``Task.targets``), each step's ``l1`` the one that leaves that
  fraction of the layer's weights exactly zero (one run);
* ``group``: group lasso on the input layer's columns (one per input feature:
  ``group_dim = 1`` of an ``nn.Linear`` weight [out, in] and of an LSTM's
  ``weight_ih_l0`` [4 * hidden, in]) with ``group_l1 = alpha * sqrt(rows)``,
  rows being a column's length (32 for the MLP, 64 for the LSTM): the usual
  sqrt(group size) weighting, under which a column whose entries have equal
  magnitude costs what L1 at ``alpha`` charges it; plus ridge on every
  weight (the input layer's too), ``l2 = alpha / 2`` (``l1_ratio = 0``, as
  ``l2``). The ridge term is needed: without it the later layers can grow to make
  up for the shrunken input columns, and on the MLP either noise columns
  survive or, at alphas that zero all of them, validation accuracy falls
  below L1's. The proximal step (``pyreg.group_prox_``, group lasso and ridge
  in one exact prox) zeroes whole columns. Same alpha grid as the other
  methods.

Every run of a task starts from the same initial weights (seeded) and sees the
same data, so runs differ only by their regularization. Biases are not
regularized (``pyreg.param_groups``' default). The coefficients (``l1``,
``l2``, ``group_l1``, ``target_sparsity``) ramp up linearly over the first half of training (a
schedule written into the param groups, read at every step), so
that a strong L1 does not zero the network before it has learned which
inputs matter.

The fine-tuning part (:func:`run_finetune`) pre-trains an MLP without a
penalty, then fine-tunes copies with a new head on a small related task:
``none``, ``l2`` (ridge toward 0) and ``l2-sp`` (ridge toward the pre-trained
weights, ``pyreg.param_groups(ref=pretrained)``), both with ``l2 = alpha / 2``
and no ramp.
"""
from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

import pyreg

from .data import Splits

METHODS = ("none", "l1", "l2", "elastic", "layer", "group", "strength", "group-strength", "path")
#: method ``path``: the grid size, in runs of a fifth of it (``len(alphas) / 5``), from which it refits
#: (one run at the alpha its path picked, the path taking the rest; see :func:`path_budget`)
PATH_REFIT_RUNS = 1.5
#: method ``strength``: the one strength it runs with (``l1_strength``, a fraction in [0, 1])
STRENGTH = 0.8
#: method ``group-strength``: its ``group_strength`` on the input layer's columns
GROUP_STRENGTH = 0.9
L1_RATIO = {"l1": 1.0, "l2": 0.0, "elastic": 0.5, "path": 1.0}  # path: L1 at the alpha it picked
LAYER_FACTOR = 0.1  # method "layer": alpha on the input layer, alpha * LAYER_FACTOR elsewhere


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------
class MLP(nn.Sequential):
    """inputs -> hidden -> hidden -> classes, ReLU; ``"0"`` is the input layer."""

    input_layer = "0"
    input_weight = "0.weight"  # its weight [hidden, inputs]: a column per input

    def __init__(self, num_features: int, num_classes: int, hidden: int = 32):
        super().__init__(nn.Linear(num_features, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))

    def first_weight(self) -> Tensor:
        return self[0].weight


class LSTMClassifier(nn.Module):
    """One LSTM layer and a linear head on the last hidden state."""

    input_layer = "lstm.weight_ih_l0"
    input_weight = "lstm.weight_ih_l0"  # [4 * hidden, inputs]: a column per input channel

    def __init__(self, num_features: int, num_classes: int, hidden: int = 32):
        super().__init__()
        self.lstm = nn.LSTM(num_features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])

    def first_weight(self) -> Tensor:
        return self.lstm.weight_ih_l0


# --------------------------------------------------------------------------
# Tasks and runs
# --------------------------------------------------------------------------
@dataclass
class Task:
    """A data set, a model and how to train it (full batch)."""

    name: str
    data: Splits
    make_model: Callable[[], nn.Module]
    make_optimizer: Callable[[list[dict]], torch.optim.Optimizer]
    steps: int
    #: method ``target``: ``target_sparsity`` per layer name (e.g. ``{"0": 0.9, "2": 0.5}``)
    targets: dict[str, float] | None = None

    def to(self, device: torch.device) -> Task:
        return Task(self.name, self.data.to(device), self.make_model, self.make_optimizer, self.steps,
                    self.targets)


def coefficients(method: str, alpha: float, rows: int = 1) -> dict[str, float | None]:
    """Base (l1, l2) of a method at strength alpha, and ``group_l1``: the group
    lasso coefficient of the input layer's columns (``rows`` entries each).
    ``per-layer`` (the ``--full`` grid) has no one l1: None (its run's
    ``layer_alphas`` say each weight's)."""
    if method in ("none", "target", "strength", "group-strength"):  # coefficients from a target / a strength
        return {"l1": 0.0, "l2": 0.0, "group_l1": 0.0}
    if method == "per-layer":
        return {"l1": None, "l2": 0.0, "group_l1": 0.0}
    if method == "layer":
        return {"l1": alpha * LAYER_FACTOR, "l2": 0.0, "group_l1": 0.0}
    l1, l2 = pyreg.from_sklearn(alpha, L1_RATIO.get(method, 0.0))
    if method == "group":  # ridge, plus group lasso alpha * sqrt(rows) on the input columns
        return {"l1": 0.0, "l2": l2, "group_l1": alpha * rows ** 0.5}
    return {"l1": l1, "l2": l2, "group_l1": 0.0}


def build_groups(model: nn.Module, method: str, alpha: float,
                 targets: dict[str, float] | None = None,
                 layer_alphas: dict[str, float] | None = None) -> list[dict]:
    """``pyreg.param_groups`` for a method: biases excluded; for ``layer`` the
    input layer gets its own, stronger L1, for ``group`` group lasso over the
    columns of its weight, for ``target`` a ``target_sparsity`` per layer of
    ``targets`` (overrides); for ``per-layer`` (the ``--full`` grid) L1 at
    its own alpha on each weight of ``layer_alphas`` (by parameter name)."""
    coef = coefficients(method, alpha, model.get_parameter(model.input_weight).shape[0])
    overrides = None
    if method == "strength":
        return pyreg.param_groups(model, l1_strength=alpha)
    if method == "group-strength":
        return pyreg.param_groups(model, overrides={model.input_weight: {"group_strength": alpha, "group_dim": 1}})
    if method == "per-layer":
        if not layer_alphas:
            raise ValueError("method 'per-layer' needs an alpha per weight, e.g. {'0.weight': 0.1}")
        return pyreg.param_groups(model, overrides={name: {"l1": pyreg.from_sklearn(a, 1.0)[0]}
                                                    for name, a in layer_alphas.items()})
    if method == "target":
        if not targets:
            raise ValueError("method 'target' needs the task's targets, e.g. {'0': 0.9}")
        overrides = {layer: {"target_sparsity": t} for layer, t in targets.items()}
    elif method == "layer":
        # the weight's name: an override's l1 applies to the (excluded) bias of a module pattern too
        overrides = {model.input_weight: {"l1": alpha}}
    elif method == "group":
        # the weight's name, not the module's: a module pattern would give the
        # (1-D) bias group_l1 too
        overrides = {model.input_weight: {"group_l1": coef["group_l1"], "group_dim": 1}}
    return pyreg.param_groups(model, l1=coef["l1"], l2=coef["l2"], overrides=overrides)


def _accuracy_and_loss(model: nn.Module, x: Tensor, y: Tensor):
    logits = model(x)
    return (logits.argmax(1) == y).float().mean(), nn.functional.cross_entropy(logits, y)


def train_one(task: Task, method: str, alpha: float, seed: int, device: torch.device,
              on_tick: Callable[[int, float | None], None] | None = None,
              want_loss: bool = False, layer_alphas: dict[str, float] | None = None,
              alphas: Sequence[float] | None = None) -> dict:
    """Train one model and return its measurements (plain Python numbers).

    ``on_tick(steps_done, loss)`` is called about 20 times per run; the loss
    is read from the device (a host sync) only when ``want_loss``. Method
    ``path`` needs the grid (``alphas``; ``alpha`` is unused) and reports
    progress once, at its end.
    """
    if method == "path":
        if not alphas:
            raise ValueError("method 'path' needs the alpha grid, e.g. alphas=[0.01, 0.1, 1.0]")
        model, groups, alpha, trace, runs = train_path(task, alphas, seed, device)
        if on_tick is not None:
            on_tick(task.steps, None)
        r = measure(model, groups, task.data, method, alpha)
        r["path"], r["runs"] = trace, round(runs, 3)
        return r
    model, opt = train_model(task, method, alpha, seed, device, on_tick, want_loss, layer_alphas)
    r = measure(model, opt.param_groups, task.data, method, alpha)
    if layer_alphas is not None:
        r["layer_alphas"], r["alpha"] = dict(layer_alphas), None  # (an alpha per weight, no one alpha)
    if method == "target":
        r["targets"] = {f"{layer}.weight": t for layer, t in task.targets.items()}
    return r


def train_model(task: Task, method: str, alpha: float, seed: int, device: torch.device,
                on_tick: Callable[[int, float | None], None] | None = None, want_loss: bool = False,
                layer_alphas: dict[str, float] | None = None):
    """Train one model (deterministic for a seed); returns (model, optimizer)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # same initial weights for every run of a task
        model = task.make_model()
    model.to(device)
    data = task.data
    opt = task.make_optimizer(build_groups(model, method, alpha, task.targets, layer_alphas))
    ramped = ("l1", "l2", "group_l1", "target_sparsity")  # not l1_strength: its l1 follows the push
    targets = [{k: g[k] for k in ramped if g.get(k) is not None} for g in opt.param_groups]
    ramp_steps = max(1, task.steps // 2)
    tick = max(1, task.steps // 20)
    model.train()
    for step in range(task.steps):
        if step <= ramp_steps and (step % tick == 0 or step == ramp_steps):  # the schedule
            f = min(1.0, step / ramp_steps)
            for g, target in zip(opt.param_groups, targets):
                g.update({k: v * f for k, v in target.items()})
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(data.x_train), data.y_train)
        loss.backward()
        opt.step()
        if on_tick is not None and ((step + 1) % tick == 0 or step + 1 == task.steps):
            on_tick(step + 1, loss.item() if want_loss else None)
    return model, opt


def _correct(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(1) == y).float()


def path_budget(task: Task, alphas: Sequence[float]) -> tuple[int, bool]:
    """Method ``path``'s use of a fifth of the grid's training steps
    (``len(alphas) / 5`` runs): (the steps at each alpha of the path, whether
    one run at the picked alpha follows). With room for that run and a path
    of at least half a run (grids of 8 alphas or more), the path takes what
    the refit leaves; with less, the path alone takes one run's steps."""
    runs = len(alphas) / 5
    refit = runs >= PATH_REFIT_RUNS
    path_steps = int((runs - 1 if refit else max(1.0, runs)) * task.steps)
    return max(1, path_steps // len(alphas)), refit


def train_path(task: Task, alphas: Sequence[float], seed: int, device: torch.device):
    """Method ``path``: :func:`pyreg.path` over ``alphas`` (L1, scikit-learn's
    alpha) from the smallest up, the steps :func:`path_budget` gives at each,
    the task's optimizer made afresh at each alpha. Where the budget holds
    one run more, the path picks by the one-standard-error rule (the largest
    alpha whose validation accuracy is within one standard error of the
    best: ``select="1se"``) and the result is a run of the task's own
    training at that alpha from the same initial weights (as scikit-learn's
    ``LassoCV`` refits at the alpha its path picked); else the result is the
    path's fit with the best validation accuracy. Returns (the model, its
    param groups, the alpha picked, the path: per alpha ``alpha``,
    ``val_acc``, ``sparsity``, and the runs it took, a fraction)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same initial weights as every other run of the task
        model = task.make_model()
    model.to(device)
    d = task.data
    grid = sorted(alphas)
    per_alpha, refit = path_budget(task, grid)
    res = pyreg.path(model, nn.functional.cross_entropy, (d.x_train, d.y_train), val=(d.x_val, d.y_val),
                     alphas=[pyreg.from_sklearn(a, 1.0)[0] for a in grid], method="l1",
                     optimizer=task.make_optimizer, epochs=per_alpha, metric=_correct,
                     greater_is_better=True, order="increasing", select="1se" if refit else "best",
                     keep_weights=False, progress=False)
    trace = [{"alpha": a, "val_acc": round(r["val_metric"], 6), "sparsity": r["sparsity"]}
             for a, r in zip(grid, res.rows)]
    runs = (per_alpha * len(grid) + (task.steps if refit else 0)) / task.steps
    if refit:
        model, opt = train_model(task, "l1", grid[res.index], seed, device)
        return model, opt.param_groups, grid[res.index], trace, runs
    best = res.model()
    return best, pyreg.param_groups(best), grid[res.index], trace, runs


def compact_winner(task: Task, winner: dict, seed: int, device: torch.device, batch: int = 4096) -> dict:
    """The grid winner retrained (the same model: same seed) and compacted
    with :func:`pyreg.compact` at a batch of ``batch`` random inputs: its
    size, multiply-adds and kept inputs before and after. Not timed (the
    demo's CPU paths are fixed for its numbers, not for speed: the speed of
    a compacted model is ``pyreg bench --compact``'s), so its ``latency`` is
    empty."""
    model, _ = train_model(task, winner["method"], winner["alpha"], seed, device)
    model.eval()
    x = task.data.x_train
    example = torch.randn((batch,) + tuple(x.shape[1:]), generator=torch.Generator().manual_seed(seed)).to(x)
    out = pyreg.compact(model, example, measure=False)
    rep = out.report
    inputs = next(iter(rep.inputs.values()), None)
    return {"task": task.name, "method": winner["method"], "alpha": winner["alpha"], "batch": batch,
            "params_before": rep.params_before, "params_after": rep.params_after,
            "macs_before": rep.macs_before, "macs_after": rep.macs_after,
            "inputs_kept": None if inputs is None else list(inputs["kept"]),
            "num_inputs": None if inputs is None else inputs["size"],
            "latency": {dev: {k: v for k, v in lat.items()} for dev, lat in rep.latency.items()},
            "report": str(rep)}


@torch.no_grad()
def layer_stats(groups: Sequence[dict]):
    """(names, WeightStats, numels) of every parameter of the param groups
    (``param_names`` and ``params``, e.g. an optimizer's): one fused
    weight_stats pass over all layers."""
    params = [p for g in groups for p in g["params"]]
    names = [n for g in groups for n in g["param_names"]]
    return names, pyreg.weight_stats([p.detach() for p in params]), [p.numel() for p in params]


def measure(model: nn.Module, groups: Sequence[dict], data: Splits, method: str, alpha: float) -> dict:
    """Accuracy and loss per split, per-layer norms and sparsity (of the
    parameters of ``groups``: the optimizer's param groups), and which inputs
    the first layer still uses. Read back to the host once, after training."""
    model.eval()
    values = {}
    with torch.no_grad():
        for split in ("train", "val", "test"):
            acc, loss = _accuracy_and_loss(model, getattr(data, f"x_{split}"), getattr(data, f"y_{split}"))
            values[f"{split}_acc"], values[f"{split}_loss"] = acc, loss
    names, stats, numels = layer_stats(groups)
    first = model.first_weight()
    # a column of the input layer's weight is one input feature (LSTM: 4 gates x hidden rows)
    used = (first != 0).any(dim=0)
    column_norms = pyreg.group_norms([first], dim=1)[0]
    host = {k: float(v) for k, v in values.items()}
    used_list = used.cpu().tolist()
    informative = set(data.informative)
    used_idx = [j for j, u in enumerate(used_list) if u]
    kept = len(informative.intersection(used_idx))
    num_noise = data.num_features - len(informative)
    noise_used = len(used_idx) - kept
    layers = {}
    nnz = stats.nnz.tolist()
    for i, name in enumerate(names):
        layers[name] = {"l1_norm": float(stats.l1[i]), "l2_norm": float(stats.l2[i]),
                        "nonzero": nnz[i], "numel": numels[i],
                        "sparsity": (1.0 - nnz[i] / numels[i]) if numels[i] else 0.0}
    coef = coefficients(method, alpha, first.shape[0])
    return {
        "task": data.name, "method": method, "alpha": alpha,
        "l1": coef["l1"], "l2": coef["l2"], "group_l1": coef["group_l1"],
        **{k: round(v, 6) for k, v in host.items()},
        "gap": round(host["train_acc"] - host["val_acc"], 6),
        "sparsity": 1.0 - sum(nnz) / max(1, sum(numels)),
        "inputs_used": len(used_idx),
        "informative_kept": kept,
        "noise_zeroed": num_noise - noise_used,
        "num_informative": len(informative),
        "num_noise": num_noise,
        "precision": kept / len(used_idx) if used_idx else 0.0,
        "recall": kept / len(informative) if informative else 0.0,
        "layers": layers,
        "input_weight_norms": [round(float(v), 6) for v in column_norms.cpu().tolist()],
        "inputs_kept": used_idx,
    }


#: Methods run once, not over the grid (``target``: the task's
#: ``target_sparsity`` per layer; ``strength``: ``l1_strength`` = :data:`STRENGTH`;
#: ``group-strength``: ``group_strength`` = :data:`GROUP_STRENGTH` on the input layer;
#: ``path``: the grid in a fifth of its steps, its alpha the one it picked).
SINGLE_RUN = ("none", "target", "strength", "group-strength", "path")


def plan_runs(methods: Sequence[str], alphas: Sequence[float]) -> list[tuple]:
    """(method, alpha) pairs: ``none``, ``target`` and ``path`` once (alpha 0;
    ``path``'s result has the alpha it picked), ``strength`` and
    ``group-strength`` once (alpha :data:`STRENGTH`, :data:`GROUP_STRENGTH`),
    every other method over the grid."""
    runs = []
    for m in methods:
        one = {"strength": STRENGTH, "group-strength": GROUP_STRENGTH}.get(m, 0.0)
        runs.extend([(m, one)] if m in SINGLE_RUN else [(m, a) for a in alphas])
    return runs


def run_study(tasks: Sequence[Task], methods: Sequence[str], alphas: Sequence[float], seed: int,
              device: torch.device, progress) -> list[dict]:
    """Every planned run of every task, in order; ``progress`` is a
    :class:`~pyreg.demo.report.Progress`."""
    results = []
    runs = [(t, m, a) for t in tasks for m, a in plan_runs(methods, alphas)]
    progress.start(sum(t.steps for t, _, _ in runs))
    for task, method, alpha in runs:
        label = f"{task.name} {method}" + ("" if method in ("none", "target", "path") else f" alpha={alpha:g}")
        t0 = time.perf_counter()
        done = [0]

        def on_tick(step, loss, _done=done, _label=label):
            progress.advance(step - _done[0], _label, loss)
            _done[0] = step

        r = train_one(task, method, alpha, seed, device, on_tick, want_loss=progress.wants_loss, alphas=alphas)
        progress.run_done(label, r, time.perf_counter() - t0)
        results.append(r)
    progress.finish()
    return results


def run_layer_grid(task: Task, alphas: Sequence[float], seed: int, device: torch.device, progress) -> list[dict]:
    """The exhaustive per-layer grid (``pyreg demo --full``): L1 with its own
    alpha on each weight of the task's model (biases excluded), every
    combination of ``alphas``: len(alphas) ** (number of weights) runs."""
    with torch.random.fork_rng(devices=[]):
        names = [n for n, p in task.make_model().named_parameters() if p.dim() > 1]
    combos = list(itertools.product(alphas, repeat=len(names)))
    progress.start(task.steps * len(combos))
    results = []
    for combo in combos:
        layer_alphas = dict(zip(names, combo))
        label = f"{task.name} per-layer " + ",".join(f"{a:g}" for a in combo)
        t0 = time.perf_counter()
        done = [0]

        def on_tick(step, loss, _done=done, _label=label):
            progress.advance(step - _done[0], _label, loss)
            _done[0] = step

        r = train_one(task, "per-layer", combo[0], seed, device, on_tick, progress.wants_loss, layer_alphas)
        progress.run_done(label, r, time.perf_counter() - t0)
        results.append(r)
    progress.finish()
    return results


def mark_input_scales(results: Sequence[dict], scales: Sequence[float]) -> None:
    """Adds ``kept_large_scale`` to each row: how many of the inputs it kept
    are among the larger-scale half (``scales``: each input's standard
    deviation on the raw training split, above their median)."""
    median = sorted(scales)[len(scales) // 2]
    large = {j for j, v in enumerate(scales) if v >= median}
    for r in results:
        r["kept_large_scale"] = len(large.intersection(r["inputs_kept"]))
        r["num_large_scale"] = len(large)


def grid_winners(results: Sequence[dict]) -> list[dict]:
    """Per (task, method): the run with the best validation accuracy; ties go
    to the larger alpha (the simpler, sparser model)."""
    best: dict[tuple, dict] = {}
    for r in results:
        key = (r["task"], r["method"])
        cur = best.get(key)
        if cur is None or (r["val_acc"], r["alpha"]) > (cur["val_acc"], cur["alpha"]):
            best[key] = r
    return list(best.values())


# --------------------------------------------------------------------------
# Fine-tuning: regularization toward the pre-trained weights (L2-SP)
# --------------------------------------------------------------------------
FINETUNE_METHODS = ("none", "l2", "l2-sp")


@dataclass
class FineTuneTask:
    """Pre-train an MLP on ``old``, then fine-tune it on the small related ``new``
    task with a new head (full batch)."""

    old: Splits
    new: Splits
    pretrain_steps: int
    finetune_steps: int
    finetune_lr: float

    def to(self, device: torch.device) -> FineTuneTask:
        return FineTuneTask(self.old.to(device), self.new.to(device), self.pretrain_steps,
                            self.finetune_steps, self.finetune_lr)


def pretrain(task: FineTuneTask, seed: int, device: torch.device) -> nn.Module:
    """The pre-trained model: an :class:`MLP` trained without a penalty on the
    old task (SGD with momentum, as the ``mlp`` task)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MLP(task.old.num_features, task.old.num_classes)
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(task.pretrain_steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(task.old.x_train), task.old.y_train).backward()
        opt.step()
    return model.eval()


def finetune_one(task: FineTuneTask, pretrained: nn.Module, method: str, alpha: float, seed: int,
                 device: torch.device) -> dict:
    """Fine-tune a copy of ``pretrained`` with a new head on the new task.

    ``l2`` and ``l2-sp`` use ``l2 = alpha / 2`` (``pyreg.from_sklearn(alpha, 0)``,
    as the study's ``l2`` method) on every weight; ``l2-sp`` regularizes
    ``w - w_pretrained`` instead of ``w`` (``pyreg.param_groups(ref=...)``;
    the new head has no pre-trained counterpart and gets plain L2). Adam,
    proximal mode, no ramp. Retention: the fine-tuned body with the
    pre-trained (old) head, on the old task's test split.
    """
    new = task.new
    model = copy.deepcopy(pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model[-1] = nn.Linear(model[-1].in_features, new.num_classes)
    model.to(device)
    l2 = 0.0 if method == "none" else pyreg.from_sklearn(alpha, 0.0)[1]
    ref = pretrained if method == "l2-sp" else None
    groups = pyreg.param_groups(model, l2=l2, ref=ref)
    opt = pyreg.optim.Adam(groups, lr=task.finetune_lr)
    model.train()
    for _ in range(task.finetune_steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(new.x_train), new.y_train).backward()
        opt.step()
    return measure_finetune(model, pretrained, task, method, alpha if method != "none" else 0.0, l2)


@torch.no_grad()
def measure_finetune(model: nn.Module, pretrained: nn.Module, task: FineTuneTask, method: str,
                     alpha: float, l2: float) -> dict:
    """New-task accuracy per split, old-task test accuracy with the old head
    (retention), and how far the shared layers moved from the pre-trained ones."""
    model.eval()
    old_model = nn.Sequential(*list(model)[:-1], pretrained[-1])
    values = {f"new_{s}_acc": _accuracy_and_loss(model, getattr(task.new, f"x_{s}"), getattr(task.new, f"y_{s}"))[0]
              for s in ("train", "val", "test")}
    values["old_test_acc"] = _accuracy_and_loss(old_model, task.old.x_test, task.old.y_test)[0]
    body = [p for n, p in model.named_parameters() if not n.startswith(f"{len(model) - 1}.")]
    body0 = [p for n, p in pretrained.named_parameters() if not n.startswith(f"{len(pretrained) - 1}.")]
    moved = torch.stack([(a - b).norm() ** 2 for a, b in zip(body, body0)]).sum().sqrt()
    size = torch.stack([b.norm() ** 2 for b in body0]).sum().sqrt()
    values["drift"] = moved / size
    return {"task": "finetune", "method": method, "alpha": alpha, "l2": l2,
            **{k: round(float(v), 6) for k, v in values.items()}}


def run_finetune(task: FineTuneTask, methods: Sequence[str], alphas: Sequence[float], seed: int,
                 device: torch.device, progress) -> list[dict]:
    """Pre-train once, then fine-tune with each method (``none`` once, the
    others over ``alphas``). The first row is the pre-trained model itself
    (old-task accuracy before fine-tuning). Each method's grid-search winner
    (best new-task validation accuracy; ties to the larger alpha) is marked
    ``selected``."""
    t0 = time.perf_counter()
    pretrained = pretrain(task, seed, device)
    with torch.no_grad():
        val = _accuracy_and_loss(pretrained, task.old.x_val, task.old.y_val)[0]
        acc = _accuracy_and_loss(pretrained, task.old.x_test, task.old.y_test)[0]
    rows = [{"task": "finetune", "method": "pretrained", "alpha": 0.0, "l2": 0.0,
             "old_val_acc": round(float(val), 6), "old_test_acc": round(float(acc), 6), "selected": True}]
    progress.note(f"finetune: pre-trained, old test acc {rows[0]['old_test_acc']:.3f}", time.perf_counter() - t0)
    for method, alpha in plan_runs(methods, alphas):
        t0 = time.perf_counter()
        r = finetune_one(task, pretrained, method, alpha, seed, device)
        progress.note(f"finetune {method}" + ("" if method == "none" else f" alpha={alpha:g}")
                      + f": new val acc {r['new_val_acc']:.3f}, old test acc {r['old_test_acc']:.3f}",
                      time.perf_counter() - t0)
        rows.append(r)
    best: dict[str, dict] = {}
    for r in rows[1:]:
        cur = best.get(r["method"])
        if cur is None or (r["new_val_acc"], r["alpha"]) > (cur["new_val_acc"], cur["alpha"]):
            best[r["method"]] = r
    for r in rows[1:]:
        r["selected"] = best[r["method"]] is r
    return rows
