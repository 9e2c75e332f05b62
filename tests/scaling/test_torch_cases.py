"""PyTorch's own grad-scaler test cases, run on torch.amp.GradScaler and mixprec's by substitution.

The cases are those of PyTorch's ``test/test_torch.py`` (``TestTorchDeviceType``, the
``test_grad_scaling_*`` family and its neighbours) that apply to a CPU, rewritten for pytest:
every case takes the scaler class as a parameter and must pass for both. The reference in
each is the one upstream uses: an unscaled fp32 control model, a non-fused control optimizer,
or torch's own kernels. Left out: the tests of the deprecated ``torch.cuda.amp`` /
``torch.cpu.amp`` aliases, the multi-GPU cases, and ``test_grad_scaling_device_as_key`` (it
checks that ``torch.device`` objects hash alike and exercises no scaler).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.testing import assert_close
from torch_scaling_cases import (
    DEVICE,
    Run,
    make_case,
    run_scaling_case,
    scaler_classes,
)

from mixprec.scaling import ScaleState, dynamic_update
from mixprec.scaling.rules import DynamicScaling

# -- test_grad_scaling_scale, _state_dict, _update_scale, _unscale, _unscale_sparse -----------


@scaler_classes
def test_grad_scaling_scale(scaler_cls: type[torch.amp.GradScaler]) -> None:
    scaler = scaler_cls(DEVICE, init_scale=2.0)
    t0 = torch.full((1,), 4.0, dtype=torch.float32)
    t1 = torch.full((1,), 4.0, dtype=torch.float32)
    outputs = (t1.clone(), (t0.clone(), t1.clone()), [t0.clone(), (t1.clone(), t0.clone())])
    outputs = scaler.scale(outputs)
    assert isinstance(outputs, tuple) and isinstance(outputs[2], list)
    flat = [outputs[0], outputs[1][0], outputs[1][1], outputs[2][0], *outputs[2][1]]
    assert all(t.item() == 8.0 for t in flat)
    assert scaler._scale is not None and scaler._scale.device == t1.device


@scaler_classes
@pytest.mark.parametrize("lazy_init_scale", [True, False])
def test_grad_scaling_state_dict(
    scaler_cls: type[torch.amp.GradScaler], lazy_init_scale: bool
) -> None:
    s0 = scaler_cls(
        DEVICE, init_scale=3.0, growth_factor=4.0, backoff_factor=0.5, growth_interval=2
    )
    s1 = scaler_cls(
        DEVICE, init_scale=6.0, growth_factor=7.0, backoff_factor=0.8, growth_interval=1
    )
    s1._init_growth_tracker = 7  # a value for load_state_dict to overwrite
    if lazy_init_scale:
        s1.scale(torch.full((1,), 4.0, dtype=torch.float32))
        assert isinstance(s1._scale, torch.FloatTensor)
    s1.load_state_dict(s0.state_dict())
    assert s1.get_scale() == 3.0
    assert s1.get_growth_factor() == 4.0
    assert s1.get_backoff_factor() == 0.5
    assert s1.get_growth_interval() == 2
    assert s1._init_growth_tracker == 0


def _torch_update_(scale, tracker, found_inf, growth, backoff, interval) -> None:
    torch._amp_update_scale_(scale, tracker, found_inf, growth, backoff, interval)


def _mixprec_update_(scale, tracker, found_inf, growth, backoff, interval) -> None:
    rule = DynamicScaling(growth_factor=growth, backoff_factor=backoff, growth_interval=interval)
    left = torch.ones((), dtype=torch.int32)
    new = dynamic_update(ScaleState(scale, tracker, left), found_inf, rule)
    scale.copy_(new.scale)
    tracker.copy_(new.growth_tracker)


@pytest.mark.parametrize("update_", [_torch_update_, _mixprec_update_], ids=["torch", "mixprec"])
def test_grad_scaling_update_scale(update_: Callable[..., None]) -> None:
    """Upstream drives torch's kernel; mixprec's rule on tensors is its substitute."""
    growth, backoff, interval = 2.0, 0.25, 2
    scale = torch.full((1,), 4.0, dtype=torch.float32)
    tracker = torch.full((1,), 0.0, dtype=torch.int32)
    found_inf = torch.full((1,), 0.0, dtype=torch.float32)
    update_(scale, tracker, found_inf, growth, backoff, interval)  # two clean iterations
    assert (tracker.item(), scale.item()) == (1, 4.0)
    update_(scale, tracker, found_inf, growth, backoff, interval)
    assert (tracker.item(), scale.item()) == (0, 8.0)
    found_inf.fill_(1.0)  # a skipped iteration
    update_(scale, tracker, found_inf, growth, backoff, interval)
    assert (tracker.item(), scale.item()) == (0, 2.0)


def _perfect_storm(g: torch.Tensor, inject_inf: int) -> list[torch.Tensor]:
    """Gradients of mixed dtypes and layouts; an inf in entry ``inject_inf`` (if >= 0)."""
    grads = [g.clone(), g.clone()[:, :5], g.to(torch.float16), g.to(torch.float16)]
    if inject_inf >= 0:
        grads[inject_inf][2, 2] = float("inf")
    return grads


@scaler_classes
def test_grad_scaling_unscale(scaler_cls: type[torch.amp.GradScaler]) -> None:
    """The scaler groups gradients by device and dtype and finds an inf in any of them."""
    g = torch.full((20, 20), 4.0)
    inv_scale = torch.full((1,), 0.25)
    scaler = scaler_cls(DEVICE)
    params = [torch.empty_like(t) for t in _perfect_storm(g, -1)]
    opt = torch.optim.SGD(params, lr=1.0)
    for inject_inf in range(-1, len(params)):
        found_inf = torch.full((1,), 0.0)
        grads = _perfect_storm(g, inject_inf)
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad
        per_device = scaler._unscale_grads_(opt, inv_scale, found_inf, True)
        total = sum(v.item() for v in per_device.values())
        if inject_inf < 0:
            assert total == 0
            for grad in grads:
                assert_close(grad, torch.ones_like(grad), rtol=1e-5, atol=1e-7)
        else:
            assert total == 1


@scaler_classes
def test_grad_scaling_unscale_public(scaler_cls: type[torch.amp.GradScaler]) -> None:
    """The same storm through the public unscale_ (fp32 gradients only: fp16 is refused)."""
    g = torch.full((20, 20), 4.0)
    for inject_inf in (-1, 0, 1):
        params = [torch.empty_like(g), torch.empty_like(g)[:, :5]]
        opt = torch.optim.SGD(params, lr=1.0)
        scaler = scaler_cls(DEVICE, init_scale=4.0)
        scaler.scale(torch.ones(()))
        grads = _perfect_storm(g, inject_inf)[:2]
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad
        scaler.unscale_(opt)
        total = sum(v.item() for v in scaler._found_inf_per_device(opt).values())
        assert total == (0 if inject_inf < 0 else 1)
        if inject_inf < 0:
            for grad in grads:
                assert_close(grad, torch.ones_like(grad), rtol=1e-5, atol=1e-7)


@scaler_classes
def test_grad_scaling_unscale_sparse(scaler_cls: type[torch.amp.GradScaler]) -> None:
    scaler = scaler_cls(DEVICE)
    inv_scale = torch.full((1,), 0.25)
    found_inf = torch.empty((1,))
    cur = found_inf.device
    i = torch.tensor([[0, 1, 1], [2, 0, 2]], dtype=torch.int64)
    v = torch.tensor([16.0, 32.0, 64.0])
    s = torch.sparse_coo_tensor(i, v, torch.Size([2, 3]), check_invariants=True)

    p = s.clone()
    opt = torch.optim.SGD([p], lr=1.0)
    p.grad = s.clone()
    found_inf.zero_()
    found = scaler._unscale_grads_(opt, inv_scale, found_inf, False)[cur]
    assert found.item() == 0.0
    assert torch.equal(p.grad.to_dense(), (s / 4).to_dense())
    for bad in (float("inf"), float("nan")):
        p.grad = torch.sparse_coo_tensor(
            i, torch.tensor([16.0, 32.0, bad]), torch.Size([2, 3]), check_invariants=True
        )
        found_inf.zero_()
        assert scaler._unscale_grads_(opt, inv_scale, found_inf, False)[cur].item() == 1.0

    p = s.clone().half()
    opt = torch.optim.SGD([p], lr=1.0)
    p.grad = s.clone().half()
    found_inf.zero_()
    assert scaler._unscale_grads_(opt, inv_scale, found_inf, True)[cur].item() == 0.0
    assert torch.equal(p.grad.to_dense(), (s.half() / 4).to_dense())
    # Duplicate indices: uncoalesced the values fit fp16, coalesced 64000 + 64000 overflows.
    i = torch.tensor([[0, 1, 0], [2, 0, 2]], dtype=torch.int64)
    v = torch.tensor([64000.0, 32.0, 64000.0])
    p.grad = torch.sparse_coo_tensor(
        i, v, torch.Size([2, 3]), dtype=torch.float16, check_invariants=True
    )
    found_inf.zero_()
    assert scaler._unscale_grads_(opt, inv_scale, found_inf, True)[cur].item() == 1.0


@scaler_classes
def test_grad_scaling_unscale_sparse_public(scaler_cls: type[torch.amp.GradScaler]) -> None:
    """Sparse fp32 gradients through the public unscale_: divided, and inf/NaN found."""
    i = torch.tensor([[0, 1, 1], [2, 0, 2]], dtype=torch.int64)
    for last, expect_inf in ((64.0, 0.0), (float("inf"), 1.0), (float("nan"), 1.0)):
        v = torch.tensor([16.0, 32.0, last])
        s = torch.sparse_coo_tensor(i, v, torch.Size([2, 3]), check_invariants=True)
        p = s.clone()
        opt = torch.optim.SGD([p], lr=1.0)
        scaler = scaler_cls(DEVICE, init_scale=4.0)
        scaler.scale(torch.ones(()))
        p.grad = s.clone()
        scaler.unscale_(opt)
        assert sum(v.item() for v in scaler._found_inf_per_device(opt).values()) == expect_inf
        if not expect_inf:
            assert torch.equal(p.grad.to_dense(), (s / 4).to_dense())


# -- autocast, fused optimizers ---------------------------------------------------------------


def _autocast_run(try_pickle: bool) -> Run:
    def run(data, model, optimizer, scaler, loss_fn, skip_iter, try_scaling_api):
        for i, (inputs, target) in enumerate(data):
            optimizer.zero_grad()
            with torch.autocast(DEVICE, dtype=torch.float16, enabled=try_scaling_api):
                loss = loss_fn(model(inputs), target)
            if try_scaling_api:
                scaler.scale(loss).backward()
                if i == skip_iter and scaler.is_enabled():
                    with torch.no_grad():
                        model[1].weight.grad.fill_(float("inf"))
                scaler.step(optimizer)
                scaler.update()
                if try_pickle:
                    scaler = pickle.loads(pickle.dumps(scaler))
            else:
                loss.backward()
                if (not scaler.is_enabled()) or (i != skip_iter):
                    optimizer.step()
        return scaler

    return run


@scaler_classes
@pytest.mark.parametrize("try_pickle", [False, True], ids=["plain", "pickled"])
@pytest.mark.parametrize(
    "optimizer_kwargs",
    [{}, {"foreach": True}, {"fused": True}],
    ids=["for-loop", "foreach", "fused"],
)
def test_grad_scaling_autocast_sgd(
    scaler_cls: type[torch.amp.GradScaler], try_pickle: bool, optimizer_kwargs: dict[str, Any]
) -> None:
    """Scaling + fp16 autocast against fp32 without either (atol 1e-3: fp16 vs fp32)."""
    run_scaling_case(
        scaler_cls,
        _autocast_run(try_pickle),
        unskipped=3,
        skipped=1,
        atol=1e-3,
        optimizer_ctor=torch.optim.SGD,
        optimizer_kwargs=optimizer_kwargs,
    )


def _autocast_control_run(data, model, optimizer, scaler, loss_fn, skip_iter, try_scaling_api):
    for i, (inputs, target) in enumerate(data):
        optimizer.zero_grad()
        with torch.autocast(DEVICE, dtype=torch.float16):  # the control runs fp16 too
            loss = loss_fn(model(inputs), target)
        if try_scaling_api:
            scaler.scale(loss).backward()
            if i == skip_iter and scaler.is_enabled():
                with torch.no_grad():
                    model[1].weight.grad.fill_(float("inf"))
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if (not scaler.is_enabled()) or (i != skip_iter):
                optimizer.step()


@scaler_classes
@pytest.mark.parametrize("optimizer_ctor", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize(
    "optimizer_kwargs",
    [{}, {"foreach": True}, {"fused": True}],
    ids=["for-loop", "foreach", "fused"],
)
def test_grad_scaling_autocast_adam(
    scaler_cls: type[torch.amp.GradScaler],
    optimizer_ctor: Callable[..., torch.optim.Optimizer],
    optimizer_kwargs: dict[str, Any],
) -> None:
    """Adam and AdamW under fp16 autocast, against an fp16-autocast control without scaling.

    Upstream runs these against the fp32 control and expects them to fail (Adam amplifies the
    fp16-vs-fp32 difference past any tolerance); against a control that computes in fp16 as
    well, what remains is the scaler's own work, which power-of-two scales make exact.
    """
    run_scaling_case(
        scaler_cls,
        _autocast_control_run,
        unskipped=3,
        skipped=1,
        optimizer_ctor=optimizer_ctor,
        optimizer_kwargs=optimizer_kwargs,
    )


@scaler_classes
@pytest.mark.parametrize("optimizer_ctor", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("separate_unscale", [False, True])
def test_grad_scaling_autocast_fused_optimizers(
    scaler_cls: type[torch.amp.GradScaler],
    optimizer_ctor: Callable[..., torch.optim.Optimizer],
    amsgrad: bool,
    separate_unscale: bool,
) -> None:
    """A fused optimizer (unscaling in its kernel) against the non-fused one, one scaler."""
    torch.manual_seed(0)
    kwargs = {"fused": True, "amsgrad": amsgrad}
    control, scaling, _, opt_scaling, data, loss_fn, _ = make_case(optimizer_ctor, kwargs)
    opt_control = optimizer_ctor(control.parameters(), lr=1.0, **(kwargs | {"fused": False}))
    scaler = scaler_cls(DEVICE, init_scale=128.0)
    for inputs, target in data:
        opt_control.zero_grad()
        with torch.autocast(DEVICE, dtype=torch.float16):
            loss_control = loss_fn(control(inputs), target)
        scaler.scale(loss_control).backward()
        scaler.step(opt_control)
        scaler.update()

        opt_scaling.zero_grad()
        with torch.autocast(DEVICE, dtype=torch.float16):
            loss_scaling = loss_fn(scaling(inputs), target)
        scaler.scale(loss_scaling).backward()
        if separate_unscale:
            scaler.unscale_(opt_scaling)
        scaler.step(opt_scaling)
        scaler.update()

        assert_close(loss_control, loss_scaling)
        for p_control, p_scaling in zip(control.parameters(), scaling.parameters(), strict=True):
            assert_close(p_control.grad, p_scaling.grad)
            assert_close(p_control, p_scaling)
            state_control, state_scaling = (
                opt_control.state[p_control],
                opt_scaling.state[p_scaling],
            )
            for key in state_control:
                actual = state_scaling[key]
                if key == "step":
                    actual = actual.squeeze()
                assert_close(state_control[key], actual, msg=key)


@scaler_classes
@pytest.mark.parametrize("optimizer_ctor", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize(
    "optimizer_kwargs",
    [{"foreach": False, "fused": False}, {"foreach": True, "fused": False}, {"fused": True}],
    ids=["for-loop", "foreach", "fused"],
)
def test_params_invalidated_with_grads_invalidated_between_unscale_and_step(
    scaler_cls: type[torch.amp.GradScaler],
    optimizer_ctor: Callable[..., torch.optim.Optimizer],
    optimizer_kwargs: dict[str, Any],
) -> None:
    """Gradients broken after unscale_ are stepped on: the check ran before they broke."""
    torch.manual_seed(0)
    model, _, optimizer, _, data, loss_fn, _ = make_case(optimizer_ctor, optimizer_kwargs)
    scaler = scaler_cls(DEVICE, init_scale=128.0)
    for inputs, target in data:
        optimizer.zero_grad()
        with torch.autocast(DEVICE, dtype=torch.float16):
            loss = loss_fn(model(inputs), target)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        for j, param in enumerate(model.parameters()):
            param.grad.copy_(torch.inf if j % 2 else torch.nan)
        scaler.step(optimizer)
        scaler.update()
    assert all((p.isnan().any() or p.isinf().any()) for p in model.parameters())


@scaler_classes
def test_grad_scale_will_not_overflow(scaler_cls: type[torch.amp.GradScaler]) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    optimizer = torch.optim.Adam(model.parameters())
    scaler = scaler_cls(DEVICE, growth_interval=1, growth_factor=2**4, init_scale=1e38)
    optimizer.zero_grad()
    x = torch.randn(1, 5)
    y = 1e-30 * torch.randn(1, 1)
    scaler.scale(((model(x) - y) ** 2).mean()).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler._scale is not None
    assert scaler._scale != float("inf") and scaler._scale != float("nan")
