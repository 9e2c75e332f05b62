"""What every wrapper shares: closures (LBFGS), groups added later, complex parameters.

References: a plain fp32 ``torch.optim`` optimizer fed the same data, whose closure sees its
weights rounded as the wrapped model sees them; a plain optimizer on the complex parameters.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from optim_helpers import grads_for, make_params, roundtrip, set_grads
from torch import nn

from mixprec.optim import (
    KahanOptimizer,
    MasterWeightOptimizer,
    StochasticRoundingOptimizer,
    cast_module,
    kahan_round,
)

WRAPPERS = {
    "master": MasterWeightOptimizer,
    "stochastic": StochasticRoundingOptimizer,
    "kahan": KahanOptimizer,
}


def _wrap(kind: str, inner: torch.optim.Optimizer) -> torch.optim.Optimizer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some cases hold no 16-bit parameter on purpose
        return WRAPPERS[kind](inner)


# -- closures: LBFGS ------------------------------------------------------------------------------


def _least_squares(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 8, generator=g)
    y = x @ torch.randn(8, 4, generator=g) + 0.5
    return lambda weight, bias, shift: ((x @ weight.T + bias + shift - y) ** 2).mean()


def _neighbours(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``dtype`` values just below and above fp32 ``x`` (both ``x`` where it is exact)."""
    near = x.to(dtype)
    up = torch.nextafter(near, torch.full_like(near, float("inf"))).float()
    down = torch.nextafter(near, torch.full_like(near, float("-inf"))).float()
    lower = torch.where(near.float() <= x, near.float(), down)
    upper = torch.where(near.float() >= x, near.float(), up)
    return lower, upper


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_lbfgs_steps_like_fp32_lbfgs_on_the_rounded_weights(kind, dtype16, line_search):
    loss_of = _least_squares()
    g = torch.Generator().manual_seed(1)
    weight = nn.Parameter((0.3 * torch.randn(4, 8, generator=g)).to(dtype16))
    bias = nn.Parameter(torch.zeros(4, dtype=dtype16))
    shift = nn.Parameter(torch.zeros(4))  # fp32: its own shadow
    reference = [nn.Parameter(p.detach().float().clone()) for p in (weight, bias, shift)]

    def make(params):
        return torch.optim.LBFGS(
            params, lr=0.8, max_iter=5, history_size=4, line_search_fn=line_search
        )

    wrapped = _wrap(kind, make([weight, bias, shift]))
    plain = make(reference)

    def closure():
        wrapped.zero_grad()
        loss = loss_of(weight.float(), bias.float(), shift)
        loss.backward()
        return loss

    def reference_closure():
        # The fp32 twin evaluates where the wrapped model does: at its weights rounded to nearest
        # (the cast's backward rounds the gradient to 16 bits, as the model's 16-bit grad is).
        plain.zero_grad()
        w, b, s = reference
        loss = loss_of(w.to(dtype16).float(), b.to(dtype16).float(), s)
        loss.backward()
        return loss

    first = reference_closure().item()
    for _ in range(4):
        got = wrapped.step(closure)
        want = plain.step(reference_closure)
        assert torch.equal(got, want)
        with torch.no_grad():
            assert torch.equal(shift, reference[2])
            for index, (param, ref) in enumerate(zip((weight, bias), reference, strict=False)):
                if kind == "master":
                    assert torch.equal(wrapped.master_params()[index], ref)
                    assert torch.equal(param, ref.to(dtype16))
                elif kind == "kahan":
                    high, low = kahan_round(ref, dtype16)
                    assert torch.equal(param, high)
                    assert torch.equal(wrapped.compensation(param), low)
                    ref.copy_(high.float() + low.float())  # where the next step starts
                else:
                    lower, upper = _neighbours(ref, dtype16)
                    assert torch.all((param.float() == lower) | (param.float() == upper))
                    ref.copy_(param.float())  # the rounding the wrapper drew
    assert reference_closure().item() < first / 10  # LBFGS did converge


