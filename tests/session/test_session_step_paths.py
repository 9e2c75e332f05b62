"""``MixedPrecision.step`` with one optimizer takes the scaler's shortcut
(``GradScaler.step_and_update``: one found-inf check read once); with several, or with clipping,
the general sequence (``decide_together_``, ``step`` each, ``update``). Both must train alike, bit
for bit: the reference is a twin model whose parameters are split over two AdamW optimizers (Adam
updates each parameter on its own, so the split changes no number), stepped in lock-step, with
clean steps, a growing scale and skipped inf/NaN steps.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixprec import MixedPrecision

# step -> (parameter, bad value) written into a gradient after the backward
BAD = {2: ("0.weight", math.inf), 3: ("2.bias", math.nan), 6: ("0.bias", -math.inf)}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 5))


def session(preset: str, split: bool) -> tuple[nn.Module, list[Any], MixedPrecision]:
    model = make_model()
    groups = [list(model[0].parameters()), list(model[2].parameters())]
    if split:
        optimizers = [torch.optim.AdamW(params, lr=1e-2) for params in groups]
    else:
        optimizers = [torch.optim.AdamW([p for params in groups for p in params], lr=1e-2)]
    # growth every 3 clean steps, so the scale moves both ways (ignored without scaling)
    options = {"scaler_options": {"growth_interval": 3}} if preset == "fp16-mixed" else {}
    mp = MixedPrecision(preset, "cpu", backend="emulated", **options)
    model, *optimizers = mp.prepare(model, *optimizers)
    return model, optimizers, mp


def adam_state(model: nn.Module, optimizers: list[Any]) -> dict[str, dict[str, torch.Tensor]]:
    names = {id(p): name for name, p in model.named_parameters()}
    return {
        names[id(p)]: dict(state)
        for opt in optimizers
        for p, state in opt.state.items()  # type: ignore[attr-defined]
    }


def general_calls(mp: MixedPrecision) -> list[str]:
    """Record the scaler's general-sequence calls (none on the shortcut)."""
    calls: list[str] = []
    method = mp.scaler.decide_together_

    def spy(optimizers: Any) -> None:
        calls.append("decide_together_")
        method(optimizers)

    mp.scaler.decide_together_ = spy  # type: ignore[method-assign]
    return calls


@pytest.mark.parametrize("preset", ["bf16-mixed", "fp16-mixed"])
@pytest.mark.parametrize("forced_by", ["two optimizers", "clipping"])
def test_one_optimizer_steps_as_the_general_path(preset: str, forced_by: str) -> None:
    split = forced_by == "two optimizers"
    fast, general = session(preset, split=False), session(preset, split=split)
    fast_calls, general_calls_ = general_calls(fast[2]), general_calls(general[2])
    # a clip that never clips: its factor is exactly 1 (the norm is far below it)
    step_kwargs = {} if split else {"max_grad_norm": 1e30}
    g = torch.Generator().manual_seed(1)
    skipped = []
    for step in range(9):
        x, y = torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)
        reports, losses = [], []
        for (model, optimizers, mp), kwargs in ((fast, {}), (general, step_kwargs)):
            for opt in optimizers:
                opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            mp.backward(loss)
            if step in BAD:
                name, value = BAD[step]
                grad = model.get_parameter(name).grad
                grad.view(-1)[3] = value
            losses.append(loss)
            reports.append(mp.step(*optimizers, **kwargs))
        assert torch.equal(losses[0], losses[1])
        fast_report, general_report = reports
        if not split:
            assert general_report.grad_norm is not None
            general_report = dataclasses.replace(general_report, grad_norm=None)
            # a non-finite norm makes the clip factor NaN, so every gradient was spread with it
            assert set(fast_report.nonfinite_params) <= set(general_report.nonfinite_params)
            general_report = dataclasses.replace(
                general_report, nonfinite_params=fast_report.nonfinite_params
            )
        assert dataclasses.replace(fast_report, seconds=None) == dataclasses.replace(
            general_report, seconds=None
        )
        skipped.append(not fast_report.stepped)
        for (name, p), q in zip(fast[0].named_parameters(), general[0].parameters(), strict=True):
            assert torch.equal(p, q), name
        a, b = adam_state(fast[0], fast[1]), adam_state(general[0], general[1])
        assert a.keys() == b.keys()
        for name, state in a.items():
            for key, value in state.items():
                assert torch.equal(value, b[name][key]), (name, key)
        scalers = fast[2].scaler, general[2].scaler
        assert scalers[0].state_dict() == scalers[1].state_dict()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert scalers[0].step_skipped() == scalers[1].step_skipped()
        assert scalers[0].step_skipped(fast[1][0]) == scalers[1].step_skipped(general[1][0])
        states = fast[2].state_dict(), general[2].state_dict()
        for key in ("version", "policy", "update", "steps", "scaler"):
            assert states[0][key] == states[1][key], key
    assert fast_calls == []  # the shortcut ran every step
    assert general_calls_ == ["decide_together_"] * 9
    assert skipped[2] and skipped[3] and skipped[6]  # the bad steps were skipped
    assert skipped.count(False) >= 5
    if preset == "fp16-mixed":  # the scale backed off and grew again
        assert fast[2].scaler.total_steps == 9 and fast[2].scaler.skipped_steps >= 3
