"""``GradScaler.step_and_update`` ends an iteration exactly as ``decide_together_``, ``step`` for
each optimizer and ``update`` do (what ``MixedPrecision.step`` ran before it), bit for bit: its
shortcut for one optimizer that unscales in place must leave every observable number, record and
answer as that sequence leaves them, on clean, growing and skipped (inf/NaN) steps.

The reference is the general sequence, run on a twin model in lock-step.
"""

from __future__ import annotations

import copy
import math
import pickle
import warnings
from typing import Any

import pytest
import torch
from torch.amp.grad_scaler import OptState

from mixprec.scaling import GradScaler

SETTINGS: dict[str, dict[str, Any]] = {
    # torch's default rule (the one-kernel update), growing every 3 clean steps
    "dynamic": {"init_scale": 2.0**10, "growth_interval": 3},
    # the rule's own tensor ops: hysteresis, bounds, a floor that is reached
    "dynamic-hysteresis": {
        "init_scale": 4.0,
        "growth_interval": 2,
        "hysteresis": 2,
        "min_scale": 1.0,
        "max_scale": 16.0,
        "backoff_factor": 0.3,
    },
    "static": {"strategy": "static", "init_scale": 8.0},
    "none": {"strategy": "none"},
}

# iteration -> what goes wrong in its gradients (None: a clean step)
BAD = {2: math.inf, 3: math.nan, 4: -math.inf, 9: math.inf}


def twin(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=0.05)


def general(scaler: GradScaler, *optimizers: torch.optim.Optimizer) -> bool:
    """The sequence step_and_update stands for (MixedPrecision.step's, before it)."""
    scaler.decide_together_(optimizers)
    for optimizer in optimizers:
        scaler.step(optimizer)
    scaler.update()
    return not scaler.step_skipped()


def backward(scaler: GradScaler, model: torch.nn.Module, x: torch.Tensor, bad: float | None):
    loss = model(x).float().pow(2).mean()
    scaler.scale(loss).backward()
    if bad is not None:
        model[0].weight.grad[1, 2] = bad


def assert_same(fast: Any, slow: Any) -> None:
    """Every observable of (model, optimizer, scaler) equal, bit for bit."""
    (m_a, o_a, s_a), (m_b, o_b, s_b) = fast, slow
    for p, q in zip(m_a.parameters(), m_b.parameters(), strict=True):
        assert torch.equal(p, q)
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:  # unscaled in place alike (NaN where the bad value was)
            assert torch.equal(p.grad.nan_to_num(), q.grad.nan_to_num())
    a, b = o_a.state_dict(), o_b.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for key, state in a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["state"][key][name]), name
    assert s_a.state_dict() == s_b.state_dict()
    assert s_a.get_scale() == s_b.get_scale()
    for name in ("_scale", "_growth_tracker"):
        x, y = getattr(s_a, name), getattr(s_b, name)
        assert (x is None) == (y is None)
        if x is not None:
            assert (x.dtype, x.shape) == (y.dtype, y.shape) and torch.equal(x, y), name
    assert (s_a.total_steps, s_a.skipped_steps) == (s_b.total_steps, s_b.skipped_steps)
    assert s_a.step_skipped() == s_b.step_skipped()
    assert s_a.step_skipped(o_a) == s_b.step_skipped(o_b)
    assert dict(s_a._per_optimizer_states) == {} == dict(s_b._per_optimizer_states)


def shortcut_spy(scaler: GradScaler) -> list[str]:
    """Record every general-path call the scaler makes (none when the shortcut runs)."""
    calls: list[str] = []
    for name in ("decide_together_", "step", "update", "step_skipped"):
        method = getattr(scaler, name)

        def spy(*args: Any, __name: str = name, __method: Any = method, **kwargs: Any) -> Any:
            calls.append(__name)
            return __method(*args, **kwargs)

        setattr(scaler, name, spy)
    return calls


