"""``pyreg.path``: a regularization path for any model.

Fit the same model at a grid of regularization strengths, largest first, each
fit warm-started from the previous one (as scikit-learn's ``lasso_path`` and
glmnet do), or smallest first (``order="increasing"``: a network learns
before its weights are pruned, and the steps of one training run can be
spread over the whole grid), measure a validation metric, the sparsity and
the per-layer norms at every strength, and pick one (the best, or glmnet's
"one standard error" rule). :func:`path` returns a :class:`PathResult`.
"""
from __future__ import annotations

import copy
import glob
import math
import numbers
import os
import time
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import ops
from ._validate import flag, nonneg_real, real
from .optim.groups import param_groups
from .optim.keys import GroupSettings, read_group

#: The built-in methods (``method=`` also takes a callable).
METHODS = ("l1", "l2", "elastic_net", "group", "strength", "group_strength")
#: The selection rules.
SELECTS = ("best", "1se")
#: The orders the grid can be fitted in.
ORDERS = ("decreasing", "increasing")
#: What a ``method`` callable may return (the keyword arguments of :func:`pyreg.param_groups`).
_GROUP_KWARGS = frozenset(("l1", "l2", "exclude", "overrides", "ref", "l1_strength"))
#: The methods whose alpha is a strength in [0, 1] (default grid from _STRENGTH_TOP down).
_STRENGTH_METHODS = ("strength", "group_strength")
#: ``method="strength"``: the default grid, from this strength down, evenly spaced.
_STRENGTH_TOP = 0.95
#: ``method="l2"``: ridge has no alpha that keeps zero weights at zero; the
#: default grid then starts where glmnet's ridge grid starts (its rule for
#: l1_ratio = 0: alpha_max at l1_ratio = 1e-3), in pyreg's convention.
_RIDGE_RATIO = 1e-3

Batches = Union[Tuple[Tensor, Tensor], Iterable[Any]]


