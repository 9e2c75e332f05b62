"""Pure 16-bit wrappers: unbiased stochastic rounding, Kahan compensation, checkpoints, errors."""

from __future__ import annotations

import pytest
import torch
from optim_helpers import grads_for, make_params, roundtrip, set_grads
from torch import nn

from mixprec.optim import KahanOptimizer, StochasticRoundingOptimizer, kahan_round, stochastic_round


def test_stochastic_rounding_is_unbiased_over_a_long_run_of_tiny_updates(dtype16):
    """10,000 weights at 1.0 take 400 SGD steps of 1e-4 (a fraction of an ulp each)."""
    n, steps, lr = 10_000, 400, 1e-4
    w = nn.Parameter(torch.ones(n, dtype=dtype16))
    opt = StochasticRoundingOptimizer(torch.optim.SGD([w], lr=lr), seed=0)
    for _ in range(steps):
        w.grad = torch.ones_like(w)
        opt.step()
    expected = 1.0 - steps * lr  # 0.96; round to nearest would leave every weight at 1.0
    mean = w.double().mean().item()
    # Each step adds an independent rounding error of variance ulp**2 * f * (1 - f), f = lr / ulp,
    # so the mean over n weights has a standard error of ulp * sqrt(steps * f * (1 - f) / n).
    ulp = 2.0**-8 if dtype16 == torch.bfloat16 else 2.0**-11  # just below 1.0
    f = lr / ulp
    standard_error = ulp * (steps * f * (1 - f) / n) ** 0.5
    assert abs(mean - expected) < 5 * standard_error
    assert 5 * standard_error < 0.1 * steps * lr  # the test can tell a drift of 10% of the sum


