"""Fused one-pass updates against the reference path (the wrapper stepping torch's optimizer).

SGD, Adam and AdamW give the reference path's bits: weights, masters, states and compensation
are compared with ``torch.equal``. Stochastic rounding is checked bit for bit against the torch
implementation of the same counter-based bits, and fp16 against ``round_to_grid`` given the same
uniforms.
"""

from __future__ import annotations

import pytest
import torch
from optim_helpers import grads_for, make_params, roundtrip, set_grads
from torch import nn

from mixprec import stochastic
from mixprec.formats import resolve_format
from mixprec.optim import (
    KahanOptimizer,
    MasterWeightOptimizer,
    StochasticRoundingOptimizer,
    fused,
    memory_report,
)
from mixprec.quantize import round_to_grid

WRAPPERS = {
    "master": MasterWeightOptimizer,
    "stochastic": lambda inner: StochasticRoundingOptimizer(inner, seed=5),
    "kahan": KahanOptimizer,
}
INNER = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd-momentum-dampening": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, dampening=0.2, foreach=True
    ),
    "sgd-nesterov-wd": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01
    ),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True),
    "adam-wd": lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1),
}


@pytest.fixture(scope="module", autouse=True)
def _engine():
    if fused.engine() is None:
        pytest.skip(f"the fused kernels cannot be built here: {fused.engine_error()}")


def _run(wrapper, inner, dtype16, mode, steps=4, chunk_numel=None):
    params = make_params(dtype16)
    params.insert(2, nn.Parameter(torch.randn(6, generator=torch.Generator().manual_seed(4))))
    opt = WRAPPERS[wrapper](inner(params))
    opt.fused = mode
    opt.chunk_numel = chunk_numel
    fused_counts = []
    for step in range(steps):
        opt.grad_scale = torch.tensor(4.0)  # as GradScaler.step hands it
        set_grads(params, [4.0 * g for g in grads_for(params, step)])
        opt.step()
        del opt.grad_scale
        fused_counts.append(opt.last_step_fused)
    return params, opt, fused_counts


def _states(opt):
    return list(roundtrip(opt.state_dict())["optimizer"]["state"].items())


@pytest.mark.parametrize("inner", list(INNER))
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_fused_steps_give_the_bits_of_the_reference_path(wrapper, inner, dtype16):
    ref, ref_opt, ref_counts = _run(wrapper, INNER[inner], dtype16, "off")
    got, opt, counts = _run(wrapper, INNER[inner], dtype16, "auto")
    assert ref_counts == [0] * 4 and counts == [4] * 4  # the four 16-bit parameters
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)
    for (i, a), (j, b) in zip(_states(ref_opt), _states(opt), strict=True):
        assert i == j and list(a) == list(b)
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
    if wrapper == "master":
        for a, b in zip(ref_opt.master_params(), opt.master_params(), strict=True):
            assert torch.equal(a, b)
    if wrapper == "kahan":
        for a, b in zip(ref[:2] + ref[3:], got[:2] + got[3:], strict=True):
            assert torch.equal(ref_opt.compensation(a), opt.compensation(b))


def test_fused_steps_do_not_depend_on_the_chunks(dtype16):
    one, _, _ = _run("stochastic", INNER["adamw"], dtype16, "auto")
    chunked, _, _ = _run("stochastic", INNER["adamw"], dtype16, "auto", chunk_numel=10)
    for a, b in zip(one, chunked, strict=True):
        assert torch.equal(a, b)


def test_fused_resume_continues_bit_for_bit():
    def make():
        params = make_params(torch.bfloat16)
        return params, StochasticRoundingOptimizer(torch.optim.AdamW(params, lr=1e-2), seed=1)

    straight, opt = make()
    for step in range(4):
        set_grads(straight, grads_for(straight, step))
        opt.step()
    resumed, first = make()
    for step in range(2):
        set_grads(resumed, grads_for(resumed, step))
        first.step()
    saved = roundtrip({"opt": first.state_dict(), "params": [p.detach() for p in resumed]})
    again, second = make()
    with torch.no_grad():
        for p, value in zip(again, saved["params"], strict=True):
            p.copy_(value)
    second.load_state_dict(saved["opt"])
    for step in range(2, 4):
        set_grads(again, grads_for(again, step))
        second.step()
        assert second.last_step_fused == 4
    for a, b in zip(straight, again, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("wrapper", "total"), [("master", 16), ("stochastic", 12), ("kahan", 14)])
def test_fused_memory_account_is_unchanged(wrapper, total):
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32)).to(torch.bfloat16)
    opt = WRAPPERS[wrapper](torch.optim.AdamW(model.parameters()))
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    assert opt.last_step_fused == 4
    report = memory_report(model, opt)
    assert round(report.per_param["total"]) == total
    assert report.workspace == 0  # one pass needs no fp32 scratch


