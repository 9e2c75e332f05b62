"""MasterWeightOptimizer: twin fp32 reference, the Optimizer interface, checkpoints, errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from optim_helpers import grads_for, make_params, roundtrip, set_grads
from torch import nn

from mixprec.optim import MasterWeightOptimizer


def _twin_run(dtype16: torch.dtype, make_opt, steps: int = 30):
    params16 = make_params(dtype16)
    # The reference starts from the same (16-bit) values, kept in fp32 and fed the same gradients.
    params32 = [nn.Parameter(p.detach().float()) for p in params16]
    wrapped = MasterWeightOptimizer(make_opt(params16))
    reference = make_opt(params32)
    for step in range(steps):
        grads = [g.to(dtype16).float() for g in grads_for(params16, step)]
        set_grads(params16, grads)
        set_grads(params32, grads)
        wrapped.step()
        reference.step()
        for p, m in zip(params16, wrapped.master_params(), strict=True):
            assert torch.equal(p, m.to(dtype16)), "16-bit params must equal the masters rounded"
    return wrapped.master_params(), params32


def test_sgd_masters_equal_fp32_run_exactly(dtype16):
    masters, reference = _twin_run(
        dtype16, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2)
    )
    for m, r in zip(masters, reference, strict=True):
        assert m.dtype == torch.float32
        assert torch.equal(m, r)


def test_adamw_masters_match_fp32_run(dtype16):
    masters, reference = _twin_run(dtype16, lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    for m, r in zip(masters, reference, strict=True):
        torch.testing.assert_close(m, r, rtol=1e-6, atol=1e-7)


def test_small_updates_accumulate_in_master_but_vanish_in_bf16():
    w16 = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    plain = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    wrapped = MasterWeightOptimizer(torch.optim.SGD([w16], lr=1e-4))
    bare = torch.optim.SGD([plain], lr=1e-4)
    for _ in range(200):
        w16.grad = torch.ones_like(w16)
        plain.grad = torch.ones_like(plain)
        wrapped.step()
        bare.step()
    assert torch.equal(plain, torch.ones_like(plain))  # below half an ulp: every update lost
    master = wrapped.master_params()[0]
    torch.testing.assert_close(master, torch.full((4,), 0.98), rtol=0, atol=1e-5)
    assert torch.equal(w16, master.to(torch.bfloat16))


def test_fp32_params_are_their_own_master_and_warn_when_all_fp32():
    mixed = [nn.Parameter(torch.ones(3, dtype=torch.bfloat16)), nn.Parameter(torch.ones(3))]
    opt = MasterWeightOptimizer(torch.optim.SGD(mixed, lr=0.1))
    assert opt.master_params()[1] is mixed[1]
    assert opt.master_params()[0] is not mixed[0]
    with pytest.warns(UserWarning, match=r"every parameter is already float32.*identity"):
        only32 = MasterWeightOptimizer(torch.optim.SGD([nn.Parameter(torch.ones(3))], lr=0.1))
    p = only32.param_groups[0]["params"][0]
    p.grad = torch.full((3,), 2.0)
    only32.step()
    assert torch.equal(p, torch.full((3,), 0.8))


def test_param_groups_scheduler_and_add_param_group():
    params = make_params(torch.bfloat16)
    inner = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.5}], lr=0.1)
    opt = MasterWeightOptimizer(inner)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]
    assert opt.param_groups[0]["params"] == params[:2]
    assert isinstance(opt, torch.optim.Optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    set_grads(params, grads_for(params, 0))
    opt.step()
    scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    set_grads(params, grads_for(params, 1))
    opt.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.01)  # the inner optimizer got it
    assert inner.param_groups[1]["lr"] == pytest.approx(0.05)

    extra = nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    opt.add_param_group({"params": [extra], "lr": 1e-3})
    assert len(opt.param_groups) == len(inner.param_groups) == 3
    assert inner.param_groups[2]["params"][0].dtype == torch.float32
    assert inner.param_groups[2]["momentum"] == 0  # filled from the defaults
    extra.grad = torch.ones(2, dtype=torch.bfloat16)
    opt.step()
    assert opt.master_params()[-1][0].item() == pytest.approx(1 - 1e-3)


def test_zero_grad_clip_grad_norm_and_closure():
    params = make_params(torch.bfloat16)
    opt = MasterWeightOptimizer(torch.optim.SGD(params, lr=1.0))
    set_grads(params, [torch.full(p.shape, 10.0) for p in params])
    norm = nn.utils.clip_grad_norm_(params, max_norm=1.0)
    assert norm.item() > 1.0
    before = [m.clone() for m in opt.master_params()]
    opt.step()
    moved = torch.cat([(b - m).flatten() for b, m in zip(before, opt.master_params(), strict=True)])
    assert torch.linalg.vector_norm(moved).item() == pytest.approx(1.0, rel=1e-2)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    assert all(m.grad is None for m in opt.master_params())  # fp32 grads live only in step()

    def closure():
        set_grads(params, grads_for(params, 3))
        return torch.tensor(1.5)

    assert opt.step(closure).item() == 1.5


def test_max_grad_norm_clips_the_master_gradients():
    params = make_params(torch.bfloat16)
    opt = MasterWeightOptimizer(torch.optim.SGD(params, lr=1.0), max_grad_norm=0.5)
    set_grads(params, [torch.full(p.shape, 4.0) for p in params])
    before = [m.clone() for m in opt.master_params()]
    opt.step()
    moved = torch.cat([(b - m).flatten() for b, m in zip(before, opt.master_params(), strict=True)])
    assert torch.linalg.vector_norm(moved).item() == pytest.approx(0.5, rel=1e-5)
    assert opt.last_grad_norm is not None and opt.last_grad_norm.item() > 0.5


def test_state_view_exposes_inner_state_by_model_param():
    params = make_params(torch.bfloat16)
    opt = MasterWeightOptimizer(torch.optim.Adam(params, lr=1e-3))
    set_grads(params, grads_for(params, 0))
    opt.step()
    assert opt.state[params[0]]["exp_avg"].shape == params[0].shape
    assert opt.state[params[0]]["exp_avg"].dtype == torch.float32
    assert len(opt.state) == len(params)


@pytest.mark.parametrize("make_inner", ["sgd", "adamw"])
def test_resume_mid_run_continues_bit_for_bit(dtype16, make_inner):
    def build(params):
        if make_inner == "sgd":
            inner = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        else:
            inner = torch.optim.AdamW(params, lr=1e-3)
        opt = MasterWeightOptimizer(inner)
        return opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)

    params = make_params(dtype16)
    opt, sched = build(params)
    for step in range(5):
        set_grads(params, grads_for(params, step))
        opt.step()
        sched.step()
    saved_params = [p.detach().clone() for p in params]
    checkpoint = roundtrip({"opt": opt.state_dict(), "sched": sched.state_dict()})
    for step in range(5, 10):
        set_grads(params, grads_for(params, step))
        opt.step()
        sched.step()

    resumed = [nn.Parameter(p.clone()) for p in saved_params]
    opt2, sched2 = build(resumed)
    opt2.load_state_dict(checkpoint["opt"])
    sched2.load_state_dict(checkpoint["sched"])
    base_lr = 0.1 if make_inner == "sgd" else 1e-3
    assert opt2.param_groups[0]["lr"] == pytest.approx(base_lr * 0.9**5)
    for step in range(5, 10):
        set_grads(resumed, grads_for(resumed, step))
        opt2.step()
        sched2.step()
    for a, b in zip(params, resumed, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(opt.master_params(), opt2.master_params(), strict=True):
        assert torch.equal(a, b)


def test_load_rejects_other_model_shape_and_loads_nothing():
    params = make_params(torch.bfloat16)
    opt = MasterWeightOptimizer(torch.optim.Adam(params, lr=1e-3))
    set_grads(params, grads_for(params, 0))
    opt.step()
    shapes = [(8, 5), (8,), (3, 9), (3,)]
    other = [nn.Parameter(torch.ones(s, dtype=torch.bfloat16)) for s in shapes]
    other_opt = MasterWeightOptimizer(torch.optim.Adam(other, lr=0.5))
    set_grads(other, [torch.full(s, 0.1) for s in shapes])
    other_opt.step()
    before = copy.deepcopy(other_opt.state_dict())
    before_params = [p.detach().clone() for p in other]
    with pytest.raises(ValueError, match=r"parameter 2 of group 0 has shape \(3, 8\).*\(3, 9\)"):
        other_opt.load_state_dict(opt.state_dict())
    after = other_opt.state_dict()
    assert after["optimizer"]["param_groups"] == before["optimizer"]["param_groups"]
    for index, state in before["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(after["optimizer"]["state"][index][key], value)
    assert all(torch.equal(a, b) for a, b in zip(after["masters"], before["masters"], strict=True))
    assert all(torch.equal(p, q) for p, q in zip(other, before_params, strict=True))


def test_load_rejects_wrong_kind_and_bad_input():
    opt = MasterWeightOptimizer(torch.optim.SGD(make_params(torch.bfloat16), lr=0.1))
    with pytest.raises(TypeError, match=r"expects a dict .* got list"):
        opt.load_state_dict([])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"missing \['wrapper', 'shapes'\]"):
        opt.load_state_dict({"optimizer": {}})
    sd = opt.state_dict()
    sd["wrapper"] = "kahan"
    with pytest.raises(ValueError, match=r"saved by a 'kahan' wrapper, this is 'master'"):
        opt.load_state_dict(sd)


def test_constructor_errors():
    with pytest.raises(TypeError, match=r"wraps a torch.optim.Optimizer, got list"):
        MasterWeightOptimizer([1, 2])  # type: ignore[arg-type]
    params = make_params(torch.bfloat16)
    inner = torch.optim.SGD(params, lr=0.1)
    wrapped = MasterWeightOptimizer(inner)
    with pytest.raises(TypeError, match=r"already wrapped \(MasterWeightOptimizer\)"):
        MasterWeightOptimizer(wrapped)
    stepped = torch.optim.Adam(make_params(torch.bfloat16), lr=0.1)
    for p in stepped.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    stepped.step()
    with pytest.raises(RuntimeError, match=r"before its first step.*holds state for 4"):
        MasterWeightOptimizer(stepped)
    with pytest.raises(TypeError, match=r"got one of dtype torch.float64"):
        MasterWeightOptimizer(torch.optim.SGD([nn.Parameter(torch.ones(2).double())], lr=0.1))
    mixed = [nn.Parameter(torch.ones(2, dtype=torch.bfloat16)), nn.Parameter(torch.ones(2))]
    mixed.append(nn.Parameter(torch.ones(2, dtype=torch.bfloat16, device="meta")))
    with pytest.raises(ValueError, match=r"mixes devices \['cpu', 'meta'\]"):
        MasterWeightOptimizer(torch.optim.SGD(mixed, lr=0.1))
    with pytest.raises(ValueError, match=r"max_grad_norm must be positive.*got -1.0"):
        MasterWeightOptimizer(
            torch.optim.SGD(make_params(torch.bfloat16), lr=0.1), max_grad_norm=-1.0
        )
    with pytest.raises(TypeError, match=r"max_grad_norm must be a number or None, got str '1'"):
        MasterWeightOptimizer(
            torch.optim.SGD(make_params(torch.bfloat16), lr=0.1), max_grad_norm="1"
        )


def test_add_param_group_error_leaves_groups_unchanged():
    opt = MasterWeightOptimizer(torch.optim.SGD(make_params(torch.bfloat16), lr=0.1))
    with pytest.raises(TypeError, match=r"dtype torch.float64"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2).double())]})
    assert len(opt.param_groups) == len(opt.optimizer.param_groups) == 1


def test_sparse_gradient_is_rejected():
    emb = nn.Embedding(10, 4, sparse=True).to(torch.bfloat16)
    opt = MasterWeightOptimizer(torch.optim.SGD(emb.parameters(), lr=0.1))
    emb(torch.tensor([1, 2])).float().sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"does not support sparse gradients"):
            opt.step()


@pytest.mark.parametrize("keep", [False, True])
def test_params_without_grad_are_not_stepped(keep):
    params = make_params(torch.bfloat16)
    opt = MasterWeightOptimizer(
        torch.optim.SGD(params, lr=0.1, momentum=0.9), keep_grad_buffers=keep
    )
    set_grads(params, grads_for(params, 0))
    opt.step()
    frozen = params[0].detach().clone(), opt.master_params()[0].clone()
    params[0].grad = None
    set_grads(params[1:], grads_for(params[1:], 1))
    opt.step()
    assert torch.equal(params[0], frozen[0]) and torch.equal(opt.master_params()[0], frozen[1])


def test_keep_grad_buffers_gives_the_same_steps():
    a, b = make_params(torch.bfloat16), make_params(torch.bfloat16)
    lean = MasterWeightOptimizer(torch.optim.AdamW(a, lr=1e-3))
    kept = MasterWeightOptimizer(torch.optim.AdamW(b, lr=1e-3), keep_grad_buffers=True)
    for step in range(5):
        set_grads(a, grads_for(a, step))
        set_grads(b, grads_for(b, step))
        lean.step()
        kept.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(m.grad is None for m in kept.master_params())
    with pytest.raises(TypeError, match=r"keep_grad_buffers must be True or False, got int 1"):
        MasterWeightOptimizer(
            torch.optim.SGD(make_params(torch.bfloat16), lr=0.1), keep_grad_buffers=1
        )
