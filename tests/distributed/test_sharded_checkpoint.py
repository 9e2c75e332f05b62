"""Sharded checkpoint folders in one process: atomic against a kill, refusals change nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mixprec import MixedPrecision
from mixprec.checkpoint import CheckpointError
from mixprec.distributed import checkpoint as sharded


def make(width: int = 6) -> tuple[MixedPrecision, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    mp = MixedPrecision("fp32", device="cpu")
    model = nn.Sequential(nn.Linear(4, width), nn.Linear(width, 2))
    model, opt = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    return mp, model, opt


def one_step(mp: MixedPrecision, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    mp.backward(model(torch.ones(3, 4)).pow(2).mean())
    mp.step(opt)
    opt.zero_grad()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_round_trip_in_a_folder(tmp_path: Path) -> None:
    mp, model, opt = make()
    one_step(mp, model, opt)
    mp.save(tmp_path, model, opt, epoch=3)  # an existing folder: the sharded format
    assert sharded.is_sharded_checkpoint(tmp_path)
    saved = snapshot(model)
    saved_momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    torch.manual_seed(7)
    mp2, model2, opt2 = make()
    assert mp2.load(tmp_path, model2, opt2) == {"epoch": 3}
    assert all(torch.equal(saved[k], v) for k, v in model2.state_dict().items())
    for p, momentum in zip(model2.parameters(), saved_momentum, strict=True):
        assert torch.equal(opt2.state[p]["momentum_buffer"], momentum)
    assert torch.equal(torch.get_rng_state(), rng)
    assert mp2.state_dict()["steps"] == 1


def test_other_global_shapes_are_refused_and_nothing_loads(tmp_path: Path) -> None:
    mp, model, opt = make()
    mp.save(tmp_path, model, opt)
    mp_wide, wide, wide_opt = make(width=7)
    before = snapshot(wide)
    with pytest.raises(CheckpointError, match=r"'0\.weight' was saved with global shape \(6, 4\)"):
        mp_wide.load(tmp_path, wide, wide_opt)
    assert all(torch.equal(before[k], v) for k, v in wide.state_dict().items())


def test_refused_values_write_nothing(tmp_path: Path) -> None:
    mp, model, opt = make()
    mp.save(tmp_path, model, opt, epoch=1)
    listing = sorted(os.listdir(tmp_path))
    with pytest.raises(TypeError, match=r"numpy"):
        mp.save(tmp_path, model, opt, epoch=np.int64(2))
    assert sorted(os.listdir(tmp_path)) == listing
    assert make()[0].load(tmp_path, *make()[1:]) == {"epoch": 1}


def test_a_policy_mismatch_is_refused(tmp_path: Path) -> None:
    mp, model, opt = make()
    mp.save(tmp_path, model, opt)
    other = MixedPrecision("bf16-mixed", device="cpu")
    model2 = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    model2, opt2 = other.prepare(model2, torch.optim.SGD(model2.parameters(), lr=0.1))
    with pytest.raises(CheckpointError, match=r"saved with policy 'params=fp32"):
        other.load(tmp_path, model2, opt2, strict=True)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    _, model, opt = make()
    with pytest.raises(CheckpointError, match=r"is not a sharded mixprec checkpoint"):
        sharded.load(tmp_path, model, [opt])


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from mixprec.distributed import checkpoint as sharded
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    print("ready", flush=True)
    value = 0.0
    while True:
        value += 1.0
        with torch.no_grad():
            model.weight.fill_(value)
        sharded.save(sys.argv[1], model, state={"value": value})
    """
)


@pytest.mark.slow
def test_a_kill_mid_save_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 60
        while not sharded.is_sharded_checkpoint(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.7)  # several saves later, at an arbitrary instant of one of them
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    model = torch.nn.Linear(256, 256)
    value = sharded.load(tmp_path, model)["value"]
    assert value >= 1.0
    assert torch.equal(model.weight, torch.full((256, 256), value))  # one whole version
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("v-")]) >= 1
    sharded.save(tmp_path, model, state={"value": -1.0})  # the next save cleans up
    assert [p.name.startswith("v-") for p in tmp_path.iterdir() if p.is_dir()] == [True]


def test_a_file_path_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    mp, model, opt = make()
    single = tmp_path / "ckpt.pt"
    mp.save(single, model, opt)  # one process, a file path: the single-file format
    before = single.read_bytes()
    with pytest.raises(ValueError, match=r"'.*ckpt\.pt' is a file; a sharded checkpoint is a"):
        sharded.save(single, model, [opt])
    assert single.read_bytes() == before
    assert make()[0].load(single, *make()[1:]) == {}  # a file loads as a single-file checkpoint