def test_lr_scheduler_on_the_wrapper_drives_the_fused_step():
    def run(mode):
        params = make_params(torch.bfloat16)
        opt = MasterWeightOptimizer(torch.optim.SGD(params, lr=0.5, momentum=0.9))
        opt.fused = mode
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for step in range(3):
            set_grads(params, grads_for(params, step))
            opt.step()
            scheduler.step()
        return opt.master_params()

    for a, b in zip(run("off"), run("auto"), strict=True):
        assert torch.equal(a, b)


class _MySGD(torch.optim.SGD):
    pass


@pytest.mark.parametrize(
    "case",
    ["subclass", "amsgrad", "maximize", "fused-true", "max-grad-norm", "state-dtype", "hook"],
)
def test_unsupported_settings_take_the_reference_path(case):
    params = make_params(torch.bfloat16)
    inner = {
        "subclass": lambda: _MySGD(params, lr=0.1),
        "amsgrad": lambda: torch.optim.AdamW(params, amsgrad=True),
        "maximize": lambda: torch.optim.SGD(params, lr=0.1, maximize=True),
        "fused-true": lambda: torch.optim.AdamW(params, fused=True),
    }.get(case, lambda: torch.optim.AdamW(params))()
    if case == "max-grad-norm":
        opt = MasterWeightOptimizer(inner, max_grad_norm=1.0)
    elif case == "state-dtype":
        opt = StochasticRoundingOptimizer(inner, state_dtype=torch.bfloat16)
    else:
        opt = MasterWeightOptimizer(inner)
    calls = []
    if case == "hook":
        inner.register_step_post_hook(lambda *args: calls.append(1))
    set_grads(params, grads_for(params, 0))
    opt.step()
    assert opt.last_step_fused == 0
    assert len(calls) == (case == "hook")


def test_fused_setting_is_validated():
    opt = MasterWeightOptimizer(torch.optim.SGD(make_params(torch.bfloat16), lr=0.1))
    assert opt.fused == "auto"
    with pytest.raises(ValueError, match=r"fused must be 'auto'.* or 'off'.*got 'on'"):
        opt.fused = "on"  # type: ignore[assignment]


def _specials() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    values = [
        torch.randn(5000, generator=g),
        torch.randn(2000, generator=g) * 1e-6,  # fp16 subnormals
        torch.randn(500, generator=g) * 1e-40,  # fp32 subnormals
        torch.tensor([65504.0, 65519.0, 65520.0, 65535.9, 7e4, 3.3e38, 3.4e38, 0.0, -0.0]),
        torch.tensor([float("inf"), -float("inf"), 2.0**-24, 2.0**-25, 2.0**-14, -(2.0**-15)]),
    ]
    x = torch.cat(values)
    return torch.cat([x, -x])


@pytest.mark.parametrize("offset", [0, 7])
def test_bf16_kernel_gives_the_bits_of_the_torch_rounding(offset):
    x = _specials()
    key = stochastic.counter_key(9, 0, 3)
    expected = torch.empty_like(x, dtype=torch.bfloat16)
    stochastic._stochastic_round_bf16_torch_([x.clone()], [expected], key, offset)
    got = torch.empty_like(expected)
    assert fused.stochastic_round_(x, got, key, offset)
    assert torch.equal(got, expected)
    nan = torch.full((4,), float("nan"))
    fused.stochastic_round_(nan, got[:4], key, offset)
    assert got[:4].isnan().all()


@pytest.mark.parametrize("offset", [0, 7])
def test_fp16_kernel_is_round_to_grid_with_the_same_uniforms(offset):
    x = torch.cat([_specials(), torch.full((3,), float("nan"))])
    key = stochastic.counter_key(9, 0, 3)
    words = stochastic.random_bits(x.numel(), key, offset)
    uniform = ((words >> 8) & ((1 << 24) - 1)).float() * 2.0**-24
    expected = round_to_grid(x, resolve_format("fp16"), "stochastic", uniform=uniform)
    got = torch.empty_like(x, dtype=torch.float16)
    assert fused.stochastic_round_(x, got, key, offset)
    finite = ~expected.isnan()
    assert torch.equal(got[finite].float(), expected[finite])
    assert torch.equal(got.isnan(), expected.isnan())


def test_a_group_added_after_the_first_steps_is_stepped_fused_too():
    def run(mode):
        params = make_params(torch.bfloat16)
        opt = MasterWeightOptimizer(torch.optim.SGD(params[:2], lr=0.1, momentum=0.9))
        opt.fused = mode
        for step in range(4):
            if step == 2:
                opt.add_param_group({"params": params[2:], "lr": 0.05})
            live = params if step >= 2 else params[:2]
            set_grads(live, grads_for(live, step))
            opt.step()
        return params, opt.last_step_fused

    (ref, ref_count), (got, count) = run("off"), run("auto")
    assert (ref_count, count) == (0, 4)
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)


def test_kernel_bits_do_not_depend_on_the_thread_count():
    x = torch.randn(1 << 17, generator=torch.Generator().manual_seed(2))
    key = stochastic.counter_key(1, 0, 0)
    outs = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            out = torch.empty_like(x, dtype=torch.float16)
            assert fused.stochastic_round_(x, out, key, 3)
            outs.append(out)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
