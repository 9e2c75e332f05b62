"""GradScaler's protocol: call order as torch, the off modes, skips, clipping, fused steps."""

from __future__ import annotations

import copy
import math
import pickle
from typing import Any

import pytest
import torch

from mixprec.scaling import GradScaler, LossScaleAtMinimumError


def set_grad_entry(param: torch.Tensor, value: float) -> None:
    """Overwrite the first entry of ``param``'s gradient: an injected overflow."""
    grad = param.grad
    assert grad is not None
    grad.view(-1)[0] = value


def setup(seed: int = 0, dtype: torch.dtype = torch.float32, **opt_kwargs):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(
        dtype
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, **opt_kwargs)
    x = torch.randn(3, 4, dtype=dtype)
    return model, opt, x


def backward(scaler, model, x, inject: str | None = None) -> None:
    scaler.scale(model(x).float().pow(2).mean()).backward()
    if inject is not None:
        set_grad_entry(next(model.parameters()), float(inject))


# -- call order: the same misuse fails in torch and here ------------------------------------


def misuse_unscale_twice(scaler, model, opt, x):
    backward(scaler, model, x)
    scaler.unscale_(opt)
    scaler.unscale_(opt)


def misuse_unscale_after_step(scaler, model, opt, x):
    backward(scaler, model, x)
    scaler.step(opt)
    scaler.unscale_(opt)


def misuse_step_twice(scaler, model, opt, x):
    backward(scaler, model, x)
    scaler.step(opt)
    scaler.step(opt)


def misuse_step_without_scale(scaler, model, opt, x):
    model(x).sum().backward()
    scaler.step(opt)


def misuse_update_without_check(scaler, model, opt, x):
    backward(scaler, model, x)
    scaler.update()


def misuse_update_twice(scaler, model, opt, x):
    backward(scaler, model, x)
    scaler.step(opt)
    scaler.update()
    scaler.update()


def misuse_closure(scaler, model, opt, x):
    backward(scaler, model, x)
    scaler.step(opt, closure=lambda: model(x).sum())


MISUSES = {
    misuse_unscale_twice: r"unscale_\(\) was called twice for this optimizer",
    misuse_unscale_after_step: r"unscale_\(\) was called after step\(\)",
    misuse_step_twice: r"step\(\) was called twice for this optimizer in one iteration",
    misuse_step_without_scale: r"step\(\) was called before scale\(\)",
    misuse_update_without_check: r"update\(\) found no inf/NaN checks since the last update\(\)",
    misuse_update_twice: r"update\(\) found no inf/NaN checks .* update\(\) only once",
    misuse_closure: r"closures are not supported",
}


@pytest.mark.parametrize("misuse", list(MISUSES), ids=lambda f: f.__name__)
def test_call_order_errors_match_torch(misuse) -> None:
    model, opt, x = setup()
    with pytest.raises((RuntimeError, AssertionError)):
        misuse(torch.amp.GradScaler("cpu"), model, opt, x)
    model, opt, x = setup()
    with pytest.raises(RuntimeError, match=MISUSES[misuse]):
        misuse(GradScaler("cpu"), model, opt, x)


def test_clip_call_order() -> None:
    model, opt, x = setup()
    scaler = GradScaler("cpu")
    backward(scaler, model, x)
    scaler.clip_grad_norm_(opt, 1.0)
    with pytest.raises(RuntimeError, match=r"unscale_\(\) was called twice"):
        scaler.unscale_(opt)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match=r"clip_grad_norm_\(\) was called after step\(\)"):
        scaler.clip_grad_norm_(opt, 1.0)


# -- the off modes: one loop for fp16, bf16 and fp32 ---------------------------------------


def loop(scaler, model, opt, x, overflow_at=()) -> list[bool]:
    skipped = []
    for it in range(4):
        opt.zero_grad()
        backward(scaler, model, x, inject="inf" if it in overflow_at else None)
        scaler.clip_grad_norm_(opt, 10.0)
        scaler.step(opt)
        scaler.update()
        skipped.append(scaler.step_skipped(opt))
    return skipped


