"""Param groups from a model: :func:`param_groups` (per-layer coefficients,
exclusions, overrides, reference weights) and its default exclusion rule."""
from __future__ import annotations

import fnmatch
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from torch import Tensor, nn

from .._validate import nonneg_real
from .keys import COEF_KEYS, STRUCTURED_KEYS, coef_values

_NORM_TYPES: Tuple[type, ...] = tuple(
    t for t in (getattr(nn.modules.batchnorm, "_NormBase", None), nn.LayerNorm, nn.GroupNorm,
                getattr(nn, "RMSNorm", None), nn.LocalResponseNorm)
    if t is not None)
_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)


def default_exclude(name: str, param: Tensor, module: nn.Module) -> bool:
    """The default rule of :func:`param_groups`: True (not regularized) for

    * biases (the attribute name is ``bias`` or ends with ``_bias``),
    * every parameter of a normalization layer (BatchNorm*, InstanceNorm*,
      SyncBatchNorm, LayerNorm, GroupNorm, RMSNorm, or any module whose class
      name contains ``"Norm"``, e.g. third-party ``LlamaRMSNorm``),
    * every parameter of an embedding (``nn.Embedding``, ``nn.EmbeddingBag``),
    * any other parameter with at most one dimension (scales, gains, biases of
      custom modules),
    * by name: biases (``bias_k``, ``bias_v`` of ``nn.MultiheadAttention``),
      embeddings and tokens held as parameters (``pos_embed``, ``cls_token``
      and the like: a leaf name containing ``embed`` or ending in ``token``),
      and weight normalization's magnitude (``weight_g``, and ``original0`` of
      ``parametrizations.weight_norm``), a gain of any shape.
    """
    leaf = name.rsplit(".", 1)[-1]
    return (leaf == "bias" or leaf.endswith("_bias") or leaf.startswith("bias_")
            or "embed" in leaf or leaf.endswith("token") or leaf == "weight_g"
            or (leaf == "original0" and any(type(p).__name__ == "_WeightNorm" for p in module.children()))
            or isinstance(module, _NORM_TYPES + _EMBEDDING_TYPES)
            or "Norm" in type(module).__name__
            or param.dim() <= 1)


#: Keys an override sets only on the parameters that are not excluded.
_NOT_ON_EXCLUDED = STRUCTURED_KEYS + ("l1_strength", "l1_refresh")
#: The prefixes wrappers put before a model's own names (DataParallel and DDP's ``module.``,
#: torch.compile's ``_orig_mod.``): a reference matches with or without them.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _matches(pattern: str, name: str, module_name: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or (bool(module_name) and fnmatch.fnmatchcase(module_name, pattern))