# --------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------
class PathResult:
    """What :func:`path` returns.

    Attributes:
        alphas: the grid, in the order it was fitted (``order``).
        rows: one dict per alpha: ``alpha``, ``train_loss`` (the mean training
            loss over the last epoch's batches), ``val_metric`` (the mean
            metric), ``val_se`` (its standard error; NaN where it cannot be
            estimated: a metric that returns one value per batch, on a single
            batch), ``sparsity`` (fraction of exact zeros over all regularized
            weights), ``layers`` (per regularized parameter name: ``sparsity``,
            ``l1`` = sum|w|, ``l2`` = ||w||_2), ``epochs``, ``seconds`` and
            ``start`` (the alpha of the fit this one started from; None:
            the model's own weights, as the first fit does, and a fit after
            a dead one when no fit before was alive: see :func:`path`'s
            ``order``).
        best_index: the index of the best mean metric (of equal ones, the
            largest alpha's).
        index_1se: the index of the largest alpha whose mean metric is within
            one standard error of the best (glmnet's ``lambda.1se``).
        select: the rule that picked :attr:`index` (``"best"`` or ``"1se"``).
        order: the order the grid was fitted in (``"decreasing"`` or ``"increasing"``).
        index: the selected index; ``alpha`` is ``alphas[index]``.
        metric_on: ``"val"``, or ``"train"`` when no validation data was given
            (the metric was then measured on the training data).
        greater_is_better: whether a larger metric is better.
    """

    def __init__(self, alphas: List[float], rows: List[Dict[str, Any]], best_index: int, index_1se: int,
                 select: str, order: str, metric_on: str, greater_is_better: bool,
                 weights: Dict[int, Dict[str, Tensor]],
                 template: nn.Module, modes: Optional[Sequence[bool]] = None):
        self.alphas = alphas
        self.rows = rows
        self.best_index = best_index
        self.index_1se = index_1se
        self.select = select
        self.order = order
        self.index = best_index if select == "best" else index_1se
        self.metric_on = metric_on
        self.greater_is_better = greater_is_better
        self._weights = weights
        self._template = template
        self._modes = modes

    @property
    def alpha(self) -> float:
        """The selected alpha."""
        return self.alphas[self.index]

    def weights(self, i: Optional[int] = None) -> Dict[str, Tensor]:
        """The state dict (CPU copies) kept at alpha index ``i`` (default: the
        selected one). With ``keep_weights=False`` only the selected index has one."""
        i = self._index(i)
        if i not in self._weights:
            raise ValueError(f"the weights at alpha index {i} were not kept: with keep_weights=False only "
                             f"the selected fit (index {self.index}) is kept")
        return self._weights[i]

    def model(self, i: Optional[int] = None) -> nn.Module:
        """A new module (a copy of the model's architecture) holding the
        weights at alpha index ``i`` (default: the selected one), on the
        device the path ran on, each of its modules in the mode (train or
        eval) it had in the model given to :func:`path`."""
        state = self.weights(i)
        out = copy.deepcopy(self._template)
        out.load_state_dict(state)
        if self._modes is None:
            return out.train()
        _set_modes(out, self._modes)
        return out

    def _index(self, i: Optional[int]) -> int:
        if i is None:
            return self.index
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"the alpha index must be an int, got {type(i).__name__}")
        n = len(self.alphas)
        if not -n <= i < n:
            raise IndexError(f"alpha index {i} is out of range for a path of {n} alphas")
        return int(i) % n

    def table(self) -> str:
        """The path as a markdown table: one line per alpha, with the metric's
        mean ± standard error, the fit it started from (``model``: the
        model's own weights) and marks at the best and the 1se alphas."""
        what = "val metric" if self.metric_on == "val" else "train metric"
        lines = [f"| # | alpha | train loss | {what} (± se) | sparsity | start | pick |",
                 "|---:|---:|---:|---:|---:|---:|:---|"]
        for i, r in enumerate(self.rows):
            se = "" if not math.isfinite(r["val_se"]) else f" ± {r['val_se']:.3g}"
            marks = [m for m, j in (("best", self.best_index), ("1se", self.index_1se)) if i == j]
            if i == self.index:
                marks.append("selected")
            start = "model" if r.get("start") is None else f"{r['start']:.4g}"
            lines.append(f"| {i} | {r['alpha']:.4g} | {r['train_loss']:.4g} | {r['val_metric']:.4g}{se} | "
                         f"{r['sparsity']:.1%} | {start} | {', '.join(marks)} |")
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        """Everything but the weights, as plain Python values (JSON-serialisable:
        a non-finite number becomes None)."""
        return _plain({"alphas": list(self.alphas), "rows": self.rows, "best_index": self.best_index,
                       "index_1se": self.index_1se, "select": self.select, "order": self.order,
                       "index": self.index, "alpha": self.alpha, "metric_on": self.metric_on,
                       "greater_is_better": self.greater_is_better})

    def plot(self, path: str) -> str:
        """Save a figure of the path to ``path`` (PNG) and return ``path``: the
        metric with ±se error bars and lines at the best and 1se alphas, the
        per-layer sparsity and the per-layer L2 norm, against alpha on a log
        axis (largest alpha on the left, whatever the order fitted). Needs matplotlib."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a file name (str or os.PathLike), got {type(path).__name__}")
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("PathResult.plot needs matplotlib: pip install matplotlib") from e
        alphas = list(self.alphas)
        positive = [a for a in alphas if a > 0]
        fig = Figure(figsize=(13, 4), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, 3)
        metric = [r["val_metric"] for r in self.rows]
        se = [r["val_se"] if math.isfinite(r["val_se"]) else 0.0 for r in self.rows]
        ax = axes[0]
        ax.errorbar(alphas, metric, yerr=se, marker="o", ms=3, capsize=2)
        ax.axvline(alphas[self.best_index], color="tab:green", ls="--", label="best")
        ax.axvline(alphas[self.index_1se], color="tab:red", ls=":", label="1se")
        ax.set_ylabel("val metric" if self.metric_on == "val" else "train metric")
        ax.legend()
        names = list(self.rows[0]["layers"]) if self.rows else []
        for name in names:
            axes[1].plot(alphas, [r["layers"][name]["sparsity"] for r in self.rows], marker=".", label=name)
            axes[2].plot(alphas, [r["layers"][name]["l2"] for r in self.rows], marker=".", label=name)
        axes[1].set_ylabel("fraction of exact zeros")
        axes[2].set_ylabel("L2 norm")
        if names and len(names) <= 12:
            axes[1].legend(fontsize="small")
        for ax in axes:
            if positive and len(positive) < len(alphas):
                ax.set_xscale("symlog", linthresh=min(positive))
            elif positive:
                ax.set_xscale("log")
            ax.invert_xaxis()  # largest first
            ax.set_xlabel("alpha")
        fig.savefig(path, format="png", dpi=100)
        return path

    def __repr__(self) -> str:
        if not self.rows:
            return "PathResult(empty)"
        r = self.rows[self.index]
        return (f"PathResult({len(self.alphas)} alphas, select={self.select!r}, alpha={self.alpha:.4g} "
                f"(index {self.index}), {self.metric_on}_metric={r['val_metric']:.4g}, "
                f"sparsity={r['sparsity']:.1%})")


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------
def _int(v: Any, name: str, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    return int(v)


def _check_device(device: torch.device) -> None:
    """A device of a type whose torch module says it is available here (CUDA,
    MPS, XPU...), with an index below its count; a type torch has no module
    for (an out-of-tree backend) is left to that backend."""
    if device.type == "cpu":
        return
    mod = getattr(torch, device.type, None)
    available = getattr(mod, "is_available", None)
    if device.type == "mps" and not callable(available):
        available = torch.backends.mps.is_available
    if not callable(available):
        return
    name = {"cuda": "CUDA", "mps": "MPS", "xpu": "XPU", "mtia": "MTIA"}.get(device.type, device.type)
    if not available():
        raise ValueError(f"device: {str(device)!r}, but {name} is not available here")
    count = getattr(mod, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        raise ValueError(f"device: {str(device)!r}, but {name} has {count()} device(s) here")


def _check_alphas(alphas: Any) -> Optional[List[float]]:
    if alphas is None:
        return None
    if isinstance(alphas, Tensor):
        alphas = alphas.detach().cpu().reshape(-1).tolist()
    elif isinstance(alphas, (str, bytes)) or not isinstance(alphas, Iterable):
        raise TypeError(f"alphas must be None or a sequence of numbers, got {type(alphas).__name__}")
    out = []
    for i, a in enumerate(alphas):
        if hasattr(a, "item") and not isinstance(a, numbers.Real):  # numpy / 0-dim tensor
            size = a.numel() if isinstance(a, Tensor) else getattr(a, "size", 1)
            if size != 1:
                raise ValueError(f"alphas[{i}] holds {size} values; each alpha is one number (pass a flat "
                                 "sequence of numbers, or a 1-D tensor)")
            a = a.item()
        out.append(nonneg_real(a, f"alphas[{i}]"))
    if not out:
        raise ValueError("alphas is empty: pass at least one alpha, or None for the default grid")
    return sorted(out, reverse=True)


def _check_data(data: Any, name: str) -> Tuple[bool, Any]:
    """(full_batch, data): a pair of tensors (one batch), or a re-iterable of batches."""
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(f"{name}=(X, y) needs X and y with the same first dimension (samples), "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} has no samples")
        return True, data
    if isinstance(data, (str, bytes, Tensor)) or not isinstance(data, Iterable):
        raise TypeError(f"{name} must be a tuple (X, y) of tensors or an iterable of (x, y) batches "
                        f"(a DataLoader), got {type(data).__name__}")
    if iter(data) is data:
        raise TypeError(f"{name} is an iterator, which can be read only once; pass something that can be "
                        "iterated every epoch (a list of batches, a DataLoader)")
    return False, data


def _regularized_names(groups: List[Dict[str, Any]]) -> List[str]:
    """The names of the parameters that a key of their group regularizes
    (a penalty, a target, a strength or a constraint: the keys' own reading,
    :meth:`GroupSettings.kinds`)."""
    out = []
    for gi, g in enumerate(groups):
        settings = read_group(g, {}, f"param_groups[{gi}]")
        out += [name for j, name in enumerate(g["param_names"]) if settings.kinds(j)]
    return out


class _Method:
    """``method=`` and its arguments: the param groups at each alpha."""

    def __init__(self, method: Any, l1_ratio: float, group_dim: int, exclude: Any):
        self.method, self.l1_ratio, self.group_dim, self.exclude = method, l1_ratio, group_dim, exclude
        self.names: List[str] = []

    def kwargs(self, alpha: float) -> Dict[str, Any]:
        m = self.method
        if m == "l1":
            return {"l1": alpha, "exclude": self.exclude}
        if m == "l2":
            return {"l2": alpha, "exclude": self.exclude}
        if m == "elastic_net":
            return {"l1": alpha * self.l1_ratio, "l2": 0.5 * alpha * (1.0 - self.l1_ratio), "exclude": self.exclude}
        if m == "group":
            over = {glob.escape(n): {"group_l1": alpha, "group_dim": self.group_dim} for n in self.names}
            return {"exclude": self.exclude, "overrides": over}
        if m == "strength":
            return {"l1_strength": alpha, "exclude": self.exclude}
        if m == "group_strength":
            over = {glob.escape(n): {"group_strength": alpha, "group_dim": self.group_dim} for n in self.names}
            return {"exclude": self.exclude, "overrides": over}
        kw = m(alpha)
        if not isinstance(kw, dict):
            raise TypeError(f"method({alpha!r}) must return a dict of pyreg.param_groups keyword arguments, "
                            f"got {type(kw).__name__}")
        bad = sorted(set(kw) - _GROUP_KWARGS)
        if bad:
            raise ValueError(f"method({alpha!r}) returned {bad}: not keyword arguments of pyreg.param_groups "
                             f"(expected some of {sorted(_GROUP_KWARGS)})")
        kw = dict(kw)
        kw.setdefault("exclude", self.exclude)
        return kw

    def groups(self, model: nn.Module, alpha: float) -> List[Dict[str, Any]]:
        return param_groups(model, **self.kwargs(alpha))

    def check(self, model: nn.Module, alphas: Optional[List[float]]) -> None:
        """Every alpha's groups built once on ``model`` (which is not changed),
        so a bad setting raises before anything is trained; sets :attr:`names`."""
        base = param_groups(model, l1=1.0, exclude=self.exclude)
        names = _regularized_names(base)
        if callable(self.method):
            if alphas is None:
                raise ValueError("method is a callable: pass alphas (the default grid needs a built-in method)")
            seen = set()
            for a in alphas:
                seen.update(_regularized_names(self.groups(model, a)))
            if seen:
                order = [n for g in base for n in g["param_names"]]
                names = [n for n in order if n in seen]
        self.names = names
        if not names:
            raise ValueError("no parameter is regularized: every trainable parameter is excluded "
                             "(see exclude=; exclude=[] regularizes them all)")
        if self.method in ("group", "group_strength"):
            from ._validate import group_dims

            params = dict((n, p) for g in base for n, p in zip(g["param_names"], g["params"]))
            for n in names:
                p = params[n]
                if p.dim() == 0:
                    raise ValueError(f"method={self.method!r} needs group_dim < ndim for every regularized parameter; "
                                     f"{n!r} is 0-dim")
                group_dims(self.group_dim, [p], f"group_dim (for {n!r})")
            self.groups(model, 1.0)


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------
def _batch_count(train: Any, full: bool) -> Optional[int]:
    """Batches per epoch: 1 for full-batch data, else ``len(train)`` where it has one."""
    if full:
        return 1
    try:
        return len(train)
    except TypeError:  # (an iterable without a length)
        return None


def _check_strength_steps(method: str, steps: Optional[int], warn: bool = False) -> None:
    """A strength sets its l1 at its first refresh, after ``l1_refresh``
    steps, acting from the next step: a fit of no more steps trains without
    it (``steps``: a fit's; None: unknown, nothing to check). Raises
    ValueError, or (``warn``: counted in the first fit) warns."""
    refresh = GroupSettings._field_defaults["refresh"]
    if steps is None or steps > refresh:
        return
    msg = (f"method={method!r}: a strength sets each tensor's coefficient at its first refresh, after "
           f"l1_refresh = {refresh} steps, and it acts from the next step; a fit of {steps} steps (epochs x "
           f"batches) trains without it. Give more epochs (or smaller batches): over {refresh} steps per fit")
    if warn:
        warnings.warn(msg, stacklevel=3)
    else:
        raise ValueError(msg)


def _to(x: Any, device: Optional[torch.device]) -> Any:
    if device is None:
        return x
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a namedtuple: its fields by position
        return type(x)(*(_to(v, device) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):  # (a copy keeps what a subclass holds besides its items: a defaultdict's factory)
        out = copy.copy(x)
        for k, v in x.items():
            out[k] = _to(v, device)
        return out
    return x


def _batches(data: Any, full: bool, device: Optional[torch.device], name: str):
    if full:
        yield data
        return
    for i, b in enumerate(data):
        if not isinstance(b, (list, tuple)) or len(b) != 2:
            raise TypeError(f"{name} must yield (x, y) batches, got {type(b).__name__}"
                            + (f" of length {len(b)}" if isinstance(b, (list, tuple)) else ""))
        if _size(b[0], b[1]) == 0:  # (its mean loss is NaN: it would make the weights NaN)
            raise ValueError(f"{name}'s batch {i} has no samples")
        yield _to(b[0], device), _to(b[1], device)


def _leading(t: Any) -> Optional[int]:
    """The first dimension of the first tensor of 1 or more dims in ``t`` (a tensor, or a list,
    tuple or dict of them, nested), or None."""
    if isinstance(t, Tensor):
        return t.shape[0] if t.dim() > 0 else None
    items = t.values() if isinstance(t, dict) else t if isinstance(t, (list, tuple)) else ()
    for v in items:
        n = _leading(v)
        if n is not None:
            return n
    return None


def _size(x: Any, y: Any) -> int:
    """A batch's number of samples: the first dimension of its targets' first tensor, else of its
    inputs' (1 where neither holds a tensor of 1 or more dims)."""
    for t in (y, x):
        n = _leading(t)
        if n is not None:
            return n
    return 1


def _scalar(v: Any, what: str) -> Tensor:
    """A loss's value, checked: one value, which training can differentiate."""
    if not isinstance(v, Tensor) or v.numel() != 1:
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"{what} must return a scalar tensor, got {shape}")
    if not v.requires_grad:
        raise ValueError(f"{what} returned a tensor that does not depend on the model's weights (no grad: "
                         "detached, computed under torch.no_grad, or from .item()); it must be differentiable")
    return v.reshape(())