def test_disabled_scaler_is_plain_training() -> None:
    model, opt, x = setup()
    reference, ref_opt, _ = setup()
    for _ in range(4):
        ref_opt.zero_grad()
        reference(x).float().pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 10.0)
        ref_opt.step()
    scaler = GradScaler("cpu", enabled=False)
    assert loop(scaler, model, opt, x) == [False] * 4
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not scaler.is_enabled() and scaler.get_scale() == 1.0 and scaler.state_dict() == {}
    assert (scaler.total_steps, scaler.skipped_steps) == (0, 0)
    scaler.load_state_dict(GradScaler("cpu").state_dict())  # a no-op, as torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_none_strategy_never_scales_but_skips_nonfinite(dtype: torch.dtype) -> None:
    model, opt, x = setup(dtype=dtype)
    reference, ref_opt, _ = setup(dtype=dtype)
    scaler = GradScaler("cpu", strategy="none")
    loss = model(x).float().pow(2).mean()
    assert scaler.scale(loss) is loss
    plain = GradScaler("cpu", enabled=False)
    assert loop(scaler, model, opt, x, overflow_at=(1,)) == [False, True, False, False]
    # The same loop without a scaler, minus the overflowing iteration, gives the same weights.
    loop(plain, reference, ref_opt, x, overflow_at=())
    ref2, ref2_opt, _ = setup(dtype=dtype)
    for it in range(4):
        ref2_opt.zero_grad()
        if it == 1:
            continue
        backward(plain, ref2, x)
        torch.nn.utils.clip_grad_norm_(ref2.parameters(), 10.0)
        ref2_opt.step()
    for a, b in zip(model.parameters(), ref2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert scaler.get_scale() == 1.0 and scaler.is_enabled()
    assert (scaler.total_steps, scaler.skipped_steps) == (4, 1)


def test_static_strategy_keeps_its_scale() -> None:
    model, opt, x = setup()
    scaler = GradScaler("cpu", init_scale=512.0, growth_interval=1, strategy="static")
    assert loop(scaler, model, opt, x, overflow_at=(0, 2)) == [True, False, True, False]
    assert scaler.get_scale() == 512.0
    scaler_t = torch.amp.GradScaler("cpu", init_scale=512.0)
    assert torch.equal(scaler.scale(torch.ones(2)), scaler_t.scale(torch.ones(2)))


def test_on_min_scale_raise() -> None:
    model, opt, x = setup()
    scaler = GradScaler("cpu", init_scale=2.0, min_scale=1.0, on_min_scale="raise")
    backward(scaler, model, x, inject="nan")
    scaler.step(opt)
    scaler.update()  # 2 -> 1: still allowed
    assert scaler.get_scale() == 1.0
    opt.zero_grad()
    backward(scaler, model, x, inject="nan")
    scaler.step(opt)
    with pytest.raises(
        LossScaleAtMinimumError, match=r"already at its minimum, 1\.0 \(min_scale=1\.0\)"
    ):
        scaler.update()
    assert (scaler.total_steps, scaler.skipped_steps, scaler.get_scale()) == (2, 2, 1.0)
    opt.zero_grad()
    backward(scaler, model, x)  # the next iteration runs normally
    scaler.step(opt)
    scaler.update()
    assert not scaler.step_skipped()
    continuing = GradScaler("cpu", init_scale=1.0, min_scale=1.0)
    backward(continuing, model, x, inject="nan")
    continuing.step(opt)
    at_minimum = r"already at its minimum, 1\.0 .* on_min_scale='raise'"
    with pytest.warns(RuntimeWarning, match=at_minimum):
        continuing.update()
    assert continuing.get_scale() == 1.0 and continuing.step_skipped()


# -- scale(), update(new_scale), getters and setters ----------------------------------------


def test_scale_nested_outputs_like_torch() -> None:
    a, b, c = torch.ones(2), torch.full((3,), 2.0), torch.tensor(3.0)
    outputs: list[Any] = [a, (b, [c])]
    ours = GradScaler("cpu", init_scale=8.0).scale(outputs)
    theirs = torch.amp.GradScaler("cpu", init_scale=8.0).scale(outputs)
    assert type(ours) is list and type(ours[1]) is tuple and type(ours[1][1]) is list
    flat = lambda o: [o[0], o[1][0], o[1][1][0]]  # noqa: E731
    for x, y in zip(flat(ours), flat(theirs), strict=True):
        assert torch.equal(x, y)
    assert [t.tolist() for t in GradScaler("cpu", init_scale=2.0).scale(t for t in (a, b))] == [
        [2.0, 2.0],
        [4.0, 4.0, 4.0],
    ]
    with pytest.raises(
        TypeError,
        match=r"scale\(\) takes a tensor or an iterable of tensors .* got 3\.0 of type float",
    ):
        GradScaler("cpu").scale(3.0)


@pytest.mark.parametrize("new_scale", [100.0, 64, torch.tensor(3.5)])
def test_update_new_scale_like_torch(new_scale) -> None:
    states = []
    for cls in (torch.amp.GradScaler, GradScaler):
        model, opt, x = setup()
        scaler = cls("cpu", growth_interval=1)
        backward(scaler, model, x)
        scaler.step(opt)
        scaler.update(
            new_scale if not isinstance(new_scale, int) or cls is GradScaler else float(new_scale)
        )
        states.append((scaler.get_scale(), scaler.state_dict()["_growth_tracker"]))
    assert states[0] == states[1]


def test_update_new_scale_errors() -> None:
    model, opt, x = setup()
    scaler = GradScaler("cpu")
    backward(scaler, model, x)
    scaler.step(opt)
    with pytest.raises(ValueError, match=r"new_scale must be a finite float > 0 .* got 0\.0"):
        scaler.update(0.0)
    with pytest.raises(
        ValueError, match=r"new_scale must be a float or a 1-element tensor .* shape \(2,\)"
    ):
        scaler.update(torch.ones(2))
    with pytest.raises(TypeError, match=r"new_scale must be a float, got '8' of type str"):
        scaler.update("8")  # type: ignore[arg-type]
    none = GradScaler("cpu", strategy="none")
    backward(none, model, x)
    none.step(opt)
    with pytest.raises(ValueError, match=r"update\(new_scale=8\.0\) with strategy='none'"):
        none.update(8.0)
    bounded = GradScaler("cpu", init_scale=4.0, max_scale=16.0)
    backward(bounded, model, x)
    bounded.step(opt)
    with pytest.raises(ValueError, match=r"new_scale=32\.0 lies outside \[min_scale, max_scale\]"):
        bounded.update(32.0)


def test_getters_and_setters_like_torch() -> None:
    ours, theirs = (
        GradScaler("cpu", 1024.0, 3.0, 0.25, 7),
        torch.amp.GradScaler("cpu", 1024.0, 3.0, 0.25, 7),
    )
    for name in (
        "get_scale",
        "get_growth_factor",
        "get_backoff_factor",
        "get_growth_interval",
        "is_enabled",
    ):
        assert getattr(ours, name)() == getattr(theirs, name)()
    ours.set_growth_factor(4.0)
    ours.set_backoff_factor(0.125)
    ours.set_growth_interval(11)
    assert (ours.get_growth_factor(), ours.get_backoff_factor(), ours.get_growth_interval()) == (
        4.0,
        0.125,
        11,
    )
    with pytest.raises(
        ValueError, match=r"growth_factor must be a finite float > 1\.0, e\.g\. 2\.0, got 1\.0"
    ):
        ours.set_growth_factor(1.0)
    with pytest.raises(
        ValueError, match=r"backoff_factor must be a float in \(0, 1\), e\.g\. 0\.5, got 1\.5"
    ):
        ours.set_backoff_factor(1.5)
    with pytest.raises(
        ValueError, match=r"growth_interval must be an int in \[1, 2\*\*31 - 1\] .* got 0"
    ):
        ours.set_growth_interval(0)
    assert ours.get_growth_factor() == 4.0  # a rejected setting leaves the old one


def test_lowering_growth_interval_grows_at_once() -> None:
    """A deliberate difference from torch, whose tracker would have to wrap around first."""
    model, opt, x = setup()
    scaler = GradScaler("cpu", init_scale=8.0, growth_interval=10)
    for _ in range(5):
        opt.zero_grad()
        backward(scaler, model, x)
        scaler.step(opt)
        scaler.update()
    scaler.set_growth_interval(3)
    opt.zero_grad()
    backward(scaler, model, x)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 16.0 and scaler.state_dict()["_growth_tracker"] == 0


def test_pickle_and_deepcopy_between_iterations() -> None:
    model, opt, x = setup()
    scaler = GradScaler("cpu", init_scale=64.0, growth_interval=2, hysteresis=2)
    loop(scaler, model, opt, x, overflow_at=(1, 2))
    for clone in (copy.deepcopy(scaler), pickle.loads(pickle.dumps(scaler))):
        assert clone.state_dict() == scaler.state_dict()
    backward(scaler, model, x)
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"can only be pickled between iterations"):
        pickle.dumps(scaler)


