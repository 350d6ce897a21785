"""Rewrite a traced model: fold constant channels into biases, then slice the removed ones out."""
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._graph import Analysis, feature_values

__all__ = ["StackedRNN", "rewrite", "set_module"]


class StackedRNN(nn.Module):
    """A multi-layer ``nn.LSTM``/``nn.GRU``/``nn.RNN`` whose layers have different hidden sizes.

    Runs its single-layer modules in turn, with the original's dropout between
    layers in training mode. Returns ``(output, None)``: the final states of the
    layers are not stacked (they differ in size).
    """

    def __init__(self, layers: List[nn.Module], dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.dropout = dropout

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            if i and self.dropout and self.training:
                x = F.dropout(x, self.dropout, True)
            x, _ = layer(x)
        return x, None


def set_module(root: nn.Module, name: str, new: nn.Module):
    parent, _, last = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, last, new)


def _param(t: Tensor, like: Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().to(like.dtype).contiguous().clone(), requires_grad=like.requires_grad)


def rewrite(a: Analysis, removed: Tensor, drop_inputs: bool) -> Dict[str, dict]:
    """Change ``a.graph_module`` in place; returns, per layer, the removed output and input indices."""
    gm = a.graph_module
    changes: Dict[str, dict] = {}

    def note(name, key, idx):
        if len(idx):
            changes.setdefault(name, {})[key] = idx.tolist()

    # 1. Folds, on the original weights: bias += W[:, j] * value_j for every removed nonzero column
    # whose constant value_j is not 0 (a zero adds nothing: a layer without a bias gets none).
    for s in a.sites:
        gone = removed[s.axis.ids]
        fold = gone & ~s.zero & ~s.zero_value
        if not bool(fold.any()):
            continue
        mod = gm.get_submodule(s.module)
        x = a.values[s.node.args[0].name]
        v = feature_values(x, s.axis.dim).double()
        fold = fold.to(v.device)
        if s.kind == "linear":
            delta = mod.weight.detach().double()[:, fold] @ v[fold]
            base = mod.bias.detach().double() if mod.bias is not None else 0.0
            mod.bias = _param(base + delta, mod.bias if mod.bias is not None else mod.weight)
        elif s.kind == "conv":
            w = mod.weight.detach().double()[:, fold]
            delta = w.reshape(w.shape[0], w.shape[1], -1).sum(2) @ v[fold]
            base = mod.bias.detach().double() if mod.bias is not None else 0.0
            mod.bias = _param(base + delta, mod.bias if mod.bias is not None else mod.weight)
        else:  # rnn: the input's constant goes into bias_ih_l0 (foldable marked False when there is none)
            delta = mod.weight_ih_l0.detach().double()[:, fold] @ v[fold]
            with torch.no_grad():
                mod.bias_ih_l0.copy_((mod.bias_ih_l0.double() + delta).to(mod.bias_ih_l0.dtype))

    # 2. Slices.
    keep_in = {name: ~removed[ax.ids] for name, ax in a.module_input.items()}
    for name, ids in a.module_ids.items():
        mod = gm.get_submodule(name)
        keep_out = ~removed[ids]
        kin = keep_in.get(name)
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            w = mod.weight.detach()
            if kin is None:
                kin = torch.ones(w.shape[1], dtype=torch.bool)
            note(name, "outputs", (~keep_out).nonzero().flatten())
            note(name, "inputs", (~kin).nonzero().flatten())
            rows, cols = keep_out.nonzero().flatten().to(w.device), kin.nonzero().flatten().to(w.device)
            mod.weight = _param(w.index_select(0, rows).index_select(1, cols), mod.weight)
            if mod.bias is not None:
                mod.bias = _param(mod.bias.detach().index_select(0, rows), mod.bias)
            if isinstance(mod, nn.Linear):
                mod.in_features, mod.out_features = int(kin.sum()), int(keep_out.sum())
            else:
                mod.in_channels, mod.out_channels = int(kin.sum()), int(keep_out.sum())
        elif isinstance(mod, nn.Embedding):
            note(name, "outputs", (~keep_out).nonzero().flatten())
            mod.weight = _param(mod.weight.detach()[:, keep_out.to(mod.weight.device)], mod.weight)
            mod.embedding_dim = int(keep_out.sum())
    for name, ax in a.slices:
        if name in changes.get("__bn_done__", {}):
            continue
        changes.setdefault("__bn_done__", {})[name] = True
        mod = gm.get_submodule(name)
        keep = ~removed[ax.ids]
        note(name, "channels", (~keep).nonzero().flatten())
        held = mod.running_mean if mod.running_mean is not None else mod.weight  # (None: neither, nothing to cut)
        keep = keep.to(held.device) if held is not None else keep
        if mod.affine:
            mod.weight = _param(mod.weight.detach()[keep], mod.weight)
            mod.bias = _param(mod.bias.detach()[keep], mod.bias)
        if mod.running_mean is not None:
            mod.running_mean = mod.running_mean[keep].clone()
            mod.running_var = mod.running_var[keep].clone()
        mod.num_features = int(keep.sum())
    changes.pop("__bn_done__", None)
    for name, plan in a.rnns.items():
        _rewrite_rnn(gm, name, plan, removed, keep_in.get(name), changes)

    # 3. Literal sizes in view/reshape calls.
    for node, ax in a.reshapes:
        new = int((~removed[ax.ids]).sum())
        if new == len(ax.ids):
            continue
        key = next((k for k in ("shape", "size") if k in node.kwargs), None)  # (the sizes by keyword)
        shape_args = [node.kwargs[key]] if key else list(node.args[1:])
        packed = len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list))
        sizes = list(shape_args[0]) if packed else shape_args
        if ax.dim < len(sizes) and isinstance(sizes[ax.dim], int) and sizes[ax.dim] != -1:
            sizes[ax.dim] = new
            if key:
                node.kwargs = {**node.kwargs, key: tuple(sizes)}
            else:
                node.args = (node.args[0], tuple(sizes)) if packed else (node.args[0], *sizes)

    # 4. Inputs: gather the kept features in front, or take only them.
    kept_inputs = {}
    for k, (node, ax) in enumerate(a.inputs):
        keep = ~removed[ax.ids]
        kept_inputs[node.name] = {"dim": ax.dim, "kept": keep.nonzero().flatten().tolist(),
                                  "removed": (~keep).nonzero().flatten().tolist(), "size": len(keep)}
        if bool(keep.all()) or drop_inputs:
            continue
        kept = keep.nonzero().flatten()
        if int(kept[-1] - kept[0]) + 1 == len(kept):  # one contiguous range: a view, no copy
            with gm.graph.inserting_after(node):
                gather = gm.graph.call_function(torch.narrow, (node, ax.dim, int(kept[0]), len(kept)))
        else:
            buf = f"kept_inputs_{node.name}"
            gm.register_buffer(buf, kept.to(a.values[node.name].device))
            with gm.graph.inserting_after(node):
                idx = gm.graph.get_attr(buf)
            with gm.graph.inserting_after(idx):
                gather = gm.graph.call_function(torch.index_select, (node, ax.dim, idx))
        node.replace_all_uses_with(gather, delete_user_cb=lambda n: n is not gather)
    gm.graph.lint()
    gm.recompile()
    return changes, kept_inputs


