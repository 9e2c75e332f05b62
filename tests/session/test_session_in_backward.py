"""MixedPrecision(step_in_backward=True): the ordinary step bit for bit, no gradient kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixprec.session import MixedPrecision

# (policy, update, master_remainder, optimizer): where the step inside backward must give the
# ordinary step's bits (separable optimizers, no loss scaling, no clipping).
CASES = [
    ("bf16-pure", "stochastic", None, "adamw"),
    ("bf16-pure", "kahan", None, "sgd"),
    ("p=bf16,master=fp32", "auto", None, "adamw"),
    ("p=bf16,master=fp32", "auto", 16, "sgd"),
    ("bf16-mixed", "auto", None, "adamw"),
    ("fp32", "auto", None, "adamw"),
]
OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
}


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 4))


def batches(n, start=0):
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(16, 4, generator=g)
    xs = [torch.randn(8, 16, generator=g) for _ in range(start + n)][start:]
    return [(x, (x @ teacher).argmax(-1)) for x in xs]


def setup(policy, update, remainder, opt, in_backward, model=None, schedule=False):
    model = model or make_model()
    optimizer = OPTIMIZERS[opt](model.parameters())
    mp = MixedPrecision(
        policy, "cpu", backend="emulated", update=update, master_remainder=remainder,
        step_in_backward=in_backward,
    )  # fmt: skip
    model, optimizer = mp.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.7) if schedule else None
    return model, optimizer, mp, scheduler


def train(model, optimizer, mp, data, scheduler=None, seen=None):
    reports = []
    for x, y in data:
        loss = F.cross_entropy(model(x).float(), y)
        mp.backward(loss)
        if seen is not None:
            seen.append([p.grad is None for p in model.parameters()])
        reports.append(mp.step(optimizer))
        optimizer.zero_grad()  # harmless: nothing left to reset
        if scheduler is not None:
            scheduler.step()
    return reports


def assert_equal_state(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_equal_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_equal_state(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def assert_same(a, b):
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert p.dtype == q.dtype and torch.equal(p, q)


@pytest.mark.parametrize(("policy", "update", "remainder", "opt"), CASES)
def test_step_in_backward_is_bit_for_bit_the_ordinary_step(policy, update, remainder, opt):
    ordinary = setup(policy, update, remainder, opt, False, schedule=True)
    inside = setup(policy, update, remainder, opt, True, schedule=True)
    train(*ordinary[:3], batches(4), ordinary[3])
    seen: list[list[bool]] = []
    reports = train(*inside[:3], batches(4), inside[3], seen)
    assert_same(ordinary[0], inside[0])
    assert_equal_state(ordinary[1].state_dict(), inside[1].state_dict())
    assert all(all(row) for row in seen)  # every gradient freed inside backward
    assert all(r.stepped and r.grad_norm is not None and r.grad_norm > 0 for r in reports)


def test_grad_norm_is_the_global_norm_of_the_gradients():
    model, _, mp, _ = setup("bf16-pure", "stochastic", None, "adamw", False)
    x, y = batches(1)[0]
    mp.backward(F.cross_entropy(model(x).float(), y))
    norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in model.parameters()])
    )
    inside = setup("bf16-pure", "stochastic", None, "adamw", True)
    report = train(*inside[:3], batches(1))[0]
    assert report.grad_norm == pytest.approx(float(norm), rel=1e-6)


def test_resume_is_bit_for_bit(tmp_path):
    straight = setup("bf16-pure", "stochastic", None, "adamw", True)
    train(*straight[:3], batches(5))
    first = setup("bf16-pure", "stochastic", None, "adamw", True)
    train(*first[:3], batches(2))
    first[2].save(tmp_path / "ckpt.pt", first[0], first[1])
    resumed = setup("bf16-pure", "stochastic", None, "adamw", True)
    resumed[2].load(tmp_path / "ckpt.pt", resumed[0], resumed[1])
    train(*resumed[:3], batches(3, start=2))
    assert_same(straight[0], resumed[0])


def test_compiled_model_equals_eager():
    eager = setup("bf16-pure", "stochastic", None, "adamw", True)
    compiled = setup("bf16-pure", "stochastic", None, "adamw", True)
    model = torch.compile(compiled[0], backend="aot_eager")
    train(*eager[:3], batches(3))
    train(model, compiled[1], compiled[2], batches(3))
    assert_same(eager[0], compiled[0])


def test_a_nonfinite_gradient_skips_that_parameter_alone():
    model, optimizer, mp, _ = setup("bf16-pure", "stochastic", None, "sgd", True)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batches(1)[0]
    hook = model[3].bias.register_hook(lambda g: torch.full_like(g, float("nan")))
    mp.backward(F.cross_entropy(model(x).float(), y))
    hook.remove()
    report = mp.step(optimizer)
    assert not report.stepped and report.nonfinite_params == ("3.bias",)
    assert torch.equal(model[3].bias, before[-1])  # not stepped
    assert not torch.equal(model[3].weight, before[-2])  # the others were
    assert model[3].bias.grad is None


def test_refusals_name_the_value_and_what_works():
    with pytest.raises(
        ValueError, match=r"dynamic loss scaling \(policy 'params=fp32,compute=fp16"
    ):
        MixedPrecision("fp16-mixed", "cpu", backend="emulated", step_in_backward=True)
    with pytest.raises(TypeError, match="step_in_backward must be True or False, got 1"):
        MixedPrecision("bf16-pure", "cpu", backend="emulated", step_in_backward=1)
    model, optimizer, mp, _ = setup("bf16-pure", "stochastic", None, "adamw", True)
    x, y = batches(1)[0]
    mp.backward(F.cross_entropy(model(x).float(), y))
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"second backward before mp.step \(1 already\)"):
        mp.backward(F.cross_entropy(model(x).float(), y))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    with pytest.raises(ValueError, match=r"max_grad_norm=1.0 clips by the norm of all"):
        mp.step(optimizer, max_grad_norm=1.0)
    linear = nn.Linear(2, 2)
    mp2 = MixedPrecision("bf16-pure", "cpu", backend="emulated", step_in_backward=True)
    with pytest.raises(ValueError, match="LBFGS may couple its parameters"):
        mp2.prepare(linear, torch.optim.LBFGS(linear.parameters()))
    assert linear.weight.dtype == torch.float32  # refused before anything changed
    mp3 = MixedPrecision("bf16-pure", "cpu", backend="emulated", step_in_backward=True)
    with pytest.raises(ValueError, match="got none"):
        mp3.prepare(nn.Linear(2, 2))


def test_master_remainder_is_checked():
    with pytest.raises(ValueError, match=r"master_remainder must be None .* got 12"):
        MixedPrecision("bf16-pure", "cpu", backend="emulated", update="master",
                       master_remainder=12)  # fmt: skip
    with pytest.raises(ValueError, match=r"the update is 'stochastic'"):
        MixedPrecision("bf16-pure", "cpu", backend="emulated", master_remainder=16)


def test_a_backward_that_reaches_no_parameter_reports_no_step():
    _, optimizer, mp, _ = setup("bf16-pure", "stochastic", None, "adamw", True)
    x, _ = batches(1)[0]
    mp.backward(torch.zeros((), requires_grad=True) + x.sum() * 0)  # no model parameter in it
    report = mp.step(optimizer)
    assert not report.stepped and report.grad_norm is None and report.nonfinite_params == ()


@pytest.mark.parametrize("in_backward", [False, True])
def test_session_compressed_masters_equal_full_ones_and_resume(tmp_path, in_backward):
    full = setup("p=bf16,master=fp32", "auto", None, "adamw", in_backward)
    train(*full[:3], batches(5))
    first = setup("p=bf16,master=fp32", "auto", 16, "adamw", in_backward)
    train(*first[:3], batches(2))
    first[2].save(tmp_path / "ckpt.pt", first[0], first[1])
    resumed = setup("p=bf16,master=fp32", "auto", 16, "adamw", in_backward)
    resumed[2].load(tmp_path / "ckpt.pt", resumed[0], resumed[1])
    train(*resumed[:3], batches(3, start=2))
    assert_same(full[0], resumed[0])
    assert "remainders" in resumed[1].state_dict() and resumed[1].remainder_bits == 16
