"""Channel dependency analysis for ``pyreg.compact``.

Every tensor in the traced graph that carries removable channels gets an
:class:`Axis`: the tensor dim that holds them, one *channel id* per feature
along that dim, and whether each feature is a constant (the same value at
every sample and position). Ids are created by producers (a Linear's output
rows, a conv's output channels, an embedding's dims, a recurrent layer's
hidden units, the model's input features); ops that join tensors element-wise
(residual sums) unite ids, so coupled channels share one class. Consumers
(the input columns of a Linear, conv or recurrent layer) are recorded as
*sites*. A class is removed when no op outside the supported set sees it, and
at every site its columns are zero or its value is a foldable constant.
"""
import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Axis", "Analysis", "analyze", "decide", "feature_values"]

# Element-wise modules and functions: a channel stays a channel, a constant stays a constant.
ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Tanhshrink,
    nn.LogSigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout,
)
ELEMENTWISE_FUNCTIONS = {
    torch.relu, torch.tanh, torch.sigmoid, torch.abs, torch.neg, torch.exp, torch.nn.functional.relu,
    F.relu6, F.gelu, F.silu, F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.softsign, F.hardtanh,
    F.hardswish, F.hardsigmoid, F.mish, F.tanh, F.sigmoid, F.dropout, F.dropout1d, F.dropout2d,
    F.logsigmoid, operator.neg,
}
ELEMENTWISE_METHODS = {
    "relu", "tanh", "sigmoid", "abs", "neg", "exp", "contiguous", "clone", "detach", "float", "double",
    "half", "to", "type_as",
}  # (in-place forms were made out-of-place before: _inplace.py)
BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                    torch.div}
BINARY_METHODS = {"add", "sub", "mul", "div"}
RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
RESHAPE_METHODS = {"flatten", "view", "reshape"}
#: Ops that add or drop dims of size 1 and keep the others in order.
UNIT_DIM_FUNCTIONS = {torch.squeeze, torch.unsqueeze}
UNIT_DIM_METHODS = {"squeeze", "unsqueeze"}
#: Attributes of a tensor that do not depend on its width.
WIDTH_FREE_ATTRIBUTES = {"device", "dtype", "ndim", "is_cuda", "layout", "requires_grad"}
#: max/min over a dim: a (values, indices) pair, followed where only its values are read.
PAIR_FUNCTIONS = {torch.max, torch.min}
PAIR_METHODS = {"max", "min"}
REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AvgPool1d, nn.AvgPool2d)
POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                  F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.avg_pool1d, F.avg_pool2d}
#: F.avg_pool1d/2d's positional arguments, in order
_AVG_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
RNN_MODULES = (nn.LSTM, nn.GRU, nn.RNN)
#: Modules that read a 3-D input as [batch, channels, length]: a model input they read has its features in dim 1.
CHANNELS_FIRST_1D = (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d,
                     nn.AdaptiveMaxPool1d)
RNN_GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}


@dataclass
class Axis:
    """The channel dim of one tensor: a class id and a constant flag per feature."""
    dim: int
    ids: Tensor    # int64 [F]
    const: Tensor  # bool [F]


@dataclass
class Site:
    """Input columns of one call of a consumer layer."""
    node: object
    module: str
    kind: str          # "linear", "conv", "rnn"
    axis: Axis
    zero: Tensor       # bool [F]: the layer's weight columns for this feature are all zero
    foldable: Tensor   # bool [F]: a constant here can be folded exactly into the layer's bias
    zero_value: Tensor  # bool [F]: the feature's value here (a constant's) is 0: nothing to fold


@dataclass
class Producer:
    module: str        # layer name, or "<input k>"
    ids: Tensor        # ids of its output rows/channels
    ok: Tensor         # bool: the row may be removed at all


@dataclass
class RnnPlan:
    """Hidden units of a recurrent layer: what each layer may lose."""
    module: str
    gates: int
    ids: Tensor                                    # the last layer's ids (its output channels)
    internal_keep: List[Tensor] = field(default_factory=list)  # bool [H] per inner layer
    hidden_used: bool = False


@dataclass
class RnnOut:
    plan: RnnPlan
    axis: Axis
    part: str          # "all" (the module's tuple), "h" (hidden tuple of an LSTM)


