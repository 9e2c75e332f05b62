"""mixprec.GradScaler is a torch.amp.GradScaler: type, private fields, step protocol, error types.

The reference throughout is torch.amp.GradScaler itself, driven in lock-step with mixprec's.
"""

from __future__ import annotations

import math
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.amp.grad_scaler import OptState

from mixprec.scaling import GradScaler

SCALERS: dict[str, Callable[..., torch.amp.GradScaler]] = {
    "torch": lambda **kw: torch.amp.GradScaler("cpu", **kw),
    "mixprec": lambda **kw: GradScaler("cpu", **kw),
}


def twins(seed: int = 0) -> list[tuple[torch.nn.Module, torch.optim.Optimizer]]:
    out = []
    for _ in range(2):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
        out.append((model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)))
    return out


def test_is_a_torch_grad_scaler() -> None:
    scaler = GradScaler("cpu")
    assert isinstance(scaler, torch.amp.GradScaler)
    assert isinstance(GradScaler("cpu", enabled=False), torch.amp.GradScaler)


# -- torch's private fields hold what torch's scaler holds ----------------------------------

_FIELDS = (
    "_enabled",
    "_init_scale",
    "_growth_factor",
    "_backoff_factor",
    "_growth_interval",
    "_init_growth_tracker",
)


def assert_same_fields(ours: torch.amp.GradScaler, theirs: torch.amp.GradScaler) -> None:
    for name in _FIELDS:
        assert getattr(ours, name) == getattr(theirs, name), name
    for name in ("_scale", "_growth_tracker"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), name
            assert torch.equal(a, b), name
    assert ours._get_growth_tracker() == theirs._get_growth_tracker()
    mine, torchs = ours._per_optimizer_states, theirs._per_optimizer_states
    assert len(mine) == len(torchs)
    for (_, a_rec), (_, b_rec) in zip(mine.items(), torchs.items(), strict=True):
        assert a_rec["stage"] is b_rec["stage"]
        a_flags, b_flags = a_rec["found_inf_per_device"], b_rec["found_inf_per_device"]
        assert set(a_flags) == set(b_flags)
        for device in a_flags:
            assert float(a_flags[device]) == float(b_flags[device])


def test_private_fields_in_lock_step_with_torch() -> None:
    """After every call of a run with overflows, growth and an unscale_, the fields agree."""
    (m0, o0), (m1, o1) = twins()
    kwargs = {"init_scale": 2.0**10, "growth_interval": 3, "backoff_factor": 0.25}
    ours, theirs = GradScaler("cpu", **kwargs), torch.amp.GradScaler("cpu", **kwargs)
    assert_same_fields(ours, theirs)  # before the first scale(): lazy, None
    x = torch.randn(5, 4)
    for it in range(12):
        for model, opt, scaler in ((m0, o0, ours), (m1, o1, theirs)):
            opt.zero_grad()
            scaler.scale(model(x).pow(2).mean()).backward()
            if it in (2, 3, 8):
                model[0].weight.grad[0, 0] = math.inf
        assert_same_fields(ours, theirs)
        if it % 4 == 1:
            ours.unscale_(o0)
            theirs.unscale_(o1)
            assert_same_fields(ours, theirs)
        ours.step(o0)
        theirs.step(o1)
        assert_same_fields(ours, theirs)
        ours.update()
        theirs.update()
        assert_same_fields(ours, theirs)
    assert ours.get_scale() != 2.0**10  # the run moved the scale both ways
    for a, b in zip(m0.parameters(), m1.parameters(), strict=True):
        assert torch.equal(a, b)