@pytest.mark.parametrize("setting", SETTINGS)
def test_shortcut_equals_the_general_sequence(setting: str) -> None:
    kwargs = SETTINGS[setting]
    runs = []
    for _ in range(2):
        model, opt = twin()
        runs.append((model, opt, GradScaler("cpu", **kwargs)))
    fast, slow = runs
    calls = shortcut_spy(fast[2])
    x = torch.randn(5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an overflow at the floor warns, on both sides alike
        for it in range(12):
            answers = []
            for model, opt, scaler in (fast, slow):
                opt.zero_grad()
                backward(scaler, model, x, BAD.get(it))
            calls.clear()
            answers.append(fast[2].step_and_update(fast[1]))
            assert calls == []  # the shortcut ran
            answers.append(general(slow[2], slow[1]))
            assert answers[0] == answers[1] == (BAD.get(it) is None)
            assert_same(fast, slow)
    assert slow[2].skipped_steps == len(BAD)
    for name in ("decide_together_", "step", "update", "step_skipped"):
        delattr(fast[2], name)  # the spies
    copies = [pickle.loads(pickle.dumps(run[2])) for run in (fast, slow)]
    assert copies[0].state_dict() == copies[1].state_dict() == slow[2].state_dict()


def test_several_optimizers_take_the_general_sequence() -> None:
    """Two optimizers: one decision (an inf in one skips both), as the general sequence."""
    runs = []
    for _ in range(2):
        model, _ = twin()
        opts = [
            torch.optim.SGD(model[0].parameters(), lr=0.1),
            torch.optim.SGD(model[2].parameters(), lr=0.1),
        ]
        runs.append((model, opts, GradScaler("cpu", init_scale=64.0)))
    x = torch.randn(5, 4)
    for it in range(5):
        for model, opts, scaler in runs:
            for opt in opts:
                opt.zero_grad()
            backward(scaler, model, x, BAD.get(it))
        (m_a, o_a, s_a), (m_b, o_b, s_b) = runs
        assert s_a.step_and_update(*o_a) == general(s_b, *o_b) == (BAD.get(it) is None)
        for p, q in zip(m_a.parameters(), m_b.parameters(), strict=True):
            assert torch.equal(p, q)
        assert s_a.state_dict() == s_b.state_dict()
        assert [s_a.step_skipped(o) for o in o_a] == [s_b.step_skipped(o) for o in o_b]


@pytest.mark.parametrize("grads", ["sparse", "two dtypes"])
@pytest.mark.parametrize("setting", ["dynamic", "none"])
def test_gradients_that_need_unscale_s_handling_equal_the_general_sequence(grads, setting):
    """Sparse gradients, or gradients of two dtypes, go through unscale_'s grouping: still the
    general sequence's numbers, records and answers."""
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        embed = torch.nn.Embedding(10, 4, sparse=grads == "sparse")
        head = torch.nn.Linear(4, 3)
        if grads == "two dtypes":
            head.double()
        model = torch.nn.ModuleList([embed, head])
        runs.append(
            (
                model,
                torch.optim.SGD(model.parameters(), lr=0.1),
                GradScaler("cpu", **SETTINGS[setting]),
            )
        )
    ids = torch.tensor([1, 2, 2, 7])
    for it in range(6):
        answers = []
        for model, opt, scaler in runs:
            opt.zero_grad()
            loss = model[1](model[0](ids).to(model[1].weight.dtype)).pow(2).mean()
            scaler.scale(loss).backward()
            if BAD.get(it) is not None:
                model[1].bias.grad[0] = BAD[it]
        (m_a, o_a, s_a), (m_b, o_b, s_b) = runs
        answers = [s_a.step_and_update(o_a), general(s_b, o_b)]
        assert answers[0] == answers[1] == (BAD.get(it) is None)
        for p, q in zip(m_a.parameters(), m_b.parameters(), strict=True):
            assert torch.equal(p, q)
        assert s_a.state_dict() == s_b.state_dict()
        assert s_a.step_skipped(o_a) == s_b.step_skipped(o_b)
        assert dict(s_a._per_optimizer_states) == {} == dict(s_b._per_optimizer_states)


@pytest.mark.parametrize("by_hand", ["unscale_", "clip_grad_norm_"])
def test_after_unscale_or_clip_by_hand(by_hand: str) -> None:
    """An optimizer already unscaled (or clipped) in this iteration is not unscaled twice."""
    runs = [(*twin(), GradScaler("cpu", init_scale=2.0**8)) for _ in range(2)]
    x = torch.randn(5, 4)
    for it in range(4):
        for model, opt, scaler in runs:
            opt.zero_grad()
            backward(scaler, model, x, BAD.get(it))
            if by_hand == "unscale_":
                scaler.unscale_(opt)
            else:
                scaler.clip_grad_norm_(opt, max_norm=0.5)
        (_, o_a, s_a), (_, o_b, s_b) = runs
        assert s_a.step_and_update(o_a) == general(s_b, o_b)
        assert_same(runs[0], runs[1])


def test_an_optimizer_that_raises_leaves_the_same_records() -> None:
    """A step that raises leaves the iteration open as step() leaves it: unscaled, flagged."""
    runs = [(*twin(), GradScaler("cpu", init_scale=2.0**8)) for _ in range(2)]
    x = torch.randn(5, 4)
    for model, opt, scaler in runs:
        backward(scaler, model, x, None)
        opt.step = lambda: (_ for _ in ()).throw(RuntimeError("broken optimizer"))  # type: ignore[method-assign]
    (_, o_a, s_a), (_, o_b, s_b) = runs
    with pytest.raises(RuntimeError, match="broken optimizer"):
        s_a.step_and_update(o_a)
    with pytest.raises(RuntimeError, match="broken optimizer"):
        general(s_b, o_b)
    rec_a, rec_b = s_a._per_optimizer_states[id(o_a)], s_b._per_optimizer_states[id(o_b)]
    assert rec_a["stage"] is rec_b["stage"] is OptState.UNSCALED
    assert s_a._found_inf_per_device(o_a) == s_b._found_inf_per_device(o_b)
    assert s_a.state_dict() == s_b.state_dict()


def test_refusals_are_the_general_sequences() -> None:
    """Before scale(), fp16 gradients, no optimizer: the same errors, the same records."""
    model, opt = twin()
    with pytest.raises(RuntimeError, match="before scale"):
        GradScaler("cpu").step_and_update(opt)
    with pytest.raises(ValueError, match="at least one optimizer"):
        GradScaler("cpu").step_and_update()
    scalers = [GradScaler("cpu"), GradScaler("cpu")]
    half = copy.deepcopy(model).half()
    half_opt = torch.optim.SGD(half.parameters(), lr=0.1)
    for scaler in scalers:
        scaler.scale(half(torch.randn(2, 4, dtype=torch.float16)).float().sum()).backward()
    with pytest.raises(ValueError, match="FP16 gradients"):
        scalers[0].step_and_update(half_opt)
    with pytest.raises(ValueError, match="FP16 gradients"):
        general(scalers[1], half_opt)
    stages = [{k: r["stage"] for k, r in s._per_optimizer_states.items()} for s in scalers]
    assert stages[0] == stages[1]


def test_disabled_steps_always() -> None:
    model, opt = twin()
    scaler = GradScaler("cpu", enabled=False)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(torch.randn(3, 4)).sum()).backward()
    assert scaler.step_and_update(opt) is True
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("scale", [2.0**16, 3.0, 1e-30, 3e38, 2.0**-126, 0.1])
def test_the_inverse_scale_is_torchs(scale: float) -> None:
    """The reused inverse of a CPU scale is the float64 reciprocal torch computes."""
    scaler = GradScaler("cpu", init_scale=scale, strategy="static")
    tensor = scaler.scale(torch.ones(()))  # materializes the scale
    del tensor
    value = scaler._scale
    state = scaler._state
    for _ in range(2):  # computed, then reused
        inverse = state.inverse(value)
        assert inverse.dtype == torch.float32
        assert torch.equal(inverse, value.double().reciprocal().float())
    value.fill_(5.0)  # a scale changed in place is not answered from the memo
    assert torch.equal(state.inverse(value), torch.tensor(0.2, dtype=torch.float64).float())
    assert torch.equal(state.inverse(torch.tensor(-0.0)), torch.tensor(-math.inf))
