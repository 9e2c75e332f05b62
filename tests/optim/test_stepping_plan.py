"""The stepping plan's one table of one-pass declines, and the rules composed by hand.

References: the wrapper's own ``last_step_fused`` count (what the step really did), and torch's
plain SGD on the 16-bit parameters for the round-to-nearest rule.
"""

from __future__ import annotations

import pytest
import torch
from optim_helpers import grads_for, make_params, set_grads

from mixprec.optim import (
    Float16States,
    Fp32States,
    Kahan,
    Master,
    Nearest,
    Stochastic,
    WrappedOptimizer,
    fused,
)
from mixprec.optim.plan import one_pass_refusal


def _needs_engine() -> None:
    if fused.engine() is None:
        pytest.skip(f"the fused kernels cannot be built here: {fused.engine_error()}")


@pytest.mark.parametrize(
    ("rule", "storage", "why"),
    [
        (Master(), Fp32States(), None),
        (Stochastic(seed=1), Fp32States(), None),
        (Kahan(), Fp32States(), None),
        (Master(keep_grad_buffers=True), Fp32States(), "keep_grad_buffers"),
        (Nearest(), Fp32States(), "needs an fp32 master"),
        (Stochastic(seed=1), Float16States(torch.bfloat16), "stored as bfloat16"),
        (Kahan(), Float16States(torch.bfloat16), "stored as bfloat16"),
    ],
)
def test_the_table_says_why_and_the_step_does_what_it_says(rule, storage, why):
    _needs_engine()
    params = make_params(torch.bfloat16)
    opt = WrappedOptimizer(torch.optim.AdamW(params, lr=1e-3), rule, storage=storage)
    reason = one_pass_refusal(opt.optimizer, opt.fused, False, rule, storage)
    assert (reason is None) == (why is None)
    if why is not None:
        assert why in reason
    set_grads(params, grads_for(params, 0))
    opt.step()
    assert (opt.last_step_fused > 0) == (why is None)


def test_the_table_reads_the_wrapper_settings():
    _needs_engine()
    params = make_params(torch.bfloat16)
    rule, storage = Master(), Fp32States()
    opt = WrappedOptimizer(torch.optim.SGD(params, lr=0.1), rule, storage=storage)
    assert one_pass_refusal(opt.optimizer, "off", False, rule, storage) == "fused='off'"
    assert "max_grad_norm" in one_pass_refusal(opt.optimizer, "auto", True, rule, storage)
    rmsprop = torch.optim.RMSprop(make_params(torch.bfloat16))
    assert "RMSprop is not one of" in one_pass_refusal(rmsprop, "auto", False, rule, storage)


@pytest.mark.parametrize("dtype16", [torch.bfloat16, torch.float16])
def test_the_nearest_rule_is_torch_on_fp32_copies_rounded_to_nearest(dtype16):
    """Reference: torch's AdamW on fp32 tensors that are set to the 16-bit weights before each
    step and rounded to nearest after it (the plain 16-bit update with fp32 arithmetic)."""
    params = make_params(dtype16)
    copies = [torch.nn.Parameter(p.detach().float()) for p in params]
    opt = WrappedOptimizer(torch.optim.AdamW(params, lr=1e-2), Nearest())
    reference = torch.optim.AdamW(copies, lr=1e-2)
    for step in range(4):
        grads = grads_for(params, step)
        set_grads(params, grads)
        with torch.no_grad():
            for c, p in zip(copies, params, strict=True):
                c.copy_(p)
        set_grads(copies, [g.to(dtype16).float() for g in grads])
        opt.step()
        reference.step()
        assert all(torch.equal(p, c.to(dtype16)) for p, c in zip(params, copies, strict=True))


def test_a_wrapper_refuses_what_is_not_a_rule():
    with pytest.raises(TypeError, match=r"rule must be an update rule .* got str 'master'"):
        WrappedOptimizer(torch.optim.SGD(make_params(torch.bfloat16), lr=0.1), "master")
