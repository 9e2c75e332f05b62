"""4-bit layers under FSDP2 on two gloo processes, against one process on two micro-batches."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mixprec import MixedPrecision
from mixprec.compute.fp4_linear import Fp4Linear

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from dist_spawn import WORLD, spawn

pytestmark = pytest.mark.slow

POLICY = "nvfp4-mixed(sr_grad=false)"  # deterministic: stochastic draws differ per process
STEPS = 6


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 16, generator=gen)
    return x, torch.tanh(x @ torch.randn(16, 16, generator=gen))


def train(x: torch.Tensor, y: torch.Tensor, fsdp: bool, micro: int) -> dict[str, Any]:
    mp = MixedPrecision(POLICY, backend="emulated")
    model = make_model()
    if fsdp:
        model = mp.fully_shard(model)
    model, opt = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.05))
    assert all(isinstance(model[i], Fp4Linear) for i in (0, 2))
    losses = []
    for _ in range(STEPS):
        total = torch.zeros(())
        for xs, ys in zip(x.chunk(micro), y.chunk(micro), strict=True):
            with mp.autocast():
                part = (model(xs).float() - ys).pow(2).mean() / micro
            mp.backward(part)
            total += part.detach()
        mp.step(opt)
        opt.zero_grad()
        if fsdp:
            dist.all_reduce(total)
            total /= WORLD
        losses.append(float(total))
    weights = {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in model.state_dict().items()
    }
    return {"losses": losses, "weights": weights}


def worker(rank: int, out: str) -> None:
    x, y = batch()
    n = x.shape[0] // WORLD
    res = train(x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n], True, 1)
    torch.save(res, Path(out) / f"rank{rank}.pt")


def test_fsdp2_4bit_equals_one_process_on_two_micro_batches(tmp_path):
    spawn(worker, str(tmp_path))
    sharded = torch.load(tmp_path / "rank0.pt", weights_only=True)
    x, y = batch()
    single = train(x, y, False, WORLD)
    assert sharded["losses"] == pytest.approx(single["losses"], rel=1e-5)
    for key, value in single["weights"].items():
        torch.testing.assert_close(sharded["weights"][key], value, rtol=1e-5, atol=1e-6)
