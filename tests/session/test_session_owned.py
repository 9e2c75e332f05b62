"""The step's check that the optimizer's parameters are still the model's (session/owned.py):
its per-step shortcut must refuse exactly what the walk over ``model.parameters()`` refuses."""

import pytest
import torch
from torch import nn

from mixprec import MixedPrecision


def _prepared():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Linear(4, 2)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mp = MixedPrecision("bf16-mixed", device="cpu", backend="emulated")
    model, opt = mp.prepare(model, opt)
    return mp, model, opt


def _train_step(mp, model, opt):
    mp.backward(model(torch.randn(3, 4)).float().pow(2).mean())
    report = mp.step(opt)
    opt.zero_grad()
    return report


@pytest.mark.parametrize("how", ["layer", "nested layer", "parameter", "deleted"])
def test_a_change_after_steps_is_refused_at_the_next_step(how):
    mp, model, opt = _prepared()
    assert _train_step(mp, model, opt).stepped  # the shortcut has seen the model
    if how == "layer":
        model[0] = nn.Linear(4, 4)
    elif how == "nested layer":
        model[1][1] = nn.Linear(4, 2)
    elif how == "parameter":
        model[0].weight = nn.Parameter(model[0].weight.detach().clone())
    else:
        del model[1][1]
        model[1].append(nn.Identity())
        model.append(nn.Linear(4, 2))
    mp.backward(model(torch.randn(3, 4)).float().pow(2).mean())
    with pytest.raises(RuntimeError, match="no longer has"):
        mp.step(opt)


def test_unchanged_and_added_modules_keep_stepping():
    mp, model, opt = _prepared()
    for _ in range(2):
        assert _train_step(mp, model, opt).stepped
    model.append(nn.Identity())  # adds nothing the optimizer holds, removes nothing
    assert _train_step(mp, model, opt).stepped
