"""Twin runs: mixprec.GradScaler against torch.amp.GradScaler on the same model, data and infs.

Both scalers see bit-identical gradients (identical models, identical scales), so every
parameter, optimizer state, scale and growth tracker must match exactly, step for step.
"""

from __future__ import annotations

import copy
import io
import random
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import torch

from mixprec.scaling import GradScaler

INF_KINDS = ("inf", "-inf", "nan")


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 12), torch.nn.Linear(12, 3)
    )


def make_data(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 6, generator=gen), torch.randn(5, 3, generator=gen)) for _ in range(n)]


def random_plan(steps: int, seed: int, p: float = 0.3, micro: int = 1, n_params: int = 6):
    """iteration -> list of (micro-batch, kind, parameter index) injections.

    The first iteration never overflows: torch's fused SGD (torch 2.13, CPU) leaves its momentum
    buffer uninitialised when its very first step is skipped, whichever scaler drives it.
    """
    rng = random.Random(seed)
    plan: dict[int, list[tuple[int, str, int]]] = {}
    for it in range(1, steps):
        if rng.random() < p:
            plan[it] = [(rng.randrange(micro), rng.choice(INF_KINDS), rng.randrange(n_params))]
    return plan


def set_grad_entry(param: torch.Tensor, value: float) -> None:
    """Overwrite the first entry of ``param``'s gradient: an injected overflow."""
    grad = param.grad
    assert grad is not None
    grad.view(-1)[0] = value


OPTIMIZERS: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd-foreach": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=True),
    "sgd-fused": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
    "adam-single-tensor": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False),
}


def run(
    scaler,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    plan: dict[int, list[tuple[int, str, int]]],
    steps: int,
    *,
    clip: float | None = None,
    micro: int = 1,
    folded_clip: bool = False,
) -> dict[str, list]:
    """Train ``steps`` iterations; return the per-iteration trace."""
    data = make_data(steps * micro)
    params = list(model.parameters())
    trace: dict[str, list] = {"scale": [], "tracker": [], "norms": [], "changed": []}
    for it in range(steps):
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        for m in range(micro):
            x, y = data[it * micro + m]
            loss = torch.nn.functional.mse_loss(model(x), y) / micro
            scaler.scale(loss).backward()
            for target, kind, which in plan.get(it, []):
                if target == m:
                    set_grad_entry(params[which], float(kind))
        before = [
            [p.detach().clone() for g in o.param_groups for p in g["params"]] for o in optimizers
        ]
        for opt in optimizers:
            if clip is not None:
                opt_params = [p for g in opt.param_groups for p in g["params"]]
                if folded_clip:
                    norm = scaler.clip_grad_norm_(opt, clip)
                else:
                    scaler.unscale_(opt)
                    norm = torch.nn.utils.clip_grad_norm_(opt_params, clip)
                trace["norms"].append(norm)
            scaler.step(opt)
        scaler.update()
        trace["changed"].append(
            [
                any(
                    not torch.equal(a, p)
                    for a, p in zip(
                        b, (p for g in o.param_groups for p in g["params"]), strict=True
                    )
                )
                for b, o in zip(before, optimizers, strict=True)
            ]
        )
        trace["scale"].append(scaler.get_scale())
        trace["tracker"].append(
            scaler._get_growth_tracker()
            if isinstance(scaler, torch.amp.GradScaler)
            else scaler.state_dict()["_growth_tracker"]
        )
    return trace


def assert_same_training(a: torch.nn.Module, b: torch.nn.Module, opts_a, opts_b, exact=True):
    same = torch.equal if exact else lambda x, y: torch.testing.assert_close(x, y) is None
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert same(pa, pb)
    for oa, ob in zip(opts_a, opts_b, strict=True):
        sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
        assert sa.keys() == sb.keys()
        for key in sa:
            for name in sa[key]:
                assert same(torch.as_tensor(sa[key][name]), torch.as_tensor(sb[key][name])), name


