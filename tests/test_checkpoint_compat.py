"""Checkpoints written by earlier mixprec versions still load (checked-in files in tests/data).

Each file was written by ``python tests/test_checkpoint_compat.py`` with the mixprec of its
version. The test rebuilds the same run deterministically (same seed, same steps) and checks that
loading the file into a fresh setup gives exactly the rebuilt state, and that both then take the
same next step. Never regenerate a file after a format change: it stands for checkpoints users
already have on disk; add a new one beside it instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mixprec.session import MixedPrecision

DATA = Path(__file__).parent / "data"
RUNS = {  # file stem -> (policy, update)
    "v2_bf16_pure_stochastic": ("bf16-pure", "stochastic"),
    "v2_fp16_mixed_scaler": ("fp16-mixed", "auto"),
    "v2_folder_bf16_pure_stochastic": ("bf16-pure", "stochastic"),  # a sharded folder
    # version 3 (plain values checksummed); folders with manifest.pt (per-item checksums)
    "v3_bf16_pure_stochastic": ("bf16-pure", "stochastic"),
    "v3_fp16_mixed_scaler": ("fp16-mixed", "auto"),
    "v3_folder_bf16_pure_stochastic": ("bf16-pure", "stochastic"),
}
STEPS = 3


def build(policy: str, update: str, steps: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.GELU(), nn.Linear(3, 2))
    mp = MixedPrecision(policy, "cpu", backend="emulated", update=update, seed=5)
    model, opt = mp.prepare(model, torch.optim.Adam(model.parameters(), lr=0.05))
    for _ in range(steps):
        step(mp, model, opt)
    return mp, model, opt


def step(mp, model, opt) -> None:
    with mp.autocast():
        loss = model(torch.randn(5, 4)).float().pow(2).mean() * 100.0
    mp.backward(loss)
    mp.step(opt)
    opt.zero_grad()


def assert_same(a, b, where: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
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


@pytest.mark.parametrize("stem", sorted(RUNS))
def test_an_old_checkpoint_loads_as_a_deterministic_rebuild(stem: str) -> None:
    policy, update = RUNS[stem]
    mp_ref, model_ref, opt_ref = build(policy, update, STEPS)  # the run the file was saved from
    expected_rng = torch.get_rng_state()
    mp, model, opt = build(policy, update, 0)
    torch.manual_seed(123)  # the load must restore the saved RNG state
    extra = mp.load(_path(stem), model, opt)
    assert extra == {"epoch": 3, "note": stem}
    assert torch.equal(torch.get_rng_state(), expected_rng)
    assert_same(model.state_dict(), model_ref.state_dict(), "model")
    assert_same(opt.state_dict(), opt_ref.state_dict(), "optimizer")
    assert_same(mp.state_dict(), mp_ref.state_dict(), "session")
    step(mp, model, opt)  # and the resumed run goes on as the uninterrupted one
    torch.set_rng_state(expected_rng)
    step(mp_ref, model_ref, opt_ref)
    assert_same(model.state_dict(), model_ref.state_dict(), "model after a step")
    assert_same(opt.state_dict(), opt_ref.state_dict(), "optimizer after a step")


def _path(stem: str) -> Path:
    return DATA / stem if "folder" in stem else DATA / f"{stem}.pt"


def _write(stem: str) -> None:
    policy, update = RUNS[stem]
    mp, model, opt = build(policy, update, STEPS)
    if "folder" in stem:
        _path(stem).mkdir()  # an existing folder: the sharded format
    mp.save(_path(stem), model, opt, epoch=3, note=stem)


if __name__ == "__main__":  # writes the files of the current format (see the module docstring)
    for name in sys.argv[1:]:
        _write(name)
