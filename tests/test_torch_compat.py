"""The torch.optim internals pyreg relies on (pyreg/optim/_torch_compat.py),
checked against the installed torch (CI runs the oldest and the newest
supported): the hooked step's wrapper and its unwrapped function, an
optimizer's own step hooks apart from the global ones, and an optimizer
object set up without param groups."""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from pyreg.optim import _torch_compat as compat


def test_raw_step_is_the_unwrapped_function():
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.5)  # torch wraps the class's step at the first instance
    assert getattr(torch.optim.SGD.step, "hooked", False)
    raw = compat.raw_step(torch.optim.SGD)
    assert raw is not torch.optim.SGD.step and not getattr(raw, "hooked", False)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    p.grad = torch.ones(3)
    raw(opt)  # the algorithm alone: no hooks
    assert calls == [] and torch.equal(p.detach(), torch.full((3,), 0.5))


def test_own_hooks_run_but_not_the_global_ones():
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=1.0)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("own-pre"))
    opt.register_step_post_hook(lambda *a: calls.append("own-post"))
    h1 = register_optimizer_step_pre_hook(lambda *a: calls.append("global-pre"))
    h2 = register_optimizer_step_post_hook(lambda *a: calls.append("global-post"))
    try:
        p.grad = torch.ones(2)
        compat.step_with_own_hooks(opt, None)
        assert calls == ["own-pre", "own-post"]
        assert torch.equal(p.detach(), torch.zeros(2))
        loss = compat.step_with_own_hooks(opt, lambda: torch.tensor(3.0))
        assert float(loss) == 3.0
    finally:
        h1.remove()
        h2.remove()


def test_an_optimizer_set_up_without_groups_has_torchs_plumbing():
    class Shell(torch.optim.Optimizer):
        def __init__(self):
            compat.init_without_groups(self)
            self.param_groups, self.state, self.defaults = [], {}, {}

        def step(self, closure=None):
            return "stepped"

    s = Shell()
    calls = []
    s.register_step_pre_hook(lambda *a: calls.append("pre"))
    s.register_state_dict_pre_hook(lambda *a: calls.append("sd"))
    assert s.step() == "stepped" and calls == ["pre"]
    assert getattr(type(s).step, "hooked", False)
