"""``pyreg.compact``: physically remove the inputs, neurons and channels that group lasso zeroed.

Group lasso (``group_l1`` in ``pyreg.Regularized`` / ``pyreg.optim``) makes whole
input columns, neurons and channels exactly zero, but the trained model still
stores and computes them. ``compact`` returns a smaller model with the same
outputs::

    out = pyreg.compact(model, example_inputs)   # the original model is not changed
    out.model(x)                                 # == model(x) (eval mode), within float32 rounding
    print(out.report)                            # per layer: params, MACs, what went; latency before/after
    out.report.to_dict()

``compact(model, example_inputs, *, drop_inputs=False, atol=None, measure=True) -> Compacted``

- ``example_inputs``: a tensor or a tuple of positional tensors for ``model``; it
  fixes the shapes (multiply-adds, flatten widths), is used to read the value of
  constant channels, to check the result, and (``measure=True``) to time both
  models, at its batch size.
- ``drop_inputs=False``: the compacted model takes the same inputs as the
  original and gathers the kept input features itself (``torch.narrow``, a
  view, when they are one contiguous range, else ``index_select``);
  ``drop_inputs=True``: it takes only the kept features
  (``x.index_select(dim, kept)`` with ``report.inputs[name]["dim"]`` and
  ``["kept"]``). Either way the report lists the kept and removed input
  indices. A gather of scattered features reads the whole input, which can
  cost about what the smaller first layer saves (on the demo MLP at batch
  4096: 0.87x with 8 scattered kept inputs, 1.5x with 8 contiguous ones, 1.7x
  with ``drop_inputs=True``): where speed matters, feed only the kept
  features.
- ``atol``: the allowed max abs difference of the outputs; default ``1e-5 ×``
  the largest original output magnitude (float32 rounding: folding changes the
  order of a sum), or ``16 eps ×`` it for float16 and bfloat16 outputs.
- ``measure=True``: median latency of both models, interleaved calls, on the
  CPU and (when available) CUDA (copies moved to the device the model is not on).

What is removed. The model is traced with ``torch.fx.symbolic_trace``; every
channel (a Linear's output neuron, a conv's output channel, an embedding
dimension, a recurrent layer's hidden unit, an input feature) is followed to
every layer that reads it, through element-wise activations and dropout,
``BatchNorm1d/2d``, pooling, ``flatten``/``view``/``reshape`` (a conv channel
becomes a contiguous block of features for a following Linear), ``transpose``,
``unsqueeze`` and ``squeeze`` (of named dims, the channel dim not among them),
reads of a tensor's ``device`` or
``dtype``, indexing of other dims, reductions over other dims (``max``/``min`` over a dim
where only their values are read), ``torch.cat`` and
element-wise sums and products (residual connections). Channels joined by a sum
are one group. A group is removed when, at every layer that reads it, either

- the layer's weight columns for it are all zero (its value is unused), or
- its value is a constant (every producer's incoming weights are zero: a Linear
  row, a conv kernel, an embedding column; a BatchNorm with ``gamma = 0``; a
  recurrent unit with all gate rows and biases zero, whose state stays 0) and
  the layer can absorb it exactly: ``bias += W[:, j] · value`` (for a conv,
  the kernel slice's sum). A constant channel feeding a zero-padded conv is not
  constant at the borders: it is removed only when its value is 0, else kept
  and reported. A layer without a bias gets one when a nonzero constant is
  folded into it. A constant stays one through a mean or a max over other
  dims, not through a sum (its value would scale with the number of
  positions, which another input may change: only a constant 0 is removed),
  nor through a product with a value the forward computes (``h * x.mean()``,
  ``h / x.size(0)``; a parameter or buffer is fixed). A layer called more
  than once has one bias for all its calls: there only a constant 0 (nothing
  to fold) is removed.

Pooling keeps a channel a channel when its input is batched (``MaxPool1d`` on
``[B, C, L]``, ``MaxPool2d`` on ``[B, C, H, W]``); on an unbatched input torch
pools over the channel dim itself (``MaxPool1d`` on a Linear's ``[B, F]``
output is a maxout), which keeps the channels, as does a pool with
``return_indices=True``. The model may be on any device: the result is on
the same one.

Supported layers: ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` (``groups=1``),
``nn.BatchNorm1d/2d`` (sliced; eval mode), ``nn.LayerNorm`` over dims other than
the channel dim (over the channel dim it stops the chain: removing a channel
changes its statistics), ``nn.LSTM``/``nn.GRU``/``nn.RNN`` (one or more layers,
``batch_first`` either way, no initial state passed, not bidirectional, no
``proj_size``: input columns of ``weight_ih_l0`` and hidden units; a multi-layer
module whose layers lose different units becomes a :class:`StackedRNN` of
single-layer modules; with more than one layer its final states must be
unused), ``nn.Embedding`` (dims, i.e. weight columns, read by later layers),
element-wise activations, dropout and pooling. Any other layer or op that reads
a channel keeps it, and is named in ``report.left_alone`` with the reason; a
conv with ``groups > 1`` is left as it is, and so is a layer whose parameters
the forward also reads directly (``F.linear(x, self.fc.weight)``,
``self.fc.bias.sum()``), a layer with forward hooks or pre-hooks (hooks on
the model itself, which its traced forward would not run, are refused), a layer
whose weight is parametrized (``torch.nn.utils.parametrize``,
``parametrizations.weight_norm``/``spectral_norm``), and layers that share a
parameter (tied weights stay tied). Channels that reach the model's output are
kept, and so are those of a tensor passed by keyword (``self.fc(input=h)``),
of a layer also called on an input whose channels are not followed, and of a
tensor whose width the forward reads (``h.shape[-1]``, ``h.size(1)``, or its
shape used whole). Each layer keeps at least one channel.

In-place calls (``h.relu_()``, ``h += b``, ``F.relu(h, inplace=True)``,
``nn.ReLU(inplace=True)``) are followed as their out-of-place forms, later
reads of ``h`` reading the result (the compacted model computes them out of
place). Where that would change what the model computes, ``compact`` raises
``ValueError``: a write into a view whose base is read afterwards (or the
other way), into an input, parameter or buffer, an assignment into part of a
tensor (``h[:, 0] = ...``), or an in-place call with no out-of-place form.

What is returned. ``Compacted.model`` is a ``torch.fx.GraphModule`` (the
submodules keep their names; literal sizes in ``view``/``reshape`` are
updated) in eval mode: it computes the original's eval-mode forward, with
the branches the trace took in eval mode (dropout off, ``self.training``
read as False) and the constants folded at their eval-mode values, so it is
for inference (training it further runs no dropout). It takes inputs of the
example's rank. ``Compacted.report`` (:class:`Report`) holds per layer
the parameters and multiply-adds (Linear, every convolution, recurrent,
``MultiheadAttention``; at the example's shapes; 0 for any other layer,
including one that torch.fx calls whole, such as an
``nn.TransformerEncoderLayer``, whose inner layers are then not counted)
before and after, the removed output/input/hidden indices, the
element-wise zeros left (a row "(other parameters)" for parameters the
forward reads itself, a row "(unused by the forward)" for the layers it
never calls, which the result does not hold); the kept input indices; the
layers left alone and
the zero groups kept with the reason; the measured latency.

Element-wise (unstructured) zeros that are left do not make dense inference any
faster. ``Compacted.to_sparse(min_sparsity=0.5)`` returns a copy whose sparse
enough Linear layers keep their weight as a ``torch.sparse`` CSR matrix (those
whose dtype torch has no CSR product for on their device, such as float16 on
the CPU, stay dense, listed with the reason), with the measured latency of
both on the model's device: on the CPU this is usually slower unless the
weight is very sparse and large.

Errors (the original model is never changed): a model that ``torch.fx`` cannot
trace raises ``ValueError`` with torch.fx's reason (no silent fallback: an
unchanged copy would hide that nothing was removed), and so does one that
``copy.deepcopy`` cannot copy, or whose weights are on the meta device;
``example_inputs`` the model cannot run, with no samples, on the meta device,
or with NaN or inf raise ``ValueError``, as do the in-place calls above, a
model whose output on the example holds NaN or inf or differs between two
eval-mode runs (nothing to check the result against), and hooks on the model
itself;
a result whose outputs differ from the original's beyond ``atol`` raises
``RuntimeError`` naming the first layer whose output differs (this is a bug to
report, never a result), and so does a result that fails to run on
``example_inputs``, naming the node that raised.
"""
import copy
import itertools
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from .._validate import flag, nonneg_real
from ._report import Report