# --------------------------------------------------------------------------
# The path
# --------------------------------------------------------------------------
def _set_modes(module: nn.Module, modes: Sequence[bool]) -> None:
    """Each of ``module``'s modules (in ``modules()`` order) in its mode of ``modes``."""
    for m, t in zip(module.modules(), modes):
        m.training = t


def _train(work: nn.Module, modes: Sequence[bool]) -> None:
    """``work`` in the modes to train in: the given model's, module by module,
    where it was given in training mode (a submodule it holds in eval mode,
    such as a frozen BatchNorm, stays so); else every module in training mode."""
    if modes and modes[0]:
        _set_modes(work, modes)
    else:
        work.train()


#: alpha_max's margin over the largest gradient, in machine epsilons of the weights' dtype (see _alpha_max)
_TIE_MARGIN = 8


def _alpha_max(work: nn.Module, loss: Callable, train: Any, full: bool, device, params: List[Tensor],
               method: str, l1_ratio: float, group_dim: int, modes: Sequence[bool]) -> float:
    """The smallest alpha at which all-zero regularized weights stay zero: the
    largest |dloss/dw| (group: the largest group gradient norm) at the current
    weights, over the whole training data (batch losses weighted by their size),
    times 1 + 8 eps (eps: the machine epsilon of the weights' dtype, the
    largest where they differ): at the exact value the prox's test is a tie,
    which the rounding of a training step's gradient breaks either way."""
    buffers = {k: b.detach().clone() for k, b in work.named_buffers()}
    _train(work, modes)
    # Dropout off (its modules, and an RNN's between layers, which stays in training mode for cuDNN's backward):
    # the grid is the data's, not one random mask's. BatchNorm stays in training mode: its batch statistics are
    # part of the gradient, and its running ones are restored below.
    rnns = {m: m.dropout for m in work.modules() if isinstance(m, nn.RNNBase) and m.dropout}
    for m in work.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    for m in rnns:
        m.dropout = 0.0
    work.zero_grad(set_to_none=True)
    n = 0
    try:
        for x, y in _batches(train, full, device, "train"):
            b = _size(x, y)
            (_scalar(loss(work(x), y), "loss") * b).backward()
            n += b
    finally:
        _train(work, modes)
        for m, p in rnns.items():
            m.dropout = p
    if n == 0:
        raise ValueError("train has no batches")
    with torch.no_grad():
        grads = [p.grad / n if p.grad is not None else torch.zeros_like(p) for p in params]
        if method == "group":
            g = torch.cat([t.to(torch.float64) for t in ops.group_norms(grads, dim=group_dim)]).max()
        else:
            g = torch.stack([t.abs().max().to(torch.float64) for t in grads if t.numel()]).max()
        for k, b in work.named_buffers():  # the gradient pass must not move BatchNorm's statistics
            b.copy_(buffers[k])
    work.zero_grad(set_to_none=True)
    g = float(g) * (1.0 + _TIE_MARGIN * max((torch.finfo(p.dtype).eps for p in params), default=0.0))
    if method == "elastic_net":
        g /= l1_ratio
    elif method == "l2":
        g /= 2.0 * _RIDGE_RATIO  # glmnet's ridge grid: l1_ratio 1e-3; pyreg's l2 is its lambda / 2
    if not math.isfinite(g) or g <= 0.0:
        raise ValueError(f"cannot build the default grid: the loss gradient of the regularized weights at "
                         f"the model's weights gives alpha_max={g}; pass alphas")
    return g