# -- fp16 gradients ---------------------------------------------------------------------------


def fp16_setup(**opt_kwargs):
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(4, dtype=torch.float16))
    return param, torch.optim.SGD([param], lr=0.1, **opt_kwargs)


def test_fp16_gradients_are_refused_with_the_fix() -> None:
    param, opt = fp16_setup()
    scaler = GradScaler("cpu")
    scaler.scale(param.float().sum()).backward()
    with pytest.raises(
        ValueError,
        match=(
            r"(?s)Attempting to unscale FP16 gradients: 1 parameter.*'SGD'"
            r".*Keep the parameters in fp32.*FP32 master weights"
        ),
    ):
        scaler.step(opt)
    theirs = torch.amp.GradScaler("cpu")
    theirs.scale(param.float().sum())
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        theirs.unscale_(opt)  # the same exception type as torch


def test_fp16_gradients_pass_where_nothing_is_lost() -> None:
    param, opt = fp16_setup()
    none = GradScaler("cpu", strategy="none")  # unscaling by 1 is exact
    none.scale(param.float().sum()).backward()
    none.step(opt)
    none.update()
    param, opt = fp16_setup(fused=True)  # the fused kernel unscales in fp32
    fused = GradScaler("cpu", init_scale=4.0)
    fused.scale(param.float().sum()).backward()
    before = param.detach().clone()
    fused.step(opt)
    fused.update()
    assert torch.equal(param.detach(), before - 0.1)


