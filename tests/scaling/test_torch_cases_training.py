"""PyTorch's own grad-scaler test cases, part two: clipping, gradient penalty, accumulation,
several models and optimizers, and the optimizer protocol, run on torch.amp.GradScaler and
mixprec's by substitution (see ``test_torch_cases.py`` for the cases' origin and references)."""

from __future__ import annotations

from itertools import chain
from typing import Any

import pytest
import torch
from torch.testing import assert_close
from torch_scaling_cases import (
    DEVICE,
    Run,
    make_case,
    make_models_optimizers,
    run_scaling_case,
    scaler_classes,
)

# -- clipping, penalty, accumulation, several models --------------------------------------------


def _clipping_run(separate_unscale: bool) -> Run:
    max_norm = 0.2  # large enough to have an effect on these gradients

    def run(data, model, optimizer, scaler, loss_fn, skip_iter, try_scaling_api):
        for i, (inputs, target) in enumerate(data):
            optimizer.zero_grad()
            loss = loss_fn(model(inputs), target)
            if try_scaling_api:
                scaler.scale(loss).backward()
                if separate_unscale:
                    if i == skip_iter and scaler.is_enabled():
                        model[1].weight.grad.data.fill_(float("inf"))
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(
                        model.parameters(), max_norm, error_if_nonfinite=False
                    )
                else:
                    torch.nn.utils.clip_grad_norm_(
                        model.parameters(), max_norm * scaler.get_scale()
                    )
                    if i == skip_iter and scaler.is_enabled():
                        model[1].weight.grad.data.fill_(float("inf"))
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                if (not scaler.is_enabled()) or (i != skip_iter):
                    optimizer.step()

    return run


@scaler_classes
def test_grad_scaling_clipping(scaler_cls: type[torch.amp.GradScaler]) -> None:
    run_scaling_case(scaler_cls, _clipping_run(False), unskipped=3, skipped=1, atol=1e-5)


@scaler_classes
def test_grad_scaling_clipping_separate_unscale(scaler_cls: type[torch.amp.GradScaler]) -> None:
    run_scaling_case(scaler_cls, _clipping_run(True), unskipped=3, skipped=1)


def _penalty_run(data, model, optimizer, scaler, loss_fn, skip_iter, try_scaling_api):
    for i, (inputs, target) in enumerate(data):
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), target)
        if try_scaling_api:
            grads = torch.autograd.grad(scaler.scale(loss), model.parameters(), create_graph=True)
            inv_scale = 1.0 / scaler.get_scale()
            grads = [g * inv_scale for g in grads]
        else:
            grads = torch.autograd.grad(loss, model.parameters(), create_graph=True)
        loss = loss + sum(g.pow(2).sum() for g in grads).sqrt()
        if try_scaling_api:
            scaler.scale(loss).backward()
            if i == skip_iter and scaler.is_enabled():
                model[1].weight.grad.data.fill_(float("inf"))
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if (not scaler.is_enabled()) or (i != skip_iter):
                optimizer.step()


@scaler_classes
def test_grad_scaling_penalty(scaler_cls: type[torch.amp.GradScaler]) -> None:
    run_scaling_case(scaler_cls, _penalty_run, unskipped=3, skipped=1)


def _accumulation_run(data, model, optimizer, scaler, loss_fn, skip_iter, try_scaling_api):
    iters_to_accumulate = 2
    for i, (inputs, target) in enumerate(data):
        loss = loss_fn(model(inputs), target) / iters_to_accumulate
        if try_scaling_api:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if (i + 1) % iters_to_accumulate == 0:
            if try_scaling_api:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad()


@scaler_classes
def test_grad_scaling_accumulation(scaler_cls: type[torch.amp.GradScaler]) -> None:
    run_scaling_case(scaler_cls, _accumulation_run, unskipped=2, skipped=0)