__all__ = ["compact", "Compacted", "Report", "StackedRNN"]


def __getattr__(name):
    if name == "StackedRNN":
        from ._rewrite import StackedRNN
        return StackedRNN
    raise AttributeError(name)


class Compacted:
    """The result of :func:`compact`: ``.model`` (the smaller model) and ``.report``."""

    def __init__(self, model: nn.Module, report: Report, example_inputs: tuple):
        self.model = model
        self.report = report
        self._example = example_inputs

    def __repr__(self) -> str:
        return str(self.report)

    def to_sparse(self, min_sparsity: float = 0.5, measure: bool = True):
        """A copy of ``.model`` whose Linear layers with at least ``min_sparsity`` exact zeros keep
        their weight as a torch.sparse CSR matrix, and a dict: the layers converted, those left dense
        (``left_dense``: where torch has no CSR product for their dtype on their device, e.g. float16
        on the CPU) and (``measure``) the latency of the dense and the sparse model on the model's
        device (the key ``"cpu"`` or ``"cuda"``), measured interleaved at the example's batch.

        Unstructured zeros do not speed up dense inference; whether CSR does depends on the
        sparsity and size of the weights (often not, on the CPU, below ~90–95 % zeros)."""
        from ._report import SparseLinear, measure_latency
        from ._rewrite import set_module

        sparse = copy.deepcopy(self.model).eval()
        converted, left = {}, {}
        for name, mod in list(sparse.named_modules()):
            if type(mod) is nn.Linear:
                frac = float((mod.weight == 0).float().mean()) if mod.weight.numel() else 0.0
                if frac >= min_sparsity:
                    why = SparseLinear.unsupported(mod)
                    if why is None:
                        set_module(sparse, name, SparseLinear(mod))
                        converted[name] = frac
                    else:
                        left[name] = why
        info = {"converted": converted, "left_dense": left}
        if measure:
            args = _model_args(self.report, self._example)
            dev = args[0].device.type
            dense_t, sparse_t = measure_latency([self.model, sparse], [args, args], dev)
            info[dev] = {"dense_ms": dense_t["median_s"] * 1e3, "sparse_ms": sparse_t["median_s"] * 1e3,
                           "speedup": dense_t["median_s"] / sparse_t["median_s"], "repeats": dense_t["repeats"],
                           "batch_size": self.report.batch_size}
        return sparse, info


