"""Weights changed from outside after wrapping (``model.load_state_dict``) are taken on.

Reference: a fresh wrapper built on the loaded weights (at the same rounding step, for
stochastic rounding) gives the same step, bit for bit, in every update mode.
"""

from __future__ import annotations

import copy

import pytest
import torch
from optim_helpers import grads_for, roundtrip, set_grads
from torch import nn

from mixprec import MixedPrecision
from mixprec.optim import (
    KahanOptimizer,
    MasterWeightOptimizer,
    Nearest,
    StochasticRoundingOptimizer,
    WrappedOptimizer,
)

MODES = {
    "master": MasterWeightOptimizer,
    "stochastic": lambda inner: StochasticRoundingOptimizer(inner, seed=3),
    "kahan": KahanOptimizer,
    "nearest": lambda inner: WrappedOptimizer(inner, Nearest()),
}


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))


def _bf16(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for module in model:
        if not isinstance(module, nn.LayerNorm):
            module.to(torch.bfloat16)
    return model


def _step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    params = list(model.parameters())
    set_grads(params, grads_for(params, step, scale=0.3))
    opt.step()


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("fused", ["auto", "off"])
@pytest.mark.parametrize("steps_before", [0, 2])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_weights_loaded_after_wrapping_are_the_ones_stepped(mode, steps_before, fused):
    loaded = _model(1).state_dict()  # fp32 weights, e.g. a pretrained checkpoint
    model = _bf16(_model(0))
    opt = MODES[mode](torch.optim.SGD(model.parameters(), lr=0.1))
    opt.fused = fused
    for step in range(steps_before):
        _step(model, opt, step)
    model.load_state_dict(loaded)
    _step(model, opt, 10)

    fresh = _bf16(_model(0))
    fresh.load_state_dict(loaded)
    reference = MODES[mode](torch.optim.SGD(fresh.parameters(), lr=0.1))
    reference.fused = fused
    if mode == "stochastic":
        reference.rounding_step = opt.rounding_step - 1  # the same draws for the same step
    _step(fresh, reference, 10)
    assert _same(model, fresh)
    if mode == "master":
        for mine, theirs in zip(opt.master_params(), reference.master_params(), strict=True):
            assert torch.equal(mine, theirs)


@pytest.mark.parametrize("mode", ["master", "kahan"])
def test_a_resume_that_loads_the_model_after_the_optimizer_stays_bit_for_bit(mode):
    """The optimizer's buffers (masters, compensation) belong with the weights of the same
    checkpoint, in whichever order the two halves are loaded."""
    model = _bf16(_model(0))
    opt = MODES[mode](torch.optim.AdamW(model.parameters(), lr=1e-2))
    for step in range(3):
        _step(model, opt, step)
    saved_model, saved_opt = roundtrip(model.state_dict()), roundtrip(opt.state_dict())
    for step in range(3, 6):
        _step(model, opt, step)

    resumed = _bf16(_model(5))
    opt2 = MODES[mode](torch.optim.AdamW(resumed.parameters(), lr=1e-2))
    opt2.load_state_dict(saved_opt)
    resumed.load_state_dict(saved_model)  # the model second
    for step in range(3, 6):
        _step(resumed, opt2, step)
    assert _same(model, resumed)


def test_a_load_of_the_same_weights_keeps_the_masters_digits():
    model = _bf16(_model(0))
    opt = MasterWeightOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3))
    _step(model, opt, 0)
    masters = [m.clone() for m in opt.master_params()]
    model.load_state_dict(model.state_dict())
    opt.zero_grad()
    opt.step()  # no gradients: nothing moves, but the check runs
    assert all(torch.equal(a, b) for a, b in zip(masters, opt.master_params(), strict=True))


@pytest.mark.parametrize("update", ["master", "stochastic", "kahan", "nearest"])
def test_a_checkpoint_loaded_after_prepare_is_the_one_trained(update):
    """The issue's case: ``bf16-pure``, ``prepare``, then ``model.load_state_dict(fp32)``; the
    reference loads the same weights before ``prepare``."""
    loaded = _model(1).state_dict()

    def run(load_after_prepare: bool) -> nn.Module:
        model = _model(0 if load_after_prepare else 1)
        mp = MixedPrecision("bf16-pure", "cpu", backend="emulated", update=update)
        model, opt = mp.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
        if load_after_prepare:
            model.load_state_dict(loaded)
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
        for _ in range(2):
            with mp.autocast():
                loss = model(x).float().square().mean()
            mp.backward(loss)
            mp.step(opt)
            opt.zero_grad()
        return model

    assert _same(run(True), run(False))


def test_a_group_added_after_a_load_does_not_hide_the_load():
    loaded = _model(1).state_dict()

    def run(load_after_wrapping: bool) -> nn.Module:
        model = _bf16(_model(0 if load_after_wrapping else 1))
        inner = torch.optim.SGD(list(model.parameters())[:2], lr=0.1)
        opt = MasterWeightOptimizer(inner)
        if load_after_wrapping:
            model.load_state_dict(loaded)
        inner.add_param_group({"params": list(model.parameters())[2:]})
        opt.zero_grad()  # takes the new group on
        _step(model, opt, 0)
        return model

    assert _same(run(True), run(False))
