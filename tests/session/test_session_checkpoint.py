"""mp.save/load: a refused save keeps the last checkpoint, a refused load changes nothing."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from mixprec.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mixprec.session import MixedPrecision

# a plain torch optimizer with dynamic fp16 scaling; fp32 masters; stochastic rounding
POLICIES = ["fp16-mixed", "p=bf16,master=fp32", "bf16-pure"]


def prepared(policy, steps, seed=0, **options):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.GELU(), nn.Linear(3, 2))
    mp = MixedPrecision(policy, "cpu", backend="emulated", **options)
    model, opt = mp.prepare(model, torch.optim.Adam(model.parameters(), lr=0.1))
    for _ in range(steps):  # the optimizer holds state afterwards
        with mp.autocast():
            loss = model(torch.randn(5, 4)).float().pow(2).mean()
        mp.backward(loss)
        mp.step(opt)
        opt.zero_grad()
    return mp, model, opt


def snapshot(mp, model, opt):
    return copy.deepcopy(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "session": mp.state_dict(),
            "rng": torch.get_rng_state(),
        }
    )


def assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{index}]")
    else:
        assert a == b, where


def torch_state(record):
    """The torch-format state of the saved optimizer (inside the wrapper's, where wrapped)."""
    state = record["optimizers"][0]
    return state["optimizer"] if "wrapper" in state else state


def _drop_rng(record):
    del record["rng"]


def _bad_rng(record):
    record["rng"] = torch.zeros(3)


def _non_tensor_weight(record):
    record["model"]["0.bias"] = 5


def _wrong_shape_moment(record):
    torch_state(record)["state"][0]["exp_avg"] = torch.zeros(7)


def _state_of_unknown_param(record):
    torch_state(record)["state"][99] = {"step": torch.tensor(1.0)}


def _bad_scaler(record):
    record["mixed_precision"]["scaler"] = {"scale": "big"}


def _bad_steps(record):
    record["mixed_precision"]["steps"] = -3


def _no_session(record):
    del record["mixed_precision"]


BREAKS = {
    "rng missing": (_drop_rng, r"'rng' is None, not a CPU generator state"),
    "rng bad": (_bad_rng, r"'rng' is tensor\(\[0\., 0\., 0\.\]\), not a CPU generator state"),
    "model entry not a tensor": (_non_tensor_weight, r"model entry '0.bias' is a int \(5\)"),
    "optimizer state shape": (_wrong_shape_moment, r"'exp_avg' of parameter 0 has shape \(7,\)"),
    "optimizer state of no param": (_state_of_unknown_param, r"state for parameter 99, which"),
    "scaler state": (_bad_scaler, r"loss scaler state is refused"),
    "step count": (_bad_steps, r"step count must be an int >= 0, got -3"),
    "no session state": (_no_session, r"not a MixedPrecision state"),
}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", list(BREAKS))
def test_a_refused_load_changes_nothing(tmp_path, policy, name):
    breaks, message = BREAKS[name]
    saver = prepared(policy, steps=2)
    path = tmp_path / "ckpt.pt"
    saver[0].save(path, *saver[1:], step=2)
    record = load_checkpoint(path)
    breaks(record)
    save_checkpoint(path, {k: v for k, v in record.items() if k not in ("format", "version")})

    mp, model, opt = prepared(policy, steps=1, seed=1)
    with torch.no_grad():
        model[0].weight.fill_(7.0)  # a known value a half-load would overwrite
    torch.manual_seed(1234)
    before = snapshot(mp, model, opt)
    with pytest.raises(CheckpointError, match=message):
        mp.load(path, model, opt)
    assert_same(snapshot(mp, model, opt), before)
    assert torch.all(model[0].weight == 7.0)


WRAPPER_BREAKS = {
    "master": (
        "p=bf16,master=fp32", {}, "masters", torch.zeros(9),
        r"entry 'masters' 0 has shape \(9,\) but its parameter is \(3, 4\)",
    ),
    "kahan": (
        "bf16-pure", {"update": "kahan"}, "compensation", torch.zeros(9, dtype=torch.bfloat16),
        r"entry 'compensation' 0 has shape \(9,\) but its parameter is \(3, 4\)",
    ),
    "stochastic": (
        "bf16-pure", {}, "shapes", [[[9, 9], [3], [2, 3], [2]]],
        r"was saved for parameters of shapes \[\[\[9, 9\], \[3\]",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(WRAPPER_BREAKS))
def test_a_wrapper_buffer_of_another_shape_is_refused_first(tmp_path, name):
    policy, options, key, value, message = WRAPPER_BREAKS[name]
    saver = prepared(policy, steps=2, **options)
    path = tmp_path / "ckpt.pt"
    saver[0].save(path, *saver[1:])
    record = load_checkpoint(path)
    if key == "shapes":
        record["optimizers"][0][key] = value
    else:
        record["optimizers"][0][key][0] = value
    save_checkpoint(path, {k: v for k, v in record.items() if k not in ("format", "version")})
    mp, model, opt = prepared(policy, steps=1, seed=1, **options)
    before = snapshot(mp, model, opt)
    with pytest.raises(CheckpointError, match=message):
        mp.load(path, model, opt)
    assert_same(snapshot(mp, model, opt), before)


def test_torch_itself_loads_a_wrongly_shaped_optimizer_state(tmp_path):
    """Why the shape check exists: torch's load_state_dict takes the state, the step then fails."""
    mp, model, opt = prepared("fp16-mixed", steps=1)
    state = copy.deepcopy(opt.state_dict())
    state["state"][0]["exp_avg"] = torch.zeros(7)
    twin = torch.optim.Adam(model.parameters(), lr=0.1)
    twin.load_state_dict(state)  # no complaint
    model(torch.randn(2, 4)).sum().backward()
    with pytest.raises(RuntimeError):
        twin.step()
    with pytest.raises(ValueError, match=r"'exp_avg' of parameter 0 has shape \(7,\) but the"):
        mp.load_state_dict({**mp.state_dict(), "optimizers": [state]})


def test_load_state_dict_checks_everything_before_loading():
    mp, _, _ = prepared("p=bf16,master=fp32", steps=2)
    good = copy.deepcopy(mp.state_dict())
    target, target_model, target_opt = prepared("p=bf16,master=fp32", steps=1, seed=1)
    before = snapshot(target, target_model, target_opt)
    bad = copy.deepcopy(good)
    bad["optimizers"][0]["optimizer"]["state"][1]["exp_avg_sq"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"'exp_avg_sq' of parameter 1 has shape \(2, 2\)"):
        target.load_state_dict(bad)
    assert_same(snapshot(target, target_model, target_opt), before)
    target.load_state_dict(good)  # the reference: the saver's own state
    assert_same(target.state_dict(), good)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_flipped_bit_in_a_weight_is_named_and_nothing_loads(tmp_path, policy):
    saver = prepared(policy, steps=2)
    path = tmp_path / "ckpt.pt"
    saver[0].save(path, *saver[1:])
    weight = saver[1][2].weight.detach()
    raw = bytearray(path.read_bytes())
    offset = bytes(raw).find(weight.contiguous().view(torch.uint8).numpy().tobytes())
    assert offset > 0
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))
    mp, model, opt = prepared(policy, steps=1, seed=1)
    before = snapshot(mp, model, opt)
    with pytest.raises(CheckpointError, match=r"corrupt: tensor 'model/2.weight'"):
        mp.load(path, model, opt)
    assert_same(snapshot(mp, model, opt), before)