# -- fused optimizers and clipping ------------------------------------------------------------


def test_fused_step_needs_no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt, x = setup(fused=True)
    scaler = GradScaler("cpu")
    backward(scaler, model, x, inject="inf")

    def no_sync(self):
        raise AssertionError("host synchronisation (Tensor.item) in the fused path")

    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    monkeypatch.setattr(torch.Tensor, "__bool__", no_sync)
    scaler.step(opt)
    scaler.update()
    monkeypatch.undo()
    assert scaler.step_skipped(opt) and scaler.get_scale() == 2.0**15
    opt.zero_grad()
    backward(scaler, model, x)
    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    monkeypatch.setattr(torch.Tensor, "__bool__", no_sync)
    scaler.clip_grad_norm_(opt, 1.0)  # the folded clip, too
    scaler.step(opt)
    scaler.update()
    monkeypatch.undo()
    assert not scaler.step_skipped(opt)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("unscale_first", [False, True])
def test_clip_matches_unscale_then_clip(norm_type: float, unscale_first: bool) -> None:
    grads = []
    norms = []
    for ours in (False, True):
        model, opt, x = setup()
        scaler = GradScaler("cpu") if ours else torch.amp.GradScaler("cpu")
        backward(scaler, model, x)
        if not ours or unscale_first:
            scaler.unscale_(opt)
        if isinstance(scaler, GradScaler):
            norms.append(scaler.clip_grad_norm_(opt, 0.05, norm_type))
        else:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05, norm_type))
        grads.append([p.grad.clone() for p in model.parameters()])
    assert torch.equal(norms[0], norms[1])
    assert norms[1] > 0.05  # clipping happened
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("unscale_first", [False, True])
def test_clipping_twice_is_clipping_to_the_smaller_norm(fused: bool, unscale_first: bool) -> None:
    """clip 1.0 then 0.05 == torch's unscale_ + clip_grad_norm_ twice, whichever the path.

    A fused optimizer's gradients stay scaled after the first (folded) clip; the second clip
    must measure them at the scale they are held at, not as if they were unscaled.
    """
    weights = []
    for ours in (False, True):
        model, opt, x = setup(fused=fused)
        scaler = GradScaler("cpu") if ours else torch.amp.GradScaler("cpu")
        backward(scaler, model, x)
        if isinstance(scaler, GradScaler):
            if unscale_first:
                scaler.unscale_(opt)
            scaler.clip_grad_norm_(opt, 1.0)
            scaler.clip_grad_norm_(opt, 0.05)
        else:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        scaler.step(opt)
        scaler.update()
        weights.append([p.detach().clone() for p in model.parameters()])
    start, _, _ = setup(fused=fused)
    pairs = zip(weights[0], start.parameters(), strict=True)
    assert sum(float((a - b.detach()).abs().sum()) for a, b in pairs) > 0  # the step moved
    for a, b in zip(*weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_clip_flags_overflow_and_disabled_clip_is_torch() -> None:
    model, opt, x = setup()
    scaler = GradScaler("cpu")
    backward(scaler, model, x, inject="nan")
    assert scaler.clip_grad_norm_(opt, 1.0).isnan()
    scaler.step(opt)
    scaler.update()
    assert scaler.step_skipped(opt)
    model, opt, x = setup()
    reference, _, _ = setup()
    model(x).sum().backward()
    reference(x).sum().backward()
    norm = GradScaler("cpu", enabled=False).clip_grad_norm_(opt, 0.1)
    assert torch.equal(norm, torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1))
    with pytest.raises(
        ValueError, match=r"max_norm must be a finite float > 0, e\.g\. 1\.0; got -1\.0"
    ):
        scaler.clip_grad_norm_(opt, -1.0)
    with pytest.raises(ValueError, match=r"norm_type must be a float >= 1 .* got 0\.5"):
        scaler.clip_grad_norm_(opt, 1.0, 0.5)
    with pytest.raises(TypeError, match=r"max_norm must be a float, got '1' of type str"):
        scaler.clip_grad_norm_(opt, "1")  # type: ignore[arg-type]


