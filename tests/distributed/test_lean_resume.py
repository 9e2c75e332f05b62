"""A bf16-lean session under FSDP2 on 2 gloo ranks resumes bit for bit from its sharded
checkpoint, with the int8 states (codes and block scales sharded by rows) in it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_spawn import spawn
from torch import nn

from mixprec import MixedPrecision

STEPS = 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8))  # 8192 + 1024 weights


def _session():
    mp = MixedPrecision("bf16-lean", device="cpu", backend="emulated")
    model = mp.fully_shard(_model())
    model, opt = mp.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    return mp, model, opt


def _train(mp, model, opt, rank: int, steps: range) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(1000 * rank + step)
        loss = model(torch.randn(4, 64, generator=gen)).float().pow(2).mean()
        mp.backward(loss)
        mp.step(opt)
        opt.zero_grad()


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().clone() for p in model.parameters()]


def _rank(rank: int, out: str) -> None:
    mp, model, opt = _session()
    _train(mp, model, opt, rank, range(STEPS))
    inner = opt.optimizer.state[opt.shadows[next(model.parameters())]]
    codes = inner["exp_avg"]
    mp.save(Path(out) / "lean", model, opt)
    _train(mp, model, opt, rank, range(STEPS, 2 * STEPS))
    continued = _weights(model)
    mp2, model2, opt2 = _session()
    mp2.load(Path(out) / "lean", model2, opt2)
    _train(mp2, model2, opt2, rank, range(STEPS, 2 * STEPS))
    result = {
        "codes_dtype": str(codes.dtype),
        "codes_local_rows": codes.to_local().shape[0],
        "continued": continued,
        "resumed": _weights(model2),
    }
    torch.save(result, Path(out) / f"rank{rank}.pt")


@pytest.mark.slow
def test_bf16_lean_fsdp2_session_resumes_bit_for_bit(tmp_path: Path) -> None:
    spawn(_rank, str(tmp_path))
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert res["codes_dtype"] == "torch.uint8" and res["codes_local_rows"] == 64
        for got, want in zip(res["resumed"], res["continued"], strict=True):
            assert torch.equal(got, want)