def test_stochastic_rounding_is_seeded_and_reproducible():
    def run(seed):
        w = nn.Parameter(torch.ones(1000, dtype=torch.bfloat16))
        opt = StochasticRoundingOptimizer(torch.optim.SGD([w], lr=1e-4), seed=seed)
        for _ in range(20):
            w.grad = torch.ones_like(w)
            opt.step()
        return w.detach().clone()

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_stochastic_round_function_only_gives_the_two_neighbours():
    x = torch.full((4096,), 1.0 + 3 * 2.0**-10)  # 3/8 of the way from 1.0 to 1 + 2**-7
    out = stochastic_round(x, torch.bfloat16, torch.Generator().manual_seed(0)).float()
    assert set(out.unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    assert (out > 1).float().mean().item() == pytest.approx(3 / 8, abs=0.03)
    assert stochastic_round(x, torch.float32) is x


def test_kahan_sum_of_exact_small_increments_equals_fp64_reference():
    """Increments of 2**-12 (1/32 of a bf16 ulp at 1.0): the compensated sum is exact."""
    w = nn.Parameter(torch.ones(16, dtype=torch.bfloat16))
    opt = KahanOptimizer(torch.optim.SGD([w], lr=1.0))
    plain = nn.Parameter(torch.ones(16, dtype=torch.bfloat16))
    bare = torch.optim.SGD([plain], lr=1.0)
    reference = torch.ones(16, dtype=torch.float64)
    for _ in range(3000):
        w.grad = torch.full_like(w, -(2.0**-12))
        plain.grad = w.grad.clone()
        reference += 2.0**-12
        opt.step()
        bare.step()
    compensated = w.double() + opt.compensation(w).double()
    assert torch.equal(compensated, reference)
    assert torch.equal(w.double(), reference.to(torch.bfloat16).double())
    assert torch.equal(plain, torch.ones_like(plain))  # round to nearest drops every increment


def test_kahan_sum_of_random_small_increments_stays_close_to_fp64(dtype16):
    """Random increments: the error stays within the compensation's own rounding, while round to
    nearest alone would lose the whole sum."""
    n, steps = 256, 3000
    w = nn.Parameter(torch.ones(n, dtype=dtype16))
    opt = KahanOptimizer(torch.optim.SGD([w], lr=1.0))
    g = torch.Generator().manual_seed(0)
    reference = torch.ones(n, dtype=torch.float64)
    for _ in range(steps):
        increment = (torch.rand(n, generator=g) * 2e-4).to(dtype16)
        w.grad = -increment
        reference += increment.double()
        opt.step()
    compensated = w.double() + opt.compensation(w).double()
    mantissa = 7 if dtype16 == torch.bfloat16 else 10
    # The weights live in [1, 2): one ulp is 2**-mantissa; the compensation (|c| <= ulp/2) is kept
    # to mantissa + 1 bits, so each step may lose up to 2**-(2 * mantissa + 3).
    assert (compensated - reference).abs().max().item() <= steps * 2.0 ** -(2 * mantissa + 3)
    assert (compensated - reference).abs().max().item() < 0.01 * (reference - 1).min().item()
    half_ulp = 2.0 ** -(mantissa + 1)
    assert (w.double() - reference).abs().max().item() <= half_ulp + 1e-3 * half_ulp * steps


def test_kahan_round_splits_exactly():
    x = torch.tensor([1.0 + 2.0**-10, -3.0 - 2.0**-12, 0.0])
    hi, lo = kahan_round(x, torch.bfloat16)
    assert hi.dtype == lo.dtype == torch.bfloat16
    assert torch.equal(hi.float() + lo.float(), x)


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("kind", ["stochastic", "kahan"])
def test_resume_mid_run_continues_bit_for_bit(kind, state_dtype):
    def build(params):
        inner = torch.optim.AdamW(params, lr=1e-3)
        if kind == "stochastic":
            return StochasticRoundingOptimizer(inner, seed=7, state_dtype=state_dtype)
        return KahanOptimizer(inner, state_dtype=state_dtype)

    params = make_params(torch.bfloat16)
    opt = build(params)
    for step in range(4):
        set_grads(params, grads_for(params, step))
        opt.step()
    saved = [p.detach().clone() for p in params]
    checkpoint = roundtrip(opt.state_dict())
    for step in range(4, 8):
        set_grads(params, grads_for(params, step))
        opt.step()
    resumed = [nn.Parameter(p.clone()) for p in saved]
    opt2 = build(resumed)
    opt2.load_state_dict(checkpoint)
    for step in range(4, 8):
        set_grads(resumed, grads_for(resumed, step))
        opt2.step()
    for a, b in zip(params, resumed, strict=True):
        assert torch.equal(a, b)
    if state_dtype is not None:
        assert opt2.state[resumed[0]]["exp_avg"].dtype == state_dtype
    if kind == "kahan":
        for a, b in zip(params, resumed, strict=True):
            assert torch.equal(opt.compensation(a), opt2.compensation(b))


def test_state_dtype_stores_adam_moments_in_16_bits():
    params = make_params(torch.bfloat16)
    opt = StochasticRoundingOptimizer(torch.optim.Adam(params, lr=1e-3), state_dtype=torch.bfloat16)
    set_grads(params, grads_for(params, 0))
    opt.step()
    state = opt.state[params[0]]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert state["step"].dtype == torch.float32  # step counters are left alone


def test_shadows_hold_no_memory_between_steps():
    params = make_params(torch.bfloat16)
    opt = KahanOptimizer(torch.optim.SGD(params, lr=0.1))
    set_grads(params, grads_for(params, 0))
    opt.step()
    for shadow in opt.optimizer.param_groups[0]["params"]:
        assert shadow.numel() == 0 and shadow.grad is None


def test_fp32_params_pass_through_unrounded():
    w32 = nn.Parameter(torch.ones(3))
    w16 = nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt = StochasticRoundingOptimizer(torch.optim.SGD([w32, w16], lr=1e-4))
    w32.grad, w16.grad = torch.ones(3), torch.ones(3, dtype=torch.bfloat16)
    opt.step()
    assert torch.equal(w32, torch.full((3,), 1 - 1e-4))
    with pytest.warns(UserWarning, match="already float32"):
        only32 = KahanOptimizer(torch.optim.SGD([w32], lr=0.1))
    with pytest.raises(KeyError, match=r"no compensation buffer .* shape \(3,\)"):
        only32.compensation(w32)


def test_errors():
    params = make_params(torch.bfloat16)
    with pytest.raises(TypeError, match=r"seed must be an int, got float 1.5"):
        StochasticRoundingOptimizer(torch.optim.SGD(params, lr=0.1), seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"seed must be >= 0 and < 2\*\*64, got -1"):
        StochasticRoundingOptimizer(torch.optim.SGD(params, lr=0.1), seed=-1)
    with pytest.raises(ValueError, match=r"< 2\*\*64, got 18446744073709551616; .* seed % 2\*\*64"):
        StochasticRoundingOptimizer(torch.optim.SGD(params, lr=0.1), seed=2**64)
    with pytest.raises(ValueError, match=r"state_dtype must be .* got torch.float64"):
        KahanOptimizer(torch.optim.SGD(params, lr=0.1), state_dtype=torch.float64)
    with pytest.raises(TypeError, match=r"state_dtype must be a torch.dtype or None, got str"):
        KahanOptimizer(torch.optim.SGD(params, lr=0.1), state_dtype="bf16")  # type: ignore[arg-type]
    kahan = KahanOptimizer(torch.optim.SGD(params, lr=0.1))
    sr = StochasticRoundingOptimizer(torch.optim.SGD(make_params(torch.bfloat16), lr=0.1))
    with pytest.raises(
        ValueError, match=r"saved by a 'stochastic_rounding' wrapper, this is 'kahan'"
    ):
        kahan.load_state_dict(sr.state_dict())
    other = KahanOptimizer(
        torch.optim.SGD([nn.Parameter(torch.ones(2, dtype=torch.bfloat16))], lr=1)
    )
    with pytest.raises(ValueError, match=r"param groups of sizes \[4\], this optimizer \[1\]"):
        other.load_state_dict(kahan.state_dict())
