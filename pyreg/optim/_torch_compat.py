"""The torch.optim internals pyreg's optimizers rely on, in one place.

torch wraps every ``Optimizer.step`` (``Optimizer.patch_track_step_called`` /
``profile_hook_step``): the wrapper runs the global and the optimizer's own
step hooks and marks the step as called. pyreg needs two things it has no
public API for:

* a step *without* the wrapper, to run torch's own algorithm on a subset of
  parameters inside pyreg's step (the fused optimizers' fallback) or to run
  an inner optimizer's step with only its own hooks (:class:`Regularized`,
  whose own step already ran the global hooks);
* an optimizer object that shares another's ``param_groups`` and ``state``
  without ``Optimizer.__init__`` (which would copy the groups).

Checked on the oldest and the newest torch that pyreg supports
(tests/test_torch_compat.py).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Dict, Optional

from torch.optim import Optimizer

#: The hook dictionaries Optimizer.__init__ creates.
_HOOK_DICTS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
               "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
               "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")


def init_without_groups(opt: Optimizer) -> None:
    """What ``Optimizer.__init__`` sets up for the hooks and the step wrapper,
    without taking (and copying) param groups."""
    for name in _HOOK_DICTS:
        setattr(opt, name, OrderedDict())
    opt._patch_step_function()


def raw_step(cls: type) -> Callable:
    """``cls.step`` without torch's hook wrapper (the function as written)."""
    step = cls.step
    if getattr(step, "hooked", False):
        return _unhooked(step)
    return step


#: Per hooked step function: the function under all its hook wrappers (see _unhooked).
_UNHOOKED: Dict[Callable, Callable] = {}


def _unhooked(step: Callable) -> Callable:
    """The function under every hook wrapper of a hooked ``step``. One, as a
    rule; but torch.compile's first call wraps the steps of the optimizers
    dynamo does not trace (LBFGS, SparseAdam) in ``torch._dynamo.disable``,
    and the next optimizer of that class wraps that in a hook wrapper again:
    the function under the outer wrapper then runs the global hooks once
    more. Where a disable wrapper was among them, the function is returned
    disabled too (dynamo must not trace it)."""
    hit = _UNHOOKED.get(step)
    if hit is not None:
        return hit
    f, raw, disabled, seen_disable = step, step, False, False
    while f is not None:
        if getattr(f, "_torchdynamo_disable", False):
            seen_disable = True
        if getattr(f, "hooked", False):
            raw, disabled = f.__wrapped__, seen_disable
        f = getattr(f, "__wrapped__", None)
    if disabled and not getattr(raw, "_torchdynamo_disable", False):
        import torch._dynamo

        raw = torch._dynamo.disable(raw)
    if len(_UNHOOKED) > 64:
        _UNHOOKED.clear()
    _UNHOOKED[step] = raw
    return raw


def step_with_own_hooks(opt: Optimizer, closure: Optional[Callable[[], Any]]):
    """``opt.step(closure)`` with ``opt``'s own step hooks but not the global
    ones (``torch.optim.optimizer.register_optimizer_step_pre_hook`` and
    ``_post_hook``)."""
    step = type(opt).step
    if not getattr(step, "hooked", False):  # not torch's wrapped step
        return opt.step() if closure is None else opt.step(closure)
    raw = _unhooked(step)
    pre, post = opt._optimizer_step_pre_hooks, opt._optimizer_step_post_hooks
    if not pre and not post:  # the common case, in fewer operations
        out = raw(opt) if closure is None else raw(opt, closure)
        opt._optimizer_step_code()
        return out
    args: tuple = (opt,) if closure is None else (opt, closure)
    kwargs: Dict[str, Any] = {}
    for hook in list(pre.values()):
        result = hook(opt, args, kwargs)
        if result is not None:
            if not (isinstance(result, tuple) and len(result) == 2):
                raise RuntimeError(f"{raw} must return None or a tuple of (new_args, new_kwargs), "
                                   f"but got {result}.")
            args, kwargs = result
    out = raw(*args, **kwargs)
    opt._optimizer_step_code()
    for hook in list(post.values()):
        hook(opt, args, kwargs)
    return out