def test_sparse_gradients_like_torch() -> None:
    weights = []
    for cls in (torch.amp.GradScaler, GradScaler):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(10, 3, sparse=True)
        opt = torch.optim.SGD(emb.parameters(), lr=0.1)
        scaler = cls("cpu", init_scale=2.0**10)
        for it in range(4):
            opt.zero_grad()
            scaler.scale(emb(torch.tensor([1, 2, 2, 7])).pow(2).sum()).backward()
            if it == 2:
                grad = emb.weight.grad
                assert grad is not None
                grad._values()[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        weights.append((emb.weight.detach().clone(), scaler.get_scale()))
    assert torch.equal(weights[0][0], weights[1][0]) and weights[0][1] == weights[1][1] == 512.0


def test_none_strategy_with_a_fused_optimizer() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param], lr=0.1, fused=True)
    reference = torch.nn.Parameter(torch.ones(3))
    ref_opt = torch.optim.AdamW([reference], lr=0.1, fused=True)
    scaler = GradScaler("cpu", strategy="none")
    for it in range(3):
        opt.zero_grad()
        scaler.scale(param.pow(2).sum()).backward()
        if it == 1:
            set_grad_entry(param, float("nan"))
        scaler.step(opt)
        scaler.update()
        assert scaler.step_skipped(opt) is (it == 1)
        if it != 1:
            ref_opt.zero_grad()
            reference.pow(2).sum().backward()
            ref_opt.step()
    assert torch.equal(param.detach(), reference.detach())


def test_clip_with_a_fused_optimizer_only_reads_the_gradients() -> None:
    params, grads = [], []
    for ours in (False, True):
        model, opt, x = setup(fused=True)
        scaler = GradScaler("cpu") if ours else torch.amp.GradScaler("cpu")
        backward(scaler, model, x)
        scaled = [p.grad.clone() for p in model.parameters()]
        if isinstance(scaler, GradScaler):
            norm = scaler.clip_grad_norm_(opt, 0.05)
            for before, p in zip(scaled, model.parameters(), strict=True):
                assert torch.equal(before, p.grad)  # left scaled: the factor goes to the step
        else:
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        assert norm > 0.05
        grads.append(norm)
        scaler.step(opt)
        scaler.update()
        params.append([p.detach().clone() for p in model.parameters()])
    assert torch.equal(grads[0], grads[1])
    for a, b in zip(*params, strict=True):
        torch.testing.assert_close(a, b)


def test_clip_folds_into_master_weights_with_fp16_gradients() -> None:
    optim = pytest.importorskip("mixprec.optim")
    results = []
    for folded in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3).half()
        initial = model.weight.detach().float()
        inner = torch.optim.SGD(model.parameters(), lr=0.5)
        # Reference: the wrapper clips its fp32 master gradients itself, after unscaling.
        opt = optim.MasterWeightOptimizer(inner, max_grad_norm=None if folded else 0.01)
        scaler = GradScaler("cpu", init_scale=2.0**8)
        x = torch.randn(2, 4).half()
        scaler.scale(model(x).float().pow(2).sum()).backward()
        norm = scaler.clip_grad_norm_(opt, 0.01) if folded else None
        scaler.step(opt)
        scaler.update()
        results.append((model.weight.detach().float(), norm, opt))
    (folded_w, norm, _), (reference_w, _, reference_opt) = results
    torch.testing.assert_close(norm, reference_opt.last_grad_norm, rtol=1e-3, atol=0)
    torch.testing.assert_close(folded_w, reference_w)
    assert not torch.equal(folded_w, initial)  # the step was taken