def test_a_save_with_extras_torch_cannot_load_keeps_the_last_checkpoint(tmp_path):
    mp, model, opt = prepared("fp16-mixed", steps=2)
    path = tmp_path / "ckpt.pt"
    mp.save(path, model, opt, step=2)
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    before = path.read_bytes()
    prepared_again = prepared("fp16-mixed", steps=0)  # one more step on the saver
    with mp.autocast():
        loss = model(torch.randn(5, 4)).float().pow(2).mean()
    mp.backward(loss)
    mp.step(opt)
    with pytest.raises(TypeError, match=r"extra\['step'\] is a numpy.int64 .*value\.item\(\)"):
        mp.save(path, model, opt, step=np.int64(3))
    assert path.read_bytes() == before
    fresh_mp, fresh, fresh_opt = prepared_again
    assert fresh_mp.load(path, fresh, fresh_opt) == {"step": 2}
    assert_same({"model": fresh.state_dict(), "optimizer": fresh_opt.state_dict()}, saved)


def two_optimizers(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.GELU(), nn.Linear(3, 2))
    mp = MixedPrecision("p=bf16,master=fp32", "cpu", backend="emulated")
    model, first, second = mp.prepare(
        model,
        torch.optim.Adam(model[0].parameters(), lr=0.1),
        torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9),
    )
    with mp.autocast():
        loss = model(torch.randn(5, 4)).float().pow(2).mean()
    mp.backward(loss)
    mp.step(first, second)
    return mp, model, first, second


def test_an_optimizer_refusing_its_state_late_restores_the_ones_before_it(tmp_path):
    mp, model, first, second = two_optimizers(seed=0)
    path = tmp_path / "ckpt.pt"
    mp.save(path, model, first, second)
    record = load_checkpoint(path)
    masters = record["optimizers"][1]["masters"]
    masters[0] = masters[0].half()  # right shape, wrong dtype: only the wrapper knows
    save_checkpoint(path, {k: v for k, v in record.items() if k not in ("format", "version")})
    target, target_model, target_first, target_second = two_optimizers(seed=1)
    before = copy.deepcopy(
        [target_model.state_dict(), target_first.state_dict(), target_second.state_dict()]
    )
    with pytest.raises(CheckpointError, match=r"MasterWeightOptimizer refused its state: master 0"):
        target.load(path, target_model, target_first, target_second)
    after = [target_model.state_dict(), target_first.state_dict(), target_second.state_dict()]
    assert_same(after, before)