def test_closure_with_a_first_order_optimizer_is_evaluated_once(dtype16):
    params16 = make_params(dtype16)
    params32 = [nn.Parameter(p.detach().float()) for p in params16]
    wrapped = MasterWeightOptimizer(torch.optim.SGD(params16, lr=0.1, momentum=0.9))
    plain = torch.optim.SGD(params32, lr=0.1, momentum=0.9)
    calls = []
    for step in range(5):
        grads = [g.to(dtype16).float() for g in grads_for(params16, step)]

        def closure(grads=grads, step=step):
            calls.append(step)
            set_grads(params16, grads)
            return torch.tensor(float(step))

        set_grads(params32, grads)
        assert wrapped.step(closure).item() == step
        plain.step()
    assert calls == list(range(5))
    for master, ref in zip(wrapped.master_params(), params32, strict=True):
        assert torch.equal(master, ref)


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_a_closure_that_raises_leaves_no_scratch_behind(kind):
    weight = nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    wrapped = _wrap(kind, torch.optim.LBFGS([weight], lr=0.5))

    def failing():
        raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="data loader broke"):
        wrapped.step(failing)
    assert torch.equal(weight, torch.ones(3, dtype=torch.bfloat16))
    shadow = wrapped._shadows[weight]
    assert shadow.grad is None
    if kind != "master":
        assert shadow.numel() == 0  # the fp32 scratch copy was released


# -- param groups added after wrapping ------------------------------------------------------------


@pytest.mark.parametrize("through", ["inner", "wrapper"])
def test_groups_added_after_wrapping_step_like_a_plain_optimizer(dtype16, through):
    params16 = make_params(dtype16)
    params32 = [nn.Parameter(p.detach().float()) for p in params16]
    inner = torch.optim.SGD(params16[:2], lr=0.1, momentum=0.9)
    wrapped = MasterWeightOptimizer(inner)
    plain = torch.optim.SGD(params32[:2], lr=0.1, momentum=0.9)
    for step in range(6):
        if step == 3:
            late = {"params": params16[2:], "lr": 0.5}
            (inner if through == "inner" else wrapped).add_param_group(late)
            plain.add_param_group({"params": params32[2:], "lr": 0.5})
        grads = [g.to(dtype16).float() for g in grads_for(params16, step)]
        set_grads(params16, grads)
        set_grads(params32, grads)
        wrapped.step()
        plain.step()
    assert [g["lr"] for g in wrapped.param_groups] == [0.1, 0.5]
    assert wrapped.param_groups[1]["params"] == params16[2:]
    for master, ref in zip(wrapped.master_params(), params32, strict=True):
        assert torch.equal(master, ref)
    # The adopted group is in the state dict and loads into a wrapper built with both groups.
    again16 = [nn.Parameter(p.detach().clone()) for p in params16]
    rebuilt = MasterWeightOptimizer(
        torch.optim.SGD([{"params": again16[:2]}, {"params": again16[2:], "lr": 0.5}], lr=0.1)
    )
    rebuilt.load_state_dict(roundtrip(wrapped.state_dict()))
    for a, b in zip(rebuilt.master_params(), wrapped.master_params(), strict=True):
        assert torch.equal(a, b)


def test_inner_and_wrapper_groups_keep_their_order():
    params = make_params(torch.bfloat16)
    inner = torch.optim.SGD([params[0]], lr=0.1)
    wrapped = StochasticRoundingOptimizer(inner)
    inner.add_param_group({"params": [params[1]], "lr": 0.2})
    wrapped.add_param_group({"params": [params[2]], "lr": 0.3})
    assert [g["lr"] for g in wrapped.param_groups] == [0.1, 0.2, 0.3]
    assert [g["lr"] for g in inner.param_groups] == [0.1, 0.2, 0.3]
    assert [g["params"] for g in wrapped.param_groups] == [[p] for p in params[:3]]
    assert inner.param_groups[1]["params"][0] is not params[1]  # the inner group holds a shadow


def test_inner_group_that_repeats_a_parameter_is_refused_and_removed():
    params = make_params(torch.bfloat16)
    inner = torch.optim.SGD(params[:2], lr=0.1)
    wrapped = MasterWeightOptimizer(inner)
    inner.add_param_group({"params": [params[0]]})  # torch cannot tell: it holds the master
    with pytest.raises(ValueError, match=r"holds parameters that MasterWeightOptimizer already "):
        wrapped.step()
    assert len(inner.param_groups) == len(wrapped.param_groups) == 1
    inner.add_param_group({"params": [nn.Parameter(torch.ones(2, dtype=torch.float64))]})
    with pytest.raises(
        TypeError, match=r"handles float16, bfloat16, float32 and complex .*float64"
    ):
        wrapped.zero_grad()
    assert len(inner.param_groups) == 1
    wrapped.step()  # usable again


