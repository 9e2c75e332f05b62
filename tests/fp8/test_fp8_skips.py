"""A skipped step changes nothing: FP8 amax histories and scales included (issue 19, item 4).

The reference for "nothing" is the state before the step: weights, optimizer states (masters,
stochastic-rounding streams, step counts), FP8 histories, and the loss scaler, which moves only as
torch's own update kernel moves it on an overflow.
"""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mixprec
from mixprec.compute.fp8_linear import Fp8Linear

DELAYED = "params=fp32,compute=fp8:tensorwise_delayed,output=fp32"


def _session(policy, make_opt=None, update="auto"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    mp = mixprec.MixedPrecision(policy, device="cpu", backend="emulated", update=update)
    make_opt = make_opt or (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    model, opt = mp.prepare(model, make_opt(model.parameters()))
    return mp, model, opt


def _iteration(mp, model, opt, x, grad_hit=None):
    with mp.autocast():
        loss = model(x).float().square().mean()
    mp.backward(loss)
    if grad_hit is not None:
        index, value = grad_hit
        params = [p for p in model.parameters() if p.grad is not None]
        grad = params[index % len(params)].grad
        grad.view(-1)[index % grad.numel()] = value
    report = mp.step(opt)
    opt.zero_grad()
    return report


def _histories(model):
    return {
        name: m.fp8_amax_history.clone()
        for name, m in model.named_modules()
        if isinstance(m, Fp8Linear) and m.recipe.scaling == "delayed"
    }


def _state(mp, model):
    """Everything a step may change, copied: weights, buffers, FP8 histories, the session's state
    (optimizers with masters and rounding streams, the scaler)."""
    state = mp.state_dict()
    return {
        "model": copy.deepcopy(model.state_dict()),
        "buffers": {k: b.clone() for k, b in model.named_buffers()},
        "fp8": _histories(model),
        "optimizers": copy.deepcopy(state["optimizers"]),
        "scaler": copy.deepcopy(state["scaler"]),
    }


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(_bits(a), _bits(b))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def _bits(t):
    """The tensor's bytes, so NaNs compare equal and -0.0 differs from 0.0."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _scaler_after_overflow(mp, scaler_state):
    """The scaler state torch's own ``_amp_update_scale_`` gives after an overflow (the scale
    unchanged without loss scaling), the skip counted."""
    counted = {
        **scaler_state,
        "total_steps": scaler_state["total_steps"] + 1,
        "skipped_steps": scaler_state["skipped_steps"] + 1,
    }
    if mp.scaler.strategy != "dynamic":
        return counted
    scale = torch.tensor([float(scaler_state["scale"])])
    tracker = torch.tensor([int(scaler_state["_growth_tracker"])], dtype=torch.int32)
    torch._amp_update_scale_(
        scale,
        tracker,
        torch.ones(1),
        scaler_state["growth_factor"],
        scaler_state["backoff_factor"],
        scaler_state["growth_interval"],
    )
    return {**counted, "scale": scale.item(), "_growth_tracker": int(tracker.item())}


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_delayed_scaling_skips_a_bad_input_and_keeps_its_history(bad):
    mp, model, opt = _session(DELAYED)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        assert _iteration(mp, model, opt, torch.randn(8, 16, generator=g)).stepped
    before = _state(mp, model)
    x = torch.randn(8, 16, generator=g)
    x[2, 5] = bad
    assert not _iteration(mp, model, opt, x).stepped  # a non-finite input leads to a skip
    after = _state(mp, model)
    assert _equal(after["fp8"], before["fp8"])  # the history is as it was
    assert _equal(after["model"], before["model"])
    # and the clean steps after it are taken, with the history the skipped step did not touch
    for _ in range(4):
        assert _iteration(mp, model, opt, torch.randn(8, 16, generator=g)).stepped


def test_delayed_scaling_skipped_for_a_gradient_overflow_keeps_its_history():
    mp, model, opt = _session(DELAYED)
    g = torch.Generator().manual_seed(2)
    assert _iteration(mp, model, opt, torch.randn(8, 16, generator=g)).stepped
    before = _histories(model)
    report = _iteration(mp, model, opt, torch.randn(8, 16, generator=g), (0, float("inf")))
    assert not report.stepped
    assert _equal(_histories(model), before)


# Every preset, delayed FP8 scaling, and the update modes the presets do not pick themselves
# (fp32 masters and Kahan compensation beside 16-bit weights).
_CASES = [
    *((preset, "auto") for preset in mixprec.PRESETS),
    (DELAYED, "auto"),
    ("bf16-pure", "master"),
    ("bf16-pure", "kahan"),
]
_OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
}


@pytest.mark.parametrize("optimizer", list(_OPTIMIZERS))
@pytest.mark.parametrize(("preset", "update"), _CASES, ids=[f"{p}-{u}" for p, u in _CASES])
@settings(max_examples=4, deadline=None, derandomize=True)
@given(
    where=st.sampled_from(["input", "grad"]),
    value=st.sampled_from([float("inf"), float("-inf"), float("nan")]),
    index=st.integers(0, 10_000),
    warmup=st.integers(0, 2),
)
def test_a_skipped_step_changes_no_state(preset, update, optimizer, where, value, index, warmup):
    mp, model, opt = _session(preset, _OPTIMIZERS[optimizer], update)
    g = torch.Generator().manual_seed(index)
    for _ in range(warmup):
        _iteration(mp, model, opt, torch.randn(4, 16, generator=g))
    before = _state(mp, model)
    x = torch.randn(4, 16, generator=g)
    if where == "input":
        x.view(-1)[index % x.numel()] = value
    report = _iteration(mp, model, opt, x, (index, value) if where == "grad" else None)
    assert not report.stepped
    after = _state(mp, model)
    for key in ("model", "buffers", "fp8", "optimizers"):
        assert _equal(after[key], before[key]), (key, after[key], before[key])
    assert _equal(after["scaler"], _scaler_after_overflow(mp, before["scaler"]))


# -- item 33: a prepared model's state_dict is a plain one -----------------------------------------


def _delayed_run(steps, mp=None, model=None, opt=None, seed=3):
    if mp is None:
        mp, model, opt = _session(DELAYED)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        _iteration(mp, model, opt, torch.randn(8, 16, generator=g))
    return mp, model, opt


def test_prepared_delayed_model_state_dict_loads_into_the_plain_model():
    mp, model, _ = _delayed_run(2)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict())  # strict
    assert "fp8" in mp.state_dict()  # the histories are the session's state


def test_delayed_scaling_resumes_bit_for_bit(tmp_path):
    mp, model, opt = _delayed_run(3)
    mp.save(tmp_path / "ck.pt", model, opt)
    _delayed_run(3, mp, model, opt, seed=4)
    expected = (copy.deepcopy(model.state_dict()), _histories(model))
    mp2, model2, opt2 = _session(DELAYED)
    mp2.load(tmp_path / "ck.pt", model2, opt2)
    _delayed_run(3, mp2, model2, opt2, seed=4)
    assert _equal(model2.state_dict(), expected[0])
    assert _equal(_histories(model2), expected[1])


def test_state_dict_round_trip_restores_histories():
    mp, model, opt = _delayed_run(2)
    state = copy.deepcopy(mp.state_dict())
    before = _histories(model)
    _delayed_run(2, mp, model, opt, seed=5)
    assert not _equal(_histories(model), before)
    mp.load_state_dict(state)
    assert _equal(_histories(model), before)


def test_a_checkpoint_with_histories_in_the_model_entries_still_loads(tmp_path):
    """Checkpoints written before the session held the histories kept them as model entries."""
    from mixprec.checkpoint import save_checkpoint

    mp, model, opt = _delayed_run(3)
    session = {k: v for k, v in mp.state_dict().items() if k not in ("optimizers", "fp8")}
    weights = {**model.state_dict()}
    for name, hist in _histories(model).items():
        weights[f"{name}.fp8_amax_history"] = hist
    record = {
        "model": weights,
        "optimizers": [opt.state_dict()],
        "mixed_precision": session,
        "rng": torch.get_rng_state(),
        "extra": {},
    }
    save_checkpoint(tmp_path / "old.pt", record)
    mp2, model2, opt2 = _session(DELAYED)
    mp2.load(tmp_path / "old.pt", model2, opt2)
    assert _equal(_histories(model2), _histories(model))
    assert _equal(model2.state_dict(), model.state_dict())


def test_a_session_state_with_foreign_histories_is_refused_and_changes_nothing():
    mp, model, _ = _delayed_run(2)
    state = copy.deepcopy(mp.state_dict())
    state["fp8"] = {"nope": torch.zeros(3, 16)}
    before = _state(mp, model)
    with pytest.raises(ValueError, match=r"FP8 amax histories are for layers \['nope'\]"):
        mp.load_state_dict(state)
    after = _state(mp, model)
    assert all(_equal(after[k], before[k]) for k in before)