def _unwrapped(name: str) -> str:
    """``name`` without the wrappers' leading prefixes."""
    while name.startswith(_WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def _pattern_hint(names: Sequence[str]) -> str:
    """What a pattern that matched nothing might have meant, from the model's names."""
    hint = ("patterns match a parameter's qualified name (such as 'fc1.weight') or the name of the module "
            "that holds it directly; 'encoder.*' matches everything under 'encoder'")
    prefixes = sorted({n.split(".", 1)[0] + "." for n in names if n.startswith(_WRAPPER_PREFIXES)})
    if prefixes:
        hint += f"; this model's names start with {prefixes[0]!r} (a wrapped model)"
    return hint


def param_groups(model: nn.Module, l1: float = 0.0, l2: float = 0.0,
                 exclude: Union[None, Callable[[str, Tensor, nn.Module], bool], Sequence[str]] = None,
                 overrides: Optional[Dict[str, Dict[str, Any]]] = None,
                 ref: Union[None, nn.Module, Dict[str, Tensor]] = None,
                 l1_strength: Optional[float] = None) -> List[Dict[str, Any]]:
    """Param groups for ``model`` with per-group ``l1``/``l2`` and parameter names.

    Every trainable parameter (``requires_grad``; frozen ones are skipped)
    appears once, in ``model.named_modules()`` order (a shared/tied parameter
    belongs to the first module that holds it, and the default rule leaves
    it out if it leaves it out in any of its modules: a language model's
    output layer tied to its embedding is an embedding). Parameters are regularized
    with ``l1``/``l2`` unless excluded, which puts them into a group with
    ``l1 = l2 = 0``:

    * ``exclude=None``: :func:`default_exclude` (biases, normalization layers,
      embeddings and all parameters with ``ndim <= 1``);
    * ``exclude=callable(name, param, module) -> bool``: your rule instead;
    * ``exclude=["*.bias", "encoder.*", ...]``: fnmatch patterns instead,
      matched against the parameter's qualified name or its module's name;
      ``exclude=[]`` excludes nothing. A pattern that matches no trainable
      parameter warns (a likely typo: the parameters it meant are regularized).

    ``overrides={pattern: {"l1": ..., "l2": ..., "lr": ...}}`` sets options
    for the parameters whose qualified name, or the name of the module that
    holds them directly (not an ancestor's: ``"encoder.*"`` matches
    everything under ``encoder``), matches the pattern (fnmatch-style, e.g.
    ``"encoder.layers.*"``, ``"fc"``); they are
    applied in order (later patterns win) on top of the base options, so an
    explicit ``l1``/``l2`` override applies even to an excluded parameter.
    Any other key (``lr``, ``weight_decay``, ...) is passed to the optimizer.
    A pattern that matches no parameter is an error (a likely typo), and so is
    one that matches only excluded parameters when all its keys are ones that
    apply only to the others (below).

    Overrides may also set the structured regularizers of
    :class:`Regularized`: ``group_l1`` and ``group_dim`` (group lasso),
    ``max_norm`` and ``max_norm_dim`` (max-norm constraint), e.g.
    ``overrides={"fc1": {"group_l1": 1e-3, "group_dim": 1}}`` for group lasso
    on the first layer's input columns only. These apply to the matching
    parameters that are not excluded (so ``"fc1"`` sets them on ``fc1.weight``,
    not on ``fc1.bias``), as do ``target_sparsity``, ``l2_bound``,
    ``group_strength``, ``l1_strength`` and ``l1_refresh``. A parameter held
    under several names (a weight tied to another layer's, a module
    registered twice) matches a pattern through any of them, and a
    parametrized one (after ``weight_norm``, named
    ``fc1.parametrizations.weight.original0``, held by
    ``fc1.parametrizations.weight``) through its layer's name (``"fc1"``) as
    well; the default rule treats it as its layer's (an embedding's is left
    out).

    ``l1_strength``: the L1 strength as a fraction in [0, 1] instead of an
    ``l1`` (which must then be 0): each regularized tensor's ``l1`` is set
    from its own push every ``l1_refresh`` steps (an override may set that
    key, and a per-layer ``l1_strength``; an override's ``l1`` replaces the
    strength on its parameters, and its ``l1_strength`` their ``l1``); see
    "How much regularization" in the guide and
    :func:`pyreg.optim.apply.refresh_strength`. Not with ``ref``.

    ``ref``: reference weights (a model, or a state dict such as the
    pre-trained one) to regularize toward (L1-SP / L2-SP): every group gets a
    ``"ref"`` list with, per parameter, a copy of the reference tensor of the
    same name (moved to the parameter's device and dtype), or None where the
    reference has no tensor of that name and shape (new layers, a replaced
    head): those get plain L1/L2. Names match with or without the prefixes
    of wrappers (``module.`` of DataParallel and DDP, ``_orig_mod.`` of
    torch.compile). A reference in which no regularized parameter finds its
    tensor is an error (a wrapped or another model: L2-SP would silently be
    L2 toward zero). The copies are the one extra copy of the weights that
    regularizing toward a reference needs.

    Parameters share a group when the same overrides match them and they are
    all excluded or all not: the groups are the same whatever the coefficient
    values (an override's equal to the base one included), so a checkpoint of
    a run with one set of values loads into an optimizer built with another. Each group is
    ``{"params": [...], "param_names": [...], "l1": ..., "l2": ..., **options}``
    (``param_names`` is torch.optim's own key for names, kept in state dicts).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups needs an nn.Module, got {type(model).__name__}")
    base = {"l1": nonneg_real(l1, "l1"), "l2": nonneg_real(l2, "l2")}
    if l1_strength is not None:
        a = nonneg_real(l1_strength, "l1_strength")
        if a > 1.0:
            raise ValueError(f"l1_strength is a fraction in [0, 1]; got {a}")
        if base["l1"]:
            raise ValueError("param_groups sets both l1 and l1_strength: the strength sets each tensor's l1")
        base["l1_strength"] = a
    if exclude is None:
        rule = default_exclude
    elif isinstance(exclude, type):
        raise TypeError(f"exclude must be None, a callable(name, param, module) -> bool or a list of name "
                        f"patterns, not a class ({exclude.__name__}); to leave out a type of layer: "
                        f"exclude=lambda name, p, module: isinstance(module, {exclude.__name__})")
    elif callable(exclude) and not isinstance(exclude, nn.Module):
        rule = exclude
    elif isinstance(exclude, (str, bytes)) or not isinstance(exclude, Iterable):
        raise TypeError("exclude must be None, a callable(name, param, module) or a list of name patterns")
    else:
        patterns = list(exclude)
        for p in patterns:
            if not isinstance(p, str):
                raise TypeError(f"exclude patterns must be strings, got {type(p).__name__}")
        rule = None
    if overrides is not None and not isinstance(overrides, dict):
        raise TypeError(f"overrides must be a dict mapping name patterns (str) to dicts of group options, got "
                        f"{type(overrides).__name__}")
    overrides = dict(overrides or {})
    for pattern, opts in overrides.items():
        if not isinstance(pattern, str) or not isinstance(opts, dict):
            raise TypeError("overrides must map name patterns (str) to dicts of group options")
        if "params" in opts or "param_names" in opts:
            raise ValueError(f"overrides[{pattern!r}] may not set 'params' or 'param_names'")
        for key in COEF_KEYS:
            if opts.get(key) is not None and not isinstance(opts[key], (list, tuple)):
                coef_values(opts[key], 1, f"overrides[{pattern!r}][{key!r}]")
        if "ref" in opts:
            raise ValueError(f"overrides[{pattern!r}] may not set 'ref'; pass ref= to param_groups")
    if ref is not None:
        if l1_strength is not None:
            raise ValueError("param_groups sets both l1_strength and ref: a strength sets each tensor's l1 from its "
                             "push toward zero, not toward a reference")
        if isinstance(ref, nn.Module):
            ref = dict(ref.state_dict())
        elif not isinstance(ref, dict):
            raise TypeError(f"ref must be an nn.Module or a state dict, got {type(ref).__name__}")
        ref = {_unwrapped(k): v for k, v in ref.items()}
    used = set()
    applied = set()  # the patterns that set a key on some parameter
    used_exclude = set()

    groups: List[Dict[str, Any]] = []
    seen = set()
    # every (name, module name, module) that holds each parameter: a tied or twice-registered one under each
    # of its names; a parametrized one (held by '<owner>.parametrizations.<tensor>') also as its owner's
    holders: Dict[int, List[Tuple[str, str, nn.Module]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{pname}" if module_name else pname
            at = holders.setdefault(id(param), [])
            at.append((name, module_name, module))
            owner = _parametrized_owner(model, module_name, module)
            if owner is not None:
                at.append((name, owner[0], owner[1]))
    for module_name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if not param.requires_grad:
                continue
            name = f"{module_name}.{pname}" if module_name else pname
            held = holders.get(id(param), [(name, module_name, module)])
            if rule is default_exclude:  # (a tied parameter: left out if any of its modules leaves it out)
                excluded = any(default_exclude(n, param, m) for n, _, m in held)
            elif rule is not None:
                excluded = bool(rule(name, param, module))
            else:
                hits = [p for p in patterns if any(_matches(p, n, mn) for n, mn, _ in held)]
                excluded = bool(hits)
                used_exclude.update(hits)
            opts = {"l1": 0.0, "l2": 0.0} if excluded else dict(base)
            matched = []  # the overrides that match the parameter (under any of its names)
            for pattern, extra in overrides.items():
                if any(_matches(pattern, n, mn) for n, mn, _ in held):
                    keys = {k: v for k, v in extra.items() if not (excluded and k in _NOT_ON_EXCLUDED)}
                    # l1 and l1_strength exclude each other: the one an override sets replaces the other
                    if keys.get("l1") is not None and "l1_strength" not in keys:
                        opts.pop("l1_strength", None)
                    if keys.get("l1_strength") is not None and "l1" not in keys:
                        opts["l1"] = 0.0
                    opts.update(keys)
                    used.add(pattern)
                    matched.append(pattern)
                    if keys or not extra:
                        applied.add(pattern)
            # The groups depend on which parameters are excluded and which overrides match them, not on
            # the values: l1 = l2 = 0, or an override's value equal to the base one, gives the same groups.
            key = (excluded, tuple(matched))
            for group in groups:
                if group["_key"] == key:
                    break
            else:
                group = {"_key": key, "_opts": opts, "params": [], "param_names": []}
                groups.append(group)
            group["params"].append(param)
            group["param_names"].append(name)
    names = [n for g in groups for n in g["param_names"]]
    unused = [p for p in overrides if p not in used]
    if unused:
        raise ValueError(f"overrides pattern(s) {unused} match no trainable parameter of the model ("
                         f"{_pattern_hint(names)})")
    idle = [p for p in overrides if p in used and p not in applied]
    if idle:
        raise ValueError(f"overrides pattern(s) {idle} match only excluded parameters, where their keys "
                         f"({', '.join(sorted({k for p in idle for k in overrides[p]}))}) do not apply: nothing "
                         f"would change ({_pattern_hint(names)}; a parametrized weight is named "
                         "'<module>.parametrizations.weight.original0')")
    unused = [p for p in patterns if p not in used_exclude] if rule is None else []
    if unused:
        warnings.warn(f"exclude pattern(s) {unused} match no trainable parameter of the model, so they exclude "
                      "nothing: check their spelling (patterns match a parameter's qualified name, such as "
                      "'fc1.bias', or its module's name)", UserWarning, stacklevel=2)
    for group in groups:  # (a list value, one per parameter, against the parameters it went to)
        for k in COEF_KEYS:
            v = group["_opts"].get(k)
            if isinstance(v, (list, tuple)) and len(v) != len(group["params"]):
                setters = [p for p in group["_key"][1] if k in overrides[p]]
                raise ValueError(f"overrides[{setters[-1]!r}][{k!r}] has {len(v)} values, one per parameter, but "
                                 f"the parameters it sets are {len(group['params'])}: {group['param_names']}")
    out, found, wanted, regularized = [], 0, 0, []
    for group in groups:
        opts = group.pop("_opts")
        excluded = group.pop("_key")[0]
        out.append({"params": group["params"], "param_names": group["param_names"], **opts})
        if ref is not None:
            refs = [_ref_copy(ref, _unwrapped(name), p) for name, p in zip(group["param_names"], group["params"])]
            out[-1]["ref"] = refs
            if not excluded:
                wanted += len(refs)
                found += sum(r is not None for r in refs)
                regularized += group["param_names"]
    if ref is not None and wanted and not found:
        some = regularized[:3]
        raise ValueError(f"ref has no tensor of the name and shape of any regularized parameter (such as "
                         f"{some}; ref's names: {list(ref)[:3]}): toward it, every parameter would be regularized "
                         "toward zero. Pass the reference of this model (a state dict of the same names)")
    return out


def _parametrized_owner(model: nn.Module, module_name: str, module: nn.Module) -> Optional[Tuple[str, nn.Module]]:
    """(name, module) of the module whose tensor ``module`` parametrizes
    (``module_name`` is ``'<owner>.parametrizations.<tensor>'``), else None."""
    parts = module_name.split(".")
    if len(parts) < 2 or parts[-2] != "parametrizations" or type(module).__name__ != "ParametrizationList":
        return None
    owner = ".".join(parts[:-2])
    return owner, (model.get_submodule(owner) if owner else model)


def _ref_copy(ref: Dict[str, Any], name: str, param: Tensor) -> Optional[Tensor]:
    """A copy of ``ref[name]`` like ``param`` (device, dtype), or None when the
    reference has no tensor of that name and shape."""
    r = ref.get(name)
    if not isinstance(r, Tensor) or r.shape != param.shape:
        return None
    return r.detach().to(device=param.device, dtype=param.dtype, copy=True)
