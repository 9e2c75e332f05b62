"""Loss scaling through torch's protocol: torch.amp.GradScaler("cpu") and mixprec's GradScaler."""

from __future__ import annotations

import pytest
import torch
from optim_helpers import grads_for, make_params, set_grads
from torch import nn

from mixprec.optim import KahanOptimizer, MasterWeightOptimizer, StochasticRoundingOptimizer
from mixprec.scaling import GradScaler

WRAPPERS = {
    "master": MasterWeightOptimizer,
    "stochastic": lambda inner: StochasticRoundingOptimizer(inner, seed=3),
    "kahan": KahanOptimizer,
}


SCALERS = {
    "torch": lambda **kw: torch.amp.GradScaler("cpu", **kw),
    "mixprec": lambda **kw: GradScaler("cpu", **kw),
}


def _snapshot(opt, params):
    state = {
        id(p): {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
        for p in params
    }
    extra = opt.state_dict()
    return [p.detach().clone() for p in params], state, extra


def _scaled_backward(scaler, params, step):
    """A loss whose gradients are grads_for(step); backward through the scaler."""
    grads = grads_for(params, step)
    loss = sum((p.float() * g).sum() for p, g in zip(params, grads, strict=True))
    scaler.scale(loss).backward()


@pytest.mark.parametrize("scaler_name", sorted(SCALERS))
@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_unscale_is_folded_into_the_copy(wrapper, scaler_name, dtype16):
    """Scaled by 2**10 and unscaled in the copy == the same run without a scaler (exact)."""
    params = make_params(dtype16)
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    opt = WRAPPERS[wrapper](torch.optim.AdamW(params, lr=1e-3))
    ref = WRAPPERS[wrapper](torch.optim.AdamW(twins, lr=1e-3))
    scaler = SCALERS[scaler_name](init_scale=2.0**10)
    for step in range(5):
        opt.zero_grad()
        _scaled_backward(scaler, params, step)
        scaler.step(opt)
        scaler.update()
        assert not opt.last_step_skipped
        set_grads(
            twins, [(g * 2.0**10).to(dtype16).float() / 2.0**10 for g in grads_for(twins, step)]
        )
        ref.step()
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    for a, b in zip(params, twins, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scaler_name", sorted(SCALERS))
@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_overflow_skips_and_leaves_everything_untouched(wrapper, scaler_name):
    params = make_params(torch.float16)
    opt = WRAPPERS[wrapper](torch.optim.Adam(params, lr=1e-3))
    scaler = SCALERS[scaler_name](init_scale=2.0**8)
    for step in range(3):
        opt.zero_grad()
        _scaled_backward(scaler, params, step)
        scaler.step(opt)
        scaler.update()
    before_params, before_state, before_sd = _snapshot(opt, params)
    opt.zero_grad()
    _scaled_backward(scaler, params, 3)
    params[1].grad[0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert opt.last_step_skipped
    assert scaler.get_scale() == 2.0**7
    after_params, after_state, after_sd = _snapshot(opt, params)
    for a, b in zip(before_params, after_params, strict=True):
        assert torch.equal(a, b)
    for key, entries in before_state.items():
        for name, value in entries.items():
            assert torch.equal(value, after_state[key][name]), name
    for name in ("masters", "compensation"):
        for a, b in zip(before_sd.get(name, []), after_sd.get(name, []), strict=True):
            assert (a is None and b is None) or torch.equal(a, b)
    if wrapper == "stochastic":  # no random numbers were drawn on the skipped step
        assert before_sd["generators"] == after_sd["generators"]


@pytest.mark.parametrize("scaler_name", sorted(SCALERS))
def test_explicit_unscale_then_clip_with_bf16(scaler_name):
    """scaler.unscale_(opt) unscales the bf16 grads in place; step must not unscale again."""
    params = make_params(torch.bfloat16)
    opt = MasterWeightOptimizer(torch.optim.SGD(params, lr=1.0))
    scaler = SCALERS[scaler_name](init_scale=2.0**12)
    opt.zero_grad()
    _scaled_backward(scaler, params, 0)
    scaler.unscale_(opt)
    nn.utils.clip_grad_norm_(params, max_norm=1e-3)
    before = [m.clone() for m in opt.master_params()]
    scaler.step(opt)
    scaler.update()
    moved = torch.cat([(b - m).flatten() for b, m in zip(before, opt.master_params(), strict=True)])
    assert torch.linalg.vector_norm(moved).item() == pytest.approx(1e-3, rel=1e-2)


def test_torch_scaler_refuses_to_unscale_fp16_grads_use_max_grad_norm():
    """torch's unscale_ rejects fp16 gradients; clipping the fp32 master grads inside step works."""
    params = make_params(torch.float16)
    opt = MasterWeightOptimizer(torch.optim.SGD(params, lr=1.0), max_grad_norm=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    _scaled_backward(scaler, params, 0)
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.unscale_(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt.zero_grad()
    _scaled_backward(scaler, params, 0)
    before = [m.clone() for m in opt.master_params()]
    scaler.step(opt)
    scaler.update()
    moved = torch.cat([(b - m).flatten() for b, m in zip(before, opt.master_params(), strict=True)])
    assert torch.linalg.vector_norm(moved).item() == pytest.approx(1e-3, rel=1e-3)
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads_for(params, 0)]))
    assert opt.last_grad_norm is not None
    assert opt.last_grad_norm.item() == pytest.approx(expected.item(), rel=1e-2)


@pytest.mark.parametrize("wrapper", ["master", "kahan"])
def test_mixprec_scaler_clips_fp16_through_grad_scale(wrapper):
    """mixprec's clip_grad_norm_ leaves fp16 grads alone and hands scale / clip_coef to step."""
    params = make_params(torch.float16)
    opt = WRAPPERS[wrapper](torch.optim.SGD(params, lr=1.0))

    def weights():  # the full-precision weights: masters, or params + compensation
        if isinstance(opt, MasterWeightOptimizer):
            return [m.detach().clone() for m in opt.master_params()]
        return [p.double() + opt.compensation(p).double() for p in params]

    scaler = SCALERS["mixprec"](init_scale=2.0**12)
    _scaled_backward(scaler, params, 0)
    scaled = [p.grad.clone() for p in params]
    norm = scaler.clip_grad_norm_(opt, max_norm=1e-3)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, scaled, strict=True))
    before = weights()
    scaler.step(opt)
    scaler.update()
    moved = torch.cat([(b - a).flatten() for b, a in zip(before, weights(), strict=True)])
    assert norm.item() > 1e-3
    assert torch.linalg.vector_norm(moved.double()).item() == pytest.approx(1e-3, rel=1e-2)