def _applies_groups(opt: Any) -> bool:
    """Whether ``opt`` applies pyreg's param-group keys: one of pyreg.optim's
    optimizers or a pyreg.Regularized."""
    from .optim.fused import FusedOptimizer
    from .optim.regularized import Regularized

    return isinstance(opt, (FusedOptimizer, Regularized))


#: the integer dtypes a metric may return (counts, correct predictions), besides floating point
_METRIC_INTS = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _metric_value(v: Any, b: int) -> Tensor:
    """The metric's value on a batch of ``b`` samples, as float64: one value
    per sample (1-D) or one for the batch (0-dim)."""
    if isinstance(v, bool) or not isinstance(v, (Tensor, numbers.Real)):
        raise TypeError(f"metric must return a tensor or a number, got {type(v).__name__}")
    if not isinstance(v, Tensor):
        v = torch.tensor(float(v))
    if v.is_complex() or not (v.is_floating_point() or v.dtype in _METRIC_INTS):
        raise TypeError(f"metric must return real values, got dtype {v.dtype}")
    if v.dim() >= 1 and v.shape[0] == b and v.numel() == b:
        return v.detach().reshape(-1).to(torch.float64)
    if v.numel() == 1:
        return v.detach().reshape(()).to(torch.float64)
    raise ValueError(f"metric must return a scalar or one value per sample ({b}), got shape {tuple(v.shape)}")


