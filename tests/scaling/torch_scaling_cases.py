"""The shared set-up of PyTorch's grad-scaler test cases (upstream's ``_create_scaling_case``
and ``_run_scaling_case``), for ``test_torch_cases.py`` and ``test_torch_cases_training.py``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from mixprec.scaling import GradScaler

DEVICE = "cpu"
SCALERS: dict[str, type[torch.amp.GradScaler]] = {
    "torch": torch.amp.GradScaler,
    "mixprec": GradScaler,
}
scaler_classes = pytest.mark.parametrize("scaler_cls", list(SCALERS.values()), ids=list(SCALERS))

Data = list[tuple[torch.Tensor, torch.Tensor]]


def make_models_optimizers(
    optimizer_ctor: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
    optimizer_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer, torch.optim.Optimizer]:
    """A control model/optimizer and an identical one that will train through the scaler."""
    control = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)).to(DEVICE)
    scaling = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)).to(DEVICE)
    with torch.no_grad():
        for c, s in zip(control.parameters(), scaling.parameters(), strict=True):
            s.copy_(c)
    kwargs = {"lr": 1.0, **(optimizer_kwargs or {})}
    return (
        control,
        scaling,
        optimizer_ctor(control.parameters(), **kwargs),
        optimizer_ctor(scaling.parameters(), **kwargs),
    )


def make_case(
    optimizer_ctor: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
    optimizer_kwargs: dict[str, Any] | None = None,
) -> tuple[Any, ...]:
    data: Data = [(torch.randn(8, 8), torch.randn(8, 8)) for _ in range(4)]
    loss_fn = torch.nn.MSELoss()
    skip_iter = 2
    return (*make_models_optimizers(optimizer_ctor, optimizer_kwargs), data, loss_fn, skip_iter)


Run = Callable[..., Any]


def run_scaling_case(
    scaler_cls: type[torch.amp.GradScaler],
    run: Run,
    unskipped: int,
    skipped: int,
    atol: float = 1e-7,
    optimizer_ctor: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
    optimizer_kwargs: dict[str, Any] | None = None,
) -> None:
    """Train control and scaled twins with ``run``; both enabled and disabled scaling."""
    for enabled in (True, False):
        torch.manual_seed(0)
        control, scaling, opt_control, opt_scaling, data, loss_fn, skip_iter = make_case(
            optimizer_ctor, optimizer_kwargs
        )
        # A modest initial scale and growth every step magnify any growth-handling error.
        scaler = scaler_cls(
            DEVICE, init_scale=128.0, growth_factor=2.0, enabled=enabled, growth_interval=1
        )
        run(data, control, opt_control, scaler, loss_fn, skip_iter, False)
        returned = run(data, scaling, opt_scaling, scaler, loss_fn, skip_iter, True)
        scaler = returned if returned else scaler  # run() may hand back another instance
        if enabled:
            net_growth = scaler.get_growth_factor() ** unskipped if unskipped > 0 else 1.0
            net_backoff = scaler.get_backoff_factor() ** skipped if skipped > 0 else 1.0
            assert scaler.get_scale() == 128.0 * net_growth * net_backoff
        else:
            assert scaler.get_scale() == 1.0
        for c, s in zip(control.parameters(), scaling.parameters(), strict=True):
            assert_close(c.grad, s.grad, atol=atol, rtol=1e-5)
            c_state, s_state = opt_control.state[c], opt_scaling.state[s]
            for key in c_state:
                assert_close(c_state[key], s_state[key], atol=atol, rtol=1e-5, msg=key)
            assert_close(c, s, atol=atol, rtol=1e-5)
