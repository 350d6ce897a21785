"""The study: train one model per (task, method, alpha) with ``pyreg.Regularized``
and measure what regularization did to it.

Methods (strength ``alpha``, converted with :func:`pyreg.from_sklearn`, i.e.
scikit-learn's ``ElasticNet(alpha, l1_ratio)`` penalty):

* ``none``: no penalty (one run, alpha = 0);
* ``l1``: ``l1_ratio = 1`` (Lasso): exact zeros from the proximal step;
* ``l2``: ``l1_ratio = 0`` (ridge / decoupled weight decay);
* ``elastic``: ``l1_ratio = 0.5``;
* ``layer``: per-layer alpha: L1 ``alpha`` on the input layer (input
  selection) and ``alpha / 10`` on every other weight.

Every run of a task starts from the same initial weights (seeded) and sees the
same data, so runs differ only by their regularization. Biases are not
regularized (``pyreg.param_groups``' default). The coefficients ramp up
linearly over the first half of training (a schedule written into the param
groups, as any ``Regularized`` supports), so that a strong L1 does not zero
the network before it has learned which inputs matter.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

import pyreg

from .data import Splits

METHODS = ("none", "l1", "l2", "elastic", "layer")
L1_RATIO = {"l1": 1.0, "l2": 0.0, "elastic": 0.5}
LAYER_FACTOR = 0.1  # method "layer": alpha on the input layer, alpha * LAYER_FACTOR elsewhere


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------
class MLP(nn.Sequential):
    """inputs -> hidden -> hidden -> classes, ReLU; ``"0"`` is the input layer."""

    input_layer = "0"

    def __init__(self, num_features: int, num_classes: int, hidden: int = 32):
        super().__init__(nn.Linear(num_features, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))

    def first_weight(self) -> Tensor:
        return self[0].weight


class LSTMClassifier(nn.Module):
    """One LSTM layer and a linear head on the last hidden state."""

    input_layer = "lstm.weight_ih_l0"

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
    make_optimizer: Callable[[List[dict]], torch.optim.Optimizer]
    steps: int

    def to(self, device: torch.device) -> "Task":
        return Task(self.name, self.data.to(device), self.make_model, self.make_optimizer, self.steps)


def coefficients(method: str, alpha: float) -> Dict[str, float]:
    """Base (l1, l2) of a method at strength alpha."""
    if method == "none":
        return {"l1": 0.0, "l2": 0.0}
    if method == "layer":
        return {"l1": alpha * LAYER_FACTOR, "l2": 0.0}
    l1, l2 = pyreg.from_sklearn(alpha, L1_RATIO[method])
    return {"l1": l1, "l2": l2}


def build_groups(model: nn.Module, method: str, alpha: float) -> List[dict]:
    """``pyreg.param_groups`` for a method: biases excluded; for ``layer`` the
    input layer gets its own, stronger L1 (an override)."""
    overrides = {model.input_layer: {"l1": alpha}} if method == "layer" else None
    return pyreg.param_groups(model, **coefficients(method, alpha), overrides=overrides)


def _accuracy_and_loss(model: nn.Module, x: Tensor, y: Tensor):
    logits = model(x)
    return (logits.argmax(1) == y).float().mean(), nn.functional.cross_entropy(logits, y)


def train_one(task: Task, method: str, alpha: float, seed: int, device: torch.device,
              on_tick: Optional[Callable[[int, Optional[float]], None]] = None,
              want_loss: bool = False) -> dict:
    """Train one model and return its measurements (plain Python numbers).

    ``on_tick(steps_done, loss)`` is called about 20 times per run; the loss
    is read from the device (a host sync) only when ``want_loss``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # same initial weights for every run of a task
        model = task.make_model()
    model.to(device)
    data = task.data
    opt = pyreg.Regularized(task.make_optimizer(build_groups(model, method, alpha)), mode="proximal")
    targets = [(g["l1"], g["l2"]) for g in opt.param_groups]
    ramp_steps = max(1, task.steps // 2)
    tick = max(1, task.steps // 20)
    model.train()
    for step in range(task.steps):
        if step <= ramp_steps and (step % tick == 0 or step == ramp_steps):  # the schedule
            f = min(1.0, step / ramp_steps)
            for g, (l1, l2) in zip(opt.param_groups, targets):
                g["l1"], g["l2"] = l1 * f, l2 * f
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(data.x_train), data.y_train)
        loss.backward()
        opt.step()
        if on_tick is not None and ((step + 1) % tick == 0 or step + 1 == task.steps):
            on_tick(step + 1, loss.item() if want_loss else None)
    return measure(model, opt, data, method, alpha)


@torch.no_grad()
def measure(model: nn.Module, opt: pyreg.Regularized, data: Splits, method: str, alpha: float) -> dict:
    """Accuracy and loss per split, per-layer norms and sparsity, and which
    inputs the first layer still uses. Read back to the host once, after training."""
    model.eval()
    values = {}
    for split in ("train", "val", "test"):
        acc, loss = _accuracy_and_loss(model, getattr(data, f"x_{split}"), getattr(data, f"y_{split}"))
        values[f"{split}_acc"], values[f"{split}_loss"] = acc, loss
    stats = opt.stats()  # one fused weight_stats pass over all layers
    sparsity = opt.sparsity()
    first = model.first_weight()
    # a column of the input layer's weight is one input feature (LSTM: 4 gates x hidden rows)
    used = (first != 0).any(dim=0)
    column_norms = first.norm(dim=0)
    host = {k: float(v) for k, v in values.items()}
    used_list = used.cpu().tolist()
    informative = set(data.informative)
    used_idx = [j for j, u in enumerate(used_list) if u]
    kept = len(informative.intersection(used_idx))
    num_noise = data.num_features - len(informative)
    noise_used = len(used_idx) - kept
    layers = {}
    for i, name in enumerate(stats.names):
        layers[name] = {"l1_norm": float(stats.l1[i]), "l2_norm": float(stats.l2[i]),
                        "nonzero": int(stats.nnz[i]), "numel": int(stats.numel[i]),
                        "sparsity": float(sparsity.per_param[i])}
    coef = coefficients(method, alpha)
    return {
        "task": data.name, "method": method, "alpha": alpha,
        "l1": coef["l1"], "l2": coef["l2"],
        **{k: round(v, 6) for k, v in host.items()},
        "gap": round(host["train_acc"] - host["val_acc"], 6),
        "sparsity": float(sparsity.overall),
        "inputs_used": len(used_idx),
        "informative_kept": kept,
        "noise_zeroed": num_noise - noise_used,
        "num_informative": len(informative),
        "num_noise": num_noise,
        "precision": kept / len(used_idx) if used_idx else 0.0,
        "recall": kept / len(informative) if informative else 0.0,
        "layers": layers,
        "input_weight_norms": [round(float(v), 6) for v in column_norms.cpu().tolist()],
    }


def plan_runs(methods: Sequence[str], alphas: Sequence[float]) -> List[tuple]:
    """(method, alpha) pairs: ``none`` once, every other method over the grid."""
    runs = []
    for m in methods:
        runs.extend([(m, 0.0)] if m == "none" else [(m, a) for a in alphas])
    return runs


def run_study(tasks: Sequence[Task], methods: Sequence[str], alphas: Sequence[float], seed: int,
              device: torch.device, progress) -> List[dict]:
    """Every planned run of every task, in order; ``progress`` is a
    :class:`~pyreg.demo.report.Progress`."""
    results = []
    runs = [(t, m, a) for t in tasks for m, a in plan_runs(methods, alphas)]
    progress.start(sum(t.steps for t, _, _ in runs))
    for task, method, alpha in runs:
        label = f"{task.name} {method}" + ("" if method == "none" else f" alpha={alpha:g}")
        t0 = time.perf_counter()
        done = [0]

        def on_tick(step, loss, _done=done, _label=label):
            progress.advance(step - _done[0], _label, loss)
            _done[0] = step

        r = train_one(task, method, alpha, seed, device, on_tick, want_loss=progress.wants_loss)
        progress.run_done(label, r, time.perf_counter() - t0)
        results.append(r)
    progress.finish()
    return results


def grid_winners(results: Sequence[dict]) -> List[dict]:
    """Per (task, method): the run with the best validation accuracy; ties go
    to the larger alpha (the simpler, sparser model)."""
    best: Dict[tuple, dict] = {}
    for r in results:
        key = (r["task"], r["method"])
        cur = best.get(key)
        if cur is None or (r["val_acc"], r["alpha"]) > (cur["val_acc"], cur["alpha"]):
            best[key] = r
    return list(best.values())
