"""The scale's floor: never subnormal, never an infinite reciprocal, never -inf in the weights.

References: a plain fp32 SGD twin fed the true (unscaled) gradients, and float32's own limits
from numpy.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixprec.scaling import SCALE_FLOOR, GradScaler, LossScaleAtMinimumError

FP32_TINY = float(np.finfo(np.float32).tiny)
GRADIENT = torch.tensor([0.75, -1.5])


def scaled_step(scaler: GradScaler, weight: torch.Tensor, opt, overflow: bool) -> None:
    """One iteration whose true gradient is GRADIENT; an overflow writes inf into it."""
    opt.zero_grad()
    scaler.scale((weight * GRADIENT).sum()).backward()
    if overflow:
        assert weight.grad is not None
        weight.grad[0] = math.inf
    scaler.step(opt)
    scaler.update()


def test_a_clean_step_after_150_overflows_takes_the_true_gradient() -> None:
    """From the default scale, 150 overflows in a row then one clean step: an fp32 SGD step."""
    weight = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([weight], lr=0.1)
    scaler = GradScaler("cpu")
    with pytest.warns(RuntimeWarning, match="already at its minimum"):
        for _ in range(150):
            scaled_step(scaler, weight, opt, overflow=True)
    assert scaler.get_scale() == FP32_TINY
    scaled_step(scaler, weight, opt, overflow=False)
    assert not scaler.step_skipped()
    twin = torch.zeros(2, requires_grad=True)
    twin.grad = GRADIENT.clone()
    torch.optim.SGD([twin], lr=0.1).step()
    assert torch.equal(weight.detach(), twin.detach())


@pytest.mark.parametrize("name", ["init_scale", "min_scale", "max_scale"])
@pytest.mark.parametrize("value", [1e-45, 4.6e-41, FP32_TINY / 2])
def test_scales_below_the_floor_are_refused(name: str, value: float) -> None:
    kwargs = {name: value}
    if name == "max_scale":
        kwargs["init_scale"] = FP32_TINY
    with pytest.raises(ValueError, match=rf"{name} must be .*{value!r}"):
        GradScaler("cpu", **kwargs)


def test_the_floor_itself_is_accepted() -> None:
    scaler = GradScaler("cpu", init_scale=SCALE_FLOOR, min_scale=SCALE_FLOOR)
    assert scaler.get_scale() == FP32_TINY


def test_new_scale_and_state_dict_below_the_floor_are_refused() -> None:
    weight = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([weight], lr=0.1)
    scaler = GradScaler("cpu")
    scaled_step(scaler, weight, opt, overflow=False)
    opt.zero_grad()
    scaler.scale((weight * GRADIENT).sum()).backward()
    scaler.step(opt)
    with pytest.raises(ValueError, match=r"new_scale must be at least 2\*\*-126 .* got 1e-40"):
        scaler.update(new_scale=1e-40)
    state = scaler.state_dict() | {"scale": 1e-40}
    with pytest.raises(ValueError, match=r"state_dict\['scale'\] must be at least 2\*\*-126"):
        GradScaler("cpu").load_state_dict(state)


def test_overflow_at_the_floor_warns_once_reached_and_not_before() -> None:
    """Scale 4x the floor, backoff 0.5: the third overflow in a row is the first at the floor."""
    weight = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([weight], lr=0.1)
    scaler = GradScaler("cpu", init_scale=4 * SCALE_FLOOR, growth_interval=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled_step(scaler, weight, opt, overflow=True)  # 4f -> 2f
        scaled_step(scaler, weight, opt, overflow=False)  # 2f -> 4f (growth)
        scaled_step(scaler, weight, opt, overflow=True)  # 4f -> 2f
        scaled_step(scaler, weight, opt, overflow=True)  # 2f -> f
    with pytest.warns(RuntimeWarning, match=r"already at its minimum, 1\.17549435\d*e-38"):
        scaled_step(scaler, weight, opt, overflow=True)  # at f: skipped, warned
    assert scaler.get_scale() == SCALE_FLOOR and scaler.step_skipped()


def test_overflow_at_the_floor_raises_when_asked() -> None:
    weight = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([weight], lr=0.1)
    scaler = GradScaler("cpu", init_scale=2.0, on_min_scale="raise")
    scaled_step(scaler, weight, opt, overflow=False)
    opt.zero_grad()
    scaler.scale((weight * GRADIENT).sum()).backward()
    scaler.step(opt)
    scaler.update(new_scale=SCALE_FLOOR)  # set by hand: the next overflow is at the floor
    before = weight.detach().clone()
    at_minimum = r"at its minimum, 1\.17549435\d*e-38 \(min_scale=None\).*'continue'"
    with pytest.raises(LossScaleAtMinimumError, match=at_minimum):
        scaled_step(scaler, weight, opt, overflow=True)
    assert torch.equal(weight.detach(), before)


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from([0.5, 0.25, 0.3, 0.9]),
    st.sampled_from([2.0, 1.5, 4.0]),
    st.integers(1, 4),
    st.sampled_from([2.0**16, 1.0, 2.0**-100, 3.0e-38]),
    st.lists(st.booleans(), min_size=1, max_size=250),
)
def test_random_overflows_keep_scale_normal_and_weights_finite(
    backoff: float, growth: float, interval: int, init: float, overflows: list[bool]
) -> None:
    """Any overflow sequence: the scale stays a normal float32 with a finite reciprocal, and
    every step the scaler takes is the fp32 twin's step on the true gradient."""
    weight = torch.zeros(2, requires_grad=True)
    twin = torch.zeros(2, requires_grad=True)
    opt, twin_opt = torch.optim.SGD([weight], lr=0.1), torch.optim.SGD([twin], lr=0.1)
    scaler = GradScaler(
        "cpu",
        init_scale=init,
        backoff_factor=backoff,
        growth_factor=growth,
        growth_interval=interval,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # overflows at the floor
        for overflow in overflows:
            before = scaler.get_scale()
            scaled_step(scaler, weight, opt, overflow)
            scale = scaler.get_scale()
            assert FP32_TINY <= scale <= float(np.finfo(np.float32).max)
            assert np.isfinite(np.float32(1.0) / np.float32(scale))
            if not scaler.step_skipped():
                twin.grad = GRADIENT.clone()
                twin_opt.step()
            scaled_overflowed = not np.isfinite(np.float32(1.5) * np.float32(before))
            assert scaler.step_skipped() == (overflow or scaled_overflowed)
            assert torch.isfinite(weight).all()
            torch.testing.assert_close(weight.detach(), twin.detach(), rtol=1e-5, atol=1e-7)