def _model_args(report: Report, args: tuple) -> tuple:
    """The example inputs as the compacted model takes them."""
    if not report.drop_inputs:
        return args
    out = list(args)
    for k, inp in enumerate(report.inputs.values()):
        if inp.get("position") is not None:
            i = inp["position"]
            out[i] = out[i].index_select(inp["dim"], torch.tensor(inp["kept"], device=out[i].device))
    return tuple(out)


def _flat_tensors(x):
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _flat_tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _flat_tensors(v)]
    return []


def _default_atol(outputs) -> float:
    """The default ``atol`` over the output scale: 1e-5, or 16 units of
    rounding of the outputs' least precise floating dtype where that is
    coarser (float16, bfloat16: folding a constant changes a sum's order)."""
    eps = [torch.finfo(t.dtype).eps for t in outputs if t.is_floating_point()]
    return max([1e-5] + [16 * e for e in eps])


def _check_checkable(ref: nn.Module, args: tuple, out: Any) -> None:
    """The result is checked against the model's output on the example: it
    must be finite, and the same at a second run (an eval-mode forward that
    is random, F.dropout(training=True) say, has nothing to check against).
    Raises ValueError."""
    outs = _flat_tensors(out)
    if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in outs):
        raise ValueError("compact: the model's output on example_inputs holds NaN or inf, so the compacted model "
                         "cannot be checked against it; nothing was changed")
    with torch.no_grad():
        again = _flat_tensors(ref(*args))
    if len(again) != len(outs) or not all(torch.equal(a, b) for a, b in zip(outs, again)):
        renorm = next((n for n, m in ref.named_modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
                       and m.max_norm is not None), None)
        if renorm is not None:
            raise ValueError(f"compact: the model's output on example_inputs differs between two runs in eval mode: "
                             f"its {type(ref.get_submodule(renorm)).__name__} {renorm!r} has max_norm, which "
                             "renormalizes the rows it reads in place at every forward (not supported); nothing "
                             "was changed")
        raise ValueError("compact: the model's output on example_inputs differs between two runs in eval mode "
                         "(a random forward: dropout with training=True, say), so the compacted model cannot be "
                         "checked against it; nothing was changed")


def _cannot_run(args, e: Exception) -> ValueError:
    shapes = ", ".join(str(tuple(a.shape)) for a in args)
    return ValueError(f"compact: the model cannot run on example_inputs of shape {shapes} ({type(e).__name__}: {e})")