def test_setting_torch_fields_acts_as_in_torch() -> None:
    """Settings written through torch's field names act on the next update and state_dict."""
    ours, theirs = GradScaler("cpu"), torch.amp.GradScaler("cpu")
    for scaler in (ours, theirs):
        scaler._growth_factor = 4.0
        scaler._backoff_factor = 0.125
        scaler._growth_interval = 1
        scaler._init_scale = 8.0
        scaler._init_growth_tracker = 0
    (m0, o0), (m1, o1) = twins()
    x = torch.randn(3, 4)
    for it in range(3):
        for model, opt, scaler in ((m0, o0, ours), (m1, o1, theirs)):
            opt.zero_grad()
            scaler.scale(model(x).sum()).backward()
            if it == 1:
                model[2].bias.grad[0] = math.nan
            scaler.step(opt)
            scaler.update()
        assert_same_fields(ours, theirs)
    torch_keys = theirs.state_dict()
    assert {k: ours.state_dict()[k] for k in torch_keys} == torch_keys


def test_pickle_keeps_fields_as_torch() -> None:
    (m0, o0), (m1, o1) = twins()
    ours, theirs = GradScaler("cpu", init_scale=64.0), torch.amp.GradScaler("cpu", init_scale=64.0)
    for model, opt, scaler in ((m0, o0, ours), (m1, o1, theirs)):
        scaler.scale(model(torch.ones(1, 4)).sum()).backward()
        scaler.step(opt)
        scaler.update()
    ours2, theirs2 = pickle.loads(pickle.dumps(ours)), pickle.loads(pickle.dumps(theirs))
    assert_same_fields(ours2, theirs2)
    assert ours2._scale is None and ours2._init_scale == ours.get_scale()


# -- the grad_scaler=self step protocol -------------------------------------------------------


class SelfUnscalingSGD(torch.optim.Optimizer):
    """Plain SGD that, as torch's protocol allows, takes the scaler and unscales by itself."""

    _step_supports_amp_scaling = True

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, {"lr": lr})
        self.saw_attributes = False

    def step(self, closure: Any = None, *, grad_scaler: Any = None) -> Any:
        self.saw_attributes = hasattr(self, "grad_scale") or hasattr(self, "found_inf")
        if grad_scaler is not None:
            grad_scaler.unscale_(self)
            flags = grad_scaler._found_inf_per_device(self)
            if sum(v.item() for v in flags.values()):
                return None
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(p.grad, alpha=-group["lr"])
        return "stepped"


@pytest.mark.parametrize("name", sorted(SCALERS))
def test_grad_scaler_self_protocol_steps_on_unscaled_gradients(name: str) -> None:
    """Scale 1024, true gradient 1, SGD lr 1: the weight moves by -1, not -1024."""
    weight = torch.zeros(1, requires_grad=True)
    opt = SelfUnscalingSGD([weight], lr=1.0)
    scaler = SCALERS[name](init_scale=1024.0)
    scaler.scale((weight * 1.0).sum()).backward()
    assert weight.grad is not None and weight.grad.item() == 1024.0
    with pytest.warns(FutureWarning, match="GradScaler is going to stop passing itself"):
        assert scaler.step(opt) == "stepped"
    scaler.update()
    assert weight.item() == -1.0
    assert not opt.saw_attributes
    assert scaler._per_optimizer_states == {}

    # An overflow: the optimizer skips by itself, update() sees its check and backs off.
    opt.zero_grad()
    scaler.scale((weight * math.inf).sum()).backward()
    with pytest.warns(FutureWarning):
        assert scaler.step(opt) is None
    scaler.update()
    assert weight.item() == -1.0 and scaler.get_scale() == 512.0


@pytest.mark.parametrize("name", sorted(SCALERS))
def test_fused_protocol_without_grad_scaler_argument_gets_attributes(name: str) -> None:
    """An optimizer whose step takes no grad_scaler gets grad_scale/found_inf tensors instead."""

    class Fused(SelfUnscalingSGD):
        def step(self, closure: Any = None) -> Any:  # type: ignore[override]
            assert isinstance(self.grad_scale, torch.Tensor)  # type: ignore[attr-defined]
            assert isinstance(self.found_inf, torch.Tensor)  # type: ignore[attr-defined]
            with torch.no_grad():
                for p in self.param_groups[0]["params"]:
                    p.sub_(p.grad / self.grad_scale)  # type: ignore[attr-defined]
            return "fused"

    weight = torch.zeros(1, requires_grad=True)
    opt = Fused([weight], lr=1.0)
    scaler = SCALERS[name](init_scale=1024.0)
    scaler.scale((weight * 1.0).sum()).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no FutureWarning on this path
        assert scaler.step(opt) == "fused"
    scaler.update()
    assert weight.item() == -1.0
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


