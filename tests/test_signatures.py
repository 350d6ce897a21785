"""The fused optimizers' constructors show torch's arguments (inspect,
``help()``, IDE completion): every argument of the installed torch class, in
the same order and kind, with the same default, then pyreg's keyword-only
``l1``, ``l2``, ``preconditioned``; and the arguments reach torch's
constructor, positional ones included."""
from __future__ import annotations

import inspect

import pytest
import torch

import pyreg

NAMES = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop"]


@pytest.mark.parametrize("name", NAMES)
def test_signature_lists_torchs_arguments(name):
    ours = inspect.signature(getattr(pyreg.optim, name)).parameters
    theirs = inspect.signature(getattr(torch.optim, name)).parameters
    for arg, p in theirs.items():
        assert arg in ours, arg
        assert ours[arg].default == p.default, arg
    positional = [a for a, p in theirs.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [a for a, p in ours.items() if p.kind is p.POSITIONAL_OR_KEYWORD][: len(positional)] == positional
    for own in ("l1", "l2", "preconditioned"):
        assert ours[own].kind is inspect.Parameter.KEYWORD_ONLY
    assert "l1" in (getattr(pyreg.optim, name).__doc__ or "")


@pytest.mark.parametrize("name", NAMES)
def test_arguments_reach_torch(name):
    cls = getattr(pyreg.optim, name)
    theirs = inspect.signature(getattr(torch.optim, name)).parameters
    p = torch.nn.Parameter(torch.ones(3))
    opt = cls([p], 0.125, l1=0.5)  # lr given positionally
    assert opt.param_groups[0]["lr"] == 0.125 and opt.param_groups[0]["l1"] == 0.5
    second = [a for a, q in theirs.items() if q.kind is q.POSITIONAL_OR_KEYWORD][2]
    value = (0.5, 0.75) if second == "betas" else 0.25
    opt = cls([p], 0.125, value)  # the second of torch's positional arguments
    assert opt.param_groups[0][second] == value


def test_an_argument_this_torch_lacks_is_an_error_only_when_set():
    theirs = inspect.signature(torch.optim.Adam).parameters
    if "decoupled_weight_decay" in theirs:
        pytest.skip("this torch's Adam takes decoupled_weight_decay")
    p = torch.nn.Parameter(torch.ones(3))
    pyreg.optim.Adam([p], lr=0.1)  # its default: left out
    with pytest.raises(TypeError):
        pyreg.optim.Adam([p], lr=0.1, decoupled_weight_decay=True)