def _rewrite_rnn(gm, name, plan, removed, kin, changes):
    mod = gm.get_submodule(name)
    H, L, G = mod.hidden_size, mod.num_layers, plan.gates
    keeps = [] if plan.hidden_used else [k.clone() for k in plan.internal_keep]
    if plan.hidden_used:
        keeps = [torch.ones(H, dtype=torch.bool) for _ in range(L - 1)]
    for k in keeps:
        if not bool(k.any()):
            k[0] = True
    keeps.append(~removed[plan.ids])
    w0 = mod.weight_ih_l0
    if kin is None:
        kin = torch.ones(w0.shape[1], dtype=torch.bool)
    if bool(kin.all()) and all(bool(k.all()) for k in keeps):
        return
    note_in = (~kin).nonzero().flatten().tolist()
    if note_in:
        changes.setdefault(name, {})["inputs"] = note_in
    for layer, k in enumerate(keeps):
        if not bool(k.all()):
            changes.setdefault(name, {})[f"hidden_l{layer}"] = (~k).nonzero().flatten().tolist()
    kw = dict(bias=mod.bias, batch_first=mod.batch_first)
    if isinstance(mod, nn.RNN):
        kw["nonlinearity"] = mod.nonlinearity
    layers, prev = [], kin
    for layer, k in enumerate(keeps):
        rows = torch.cat([g * H + k.nonzero().flatten() for g in range(G)]).to(w0.device)
        new = type(mod)(int(prev.sum()), int(k.sum()), num_layers=1, **kw).to(w0.device, w0.dtype)
        src = {"weight_ih": lambda w: w[rows][:, prev.to(w.device)], "weight_hh": lambda w: w[rows][:, k.to(w.device)],
               "bias_ih": lambda w: w[rows], "bias_hh": lambda w: w[rows]}
        for pname, f in src.items():
            if pname.startswith("bias") and not mod.bias:
                continue
            old = getattr(mod, f"{pname}_l{layer}")
            setattr(new, f"{pname}_l0", _param(f(old.detach()), old))
        layers.append(new)
        prev = k
    if L == 1:
        out = layers[0]
    elif all(bool(k.all()) for k in keeps):
        # only input columns changed: keep one multi-layer module
        out = type(mod)(int(kin.sum()), H, num_layers=L, dropout=mod.dropout, **kw).to(w0.device, w0.dtype)
        for layer in range(L):
            for pname in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                if pname.startswith("bias") and not mod.bias:
                    continue
                setattr(out, f"{pname}_l{layer}", getattr(layers[layer], f"{pname}_l0"))
    else:
        out = StackedRNN(layers, mod.dropout)
    out.train(mod.training)
    set_module(gm, name, out)