# -- errors catchable as torch's types ---------------------------------------------------------


def _backward(scaler: torch.amp.GradScaler, opt: torch.optim.Optimizer, model: Any) -> None:
    scaler.scale(model(torch.ones(2, 4)).sum()).backward()


MISUSES: dict[str, Callable[[torch.amp.GradScaler, Any, Any], Any]] = {
    "step before scale": lambda s, m, o: s.step(o),
    "unscale_ before scale": lambda s, m, o: s.unscale_(o),
    "update before scale": lambda s, m, o: s.update(),
    "update without a check": lambda s, m, o: (_backward(s, o, m), s.update()),
    "unscale_ twice": lambda s, m, o: (_backward(s, o, m), s.unscale_(o), s.unscale_(o)),
    "unscale_ after step": lambda s, m, o: (_backward(s, o, m), s.step(o), s.unscale_(o)),
    "step twice": lambda s, m, o: (_backward(s, o, m), s.step(o), s.step(o)),
    "closure": lambda s, m, o: (_backward(s, o, m), s.step(o, closure=lambda: 0.0)),
    "new_scale of two elements": lambda s, m, o: (
        _backward(s, o, m),
        s.step(o),
        s.update(torch.ones(2)),
    ),
    "empty state dict": lambda s, m, o: s.load_state_dict({}),
    "scale of a float": lambda s, m, o: s.scale(3.0),
    "pickle mid-iteration": lambda s, m, o: (_backward(s, o, m), s.step(o), pickle.dumps(s)),
}


@pytest.mark.parametrize("case", sorted(MISUSES))
def test_errors_are_catchable_as_the_type_torch_raises(case: str) -> None:
    (m0, o0), (m1, o1) = twins()
    with pytest.raises(Exception) as theirs:  # learn the type torch raises
        MISUSES[case](torch.amp.GradScaler("cpu"), m0, o0)
    with pytest.raises(type(theirs.value)):
        MISUSES[case](GradScaler("cpu"), m1, o1)


@pytest.mark.parametrize(
    "kwargs", [{"growth_factor": 1.0}, {"growth_factor": 0.5}, {"backoff_factor": 1.0}]
)
def test_bad_factors_are_catchable_as_torch_assertion(kwargs: dict[str, float]) -> None:
    with pytest.raises(AssertionError):
        torch.amp.GradScaler("cpu", **kwargs)
    with pytest.raises(AssertionError, match=r"_factor must be"):
        GradScaler("cpu", **kwargs)
    with pytest.raises(ValueError, match=r"_factor must be"):
        GradScaler("cpu", **kwargs)


def test_bad_device_is_a_value_error_and_a_runtime_error() -> None:
    with pytest.raises(RuntimeError):
        torch.device("gpu")  # what torch raises for the same string
    with pytest.raises(RuntimeError, match=r"device must be a device type .* got 'gpu'"):
        GradScaler("gpu")
    with pytest.raises(ValueError, match=r"got 'gpu'"):
        GradScaler("gpu")


def test_stage_names_are_torchs() -> None:
    (model, opt), _ = twins()
    scaler = GradScaler("cpu")
    _backward(scaler, opt, model)
    scaler.unscale_(opt)
    assert scaler._per_optimizer_states[id(opt)]["stage"] is OptState.UNSCALED
    scaler.step(opt)
    assert scaler._per_optimizer_states[id(opt)]["stage"] is OptState.STEPPED
