"""Checkpoints: torch compatibility both ways, weights_only loading, rejected dicts."""

from __future__ import annotations

import io

import pytest
import torch

from mixprec.scaling import GradScaler


def set_grad_entry(param: torch.Tensor, value: float) -> None:
    """Overwrite the first entry of ``param``'s gradient: an injected overflow."""
    grad = param.grad
    assert grad is not None
    grad.view(-1)[0] = value


def train(scaler, steps: int, overflow_at=(), seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3)
    for it in range(steps):
        opt.zero_grad()
        scaler.scale(model(x).pow(2).mean()).backward()
        if it in overflow_at:
            set_grad_entry(model.weight, float("inf"))
        scaler.step(opt)
        scaler.update()
    return model


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_is_plain_python_and_loads_weights_only() -> None:
    scaler = GradScaler("cpu", growth_interval=2, hysteresis=2, min_scale=1.0, max_scale=2.0**20)
    train(scaler, 7, overflow_at=(1, 2, 5))
    state = scaler.state_dict()
    assert all(isinstance(v, (int, float, str, bool, type(None))) for v in state.values())
    assert state["format_version"] == 1
    assert (state["total_steps"], state["skipped_steps"]) == (7, 3)
    fresh = GradScaler("cpu")
    fresh.load_state_dict(roundtrip(state))
    assert fresh.state_dict() == state
    assert fresh.get_scale() == scaler.get_scale()


def test_loads_torch_state_dict_and_continues_identically() -> None:
    theirs = torch.amp.GradScaler("cpu", init_scale=256.0, growth_factor=3.0, growth_interval=3)
    train(theirs, 5, overflow_at=(1,))
    ours = GradScaler("cpu", hysteresis=1)
    ours.load_state_dict(roundtrip(theirs.state_dict()))
    assert ours.get_scale() == theirs.get_scale()
    assert ours.state_dict()["_growth_tracker"] == theirs._get_growth_tracker()
    assert ours.get_growth_factor() == 3.0 and ours.get_growth_interval() == 3
    assert (ours.total_steps, ours.skipped_steps) == (0, 0)
    model_t = train(theirs, 6, overflow_at=(2,), seed=1)
    model_o = train(ours, 6, overflow_at=(2,), seed=1)
    assert ours.get_scale() == theirs.get_scale()
    assert ours.state_dict()["_growth_tracker"] == theirs._get_growth_tracker()
    assert torch.equal(model_t.weight, model_o.weight)


def test_torch_loads_our_state_dict() -> None:
    ours = GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    train(ours, 5, overflow_at=(0,))
    theirs = torch.amp.GradScaler("cpu")
    theirs.load_state_dict(roundtrip(ours.state_dict()))
    assert theirs.get_scale() == ours.get_scale()
    assert theirs._get_growth_tracker() == ours.state_dict()["_growth_tracker"]


def test_load_into_a_running_scaler_overwrites_its_tensors() -> None:
    source = GradScaler("cpu", init_scale=8.0, hysteresis=3)
    train(source, 3, overflow_at=(0,))
    target = GradScaler("cpu", init_scale=2.0**20)
    train(target, 2)  # tensors already exist
    target.load_state_dict(source.state_dict())
    assert target.state_dict() == source.state_dict()


def bad_dicts() -> dict[str, tuple[object, type[Exception], str]]:
    good = GradScaler("cpu").state_dict()
    return {
        "empty": ({}, ValueError, r"The state dict is empty, as saved by a disabled GradScaler"),
        "optimizer": (
            torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1).state_dict(),
            ValueError,
            r"This is not a GradScaler state dict: keys \['scale', 'growth_factor', .*\] are "
            r"missing \(got keys \['param_groups', 'state'\]\)",
        ),
        "newer": (
            {**good, "format_version": 2},
            ValueError,
            r"state_dict\['format_version'\] is 2 but this mixprec reads version 1",
        ),
        "unknown key": (
            {**good, "ema": 1.0},
            ValueError,
            r"unknown keys \['ema'\] and lacks keys \[\]",
        ),
        "truncated": (
            {k: v for k, v in good.items() if k != "_hysteresis_left"},
            ValueError,
            r"lacks keys \['_hysteresis_left'\]",
        ),
        "bad scale": (
            {**good, "scale": -1.0},
            ValueError,
            r"bad value: state_dict\['scale'\] must be a finite float > 0 .* got -1\.0",
        ),
        "bad factor": (
            {**good, "growth_factor": 0.5},
            ValueError,
            r"bad value: growth_factor must be a finite float > 1\.0",
        ),
        "bad tracker": (
            {**good, "_growth_tracker": -3},
            ValueError,
            r"state_dict\['_growth_tracker'\] must be an int in \[0, 2147483647\], got -3",
        ),
        "bad hysteresis": (
            {**good, "_hysteresis_left": 5},
            ValueError,
            r"state_dict\['_hysteresis_left'\] must be an int in \[1, 1\], got 5",
        ),
        "bad strategy": (
            {**good, "strategy": "fixed"},
            ValueError,
            r"state_dict\['strategy'\] must be one of \('dynamic', 'static', 'none'\), got 'fixed'",
        ),
        "skips > steps": (
            {**good, "skipped_steps": 4},
            ValueError,
            r"state_dict\['skipped_steps'\] must be an int in \[0, 0\], got 4",
        ),
        "out of bounds": (
            {**good, "max_scale": 2.0**10},
            ValueError,
            r"state_dict\['scale'\]=65536\.0 lies outside \[min_scale, max_scale\] = "
            r"\[None, 1024\.0\]",
        ),
        "not a dict": (
            [("scale", 1.0)],
            TypeError,
            r"state_dict must be a dict returned by GradScaler\.state_dict\(\), got list",
        ),
    }


@pytest.mark.parametrize("case", list(bad_dicts()))
def test_rejected_state_dicts_change_nothing(case: str) -> None:
    state, error, message = bad_dicts()[case]
    scaler = GradScaler("cpu", init_scale=4.0, hysteresis=1)
    train(scaler, 2, overflow_at=(0,))
    before = scaler.state_dict()
    with pytest.raises(error, match=message):
        scaler.load_state_dict(state)  # type: ignore[arg-type]
    assert scaler.state_dict() == before
