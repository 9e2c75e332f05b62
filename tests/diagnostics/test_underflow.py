"""Underflow accounting: counts against hand-built cases and a direct count with torch's cast."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mixprec.diagnostics import (
    exponent_histogram,
    gradient_counts,
    largest_safe_scale,
    underflow_report,
)

# fp16 at scale 1: what each value becomes, worked out by hand from the format's limits
# (smallest subnormal 2**-24, ties to even, smallest normal 2**-14, max 65504, inf from 65520).
HAND_CASE = [
    (2.0**-26, "flushed"),  # below half the smallest subnormal
    (2.0**-25, "flushed"),  # exactly half: ties to even, and 0 is even
    (-(2.0**-25) * 1.5, "subnormal"),  # rounds to -2**-24
    (2.0**-15, "subnormal"),
    (2.0**-14, "normal"),  # the smallest normal
    (2.0**-14 - 2.0**-25, "normal"),  # rounds up to the smallest normal (tie, even mantissa)
    (65504.0, "normal"),
    (65519.0, "normal"),  # rounds down to 65504
    (65520.0, "overflow"),  # the tie rounds to even, which is inf
    (-1e6, "overflow"),
    (0.0, "zero"),
    (math.inf, "nonfinite"),
    (math.nan, "nonfinite"),
]


def test_counts_match_a_hand_worked_case():
    g = torch.tensor([v for v, _ in HAND_CASE])
    kinds = [k for _, k in HAND_CASE]
    c = gradient_counts(g, scale=1.0)
    assert c.numel == len(HAND_CASE)
    assert c.nonzero == len(HAND_CASE) - kinds.count("zero") - kinds.count("nonfinite")
    assert c.flushed == kinds.count("flushed")
    assert c.subnormal == kinds.count("subnormal")
    assert c.overflow == kinds.count("overflow")
    assert c.nonfinite == kinds.count("nonfinite")
    assert c.absmax == 1e6 and c.absmin == 2.0**-26
    assert c.flushed_fraction == kinds.count("flushed") / c.nonzero


def _direct(g: torch.Tensor, scale: float) -> tuple[int, int, int, int]:
    """The same counts straight from torch's fp16 cast, element by element."""
    nonzero = flushed = subnormal = overflow = 0
    for value in g.tolist():
        if value == 0 or not math.isfinite(value):
            continue
        nonzero += 1
        stored = torch.tensor(value * scale, dtype=torch.float32).half().item()
        flushed += stored == 0
        subnormal += stored != 0 and abs(stored) < 2.0**-14
        overflow += math.isinf(stored)
    return nonzero, flushed, subnormal, overflow


@pytest.mark.parametrize("scale", [1.0, 2.0**10, 2.0**16, 3.0])
def test_counts_match_a_direct_count(scale):
    generator = torch.Generator().manual_seed(0)
    exponents = torch.empty(3000).uniform_(-50, 12, generator=generator)
    signs = torch.randint(0, 2, (3000,), generator=generator) * 2 - 1
    g = signs * torch.exp2(exponents)
    g[::50] = 0.0
    c = gradient_counts(g, scale)
    assert (c.nonzero, c.flushed, c.subnormal, c.overflow) == _direct(g, scale)
    assert c.flushed > 0 and c.subnormal > 0  # the case exercises every bucket
    assert (c.overflow > 0) == (g.abs().max().item() * scale >= 65520)


def test_bf16_flushes_only_far_below_fp16():
    g = torch.tensor([2.0**-30, 2.0**-130, 2.0**-140])
    fp16, bf16 = gradient_counts(g, 1.0, "fp16"), gradient_counts(g, 1.0, "bf16")
    assert (fp16.flushed, bf16.flushed) == (3, 1)
    assert bf16.subnormal == 1  # 2**-130 is a bf16 subnormal


def test_report_sums_parameters_and_accepts_scaled_gradients():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    generator = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * 1e-6
    report = underflow_report(model, scale=2.0**8)
    assert [c.name for c in report.params] == [n for n, _ in model.named_parameters()]
    for field in ("numel", "nonzero", "flushed", "subnormal", "overflow"):
        assert getattr(report.total, field) == sum(getattr(c, field) for c in report.params)
    direct = [gradient_counts(p.grad, 2.0**8, name=n) for n, p in model.named_parameters()]
    assert list(report.params) == direct
    scaled = {n: p.grad * 2.0**8 for n, p in model.named_parameters()}
    assert underflow_report(scaled, 2.0**8, scaled=True) == report
    assert set(report.metrics()) == {
        "underflow_fraction",
        "subnormal_fraction",
        "overflow_fraction",
        "largest_safe_scale",
    }
    assert report.worst(1)[0].flushed_fraction == max(c.flushed_fraction for c in report.params)
    assert "fp16 at scale 256" in str(report)


@pytest.mark.parametrize("absmax", [1.0, 3.7, 1e-3, 65504.0, 70000.0])
def test_largest_safe_scale_is_the_largest_power_of_two_that_fits(absmax):
    scale = largest_safe_scale(absmax)
    assert math.log2(scale).is_integer()
    assert math.isfinite(torch.tensor(absmax * scale).half().item())
    assert absmax * scale <= 65504 < absmax * scale * 2


def test_largest_safe_scale_of_zero_gradients_is_inf():
    assert largest_safe_scale(0.0) == math.inf
    model = nn.Linear(2, 1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    assert underflow_report(model, 1.0).largest_safe_scale == math.inf


def test_exponent_histogram_against_log2():
    values = [0.75, -3.0, 2.0**-50, 1e9, 0.0, math.inf, 1.0]
    exps, counts = exponent_histogram([torch.tensor(values)], low=-10, high=10)
    expected = dict.fromkeys(exps, 0)
    for v in values:
        if v != 0 and math.isfinite(v):
            expected[min(max(math.floor(math.log2(abs(v))), -10), 10)] += 1
    assert dict(zip(exps, counts, strict=True)) == expected


@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, math.nan])
def test_bad_scale_is_a_value_error(scale):
    with pytest.raises(ValueError, match=r"valid range \(0, inf\)"):
        gradient_counts(torch.ones(2), scale)


def test_bad_inputs():
    with pytest.raises(TypeError, match="scale must be a positive number, got str '1'"):
        gradient_counts(torch.ones(2), "1")
    with pytest.raises(TypeError, match="floating tensor"):
        gradient_counts(torch.ones(2, dtype=torch.long), 1.0)
    with pytest.raises(RuntimeError, match="call backward"):
        underflow_report(nn.Linear(2, 2), 1.0)
    with pytest.raises(ValueError, match="has no parameters"):
        underflow_report(nn.ReLU(), 1.0)
    with pytest.raises(TypeError, match=r"\(name, gradient tensor\) pairs"):
        underflow_report([torch.ones(2)], 1.0)
    with pytest.raises(ValueError, match="unknown number format 'fp7'"):
        underflow_report({"w": torch.ones(2)}, 1.0, "fp7")


@pytest.mark.parametrize(
    ("absmax", "error", "message"),
    [
        (float("inf"), ValueError, r"absmax must be a finite magnitude >= 0, got inf"),
        (float("nan"), ValueError, r"got nan"),
        (-1.0, ValueError, r"got -1.0"),
        ("1", TypeError, r"absmax must be a number, got str '1'"),
    ],
)
def test_largest_safe_scale_refuses_what_has_no_safe_scale(absmax, error, message):
    with pytest.raises(error, match=message):
        largest_safe_scale(absmax)