# -- complex parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_complex_parameters_are_stepped_as_they_are(kind, dtype16):
    params16 = make_params(dtype16)
    g = torch.Generator().manual_seed(3)
    z = nn.Parameter(torch.randn(5, dtype=torch.complex64, generator=g))
    z_ref = nn.Parameter(z.detach().clone())
    twin16 = [nn.Parameter(p.detach().clone()) for p in params16]
    wrapped = _wrap(kind, torch.optim.Adam([*params16, z], lr=1e-2))
    without_z = _wrap(kind, torch.optim.Adam(twin16, lr=1e-2))  # the same wrapper, no complex
    plain = torch.optim.Adam([z_ref], lr=1e-2)  # torch's own complex Adam
    for step in range(5):
        grads = grads_for(params16, step)
        set_grads(params16, grads)
        set_grads(twin16, grads)
        z_grad = torch.randn(5, dtype=torch.complex64, generator=g)
        z.grad, z_ref.grad = z_grad.clone(), z_grad.clone()
        wrapped.step()
        without_z.step()
        plain.step()
    assert z.dtype == torch.complex64
    assert torch.equal(z, z_ref)
    for p, twin in zip(params16, twin16, strict=True):
        assert torch.equal(p, twin)
    restored = _wrap(kind, torch.optim.Adam([*twin16, z_ref], lr=1e-2))
    restored.load_state_dict(roundtrip(wrapped.state_dict()))  # a complex entry saves and loads


def test_an_optimizer_of_only_fp32_and_complex_parameters_warns_that_it_is_the_identity():
    z = nn.Parameter(torch.ones(2, dtype=torch.complex64))
    with pytest.warns(UserWarning, match=r"already float32 \(or complex, which is left as it is\)"):
        MasterWeightOptimizer(torch.optim.SGD([z, nn.Parameter(torch.ones(2))], lr=0.1))


def test_cast_module_leaves_complex_tensors_alone_as_torch_autocast_does():
    model = nn.Linear(4, 4)
    model.register_parameter("phase", nn.Parameter(torch.ones(4, dtype=torch.complex64)))
    changed = cast_module(model, "bf16-pure")
    assert model.weight.dtype == torch.bfloat16
    assert model.phase.dtype == torch.complex64
    assert "phase" not in changed
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the reference: torch keeps complex as is
        assert (model.phase @ model.phase).dtype == torch.complex64


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_zero_grad_refuses_a_non_bool_flag(kind):
    wrapped = _wrap(kind, torch.optim.SGD(make_params(torch.bfloat16), lr=0.1))
    with pytest.raises(TypeError, match=r"set_to_none must be True or False, got str 'no'"):
        wrapped.zero_grad(set_to_none="no")  # type: ignore[arg-type]


# -- a parameter listed twice in one group --------------------------------------------------------


@pytest.mark.parametrize("inner", ["sgd", "adamw"])
@pytest.mark.parametrize("fused", ["auto", "off"])
def test_a_parameter_listed_twice_is_stepped_twice_as_torch_steps_it(inner, fused):
    """torch steps a parameter listed twice in a group twice (it warns); the masters must be
    what the same torch optimizer makes of fp32 copies, on both paths."""
    make = {
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    }[inner]
    params = make_params(torch.bfloat16)
    reference = [nn.Parameter(p.detach().float()) for p in params]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's warning about the repeated parameter
        plain = make([reference[0], *reference, reference[2]])
        opt = MasterWeightOptimizer(make([params[0], *params, params[2]]))
    opt.fused = fused
    for step in range(3):
        grads = grads_for(params, step)
        set_grads(params, grads)
        set_grads(reference, [g.to(torch.bfloat16).float() for g in grads])
        opt.step()
        plain.step()
    unique = list(dict.fromkeys(opt.master_params()))
    assert all(torch.equal(m, r) for m, r in zip(unique, reference, strict=True))
    assert all(torch.equal(p, r.to(p.dtype)) for p, r in zip(params, reference, strict=True))


@pytest.mark.parametrize("kind", ["stochastic", "kahan"])
def test_a_parameter_listed_twice_steps_alike_on_both_paths(kind):
    results = []
    for fused in ("auto", "off"):
        params = make_params(torch.bfloat16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = _wrap(kind, torch.optim.AdamW([params[1], *params], lr=1e-2))
        opt.fused = fused
        for step in range(3):
            set_grads(params, grads_for(params, step))
            opt.step()
        results.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