@dataclass
class Analysis:
    graph_module: object
    values: Dict[str, object]
    axes: Dict[str, Optional[Axis]]
    parent: Tensor = None
    sites: List[Site] = field(default_factory=list)
    producers: List[Producer] = field(default_factory=list)
    slices: List[tuple] = field(default_factory=list)       # (module name, Axis of its input)
    reshapes: List[tuple] = field(default_factory=list)     # (node, Axis of its output)
    inputs: List[tuple] = field(default_factory=list)       # (placeholder node, Axis)
    rnns: Dict[str, RnnPlan] = field(default_factory=dict)
    blocked: List[tuple] = field(default_factory=list)      # (ids, reason)
    left_alone: Dict[str, str] = field(default_factory=dict)
    calls: Dict[str, int] = field(default_factory=dict)
    module_ids: Dict[str, Tensor] = field(default_factory=dict)
    module_input: Dict[str, Axis] = field(default_factory=dict)


class _Ids:
    """Union-find over channel ids."""

    def __init__(self):
        self.parent: List[int] = []

    def new(self, n: int) -> Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return torch.arange(start, start + n, dtype=torch.long)

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def unite(self, a: Tensor, b: Tensor):
        pairs = torch.unique(torch.stack([a, b], 1), dim=0).tolist()
        for x, y in pairs:
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def roots(self) -> Tensor:
        return torch.tensor([self.find(i) for i in range(len(self.parent))], dtype=torch.long)


def _zero_rows(w: Tensor) -> Tensor:
    return (w.abs().amax(dim=tuple(range(1, w.dim()))) == 0).cpu()


def _zero_cols(w: Tensor) -> Tensor:
    """Per input feature (dim 1 of a Linear/conv weight): all weights zero (on the CPU, as
    every mask of the analysis, whatever the model's device)."""
    return (w.abs().amax(dim=tuple(d for d in range(w.dim()) if d != 1)) == 0).cpu()


def _zero_values(x: Tensor, dim: int) -> Tensor:
    """Per feature of ``dim``: its value (read as a constant's, see :func:`feature_values`) is 0."""
    return (feature_values(x, dim) == 0).cpu()


def feature_values(x: Tensor, dim: int) -> Tensor:
    """The values of sample 0, position 0 along every other dim, per feature of ``dim`` (a view)."""
    return x.detach().movedim(dim, -1)[(0,) * (x.dim() - 1)]


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


