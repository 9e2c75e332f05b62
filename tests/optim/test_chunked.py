"""Chunked steps: the same bits as one call of the inner optimizer, bounded scratch, fallbacks."""

from __future__ import annotations

import pytest
import torch
from optim_helpers import grads_for, make_params, roundtrip, set_grads
from torch import nn

from mixprec.optim import (
    KahanOptimizer,
    MasterWeightOptimizer,
    StochasticRoundingOptimizer,
    memory_report,
)

WRAPPERS = {
    "master": MasterWeightOptimizer,
    "stochastic": lambda inner: StochasticRoundingOptimizer(inner, seed=3),
    "kahan": KahanOptimizer,
    "stochastic-bf16-states": lambda inner: StochasticRoundingOptimizer(
        inner, seed=3, state_dtype=torch.bfloat16
    ),
}
INNER = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5),
}


def _mixed_params(dtype16: torch.dtype) -> list[nn.Parameter]:
    """16-bit parameters with an fp32 one (its own master) in the middle."""
    params = make_params(dtype16)
    params.insert(2, nn.Parameter(torch.randn(6, generator=torch.Generator().manual_seed(4))))
    return params


def _run(wrapper: str, inner: str, dtype16: torch.dtype, chunk_numel: int | None, steps: int = 5):
    params = _mixed_params(dtype16)
    opt = WRAPPERS[wrapper](INNER[inner](params))
    opt.chunk_numel = chunk_numel
    for step in range(steps):
        set_grads(params, grads_for(params, step))
        opt.grad_scale = torch.tensor(2.0)  # as GradScaler.step hands it: unscaled in the copy
        opt.step()
        del opt.grad_scale
    return params, opt


