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


def test_global_hooks_run_once_after_torch_compile_rewrapped_the_step():
    """torch.compile's first call wraps the steps of the optimizers dynamo does
    not trace (LBFGS, SparseAdam) in ``torch._dynamo.disable``, and the next
    such optimizer wraps that in torch's hook wrapper again: Regularized's
    inner step still runs the global hooks once (around the wrapper), not
    a second time from the inner hook wrapper. In a fresh process: the
    rewrap is process-wide."""
    import subprocess
    import sys

    code = """
import torch, pyreg
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
torch.optim.LBFGS([nn.Parameter(torch.zeros(1))])  # (the class's step hooked)
torch.compile(lambda x: x.sin())(torch.ones(2))  # (LBFGS.step wrapped in dynamo's disable)
w = nn.Parameter(torch.zeros(3))
opt = pyreg.Regularized(torch.optim.LBFGS([w], lr=1), l2=0.1)  # (hooked again)
def closure():
    opt.zero_grad(); loss = (w - 1).square().sum(); loss.backward(); return loss
calls = []
h = register_optimizer_step_pre_hook(lambda o, a, k: calls.append(type(o).__name__))
opt.step(closure)
h.remove()
print(calls, float(w.detach().sum()) > 0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split("\n")[-2] == "['Regularized'] True", out.stdout + out.stderr
