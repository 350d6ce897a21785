"""In-place calls in a traced model, made out-of-place for ``pyreg.compact``.

``h.relu_()`` returns nothing a traced graph uses: the graph's later reads of
``h`` read the written values only through the tensor's memory. The analysis
follows values from node to node, so every in-place call becomes its
out-of-place form (``relu_`` -> ``relu``, ``operator.iadd`` -> ``operator.add``,
``inplace=True`` -> False, an ``nn.ReLU(inplace=True)`` made ``inplace=False``)
and the later reads of the written tensor read its result. That is exact
where nothing else sees the written memory after the call: a call that
writes into a view read later through its base (or the other way), into an
input of the model, into a parameter or buffer, or that has no out-of-place
form, makes ``compact`` raise and change nothing.
"""
import operator
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Refused", "functionalize"]


class Refused(ValueError):
    """An in-place call that compact cannot rewrite without changing what the
    model computes (told apart from the model's own errors while it runs)."""

_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
              operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
              operator.imod: operator.mod, operator.ipow: operator.pow, operator.imatmul: operator.matmul,
              operator.iand: operator.and_, operator.ior: operator.or_, operator.ixor: operator.xor,
              operator.ilshift: operator.lshift, operator.irshift: operator.rshift}
_NO_FORM = {operator.setitem, operator.delitem}


_NOT_WRITES = {"requires_grad_", "retain_grad", "share_memory_", "rename_"}  # metadata only


def _torch_inplace(target) -> bool:
    """Whether ``target`` is an in-place function of torch or F (``torch.relu_``)."""
    name = getattr(target, "__name__", "")
    return (name.endswith("_") and not name.startswith("_") and name not in _NOT_WRITES
            and any(getattr(space, name, None) is target for space in (torch, F)))


def _function_form(target):
    """The out-of-place function of an in-place torch function (``torch.relu_``,
    ``F.relu_``): the same name without its underscore, in torch or F; else None."""
    name = target.__name__
    for space in (torch, F):
        if getattr(space, name, None) is target and callable(getattr(space, name[:-1], None)):
            return getattr(space, name[:-1])
    return None


def _method_form(name: str) -> Optional[str]:
    """The out-of-place Tensor method of in-place method ``name`` (``relu_``,
    ``__iadd__``), or None."""
    out = "__" + name[3:] if name.startswith("__i") else name[:-1]
    return out if callable(getattr(Tensor, out, None)) else None


def _written(node, gm) -> Optional[str]:
    """How ``node`` writes its first argument in place: "method", "operator",
    "function", "kwarg", "module"; None if it does not."""
    if node.op == "call_method":
        t = node.target
        if t in ("__setitem__", "__delitem__") or (t.startswith("__i") and t.endswith("__")):
            return "method"
        return "method" if t.endswith("_") and not t.startswith("_") and t not in _NOT_WRITES else None
    if node.op == "call_function":
        if node.target in _OPERATORS or node.target in _NO_FORM:
            return "operator"
        if node.kwargs.get("inplace") is True:
            return "kwarg"
        return "function" if _torch_inplace(node.target) else None
    if node.op == "call_module":
        return "module" if getattr(gm.get_submodule(node.target), "inplace", False) is True else None
    return None


def _storage(v) -> Optional[int]:
    if isinstance(v, Tensor) and v.numel() and v.layout == torch.strided:
        return v.untyped_storage().data_ptr()
    return None


def functionalize(gm, args) -> int:
    """Make every in-place call of ``gm``'s graph out-of-place (see the module
    doc); returns how many. Raises ValueError, with ``gm``'s graph partly
    rewritten (the caller's copy), where that would change what the model
    computes."""
    import torch.fx

    nodes = list(gm.graph.nodes)
    writes = [(n, kind) for n in nodes if (kind := _written(n, gm)) is not None]
    if not writes:
        return 0
    storages: Dict[str, Optional[int]] = {}

    class _Storages(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            storages[n.name] = _storage(out)
            return out

    with torch.no_grad():  # (every value kept to the end: a freed block handed out again is no alias)
        _Storages(gm, garbage_collect_values=False).run(*args)
    order = {n: i for i, n in enumerate(nodes)}
    for node, kind in writes:
        what = f"{node.name} ({node.op} {getattr(node.target, '__name__', node.target)})"
        target = node.args[0] if node.args else None
        if not isinstance(target, torch.fx.Node):
            raise Refused(f"compact: {what} writes in place into something that is not a tensor of the graph; "
                             "nothing was changed")
        if target.op in ("placeholder", "get_attr"):
            where = "an input of the model" if target.op == "placeholder" else f"the model's {target.target}"
            raise Refused(f"compact: {what} writes in place into {where}; compact takes models whose forward "
                             "does not write its inputs, parameters or buffers; nothing was changed")
        if node.target in _NO_FORM or node.target in ("__setitem__", "__delitem__"):
            raise Refused(f"compact: {what} writes into part of a tensor (x[...] = ...), which compact "
                             "cannot follow; nothing was changed")
        mem = storages.get(target.name)
        later = [u for m in nodes if m is not target and m is not node and mem is not None
                 and storages.get(m.name) == mem for u in m.users if order[u] > order[node]]
        if later:
            raise Refused(f"compact: {what} writes in place into {target.name}, whose memory "
                             f"{later[0].name} reads afterwards through another tensor (a view); nothing was "
                             "changed")
        if kind in ("method", "function"):
            form = _method_form(node.target) if kind == "method" else _function_form(node.target)
            if form is None:
                raise Refused(f"compact: {what} writes in place and has no out-of-place form; nothing was "
                                 "changed")
            node.target = form
        elif kind == "operator":
            node.target = _OPERATORS[node.target]
        elif kind == "kwarg":
            node.kwargs = dict(node.kwargs, inplace=False)
        else:
            gm.get_submodule(node.target).inplace = False
        for u in list(target.users):
            if u is not node and order[u] > order[node]:
                u.replace_input_with(target, node)
    gm.recompile()
    return len(writes)