def twin(opt_name: str, plan, steps: int, **kwargs):
    model_t = make_model()
    model_m = copy.deepcopy(model_t)
    opt_t = [OPTIMIZERS[opt_name](list(model_t.parameters()))]
    opt_m = [OPTIMIZERS[opt_name](list(model_m.parameters()))]
    growth: dict[str, Any] = dict(init_scale=2.0**10, growth_interval=3)
    trace_t = run(torch.amp.GradScaler("cpu", **growth), model_t, opt_t, plan, steps, **kwargs)
    scaler_m = GradScaler("cpu", **growth)
    folded = kwargs.pop("folded_clip", True)
    trace_m = run(scaler_m, model_m, opt_m, plan, steps, folded_clip=folded, **kwargs)
    return model_t, model_m, opt_t, opt_m, trace_t, trace_m, scaler_m


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("mode", ["plain", "clip", "accumulate"])
def test_matches_torch_scaler_with_injected_infs(opt_name: str, mode: str) -> None:
    steps = 24
    micro = 2 if mode == "accumulate" else 1
    plan = random_plan(steps, seed=zlib.crc32(f"{opt_name}/{mode}".encode()), micro=micro)
    kwargs = {"clip": 0.5} if mode == "clip" else {"micro": micro}
    model_t, model_m, opt_t, opt_m, tt, tm, scaler = twin(opt_name, plan, steps, **kwargs)

    assert tm["scale"] == tt["scale"]
    assert tm["tracker"] == tt["tracker"]
    assert tm["changed"] == tt["changed"]
    # A fused optimizer divides by scale / clip_coef instead of seeing clipped gradients: the
    # same arithmetic with a different rounding order, so equal to float32 accuracy only.
    exact = not (mode == "clip" and opt_name.endswith("fused"))
    assert_same_training(model_t, model_m, opt_t, opt_m, exact=exact)
    if mode == "clip":
        # The folded clip returns the true norm, bit-identical to unscale_ + clip_grad_norm_.
        for nt, nm in zip(tt["norms"], tm["norms"], strict=True):
            if exact:
                assert torch.equal(nt, nm) or (nt.isnan() and nm.isnan())
            else:
                torch.testing.assert_close(nt, nm, equal_nan=True)
    # The plan says which iterations overflow; the scaler must report exactly those.
    expected_skips = [it in plan for it in range(steps)]
    assert [not c[0] for c in tm["changed"]] == expected_skips
    assert scaler.skipped_steps == sum(expected_skips)
    assert scaler.total_steps == steps
    assert 0 < sum(expected_skips) < steps  # the plan exercises both branches


def test_two_optimizers_only_one_overflows() -> None:
    steps = 12
    # Parameters 0-3 belong to the first optimizer, 4-5 to the second; only the second overflows.
    plan = {it: [(0, "inf", 4)] for it in (2, 3, 7)}
    models, opts, traces, scalers = [], [], [], []
    for scaler in (
        torch.amp.GradScaler("cpu", growth_interval=2),
        GradScaler("cpu", growth_interval=2),
    ):
        model = make_model()
        params = list(model.parameters())
        pair = [
            torch.optim.SGD(params[:4], lr=0.05, momentum=0.9),
            torch.optim.AdamW(params[4:], lr=1e-2),
        ]
        traces.append(run(scaler, model, pair, plan, steps))
        models.append(model)
        opts.append(pair)
        scalers.append(scaler)
    tt, tm = traces
    assert tm["scale"] == tt["scale"] and tm["tracker"] == tt["tracker"]
    assert tm["changed"] == tt["changed"]
    assert_same_training(models[0], models[1], opts[0], opts[1])
    # The first optimizer always stepped, the second skipped exactly the planned iterations.
    assert all(changed[0] for changed in tm["changed"])
    assert [not changed[1] for changed in tm["changed"]] == [it in plan for it in range(steps)]
    scaler, (first, second) = scalers[1], opts[1]
    assert isinstance(scaler, GradScaler)
    assert not scaler.step_skipped(first)
    assert scaler.step_skipped(second) is (steps - 1 in plan)
    assert scaler.skipped_steps == len(plan)