def compact(model: nn.Module, example_inputs, *, drop_inputs: bool = False, atol: Optional[float] = None,
            measure: bool = True) -> Compacted:
    """Remove every exactly-zero group whose removal leaves the outputs unchanged; see the module doc."""
    import torch.fx

    if torch.is_inference_mode_enabled():  # (the new parameters would be inference tensors, which cannot train)
        with torch.inference_mode(False):
            return compact(model, example_inputs, drop_inputs=drop_inputs, atol=atol, measure=measure)

    from ._graph import analyze, decide
    from ._inplace import Refused, functionalize
    from ._report import UNUSED_PARAMS, LayerRow, capture, layer_counts, measure_latency
    from ._rewrite import rewrite

    if not isinstance(model, nn.Module):
        raise TypeError(f"compact: model must be an nn.Module, got {type(model).__name__}")
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not args or not all(isinstance(a, Tensor) for a in args):
        raise TypeError("compact: example_inputs must be a tensor or a tuple of tensors")
    flag(drop_inputs, "compact: drop_inputs")
    flag(measure, "compact: measure")
    if atol is not None:
        atol = nonneg_real(atol, "compact: atol")
    for i, a in enumerate(args):
        if a.is_meta:
            raise ValueError(f"compact: example_inputs[{i}] is on the meta device; compact runs the model on "
                             "real values (which channels are constant, and the check of the result)")
        if a.dim() and a.shape[0] == 0:
            raise ValueError(f"compact: example_inputs[{i}] has no samples (shape {tuple(a.shape)}); the example "
                             "shows which channels are constant, and checks the result")
        if a.is_floating_point() and not bool(torch.isfinite(a).all()):
            raise ValueError(f"compact: example_inputs[{i}] holds NaN or inf; the result is checked on it")
    meta = next((n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta), None)
    if meta is not None:
        raise ValueError(f"compact: the model's {meta} is on the meta device; compact needs the trained weights "
                         "(load them first, e.g. with load_state_dict(..., assign=True))")
    if model._forward_hooks or model._forward_pre_hooks:
        raise ValueError(f"compact: the {type(model).__name__} given has forward hooks of its own, which its "
                         "traced forward would not run; remove them (hooks on its layers are fine: those layers "
                         "are left whole); nothing was changed")
    try:
        ref = copy.deepcopy(model).eval()
        work = copy.deepcopy(model).eval()
    except Exception as e:
        raise ValueError(f"compact: {type(model).__name__} cannot be copied with copy.deepcopy "
                         f"({type(e).__name__}: {e}); compact works on copies, and nothing was changed") from e
    try:
        gm = torch.fx.symbolic_trace(work)
    except Exception as e:
        raise ValueError(f"compact: {type(model).__name__} cannot be traced by torch.fx.symbolic_trace "
                         f"({type(e).__name__}: {e}); nothing was changed") from e
    n_placeholders = sum(n.op == "placeholder" for n in gm.graph.nodes)
    if len(args) > n_placeholders:
        raise ValueError(f"compact: {len(args)} example inputs given, the model takes {n_placeholders}")
    try:
        with torch.no_grad():
            ref_out = ref(*args)
    except Exception as e:
        raise _cannot_run(args, e) from e
    try:
        with torch.no_grad():
            functionalize(gm, args)  # (in-place calls: their results are what later reads see)
            gm.graph.eliminate_dead_code()
            gm.recompile()
            values = capture(gm, args)
    except Refused:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"compact: the model runs on example_inputs but its torch.fx trace does not "
                         f"({type(e).__name__}: {first}): the trace follows one path through the forward, "
                         "decided without the inputs' values (a branch on an argument left to its default, "
                         "`if mask is not None`, is traced as if it were given); nothing was changed") from e
    _check_checkable(ref, args, ref_out)
    before = layer_counts(gm, values)
    traced = {id(p) for p in gm.parameters()}
    unused = sum(p.numel() for p in work.parameters() if id(p) not in traced)
    if unused:  # (layers the forward never calls: the traced model does not hold them)
        before[UNUSED_PARAMS] = {"type": "-", "params": unused, "macs": 0, "zeros": 0, "weights": 0}

    analysis = analyze(gm, values)
    removed = decide(analysis, len(analysis.parent))
    changes, kept_inputs = rewrite(analysis, removed, drop_inputs)
    gm.eval()

    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    for name, inp in kept_inputs.items():
        inp["position"] = placeholders.index(name) if placeholders.index(name) < len(args) else None
    report = Report(layers=[], inputs=kept_inputs, left_alone=dict(analysis.left_alone),
                    kept_zero_groups=_kept_zero_groups(analysis, removed),
                    batch_size=int(args[0].shape[0]) if args[0].dim() else None,
                    max_abs_error=0.0, output_scale=0.0, drop_inputs=drop_inputs,
                    example_shapes=", ".join(str(tuple(a.shape)) for a in args))
    new_args = _model_args(report, args)
    at: list = []
    try:
        with torch.no_grad():
            new_values = capture(gm, new_args, at)
    except Exception as e:
        where = f"{at[0].name} ({at[0].op} {at[0].target})" if at else "?"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RuntimeError(f"compact: the compacted model fails on example_inputs at {where} ({type(e).__name__}: "
                           f"{first}); layers changed: {', '.join(changes) or 'none'}. This is a bug; the original "
                           "model is unchanged") from e
    ref_t, new_t = _flat_tensors(ref_out), _flat_tensors(new_values["__output__"])
    scale = max([float(t.abs().max()) for t in ref_t if t.numel()] + [0.0])
    tol = atol if atol is not None else _default_atol(ref_t) * max(scale, 1e-6)
    if len(ref_t) != len(new_t) or any(a.shape != b.shape for a, b in zip(ref_t, new_t)):
        raise RuntimeError("compact: the compacted model's outputs have other shapes; this is a bug")
    err = max([float((a.double() - b.double()).abs().max()) for a, b in zip(ref_t, new_t) if a.numel()] + [0.0])
    if not err <= tol:
        raise RuntimeError(f"compact: the compacted model's outputs differ by {err:.3g} (allowed {tol:.3g}); "
                           f"first differing layer: {_first_difference(analysis, removed, values, new_values, tol)};"
                           f" layers changed: {', '.join(changes) or 'none'}. This is a bug; the original "
                           f"model is unchanged")
    report.max_abs_error, report.output_scale = err, scale

    after = layer_counts(gm, new_values)
    for name, b in before.items():
        a = after.get(name, {"type": b["type"], "params": 0, "macs": 0, "zeros": 0, "weights": 0})
        report.layers.append(LayerRow(name, a["type"], b["params"], a["params"], b["macs"], a["macs"],
                                      changes.get(name, {}), a["zeros"], a["weights"]))
    if measure:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        home = args[0].device.type
        for dev in devices:  # (the model where it is; copies moved to the other device)
            m0, m1 = (copy.deepcopy(ref), copy.deepcopy(gm)) if dev != home else (ref, gm)
            t0, t1 = measure_latency([m0, m1], [args, new_args], dev)
            report.latency[dev] = {"before_ms": t0["median_s"] * 1e3, "after_ms": t1["median_s"] * 1e3,
                                   "speedup": t0["median_s"] / t1["median_s"], "repeats": t0["repeats"]}
    return Compacted(gm, report, args)