@scaler_classes
@pytest.mark.parametrize("enabled", [True, False])
def test_grad_scaling_multiple(scaler_cls: type[torch.amp.GradScaler], enabled: bool) -> None:
    """Two models, two optimizers, two losses feeding both; one optimizer unscaled first."""
    torch.manual_seed(0)
    control0, scaling0, opt_control0, opt_scaling0, data, loss_fn, skip_iter = make_case()
    control1, scaling1, opt_control1, opt_scaling1 = make_models_optimizers()
    scaler = scaler_cls(
        DEVICE, init_scale=128.0, growth_factor=2.0, enabled=enabled, growth_interval=1
    )

    def run(model0, model1, optimizer0, optimizer1, try_scaling_api: bool) -> None:
        for i, (inputs, target) in enumerate(data):
            optimizer0.zero_grad()
            optimizer1.zero_grad()
            output0, output1 = model0(inputs), model1(inputs)
            loss0 = loss_fn(0.3 * output0 + 0.7 * output1, target)
            loss1 = loss_fn(0.6 * output0 - 0.4 * output1, target)
            if try_scaling_api:
                scaler.scale(loss0).backward(retain_graph=True)
                scaler.scale(loss1).backward()
                if i == skip_iter and scaler.is_enabled():
                    model1[1].weight.grad.data.fill_(float("inf"))
                scaler.unscale_(optimizer0)  # a separate unscale for one of the two
                scaler.step(optimizer0)
                scaler.step(optimizer1)
                scaler.update()
            else:
                loss0.backward(retain_graph=True)
                loss1.backward()
                optimizer0.step()
                if (not scaler.is_enabled()) or (i != skip_iter):
                    optimizer1.step()

    run(control0, control1, opt_control0, opt_control1, False)
    run(scaling0, scaling1, opt_scaling0, opt_scaling1, True)
    expected = (
        128.0 * scaler.get_growth_factor() ** 3 * scaler.get_backoff_factor() if enabled else 1.0
    )
    assert scaler.get_scale() == expected
    for c, s in zip(
        chain(control0.parameters(), control1.parameters()),
        chain(scaling0.parameters(), scaling1.parameters()),
        strict=True,
    ):
        assert_close(c, s, rtol=1e-5, atol=1e-7)


# -- the optimizer protocol ------------------------------------------------------------------


@scaler_classes
def test_grad_scaler_pass_itself(scaler_cls: type[torch.amp.GradScaler]) -> None:
    seen: dict[str, Any] = {}

    class _PlaceHolderOptimizer(torch.optim.Optimizer):
        def __init__(self, params: Any) -> None:
            super().__init__(params, {})
            self._step_supports_amp_scaling = True

    class Optimizer1(_PlaceHolderOptimizer):
        def step(self, closure: Any = None, *, grad_scaler: Any = None) -> None:  # type: ignore[override]
            seen["1"] = (
                isinstance(grad_scaler, torch.amp.GradScaler),
                hasattr(self, "grad_scale"),
                hasattr(self, "found_inf"),
            )

    class Optimizer2(_PlaceHolderOptimizer):
        def step(self, closure: Any = None) -> None:  # type: ignore[override]
            seen["2"] = (
                isinstance(self.grad_scale, torch.Tensor),  # type: ignore[attr-defined]
                isinstance(self.found_inf, torch.Tensor),  # type: ignore[attr-defined]
            )

    x = torch.randn(4, 4)
    m = torch.nn.Linear(4, 1)
    o1, o2 = Optimizer1(m.parameters()), Optimizer2(m.parameters())
    scaler = scaler_cls(DEVICE, init_scale=2.0)
    with torch.autocast(DEVICE, dtype=torch.float16):
        loss = m(x).mean()
    scaler.scale(loss).backward()
    with pytest.warns(FutureWarning):
        scaler.step(o1)
    scaler.step(o2)
    scaler.update()
    assert seen == {"1": (True, False, False), "2": (True, True)}