def test_step_skipped_per_optimizer_and_iteration() -> None:
    model = make_model()
    params = list(model.parameters())
    first = torch.optim.SGD(params[:4], lr=0.1)
    second = torch.optim.SGD(params[4:], lr=0.1)
    scaler = GradScaler("cpu")
    x, y = make_data(1)[0]
    for overflow in (False, True, False):
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if overflow:
            set_grad_entry(params[5], float("nan"))
        scaler.step(first)
        scaler.step(second)
        assert scaler.step_skipped(second) is overflow  # before update()
        assert scaler.step_skipped() is overflow
        scaler.update()
        assert scaler.step_skipped(first) is False
        assert scaler.step_skipped(second) is overflow
        assert scaler.step_skipped() is overflow
        first.zero_grad()
        second.zero_grad()
    assert (scaler.total_steps, scaler.skipped_steps) == (3, 1)


def test_lr_scheduler_steps_only_with_the_optimizer() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scaler = GradScaler("cpu")
    plan = random_plan(10, seed=3, p=0.4)
    x, y = make_data(1)[0]
    for it in range(10):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if it in plan:
            set_grad_entry(next(model.parameters()), float("inf"))
        scaler.step(opt)
        scaler.update()
        if not scaler.step_skipped(opt):
            sched.step()
    taken = 10 - len(plan)
    assert opt.param_groups[0]["lr"] == 0.5**taken
    assert scaler.skipped_steps == len(plan)


@pytest.mark.parametrize("opt_name", ["sgd-foreach", "adamw-fused"])
def test_resume_is_bit_exact(opt_name: str) -> None:
    steps, k = 20, 9
    plan = random_plan(steps, seed=11, p=0.35)
    options = dict(
        init_scale=2.0**12, growth_interval=2, hysteresis=2, min_scale=1.0, max_scale=2.0**14
    )

    model = make_model()
    opt = OPTIMIZERS[opt_name](list(model.parameters()))
    whole = GradScaler("cpu", **options)
    run(whole, model, [opt], plan, steps)

    model_a = make_model()
    opt_a = OPTIMIZERS[opt_name](list(model_a.parameters()))
    first = GradScaler("cpu", **options)
    run(first, model_a, [opt_a], plan, k)
    buffer = io.BytesIO()
    torch.save(
        {"model": model_a.state_dict(), "opt": opt_a.state_dict(), "scaler": first.state_dict()},
        buffer,
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    model_b = make_model(seed=5)  # different init: everything must come from the checkpoint
    model_b.load_state_dict(checkpoint["model"])
    opt_b = OPTIMIZERS[opt_name](list(model_b.parameters()))
    opt_b.load_state_dict(checkpoint["opt"])
    resumed = GradScaler("cpu")  # default settings: the checkpoint carries them
    resumed.load_state_dict(checkpoint["scaler"])
    # Continue with the same data and injections as the uninterrupted run.
    later = {it - k: v for it, v in plan.items() if it >= k}
    data_offset_run(resumed, model_b, opt_b, later, steps, k)

    assert_same_training(model, model_b, [opt], [opt_b])
    assert resumed.state_dict() == whole.state_dict()
    assert whole.skipped_steps == len(plan)


def data_offset_run(scaler, model, opt, plan, steps: int, start: int) -> None:
    """Iterations ``start..steps-1`` of ``run`` (same data)."""
    data = make_data(steps)[start:]
    params = list(model.parameters())
    for it, (x, y) in enumerate(data):
        opt.zero_grad(set_to_none=True)
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        for _, kind, which in plan.get(it, []):
            set_grad_entry(params[which], float(kind))
        scaler.step(opt)
        scaler.update()