def _kept_zero_groups(a, removed: Tensor) -> Dict[str, dict]:
    """Producers' constant (zero-incoming) rows that stay, with the reasons their groups were blocked."""
    root = a.parent
    reasons: Dict[int, str] = {}
    for ids, why in a.blocked:
        for r in root[ids].unique().tolist():
            reasons.setdefault(r, why)
    out: Dict[str, dict] = {}
    for name, ids in a.module_ids.items():
        axis_const = _producer_const(a, name)
        if axis_const is None:
            continue
        kept = axis_const & ~removed[ids]
        if bool(kept.any()):
            rs = sorted({reasons.get(int(root[i]), "read by a layer that cannot absorb it (nonzero columns, "
                                                    "not a foldable constant)") for i in ids[kept].tolist()})
            out[name] = {"count": int(kept.sum()), "indices": kept.nonzero().flatten().tolist(), "reasons": rs}
    return out


def _producer_const(a, name) -> Optional[Tensor]:
    for node in a.graph_module.graph.nodes:
        ax = a.axes.get(node.name)
        if node.op == "call_module" and node.target == name and ax is not None:
            return getattr(ax, "axis", ax).const
    return None


def _first_difference(a, removed, old_values, new_values, tol) -> str:
    for node in a.graph_module.graph.nodes:
        ax = a.axes.get(node.name)
        old, new = old_values.get(node.name), new_values.get(node.name)
        if isinstance(old, tuple):
            old, new = old[0], new[0] if isinstance(new, tuple) else new
            ax = getattr(ax, "axis", None)
        if not isinstance(old, Tensor) or not isinstance(new, Tensor):
            continue
        if ax is not None and not isinstance(ax, tuple):
            old = old.index_select(ax.dim, (~removed[ax.ids]).nonzero().flatten().to(old.device))
        if old.shape == new.shape and old.numel() and float((old.double() - new.double()).abs().max()) > tol:
            return f"{node.name} ({node.op} {node.target})"
    return "not found"


compact.__doc__ = __doc__  # help(pyreg.compact) shows the whole user documentation
