"""The pure update rules against a reference written here and torch's kernel; invariants."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixprec.scaling.rules import (
    FP32_MAX,
    SCALE_FLOOR,
    DynamicScaling,
    ScaleState,
    dynamic_update,
    initial_state,
    no_scaling_update,
    overflow_at_minimum,
    static_update,
    to_float32,
    update_scale,
)

FP32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32, from numpy


def f32(x: float) -> float:
    with np.errstate(over="ignore"):
        return float(np.float32(x))


class Reference:
    """DeepSpeed's formulation (iteration counter and last-overflow iteration), float32 scale.

    Written independently of the rule under test: growth is decided by the distance to the last
    overflow modulo the window, the tracker is derived from that distance.
    """

    def __init__(self, scale: float, rule: DynamicScaling) -> None:
        self.rule = rule
        self.scale = f32(scale)
        self.iteration = 0
        self.last_overflow = -1
        self.left = rule.hysteresis

    def step(self, overflow: bool) -> None:
        r = self.rule
        floor = f32(r.min_scale) if r.min_scale is not None else FP32_TINY
        if overflow:
            if r.hysteresis == 1 or self.left == 1:
                self.scale = max(f32(self.scale * r.backoff_factor), floor)
            else:
                self.left -= 1
            self.last_overflow = self.iteration
        else:
            if r.consecutive_hysteresis:
                self.left = r.hysteresis
            if (self.iteration - self.last_overflow) % r.growth_interval == 0:
                if not r.consecutive_hysteresis:
                    self.left = r.hysteresis
                grown = f32(self.scale * r.growth_factor)
                if math.isfinite(grown):
                    self.scale = grown
                if r.max_scale is not None:
                    self.scale = min(self.scale, f32(r.max_scale))
        self.iteration += 1

    @property
    def tracker(self) -> int:
        return (self.iteration - 1 - self.last_overflow) % self.rule.growth_interval

    def state(self) -> tuple[float, int, int]:
        return (self.scale, self.tracker, self.left)


@st.composite
def rules(draw, bounded: bool = True) -> tuple[DynamicScaling, float]:
    growth = draw(st.sampled_from([2.0, 1.5, 4.0, 1.0001, 10.0, 1.1]))
    backoff = draw(st.sampled_from([0.5, 0.25, 0.9, 0.3, 0.999]))
    min_scale = max_scale = None
    if bounded and draw(st.booleans()):
        min_scale = draw(st.sampled_from([1.0, 0.5, 3.0, 2.0**-20]))
    if bounded and draw(st.booleans()):
        max_scale = draw(st.sampled_from([2.0**24, 1000.0, 2.0**100])) * (min_scale or 1.0)
    rule = DynamicScaling(
        growth_factor=growth,
        backoff_factor=backoff,
        growth_interval=draw(st.integers(1, 6)),
        hysteresis=draw(st.integers(1, 4)) if bounded else 1,
        consecutive_hysteresis=draw(st.booleans()) if bounded else False,
        min_scale=min_scale,
        max_scale=max_scale,
    )
    low = min_scale or 2.0**-30
    high = max_scale or 2.0**40
    init = draw(st.sampled_from([low, high, 2.0**16, 3.0, 12345.678]))
    return rule, f32(min(max(init, low), high))


sequences = st.lists(st.booleans(), min_size=1, max_size=300)


@settings(max_examples=200, deadline=None)
@given(rules(), sequences)
def test_float_rule_matches_reference(case, overflows) -> None:
    rule, init = case
    ref = Reference(init, rule)
    state = initial_state(init, rule)
    for overflow in overflows:
        ref.step(overflow)
        state = dynamic_update(state, overflow, rule)
        assert tuple(state) == ref.state()


@settings(max_examples=25, deadline=None)
@given(rules(), st.lists(st.booleans(), min_size=1, max_size=60))
def test_tensor_rule_matches_float_rule(case, overflows) -> None:
    rule, init = case
    state = initial_state(init, rule)
    tensors = ScaleState(
        torch.tensor(state.scale, dtype=torch.float32),
        torch.tensor(0, dtype=torch.int32),
        torch.tensor(rule.hysteresis, dtype=torch.int32),
    )
    for overflow in overflows:
        found = torch.tensor(float(overflow))
        assert bool(overflow_at_minimum(tensors, found, rule)) == overflow_at_minimum(
            state, overflow, rule
        )
        state = dynamic_update(state, overflow, rule)
        tensors = dynamic_update(tensors, found, rule)
        assert tensors.scale.dtype == torch.float32 and tensors.growth_tracker.dtype == torch.int32
        assert (
            tensors.scale.item(),
            tensors.growth_tracker.item(),
            tensors.hysteresis_left.item(),
        ) == tuple(state)


@settings(max_examples=60, deadline=None)
@given(rules(bounded=False), sequences)
def test_default_rule_is_torch_kernel(case, overflows) -> None:
    """hysteresis=1 and no bounds: bit-identical to torch._amp_update_scale_, any factors."""
    rule, init = case
    scale = torch.tensor(init, dtype=torch.float32)
    tracker = torch.tensor(0, dtype=torch.int32)
    state = initial_state(init, rule)
    for overflow in overflows:
        torch._amp_update_scale_(
            scale,
            tracker,
            torch.tensor(float(overflow)),
            rule.growth_factor,
            rule.backoff_factor,
            rule.growth_interval,
        )
        state = dynamic_update(state, overflow, rule)
        if scale.item() < FP32_TINY:  # torch went subnormal; the rule stops at the normal floor
            assert state.scale == FP32_TINY
            return
        assert (state.scale, state.growth_tracker) == (scale.item(), tracker.item())


@settings(max_examples=100, deadline=None)
@given(rules(), st.integers(0, 2**32), st.floats(0.0, 1.0))
def test_scale_stays_finite_positive_and_in_bounds(case, seed, p_overflow) -> None:
    rule, init = case
    rng = random.Random(seed)
    state = initial_state(init, rule)
    low = rule.floor
    high = FP32_MAX if rule.max_scale is None else rule.max_scale
    for _ in range(400):
        state = dynamic_update(state, rng.random() < p_overflow, rule)
        assert math.isfinite(state.scale) and low <= state.scale <= high
        assert 1 <= state.hysteresis_left <= rule.hysteresis
        assert 0 <= state.growth_tracker < rule.growth_interval


def test_floor_is_the_smallest_normal_float32_with_a_finite_reciprocal() -> None:
    assert SCALE_FLOOR == FP32_TINY
    unscale = torch.tensor(SCALE_FLOOR).double().reciprocal().float()
    assert torch.isfinite(unscale) and unscale.item() * SCALE_FLOOR == 1.0
    # Below the floor the scale is subnormal, and two binades down its reciprocal is inf.
    assert torch.isinf(torch.tensor(SCALE_FLOOR / 4).double().reciprocal().float())


def test_extreme_sequences_never_reach_zero_or_inf() -> None:
    rule = DynamicScaling(growth_factor=1000.0, backoff_factor=0.001, growth_interval=1)
    state = initial_state(1.0, rule)
    for _ in range(50):
        state = dynamic_update(state, True, rule)
    assert state.scale == FP32_TINY
    for _ in range(50):
        state = dynamic_update(state, False, rule)
        assert math.isfinite(state.scale)
    assert state.scale * 1000.0 > FP32_MAX  # one more growth would overflow: it was refused


def test_hysteresis_tolerates_overflows_until_used_up() -> None:
    rule = DynamicScaling(growth_interval=3, hysteresis=3)
    state = initial_state(64.0, rule)
    state = dynamic_update(state, True, rule)
    state = dynamic_update(state, True, rule)
    assert (state.scale, state.hysteresis_left) == (64.0, 1)  # two tolerated, scale kept
    state = dynamic_update(state, True, rule)
    assert (state.scale, state.hysteresis_left) == (32.0, 1)  # third backs off
    state = dynamic_update(state, True, rule)
    assert state.scale == 16.0  # no tolerance until the scale grows again
    for _ in range(3):
        state = dynamic_update(state, False, rule)
    assert (state.scale, state.hysteresis_left) == (32.0, 3)  # growth refills


@pytest.mark.parametrize("consecutive", [False, True])
def test_consecutive_hysteresis_refills_on_every_clean_step(consecutive: bool) -> None:
    rule = DynamicScaling(growth_interval=100, hysteresis=2, consecutive_hysteresis=consecutive)
    state = initial_state(64.0, rule)
    for overflow in (True, False, True):
        state = dynamic_update(state, overflow, rule)
    # Consecutive: the clean step refilled the tolerance, so the second overflow is tolerated too.
    assert state.scale == (64.0 if consecutive else 32.0)
    ref = Reference(64.0, rule)
    for overflow in (True, False, True):
        ref.step(overflow)
    assert tuple(state) == ref.state()


def test_min_and_max_scale_clamp() -> None:
    rule = DynamicScaling(growth_interval=1, min_scale=4.0, max_scale=32.0)
    state = initial_state(8.0, rule)
    for _ in range(5):
        state = dynamic_update(state, True, rule)
    assert state.scale == 4.0
    assert overflow_at_minimum(state, True, rule) is True
    assert overflow_at_minimum(state, False, rule) is False
    for _ in range(5):
        state = dynamic_update(state, False, rule)
    assert state.scale == 32.0
    assert overflow_at_minimum(state, True, rule) is False


def test_overflow_at_minimum_waits_for_hysteresis() -> None:
    rule = DynamicScaling(hysteresis=2, min_scale=1.0)
    state = initial_state(1.0, rule)
    assert overflow_at_minimum(state, True, rule) is False  # tolerated first
    state = dynamic_update(state, True, rule)
    assert overflow_at_minimum(state, True, rule) is True


def test_static_and_none_rules() -> None:
    state = ScaleState(1024.0, 3, 1)
    rule = DynamicScaling()
    for found in (0, 1):
        assert static_update(state, found) == state
        assert update_scale("static", state, found, rule) == state
        assert no_scaling_update(state, found) == ScaleState(1.0, 3, 1)
        assert update_scale("none", state, found, rule).scale == 1.0
        assert update_scale("dynamic", state, found, rule) == dynamic_update(state, found, rule)
    tensor_state = ScaleState(torch.tensor(8.0), torch.tensor(0), torch.tensor(1))
    assert torch.equal(no_scaling_update(tensor_state, torch.tensor(1.0)).scale, torch.tensor(1.0))
    with pytest.raises(
        ValueError, match=r"strategy must be one of \('dynamic', 'static', 'none'\), got 'fixed'"
    ):
        update_scale("fixed", state, 0, rule)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False, width=64))
def test_to_float32_matches_numpy(x: float) -> None:
    assert to_float32(x) == f32(x)


def test_nan_flag_counts_as_found() -> None:
    rule = DynamicScaling(growth_interval=1)
    assert dynamic_update(ScaleState(8.0, 0, 1), float("nan"), rule).scale == 4.0
    assert (
        dynamic_update(
            ScaleState(torch.tensor(8.0), torch.tensor(0), torch.tensor(1)),
            torch.tensor(float("nan")),
            rule,
        ).scale.item()
        == 4.0
    )


@pytest.mark.parametrize("seed", range(6))
def test_long_seeded_sequences(seed: int) -> None:
    """Thousands of steps with bursts of overflows: floats vs reference, tensors vs floats."""
    rng = random.Random(seed)
    rule = DynamicScaling(
        growth_factor=rng.choice([2.0, 1.5, 1.01]),
        backoff_factor=rng.choice([0.5, 0.7]),
        growth_interval=rng.randint(1, 20),
        hysteresis=rng.randint(1, 5),
        consecutive_hysteresis=seed % 2 == 0,
        min_scale=rng.choice([None, 1.0]),
        max_scale=rng.choice([None, 2.0**24]),
    )
    overflows, p = [], 0.05
    for _ in range(5000):
        if rng.random() < 0.01:  # switch regime: calm or stormy
            p = rng.choice([0.0, 0.05, 0.5, 1.0])
        overflows.append(rng.random() < p)
    ref = Reference(2.0**16, rule)
    state = initial_state(2.0**16, rule)
    for overflow in overflows:
        ref.step(overflow)
        state = dynamic_update(state, overflow, rule)
        assert tuple(state) == ref.state()
    tensors = ScaleState(
        torch.tensor(2.0**16), torch.tensor(0, dtype=torch.int32), torch.tensor(rule.hysteresis)
    )
    state = initial_state(2.0**16, rule)
    for overflow in overflows[:300]:
        state = dynamic_update(state, overflow, rule)
        tensors = dynamic_update(tensors, torch.tensor(float(overflow)), rule)
    assert (tensors.scale.item(), tensors.growth_tracker.item()) == state[:2]
    assert tensors.hysteresis_left.item() == state.hysteresis_left