def _check_metric(work: nn.Module, metric: Callable, data: Any, full: bool, device, name: str = "val") -> None:
    """The metric on the first batch of its data, before anything is trained:
    data with no batch, or a metric that returns what :func:`_evaluate`
    cannot take, raise now instead of after the first fit."""
    work.eval()
    try:
        with torch.no_grad():
            for x, y in _batches(data, full, device, name):
                _metric_value(metric(work(x), y), _size(x, y))
                return
    finally:
        work.train()
    raise ValueError("the metric's data has no batches")


def _evaluate(work: nn.Module, metric: Callable, data: Any, full: bool, device,
              name: str = "val") -> Tuple[float, float, bool]:
    """The metric's mean and standard error over ``data``, and whether the
    model's output was the same for every sample (a tensor output whose
    first dimension is the batch; False for any other output). Read back at the end."""
    work.eval()
    per_sample: List[Tensor] = []
    per_batch: List[Tensor] = []
    sizes: List[int] = []
    first: Optional[Tensor] = None  # the first sample's output
    differs: Optional[Tensor] = None  # whether any sample's output differs from it (on the device)
    broken: Optional[Tensor] = None  # whether any output is NaN or infinite (on the device)
    single: List[Tensor] = []  # a 1-sample batch's one value: per sample or per batch, as the others are
    constant = True
    samples = 0
    with torch.no_grad():
        for x, y in _batches(data, full, device, name):
            b = _size(x, y)
            samples += b
            out = work(x)
            if isinstance(out, Tensor) and out.is_floating_point():
                bad = ~torch.isfinite(out).all()
                broken = bad if broken is None else broken | bad
            if constant:
                if (not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != b
                        or (first is not None and first.shape[1:] != out.shape[1:])):
                    constant = False
                elif b:
                    first = out[:1].clone() if first is None else first
                    d = (out != first).any()
                    differs = d if differs is None else differs | d
            v = _metric_value(metric(out, y), b)
            if b == 1:
                single.append(v.reshape(()))
            elif v.dim() == 1:
                per_sample.append(v)
            else:
                per_batch.append(v)
                sizes.append(b)
    work.train()
    if single:  # (the same number either way)
        if per_sample:
            per_sample.append(torch.stack(single))
        else:
            per_batch.extend(single)
            sizes.extend([1] * len(single))
    # (one sample: nothing to compare it with, so never "the same output for every sample"); a
    # fit whose output is NaN or infinite is as dead
    constant = (constant and samples > 1 and differs is not None and not bool(differs)) or (
        broken is not None and bool(broken))
    if per_sample and per_batch:
        raise ValueError("metric returned one value per sample for some batches and a scalar for others (a batch "
                         "of one sample? return one value per sample as a 1-D tensor, e.g. values.reshape(-1))")
    if per_sample:
        v = torch.cat([t.cpu() for t in per_sample])
        n = v.numel()
        if n == 0:
            raise ValueError("the metric's data has no samples")
        mean = float(v.mean())
        se = float(v.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
        return mean, se, constant
    if not per_batch:
        raise ValueError("the metric's data has no batches")
    v = torch.stack([t.cpu() for t in per_batch])
    w = torch.tensor(sizes, dtype=torch.float64)
    w = w / w.sum()
    mean = float((w * v).sum())
    k = v.numel()
    se = float(torch.sqrt(k / (k - 1) * (w * w * (v - mean) ** 2).sum())) if k > 1 else float("nan")
    return mean, se, constant


def _cpu_state(work: nn.Module) -> Dict[str, Tensor]:
    """A CPU copy of ``work``'s state dict."""
    return {k: v.detach().to("cpu", copy=True) for k, v in work.state_dict().items()}


def _layer_stats(names: List[str], params: List[Tensor]) -> Tuple[float, Dict[str, Dict[str, float]]]:
    st = ops.weight_stats([p.detach() for p in params])
    host = torch.stack([st.l1.to(torch.float64), st.l2.to(torch.float64), st.nnz.to(torch.float64)]).cpu()
    l1, l2, nnz = host.tolist()
    numels = [p.numel() for p in params]
    layers = {n: {"sparsity": (1.0 - z / m) if m else 0.0, "l1": a, "l2": b}
              for n, a, b, z, m in zip(names, l1, l2, nnz, numels)}
    total = sum(numels)
    return (1.0 - sum(nnz) / total) if total else 0.0, layers


def _better(a: float, b: float, greater: bool) -> bool:
    """Whether metric a is strictly better than b (NaN is worst)."""
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a > b if greater else a < b


def _beats(row: Dict[str, Any], other: Dict[str, Any], greater: bool) -> bool:
    """Whether ``row`` is selected over ``other`` as the best: a better mean
    metric, or an equal one at a larger alpha (the simpler model)."""
    a, b = row["val_metric"], other["val_metric"]
    if _better(a, b, greater):
        return True
    return a == b and row["alpha"] > other["alpha"]


def _select(rows: List[Dict[str, Any]], greater: bool) -> Tuple[int, int]:
    """(best, 1se) indices of ``rows``, in whatever order the alphas were fitted."""
    best = 0
    for i, r in enumerate(rows):
        if _beats(r, rows[best], greater):
            best = i
    m, se = rows[best]["val_metric"], rows[best]["val_se"]
    if math.isnan(m):
        return best, best
    se = se if math.isfinite(se) else 0.0
    limit = m - se if greater else m + se
    one_se = best
    for i, r in enumerate(rows):  # the largest alpha within one se of the best
        v = r["val_metric"]
        if not math.isnan(v) and (v >= limit if greater else v <= limit) and r["alpha"] > rows[one_se]["alpha"]:
            one_se = i
    return best, one_se


def _default_optimizer(groups: List[Dict[str, Any]]) -> torch.optim.Optimizer:
    from .optim import Adam

    return Adam(groups, lr=1e-3)


def path(model: nn.Module, loss: Callable[[Any, Any], Tensor], train: Batches, *, val: Optional[Batches] = None,
         alphas: Optional[Sequence[float]] = None, n_alphas: int = 10, eps: float = 1e-3,
         method: Union[str, Callable[[float], Dict[str, Any]]] = "l1", l1_ratio: float = 0.5,
         group_dim: int = 1, optimizer: Optional[Callable[[List[Dict[str, Any]]], torch.optim.Optimizer]] = None,
         epochs: int = 10, metric: Optional[Callable[[Any, Any], Tensor]] = None, greater_is_better: bool = False,
         select: str = "best", order: str = "decreasing", keep_weights: bool = True,
         exclude: Union[None, Callable[[str, Tensor, nn.Module], bool], Sequence[str]] = None,
         progress: bool = True, device: Union[None, str, torch.device] = None) -> PathResult:
    """Fit ``model`` along a grid of regularization strengths and measure each fit.

    The fits run on a copy of ``model`` (the model itself is not changed),
    starting from its current weights (a pre-trained model works), at each
    alpha of the grid from the largest to the smallest (or the reverse:
    ``order``), each one warm-started from the weights of the previous one
    (unless that one left the network dead: ``order``). Every alpha gets a
    fresh optimizer (the weights carry over, the optimizer's state does not)
    and ``epochs`` passes over ``train``. After each fit the metric is
    measured on ``val``, and the sparsity and norms of the regularized
    weights are read (read back once per alpha, after its fit; no host sync
    inside the training steps).

    Args:
        model: the model (an ``nn.Module``); not changed.
        loss: ``loss(model(x), y)`` -> scalar tensor: the training objective
            without the penalty (a mean over the batch).
        train: the training data: a tuple ``(X, y)`` of tensors (one full batch:
            one step per epoch), or an iterable of ``(x, y)`` batches such as a
            ``DataLoader`` (iterated again every epoch).
        val: the data the metric is measured on, in the same forms. None: the
            training data (``result.metric_on`` is then ``"train"``).
        alphas: the grid (fitted in ``order``, whatever the order given).
            None: ``n_alphas`` values spaced geometrically from
            ``alpha_max`` down to ``eps * alpha_max``, where ``alpha_max`` is
            the smallest alpha at which all-zero regularized weights stay zero:
            the largest |d loss / d w| over the regularized weights at the
            model's weights (times 1 + 8 eps of their dtype: at the exact
            value a step's rounding breaks the tie either way), on the whole
            training data with dropout off (``"group"``: the
            largest gradient norm of a group; ``"elastic_net"``: divided by
            ``l1_ratio``; ``"l2"``, which never zeroes weights: glmnet's ridge
            rule, the elastic-net value at ``l1_ratio = 1e-3``, i.e.
            ``max|g| / 1e-3 / 2`` in pyreg's l2). For a linear model with zero
            weights and ``loss = 0.5 * mse`` this is scikit-learn's
            ``max|X^T y| / n``.
        n_alphas: the size of the default grid.
        eps: the default grid's smallest alpha over its largest (0 < eps < 1).
        method: ``"l1"`` (``l1 = alpha``), ``"l2"`` (``l2 = alpha``: the
            penalty ``alpha * sum w^2``), ``"elastic_net"`` (scikit-learn's
            ``alpha * l1_ratio * sum|w| + 0.5 * alpha * (1 - l1_ratio) * sum w^2``,
            i.e. ``l1 = alpha * l1_ratio``, ``l2 = 0.5 * alpha * (1 - l1_ratio)``),
            ``"group"`` (group lasso ``group_l1 = alpha`` over the slices along
            ``group_dim`` of every regularized weight), ``"strength"``
            (``l1_strength = alpha``, a fraction in [0, 1]: each tensor's
            l1 set from its own push, see :func:`pyreg.param_groups`; the
            default grid is ``n_alphas`` strengths evenly spaced from 0.95
            down, ``eps`` unused), ``"group_strength"`` (the same for
            group lasso: ``group_strength = alpha`` over the slices along
            ``group_dim`` of every regularized weight), or a callable
            ``alpha -> dict`` of :func:`pyreg.param_groups` keyword arguments
            (``l1``, ``l2``, ``exclude``, ``overrides``, ``ref``, ``l1_strength``) for anything
            else; it needs ``alphas``.
        l1_ratio: the L1 share of ``"elastic_net"``, in (0, 1].
        group_dim: the dimension whose slices are the groups of ``"group"``
            (1: the input columns of an ``nn.Linear`` weight).
        optimizer: ``optimizer(param_groups)`` -> an optimizer, called once
            per alpha, e.g. ``lambda g: pyreg.optim.SGD(g, lr=0.1)``. It must
            apply the groups' ``l1``/``l2``/``group_l1``: one of pyreg's
            optimizers or :class:`pyreg.Regularized`. Default:
            ``pyreg.optim.Adam(g, lr=1e-3)``.
        epochs: passes over ``train`` at each alpha (>= 1). The strength
            methods need more than ``l1_refresh`` (10) steps per fit (epochs x
            batches): their first refresh sets the coefficient, acting from the
            next step (fewer raise ValueError; a warning after the first fit
            where ``train`` has no length).
        metric: ``metric(model(x), y)`` -> a tensor: one value per sample (the
            standard error is then over samples) or a scalar per batch (over
            batches, weighted by batch size). Default: ``loss``. Measured in
            eval mode without grad.
        greater_is_better: True for accuracy-like metrics.
        select: ``"best"`` (the best mean metric) or ``"1se"`` (the largest
            alpha whose mean metric is within one standard error of the best,
            glmnet's ``lambda.1se``). Both are computed; this picks
            ``result.alpha``. Of equal metrics, both pick the larger alpha.
        order: ``"decreasing"`` (largest alpha first, as scikit-learn and
            glmnet fit a path: from the sparsest model, each fit adding
            weights) or ``"increasing"`` (smallest first: each fit prunes the
            previous one, so a network learns before it is pruned).
            Increasing is also the order for spreading the steps of one
            training run over the grid (``epochs`` = the run's epochs / the
            number of alphas). In either order, a dead fit is no warm
            start: one after which the model's output is the same for every
            sample of the metric's data, or NaN or infinite anywhere (a fit
            that diverged), with more than one regularized tensor. A network whose regularized layers are (nearly) all
            zero is stuck there at every alpha (with every weight of a layer
            zero, no gradient that depends on the input reaches the others),
            so every later fit started there would stay dead. The next fit
            starts instead from the last live fit, or from the model's own
            weights if none was (``rows[i]["start"]`` says which). A single
            regularized tensor, as a linear model's, is never stuck at
            zero: its fits are always warm-started.
        keep_weights: keep a CPU copy of the weights at every alpha (for
            ``result.model(i)``). False: keep only what the selection may
            need (``"best"``: the best so far; ``"1se"`` in decreasing order:
            each fit better than all before it; in increasing order: every
            fit, as a later one may still be picked), and only the selected
            fit in the result. Either way, with more than one regularized
            tensor, the last live fit's weights (at first the model's) are
            also kept on the CPU while the path runs, for a restart after a
            dead fit (``order``).
        exclude: the parameters left unregularized, as :func:`pyreg.param_groups`
            takes it (None: biases, norms, embeddings, 1-D parameters).
        progress: show a progress bar over the alphas (needs tqdm; none without it).
        device: the device to train on (the copy and the batches are moved
            there). None: the model's device (batches are moved to it).

    Returns:
        A :class:`PathResult`.

    Raises:
        TypeError, ValueError: for a bad argument, before anything is trained.
    """
    # -- checks, all before any training ------------------------------------------------
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers()):
        raise TypeError("model has tensors on the meta device, which hold no data: materialize it first "
                        "(model.to_empty(device=...), then load its weights)")
    if not callable(loss):
        raise TypeError(f"loss must be a callable (output, target) -> tensor, got {type(loss).__name__}")
    if metric is not None and not callable(metric):
        raise TypeError(f"metric must be None or a callable (output, target) -> tensor, got {type(metric).__name__}")
    if optimizer is not None and not callable(optimizer):
        raise TypeError(f"optimizer must be None or a callable param_groups -> optimizer, "
                        f"got {type(optimizer).__name__}")
    if not callable(method) and (not isinstance(method, str) or method not in METHODS):
        raise ValueError(f"unknown method {method!r}: expected one of {list(METHODS)} or a callable "
                         "alpha -> dict of pyreg.param_groups arguments")
    l1_ratio = real(l1_ratio, "l1_ratio")
    if not 0.0 < l1_ratio <= 1.0:
        raise ValueError(f"l1_ratio must be in (0, 1], got {l1_ratio} (l1_ratio = 0 is method='l2')")
    if isinstance(group_dim, bool) or not isinstance(group_dim, numbers.Integral):
        raise TypeError(f"group_dim must be an int, got {type(group_dim).__name__}")
    epochs = _int(epochs, "epochs", 1)
    n_alphas = _int(n_alphas, "n_alphas", 1)
    eps = real(eps, "eps")
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    grid = _check_alphas(alphas)
    if method in _STRENGTH_METHODS and grid is not None and max(grid) > 1.0:
        raise ValueError(f"method={method!r} takes strengths in [0, 1]; got {max(grid)}")
    if not isinstance(select, str) or select not in SELECTS:
        raise ValueError(f"select must be one of {list(SELECTS)}, got {select!r}")
    if not isinstance(order, str) or order not in ORDERS:
        raise ValueError(f"order must be one of {list(ORDERS)}, got {order!r}")
    greater_is_better = flag(greater_is_better, "greater_is_better")
    keep_weights = flag(keep_weights, "keep_weights")
    progress = flag(progress, "progress")
    if device is not None:
        if not isinstance(device, (str, torch.device)):
            raise TypeError(f"device must be None, a str or a torch.device, got {type(device).__name__}")
        try:
            device = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"device: {e}") from None
        if device.type == "meta":
            raise ValueError("device: 'meta' holds no data to train on")
        _check_device(device)
    full_train, train = _check_data(train, "train")
    if val is None:
        full_val, val_data, metric_on = full_train, train, "train"
    else:
        full_val, val_data = _check_data(val, "val")
        metric_on = "val"
    spec = _Method(method, l1_ratio, int(group_dim), exclude)
    spec.check(model, grid)
    if method in _STRENGTH_METHODS:
        batches = _batch_count(train, full_train)
        _check_strength_steps(method, None if batches is None else epochs * batches)
    make_optimizer = _default_optimizer if optimizer is None else optimizer
    metric = loss if metric is None else metric

    # -- the copy --------------------------------------------------------------------------
    work = copy.deepcopy(model)
    modes = [m.training for m in model.modules()]
    if device is not None:
        work.to(device)
    else:
        first = next(iter(work.parameters()), None)
        device = first.device if first is not None else None
    if full_train:
        train = _to(train, device)
    if full_val:
        val_data = _to(val_data, device)
    _check_metric(work, metric, val_data, full_val, device, metric_on)
    named = {n: p for g in param_groups(work, exclude=exclude) for n, p in zip(g["param_names"], g["params"])}
    reg_names = spec.names
    reg_params = [named[n] for n in reg_names]

    if grid is None and method in _STRENGTH_METHODS:
        grid = [_STRENGTH_TOP] if n_alphas == 1 else [_STRENGTH_TOP * (1 - k / n_alphas) for k in range(n_alphas)]
    if grid is None:
        top = _alpha_max(work, loss, train, full_train, device, reg_params, method, l1_ratio, int(group_dim),
                         modes)
        grid = [top] if n_alphas == 1 else [top * eps ** (k / (n_alphas - 1)) for k in range(n_alphas)]
    if order == "increasing":
        grid = grid[::-1]

    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(grid), desc="pyreg.path", unit="alpha")
        except ImportError:
            bar = None

    rows: List[Dict[str, Any]] = []
    weights: Dict[int, Dict[str, Tensor]] = {}
    best_row: Optional[Dict[str, Any]] = None
    keep_all = keep_weights or (select == "1se" and order == "increasing")
    # A dead fit (the same output for every sample) of a network is no warm start: the next fit
    # starts from the last live one, or from the model's own weights. Their CPU copy is kept only
    # where more than one tensor is regularized (a single one, as a linear model's, is not stuck
    # at zero).
    live: Optional[Tuple[Optional[float], Dict[str, Tensor]]] = (
        (None, _cpu_state(work)) if len(reg_params) > 1 else None)
    start: Optional[float] = None
    try:
        for i, alpha in enumerate(grid):
            t0 = time.perf_counter()
            opt = make_optimizer(spec.groups(work, alpha))
            if not _applies_groups(opt):
                raise TypeError(f"optimizer(param_groups) returned a {type(opt).__name__}, which does not apply the "
                                "groups' l1/l2/group_l1 (the path would train without them): return one of "
                                "pyreg.optim's optimizers or a pyreg.Regularized")
            _train(work, modes)
            total = count = None
            steps = 0
            for _ in range(epochs):
                total, count = None, 0
                for x, y in _batches(train, full_train, device, "train"):
                    opt.zero_grad(set_to_none=True)
                    value = _scalar(loss(work(x), y), "loss")
                    value.backward()
                    opt.step()
                    steps += 1
                    b = _size(x, y)
                    part = value.detach() * b
                    total = part if total is None else total + part
                    count += b
                if count == 0:
                    raise ValueError("train has no batches")
            if i == 0 and method in _STRENGTH_METHODS and not full_train:  # (train of unknown length)
                _check_strength_steps(method, steps, warn=True)
            del opt
            work.zero_grad(set_to_none=True)
            train_loss = float(total) / count
            mean, se, constant = _evaluate(work, metric, val_data, full_val, device, metric_on)
            sparsity, layers = _layer_stats(reg_names, reg_params)
            row = {"alpha": alpha, "train_loss": train_loss, "val_metric": mean, "val_se": se,
                   "sparsity": sparsity, "layers": layers, "epochs": epochs,
                   "seconds": time.perf_counter() - t0, "start": start}
            rows.append(row)
            record = best_row is None or _beats(row, best_row, greater_is_better)  # the best so far
            if record:
                best_row = row
            # In decreasing order the best and the 1se fits are both records: without keep_weights only
            # records are kept ("best": the latest only), and at the end only the selected one.
            if keep_all or record:
                if not keep_all and select == "best":
                    weights.clear()
                weights[i] = _cpu_state(work)
            start = alpha
            if live is not None and i + 1 < len(grid):
                if constant:  # no warm start: the next fit starts where the last live one ended
                    start = live[0]
                    work.load_state_dict(live[1])
                else:
                    live = (alpha, weights[i] if i in weights else _cpu_state(work))
            if bar is not None:
                bar.set_postfix(alpha=f"{alpha:.3g}", **{metric_on: f"{mean:.4g}"})
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    best, one_se = _select(rows, greater_is_better)
    if rows and all(math.isnan(r["val_metric"]) for r in rows):
        warnings.warn(f"pyreg.path: the {metric_on} metric is NaN at every alpha, so none is better than another: "
                      f"the selected index {best} (alpha {grid[best]:.4g}) is the first fitted, not a choice "
                      "(see result.table(); a loss that diverged gives NaN: try a smaller lr)",
                      RuntimeWarning, stacklevel=2)
    if select == "1se" and rows and not math.isfinite(rows[best]["val_se"]):
        warnings.warn(f"pyreg.path: select='1se' has no standard error at the best alpha (the {metric_on} metric "
                      "returned one value for a single batch): the 1se alpha is the best one. For a standard "
                      "error, return one value per sample (e.g. a loss with reduction='none') or pass several "
                      "batches", RuntimeWarning, stacklevel=2)
    chosen = best if select == "best" else one_se
    if not keep_weights:
        weights = {chosen: weights[chosen]}
    return PathResult(grid, rows, best, one_se, select, order, metric_on, greater_is_better, weights, work,
                      modes)