@pytest.mark.parametrize("inner", list(INNER))
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_chunked_steps_give_the_bits_of_one_call(wrapper, inner, dtype16):
    """Chunks of 10 elements (each tensor alone, the fp32 one riding along) against one call."""
    whole, whole_opt = _run(wrapper, inner, dtype16, None)
    chunked, chunked_opt = _run(wrapper, inner, dtype16, 10)
    for a, b in zip(whole, chunked, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(a.grad, b.grad)  # the user's gradients are left as they were
    one, other = roundtrip(whole_opt.state_dict()), roundtrip(chunked_opt.state_dict())
    states = zip(
        one["optimizer"]["state"].values(), other["optimizer"]["state"].values(), strict=True
    )
    for a, b in states:
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


def test_chunked_steps_call_the_inner_optimizer_once_per_chunk():
    params = make_params(torch.bfloat16)  # 40 + 8 + 24 + 3 elements
    inner = torch.optim.SGD(params, lr=0.1)
    calls = []
    real_step = inner.step
    opt = MasterWeightOptimizer(inner)
    opt.fused = "off"  # the reference path: the one that calls the inner optimizer
    opt.chunk_numel = 48
    inner.step = lambda *a, **k: (calls.append(1), real_step(*a, **k))[1]  # type: ignore[method-assign]
    set_grads(params, grads_for(params, 0))
    opt.step()
    assert len(calls) == 2  # [40, 8] and [24, 3]


class _CoupledSGD(torch.optim.SGD):
    """An SGD whose update reads every gradient: it scales them by 1 / (global norm)."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        for g in grads:
            g.div_(norm)
        return super().step(closure)


def test_optimizers_that_may_couple_parameters_get_one_call():
    """A subclass of a separable optimizer is not trusted to be separable: no chunks."""

    def run(chunk_numel):
        params = make_params(torch.bfloat16)
        opt = MasterWeightOptimizer(_CoupledSGD(params, lr=0.1))
        opt.chunk_numel = chunk_numel
        for step in range(3):
            set_grads(params, grads_for(params, step))
            opt.step()
        return params

    reference = make_params(torch.bfloat16)
    masters = [nn.Parameter(p.detach().float()) for p in reference]
    bare = _CoupledSGD(masters, lr=0.1)
    for step in range(3):
        for m, g in zip(masters, grads_for(reference, step), strict=True):
            m.grad = g.to(torch.bfloat16).float()
        bare.step()
    for got, master in zip(run(10), masters, strict=True):
        assert torch.equal(got, master.to(torch.bfloat16))


def test_step_hooks_on_the_inner_optimizer_run_once_per_step():
    params = make_params(torch.bfloat16)
    inner = torch.optim.AdamW(params)
    runs = []
    inner.register_step_post_hook(lambda *_: runs.append(1))
    opt = KahanOptimizer(inner)
    opt.chunk_numel = 10
    set_grads(params, grads_for(params, 0))
    opt.step()
    assert len(runs) == 1


def test_clipping_by_max_grad_norm_uses_the_norm_of_all_gradients():
    def run(chunk_numel):
        params = make_params(torch.bfloat16)
        opt = MasterWeightOptimizer(torch.optim.SGD(params, lr=1.0), max_grad_norm=1e-3)
        opt.chunk_numel = chunk_numel
        set_grads(params, grads_for(params, 0))
        opt.step()
        return params, opt.last_grad_norm

    chunked, norm = run(10)
    whole, whole_norm = run(None)
    grads = [g.to(torch.bfloat16).float() for g in grads_for(chunked, 0)]
    assert torch.equal(norm, torch.nn.utils.get_total_norm(grads))
    assert torch.equal(norm, whole_norm)
    for a, b in zip(chunked, whole, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("wrapper", ["master", "stochastic", "kahan"])
def test_workspace_is_bounded_by_the_chunk_and_outside_the_account(wrapper):
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32)).to(torch.bfloat16)
    opt = WRAPPERS[wrapper](torch.optim.AdamW(model.parameters()))
    opt.fused = "off"  # the reference path's scratch (the fused one needs none)
    opt.chunk_numel = 1000
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    report = memory_report(model, opt)
    # fp32 grads; + weights and widened compensation (Kahan) or random words (1/2 + 1 per element)
    buffers = {"master": 1, "kahan": 3, "stochastic": 3.5}[wrapper]
    assert 0 < report.workspace <= buffers * 4 * 1000
    assert report.per_param["total"] == pytest.approx(
        {"master": 16, "stochastic": 12}.get(wrapper, 14), abs=0.01
    )
    opt.chunk_numel = None  # one call: scratch is allocated for the step and freed after it
    opt._scratch = type(opt._scratch)()
    opt.step()
    assert memory_report(model, opt).workspace == 0


def test_stochastic_rounding_of_a_group_does_not_change_when_a_group_is_added():
    """A group added after state was created takes the next elements of the stream."""

    def run(add):
        params = make_params(torch.bfloat16)
        extra = [nn.Parameter(torch.ones(5, dtype=torch.bfloat16))]
        opt = StochasticRoundingOptimizer(torch.optim.SGD(params, lr=1e-3), seed=11)
        for step in range(4):
            set_grads(params, grads_for(params, step))
            if add and step == 2:
                opt.add_param_group({"params": extra})
            if add and step >= 2:
                extra[0].grad = torch.ones(5, dtype=torch.bfloat16)
            opt.step()
        return params, extra

    alone, _ = run(False)
    with_group, extra = run(True)
    for a, b in zip(alone, with_group, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(extra[0], torch.ones(5, dtype=torch.bfloat16))


def test_a_checkpoint_of_the_torch_generator_format_is_refused():
    params = make_params(torch.bfloat16)
    opt = StochasticRoundingOptimizer(torch.optim.SGD(params, lr=0.1))
    old = opt.state_dict()
    old["generators"] = {"cpu": torch.Generator().get_state()}
    with pytest.raises(ValueError, match=r"has no step counter .* torch.Generator states"):
        opt.load_state_dict(old)
    with pytest.raises(ValueError, match=r"saved seed must be >= 0 and < 2\*\*64, got -3"):
        opt.load_state_dict({**opt.state_dict(), "seed": -3})


def test_chunk_numel_must_be_a_positive_int_or_none():
    opt = MasterWeightOptimizer(torch.optim.SGD(make_params(torch.bfloat16), lr=0.1))
    with pytest.raises(ValueError, match=r"chunk_numel must be a positive int .* got 0"):
        opt.chunk_numel = 0
    with pytest.raises(TypeError, match=r"chunk_numel must be a positive int or None, got float"):
        opt.chunk_numel = 1.5  # type: ignore[assignment]
    opt.chunk_numel = None
    assert opt.chunk_numel is None