class _Analyzer:
    def __init__(self, gm, values):
        self.gm = gm
        self.values = values
        self.uf = _Ids()
        self.a = Analysis(graph_module=gm, values=values, axes={})
        # layers whose parameters the forward also reads directly (F.linear(x, self.fc.weight)): those
        # reads would see the layer's removed rows and columns, so such a layer is left whole
        self.read_directly = {n.target.rpartition(".")[0]: n.target for n in gm.graph.nodes if n.op == "get_attr"}
        # layers whose weights the slicing cannot reach, or whose call runs more than their weights
        # (hooks, parametrizations: the weight computed from others), or that share a parameter with
        # another layer (a tie that slicing each layer would break): left whole
        self.whole: Dict[str, str] = {}
        owners: Dict[int, List[str]] = {}
        for name, mod in gm.named_modules():
            for p in mod.parameters(recurse=False):
                owners.setdefault(id(p), []).append(name)
            if torch.nn.utils.parametrize.is_parametrized(mod):
                self.whole[name] = "its weights are parametrized (torch.nn.utils.parametrize)"
            elif mod._forward_hooks or mod._forward_pre_hooks:
                self.whole[name] = "it has forward hooks, which may read or change what it computes"
        for names in owners.values():
            if len(names) > 1:
                for name in names:
                    self.whole.setdefault(name, f"it shares a parameter with {', '.join(n for n in names if n != name)}")
        self.shapes: Dict[str, tuple] = {}  # a tensor's shape read whole (x.shape, x.size()): (its Axis, its rank)
        self.untracked_calls = set()  # layers called on an input whose channels are not followed

    # -- helpers --------------------------------------------------------
    def block(self, axis: Optional[Axis], reason: str):
        if axis is not None:
            self.a.blocked.append((axis.ids, reason))

    def block_args(self, node, reason: str):
        for arg in _flat_nodes(node.args, node.kwargs):
            ax = self.a.axes.get(arg.name)
            if isinstance(ax, RnnOut):
                self.rnn_hidden_used(ax, reason)
            else:
                self.block(ax, reason)

    def rnn_hidden_used(self, out: RnnOut, reason: str):
        out.plan.hidden_used = True
        self.leave(f"{out.plan.module} (hidden units)", reason)
        self.block(out.axis, reason)

    def module_ids(self, name: str, n: int) -> Tensor:
        if name not in self.a.module_ids:
            self.a.module_ids[name] = self.uf.new(n)
        return self.a.module_ids[name]

    def first_call(self, name: str, axis: Optional[Axis]) -> bool:
        """Count calls; a layer called twice must lose the same columns in both calls (a call on
        an input whose channels are not followed keeps them all)."""
        n = self.a.calls[name] = self.a.calls.get(name, 0) + 1
        untracked = f"{name} is also called on an input whose channels are not followed"
        prev = self.a.module_input.get(name)
        if axis is None:
            if n > 1 and prev is not None:
                self.block(prev, untracked)
            self.untracked_calls.add(name)
            return n == 1
        if name in self.untracked_calls:
            self.block(axis, untracked)
        if prev is None:
            self.a.module_input[name] = axis
            return n == 1
        if prev.ids.shape == axis.ids.shape and prev.dim == axis.dim:
            self.uf.unite(prev.ids, axis.ids)
        else:
            self.block(axis, f"{name} is called on inputs of different widths")
            self.block(prev, f"{name} is called on inputs of different widths")
        return False

    def leave(self, name: str, reason: str):
        self.a.left_alone.setdefault(name, reason)

    # -- the walk -------------------------------------------------------
    def run(self):
        for node in self.gm.graph.nodes:
            out = None
            self.shape_uses(node)
            if node.op in ("call_module", "call_function", "call_method") and any(
                    self.a.axes.get(a.name) is not None for a in _flat_nodes((), node.kwargs)):
                out = self.unknown(node, "a tensor whose channels are followed is passed to it by keyword")
            elif node.op == "placeholder":
                out = self.placeholder(node)
            elif node.op == "get_attr":
                out = None
            elif node.op == "call_module":
                out = self.call_module(node)
            elif node.op in ("call_function", "call_method"):
                out = self.call_function(node)
            elif node.op == "output":
                self.block_args(node, "the model's output")
            self.a.axes[node.name] = out
        self.a.parent = self.uf.roots()
        return self.a

    def shape_uses(self, node):
        """A shape read whole (``x.shape``, ``x.size()``) may be used only for its other dims:
        reading the channel dim's size (``x.shape[-1]``), or using the shape any other way,
        keeps every channel (the forward would compute with the new width)."""
        for a in _flat_nodes(node.args, node.kwargs):
            if a.name not in self.shapes:
                continue
            ax, ndim = self.shapes[a.name]
            i = node.args[1] if node.target is operator.getitem and len(node.args) == 2 else None
            if isinstance(i, int) and node.args[0] is a:
                if _norm_dim(i, ndim) == ax.dim:
                    self.block(ax, f"its width is read ({node.name})")
            else:
                self.block(ax, f"its shape is used whole ({node.name})")

    def placeholder(self, node):
        x = self.values.get(node.name)
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
            return None
        dim = x.dim() - 1
        if x.dim() == 4 or (x.dim() == 3 and any(
                u.op == "call_module" and isinstance(self.gm.get_submodule(u.target), CHANNELS_FIRST_1D)
                for u in node.users)):
            dim = 1
        ids = self.uf.new(x.shape[dim])
        ax = Axis(dim, ids, torch.zeros(len(ids), dtype=torch.bool))
        self.a.inputs.append((node, ax))
        self.a.producers.append(Producer(f"input {node.name}", ids, torch.ones(len(ids), dtype=torch.bool)))
        return ax

    def arg_axis(self, node, i=0):
        arg = node.args[i] if len(node.args) > i else None
        if isinstance(arg, torch.fx.Node):
            return self.a.axes.get(arg.name)
        return None

    def call_module(self, node):
        name = node.target
        mod = self.gm.get_submodule(name)
        ax = self.arg_axis(node)
        if isinstance(ax, RnnOut):
            self.rnn_hidden_used(ax, f"consumed whole by {name}")
            ax = None
        x = self.values.get(node.args[0].name) if node.args and isinstance(node.args[0], torch.fx.Node) else None
        y = self.values.get(node.name)
        reason = (f"its {self.read_directly[name].rpartition('.')[2]} is also read directly by the forward"
                  if name in self.read_directly else self.whole.get(name))
        if reason is not None:
            self.leave(name, reason)
            self.block_args(node, f"consumed by {name}: {reason}")
            return None
        if isinstance(mod, nn.Linear):
            return self.linear_like(node, name, mod, ax, x, y, "linear")
        if type(mod) in (nn.Conv1d, nn.Conv2d):
            reason = None
            if mod.groups != 1:
                reason = f"{type(mod).__name__} with groups={mod.groups} is not supported"
            elif isinstance(x, Tensor) and x.dim() != len(mod.kernel_size) + 2:
                reason = f"{type(mod).__name__} on an unbatched input is not supported"
            if reason is not None:
                self.leave(name, reason)
                self.block_args(node, f"consumed by {name}: {reason}")
                return None
            return self.linear_like(node, name, mod, ax, x, y, "conv")
        if type(mod) in (nn.BatchNorm1d, nn.BatchNorm2d):
            if ax is None:
                return None
            if ax.dim != 1:
                self.block(ax, f"normalized by {name} along another dim")
                return None
            self.first_call(name, ax)
            self.a.slices.append((name, ax))
            const = ax.const.clone()
            if mod.affine:
                const |= (mod.weight.detach() == 0).cpu()
            return Axis(ax.dim, ax.ids, const)
        if isinstance(mod, nn.LayerNorm):
            if ax is None:
                return None
            nd = x.dim()
            if ax.dim >= nd - len(mod.normalized_shape):
                reason = "LayerNorm normalizes over the channel dim (removing a channel changes its statistics)"
                self.leave(name, reason)
                self.block(ax, f"consumed by {name}: {reason}")
                return None
            return Axis(ax.dim, ax.ids, torch.zeros_like(ax.const))
        if isinstance(mod, ELEMENTWISE_MODULES):
            return ax
        if isinstance(mod, nn.Flatten):
            return self.reshape(node, ax, x, y, record=False)
        if isinstance(mod, POOL_MODULES):
            if ax is None:
                return None
            if getattr(mod, "return_indices", False):
                reason = f"{type(mod).__name__} with return_indices=True is not supported"
                self.leave(name, reason)
                self.block(ax, f"consumed by {name}: {reason}")
                return None
            if ax.dim != 1 or x.dim() != _pooled_dims(type(mod).__name__) + 2:
                # (an unbatched input: the pool's window runs over the channel dim itself)
                self.block(ax, f"pooled over the channel dim by {name}")
                return None
            const = ax.const
            if isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d)) and (
                    (mod.count_include_pad and _any(mod.padding)) or getattr(mod, "divisor_override", None)):
                const = torch.zeros_like(const)  # windows at the edges average fewer values
            return Axis(1, ax.ids, const)
        if isinstance(mod, nn.Embedding):
            if mod.max_norm is not None:
                self.leave(name, "Embedding with max_norm is not supported")
                return None
            w = mod.weight.detach()
            ids = self.module_ids(name, w.shape[1])
            self.a.calls[name] = self.a.calls.get(name, 0) + 1
            if self.a.calls[name] == 1:
                self.a.producers.append(Producer(name, ids, torch.ones(len(ids), dtype=torch.bool)))
            const = (w == w[:1]).all(0).cpu()
            return Axis(y.dim() - 1, ids, const)
        if isinstance(mod, RNN_MODULES):
            return self.rnn(node, name, mod, ax, x, y)
        reason = f"{type(mod).__name__} is not supported"
        self.leave(name, reason)
        self.block_args(node, f"consumed by {name}: {reason}")
        return None

    def linear_like(self, node, name, mod, ax, x, y, kind):
        w = mod.weight.detach()
        want = x.dim() - 1 if kind == "linear" else 1
        if ax is not None and (ax.dim != want or len(ax.ids) != w.shape[1]):
            # read along another dim (its channels kept): to the layer, an input whose channels are not followed
            self.block(ax, f"consumed by {name} along another dim")
            ax = None
        first = self.first_call(name, ax)
        if ax is not None:
            zero, zero_value = _zero_cols(w), _zero_values(x, want)
            if kind == "conv" and _zero_padded(mod):
                # At padded borders a constant input channel is not constant: fold only zeros.
                foldable = zero_value
            else:
                foldable = torch.ones_like(zero)
            self.a.sites.append(Site(node, name, kind, ax, zero, foldable, zero_value))
        ids = self.module_ids(name, w.shape[0])
        if first:
            self.a.producers.append(Producer(name, ids, torch.ones(len(ids), dtype=torch.bool)))
        const = _zero_rows(w)
        return Axis(y.dim() - 1 if kind == "linear" else 1, ids, const)

    def rnn(self, node, name, mod, ax, x, y):
        gates = RNN_GATES[type(mod)]
        unsupported = None
        if mod.bidirectional:
            unsupported = "bidirectional recurrent layers are not supported"
        elif getattr(mod, "proj_size", 0):
            unsupported = "LSTM with proj_size is not supported"
        elif len(node.args) > 1 or node.kwargs:
            unsupported = "an initial hidden state is passed"
        if unsupported:  # (its input and any initial state it is given keep their channels)
            self.leave(name, unsupported)
            self.block_args(node, f"consumed by {name}: {unsupported}")
            return None
        if ax is not None and ax.dim != x.dim() - 1:  # (as in linear_like)
            self.block(ax, f"consumed by {name} along another dim")
            ax = None
        first = self.first_call(name, ax)
        H, L = mod.hidden_size, mod.num_layers
        if ax is not None:
            w = mod.weight_ih_l0.detach()
            zero, zero_value = _zero_cols(w), _zero_values(x, x.dim() - 1)
            foldable = torch.ones_like(zero) if mod.bias else zero_value
            self.a.sites.append(Site(node, name, "rnn", ax, zero, foldable, zero_value))
        incoming_zero, rec_ok = [], []
        for layer in range(L):
            w_ih = getattr(mod, f"weight_ih_l{layer}").detach().cpu().reshape(gates, H, -1)
            w_hh = getattr(mod, f"weight_hh_l{layer}").detach().cpu().reshape(gates, H, H)
            z = (w_ih == 0).all(2).all(0) & (w_hh == 0).all(2).all(0)
            if mod.bias:
                for b in ("bias_ih", "bias_hh"):
                    z &= (getattr(mod, f"{b}_l{layer}").detach().cpu().reshape(gates, H) == 0).all(0)
            incoming_zero.append(z)  # every gate's input is zero: the unit's state stays exactly 0
            used = (w_hh != 0).any(0).clone()  # [H(row unit), H(col unit)]
            used.fill_diagonal_(False)
            rec_ok.append(~used.any(0))  # no other unit reads this one through the recurrence
        ids = self.module_ids(name, H)
        new = name not in self.a.rnns
        plan = self.a.rnns.setdefault(name, RnnPlan(name, gates, ids))
        for layer in range(L - 1 if new else 0):  # (from the weights: once, however often it is called)
            nxt = getattr(mod, f"weight_ih_l{layer + 1}").detach()
            unused = rec_ok[layer] & _zero_cols(nxt)
            plan.internal_keep.append(~(incoming_zero[layer] | unused))
        if first:
            self.a.producers.append(Producer(name, ids, incoming_zero[-1] | rec_ok[-1]))
        return RnnOut(plan, Axis(y[0].dim() - 1, ids, incoming_zero[-1]), "all")

    def call_function(self, node):
        t = node.target
        method = node.op == "call_method"
        ax = self.arg_axis(node)
        x = self.values.get(node.args[0].name) if node.args and isinstance(node.args[0], torch.fx.Node) else None
        y = self.values.get(node.name)
        if (t is operator.getitem or (not method and t is getattr and node.args[1:2] == ("values",))) and \
                _is_pair(node.args[0]):
            # (every user of the pair reads its values: see pair)
            return ax
        if t is operator.getitem:
            return self.getitem(node, ax, x, y)
        if isinstance(ax, RnnOut):
            self.rnn_hidden_used(ax, f"used whole by {node.name}")
            return None
        if (method and t in ELEMENTWISE_METHODS) or (not method and t in ELEMENTWISE_FUNCTIONS):
            return ax if isinstance(y, Tensor) and x is not None and y.shape == x.shape else self.unknown(node)
        if (method and t in BINARY_METHODS) or (not method and t in BINARY_FUNCTIONS):
            return self.binary(node, y)
        if not method and t in (torch.cat, torch.concat):
            return self.cat(node, y)
        if (method and t in RESHAPE_METHODS) or (not method and t in RESHAPE_FUNCTIONS):
            return self.reshape(node, ax, x, y, record=t in ("view", "reshape") or t is torch.reshape)
        if (method and t in ("transpose", "permute")) or (not method and t in (torch.transpose, torch.permute)):
            return self.permute(node, ax, x, y)
        if (method and t in UNIT_DIM_METHODS) or (not method and t in UNIT_DIM_FUNCTIONS):
            return self.unit_dims(node, ax, x, y)
        if (method and t in REDUCE_METHODS) or (not method and t in REDUCE_FUNCTIONS):
            return self.reduce(node, ax, x, y)
        if (method and t in PAIR_METHODS) or (not method and t in PAIR_FUNCTIONS):
            return self.pair(node, ax, x, y)
        if not method and t in POOL_FUNCTIONS:
            if ax is None:
                return None
            if ax.dim != 1 or x.dim() != _pooled_dims(t.__name__) + 2:
                return self.unknown(node)
            if t in (F.avg_pool1d, F.avg_pool2d):  # as nn.AvgPool1d/2d (see module())
                given = dict(zip(_AVG_POOL_ARGS, node.args), **node.kwargs)
                pad, incl, div = (given.get(k, d) for k, d in (("padding", 0), ("count_include_pad", True),
                                                              ("divisor_override", None)))
                if _flat_nodes((pad, incl, div), {}):
                    return self.unknown(node, "its padding is computed in the forward")
                if (incl and _any(pad)) or div:
                    return Axis(1, ax.ids, torch.zeros_like(ax.const))  # windows at the edges average fewer values
            return ax
        if method and t == "dim":
            return None
        if (method and t == "size") or (not method and t is getattr and node.args[1:2] == ("shape",)):
            if ax is not None:
                d = node.args[1] if method and len(node.args) > 1 else node.kwargs.get("dim") if method else None
                if isinstance(d, int):
                    if _norm_dim(d, x.dim()) == ax.dim:
                        self.block(ax, f"its width is read ({node.name})")
                else:
                    self.shapes[node.name] = (ax, x.dim())
            return None
        if not method and t is getattr:
            return self.unknown(node) if ax is not None and node.args[1] not in WIDTH_FREE_ATTRIBUTES else None
        return self.unknown(node)

    def unknown(self, node, why="it is not supported"):
        name = getattr(node.target, "__name__", str(node.target))
        if any(self.a.axes.get(a.name) is not None for a in _flat_nodes(node.args, node.kwargs)):
            self.leave(node.name, f"op {name}: {why}")
        self.block_args(node, f"used by op {name} ({node.name})")
        return None

    def getitem(self, node, ax, x, y):
        idx = node.args[1]
        if isinstance(ax, RnnOut):
            if isinstance(idx, int) and -2 <= idx < 0:  # (output, h_n) or (h_n, c_n): two items
                idx += 2
            if ax.part == "all" and idx == 0:
                return ax.axis
            mod = self.gm.get_submodule(ax.plan.module)
            if mod.num_layers > 1:
                self.rnn_hidden_used(ax, f"{ax.plan.module}'s final state of every layer is used")
                return None
            if ax.part == "all" and isinstance(mod, nn.LSTM) and idx == 1:
                return RnnOut(ax.plan, ax.axis, "h")
            # h_n or c_n [1, B, H]: the same units; a removed unit's state stays 0
            return Axis(y.dim() - 1, ax.axis.ids, ax.axis.const)
        if ax is None or not isinstance(x, Tensor):
            return None
        if not isinstance(idx, tuple):
            idx = (idx,)
        if any(isinstance(i, (torch.fx.Node, Tensor, list)) for i in idx) or sum(i is Ellipsis for i in idx) > 1:
            return self.unknown(node)
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        if Ellipsis in idx:
            k = idx.index(Ellipsis)
            idx = idx[:k] + (slice(None),) * (x.dim() - n_real) + idx[k + 1:]
        else:
            idx = idx + (slice(None),) * (x.dim() - n_real)
        in_dim, out_dim = 0, 0
        for i in idx:
            if i is None:
                out_dim += 1
                continue
            if in_dim == ax.dim:
                if i != slice(None):
                    return self.unknown(node)
                return Axis(out_dim, ax.ids, ax.const)
            if not isinstance(i, int):
                out_dim += 1
            in_dim += 1
        return self.unknown(node)

    def binary(self, node, y):
        if not isinstance(y, Tensor):
            return None
        axes, const_ok = [], True
        for a in node.args:
            if isinstance(a, torch.fx.Node):
                ax = self.a.axes.get(a.name)
                v = self.values.get(a.name)
                if isinstance(ax, RnnOut):
                    return self.unknown(node)
                if ax is not None:
                    axes.append((ax, v))
                else:
                    # a value of the graph (a 0-dim tensor, a number from a size) may differ from input to
                    # input: a constant channel times it is not constant (a parameter or buffer is fixed)
                    const_ok &= a.op == "get_attr"
                    if isinstance(v, Tensor) and v.dim() > 0:
                        const_ok = False
                        axes.append((None, v))
            elif not isinstance(a, (int, float, bool)):
                return self.unknown(node)
        tracked = [(ax, v) for ax, v in axes if ax is not None]
        if not tracked:
            return None
        out_dim = y.dim() - (tracked[0][1].dim() - tracked[0][0].dim)
        width = y.shape[out_dim]
        for ax, v in axes:
            if ax is None:
                # an untracked tensor: fine only if it is the same for every channel
                d = v.dim() - (y.dim() - out_dim)
                if d >= 0 and v.shape[d] != 1:
                    return self.unknown(node, f"a tensor of shape {tuple(v.shape)} differs from channel to channel "
                                              "(compact does not cut it along with them)")
            elif v.dim() - ax.dim != y.dim() - out_dim or len(ax.ids) != width:
                return self.unknown(node)
        base = tracked[0][0]
        const = base.const.clone() & const_ok
        for ax, _ in tracked[1:]:
            self.uf.unite(base.ids, ax.ids)
            const &= ax.const
        return Axis(out_dim, base.ids, const)

    def cat(self, node, y):
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(dim, int):
            return self.unknown(node, "its dim is computed in the forward")
        dim = _norm_dim(dim, y.dim())
        parts = [(self.a.axes.get(t.name), self.values[t.name]) for t in tensors]
        if any(isinstance(ax, RnnOut) for ax, _ in parts):
            return self.unknown(node)
        if all(ax is None for ax, _ in parts):
            return None
        tracked = [ax for ax, _ in parts if ax is not None]
        if dim == tracked[0].dim:
            if any(ax is not None and ax.dim != dim for ax, _ in parts):
                return self.unknown(node)
            ids, const = [], []
            for ax, v in parts:
                if ax is None:
                    ax = Axis(dim, self.uf.new(v.shape[dim]), torch.zeros(v.shape[dim], dtype=torch.bool))
                    self.block(ax, f"produced by an untracked op, concatenated in {node.name}")
                ids.append(ax.ids)
                const.append(ax.const)
            return Axis(dim, torch.cat(ids), torch.cat(const))
        if any(ax is None or ax.dim != tracked[0].dim for ax, _ in parts):
            return self.unknown(node)
        base = tracked[0]
        for ax in tracked[1:]:
            self.uf.unite(base.ids, ax.ids)
        # each member's constant may differ: the joined tensor is not constant along the cat dim
        return Axis(base.dim, base.ids, torch.zeros_like(base.const))

    def reshape(self, node, ax, x, y, record):
        """flatten/view/reshape: the channel dim may merge with others (a conv's channel becomes a
        block of features, a token's dims repeat per token); it may not be split."""
        if ax is None:
            return None
        s, t = list(x.shape), list(y.shape)
        c, n = ax.dim, s[ax.dim]
        inner_s = _prod(s[c + 1:])
        for k in range(len(t)):
            inner_t = _prod(t[k + 1:])
            if t[k] > 1 and inner_t <= inner_s and inner_t * t[k] >= inner_s * n:
                break
        else:
            return self.unknown(node, "it splits the channel dim")
        if inner_s % inner_t or (inner_t * t[k]) % (inner_s * n):
            return self.unknown(node, "it splits the channel dim")
        f = (torch.arange(t[k]) * inner_t // inner_s) % n
        out = Axis(k, ax.ids[f], ax.const[f])
        if record:
            self.a.reshapes.append((node, out))
        return out

    def pair(self, node, ax, x, y):
        """max/min over a dim of other channels (a (values, indices) pair),
        all of whose users read its values (``[0]`` or ``.values``): as
        amax/amin (the values keep the channel axis). Over every element, as
        an element-wise max of two tensors, or where the indices are read: not
        followed."""
        if ax is None:
            return None
        if not isinstance(y, tuple) or not _is_pair(node):
            return self.unknown(node)
        return self.reduce(node, ax, x, y)

    def unit_dims(self, node, ax, x, y):
        """squeeze / unsqueeze: they add or drop dims of size 1 and keep the
        others in order, so a channel dim wider than 1 is the same one among
        the dims of other sizes before and after. A squeeze is followed only
        with its dims named, the channel dim not among them: one of every dim
        of size 1 would drop the channel dim where compaction leaves it one
        channel (and a batch dim of 1 in the example only)."""
        if ax is None:
            return None
        if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.shape[ax.dim] == 1:
            return self.unknown(node)
        if node.target in ("squeeze", torch.squeeze):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = dims if isinstance(dims, (tuple, list)) else [dims]
            if (not dims or not all(isinstance(d, int) for d in dims)
                    or ax.dim in [_norm_dim(d, x.dim()) for d in dims]):
                return self.unknown(node, "a squeeze of every dim of size 1, or of the channel dim (which "
                                          "compaction may leave one channel wide), is not followed")
        j = sum(1 for n in x.shape[:ax.dim] if n != 1)
        wide = [d for d, n in enumerate(y.shape) if n != 1]
        if j >= len(wide) or y.shape[wide[j]] != x.shape[ax.dim]:
            return self.unknown(node)
        return Axis(wide[j], ax.ids, ax.const)

    def permute(self, node, ax, x, y):
        if ax is None:
            return None
        if any(isinstance(a, torch.fx.Node) for a in _flat_nodes(node.args[1:], node.kwargs)):
            return self.unknown(node, "its dims are computed in the forward")
        if node.target in ("transpose", torch.transpose):
            d0, d1 = (_norm_dim(_arg(node, i, k), x.dim()) for i, k in ((1, "dim0"), (2, "dim1")))
            dim = d1 if ax.dim == d0 else d0 if ax.dim == d1 else ax.dim
        else:
            if len(node.args) < 2:
                order = node.kwargs["dims"]
            else:
                order = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
            order = [_norm_dim(d, x.dim()) for d in order]
            dim = order.index(ax.dim)
        return Axis(dim, ax.ids, ax.const)

    def reduce(self, node, ax, x, y):
        if ax is None:
            return None
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if dims is None or isinstance(dims, torch.fx.Node):
            return self.unknown(node)
        dims = [_norm_dim(d, x.dim()) for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
        if ax.dim in dims:
            return self.unknown(node)
        dim = ax.dim if keep else ax.dim - sum(d < ax.dim for d in dims)
        const = ax.const
        if node.target in ("sum", torch.sum):  # c summed over n positions is n * c: n may differ by input
            const = const & _zero_values(x, ax.dim)
        return Axis(dim, ax.ids, const)


def _is_pair(node) -> bool:
    """Whether ``node`` is a max/min over one dim whose every user reads its
    values (``[0]``, ``.values``) and nothing else."""
    if not isinstance(node, torch.fx.Node) or not (
            (node.op == "call_method" and node.target in PAIR_METHODS)
            or (node.op == "call_function" and node.target in PAIR_FUNCTIONS)):
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return isinstance(dim, int) and bool(node.users) and all(
        u.op == "call_function" and ((u.target is operator.getitem and u.args[1] in (0, -2))
                                     or (u.target is getattr and u.args[1] == "values"))
        for u in node.users)


def _arg(node, i: int, name: str):
    """A call's argument given at position ``i`` or by keyword ``name``."""
    return node.args[i] if len(node.args) > i else node.kwargs[name]


def _pooled_dims(name: str) -> int:
    """The trailing dims a pooling module or function pools (MaxPool1d: 1, ...2d: 2); its
    input has these plus a channel and a batch dim, or it is unbatched (no batch dim)."""
    return 1 if "1d" in name else 2


def _prod(xs):
    p = 1
    for v in xs:
        p *= v
    return p


def _any(p):
    return any(p) if isinstance(p, (tuple, list)) else bool(p)


def _zero_padded(conv) -> bool:
    if conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(k > 1 for k in conv.kernel_size)
    return _any(conv.padding)


def _flat_nodes(args, kwargs):
    out = []
    torch.fx.node.map_arg((args, kwargs), lambda n: out.append(n))
    return out


def analyze(gm, values) -> Analysis:
    """Walk ``gm``'s graph (with the captured ``values`` of each node) and collect the channel classes."""
    return _Analyzer(gm, values).run()


def decide(a: Analysis, n_ids: int):
    """Which ids go: a bool tensor over ids, plus notes on constant channels kept."""
    root = a.parent
    ok = torch.ones(n_ids, dtype=torch.long)
    for ids, _ in a.blocked:
        ok[root[ids]] = 0
    for p in a.producers:
        ok.scatter_reduce_(0, root[p.ids], p.ok.long(), "amin")
    for s in a.sites:
        # a layer called more than once has one bias for every call: only a constant 0 (nothing to fold)
        good = s.zero | (s.axis.const & (s.zero_value if a.calls.get(s.module, 1) > 1 else s.foldable))
        ok.scatter_reduce_(0, root[s.axis.ids], good.long(), "amin")
    # A producer keeps at least one row (layers of width zero are not supported everywhere).
    for p in a.producers:
        if len(p.ids) and bool(ok[root[p.ids]].all()):
            ok[root[p.ids[0]]] = 0
    return ok.bool()[root]
