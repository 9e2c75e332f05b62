"""Stall and recover: updates below half a bf16 ulp vanish with round to nearest; the fp32 master,
stochastic rounding and Kahan summation each recover the fp32 run's loss.

The digits classifier (scikit-learn's bundled 8x8 digits) is a 64-32-10 MLP whose parameters are
stored as ``1.0 + w``: every stored weight sits near 1.0, where a bf16 ulp is 2**-8 or 2**-7, so
AdamW's steps of about lr = 1e-4 are far below half an ulp. The forward pass upcasts the stored
weights to fp32 (only the *storage* is 16-bit), which keeps it fast on CPUs without bf16 units.
``benchmarks/bench_update_precision.py`` prints the full table with longer training.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from mixprec.optim import KahanOptimizer, MasterWeightOptimizer, StochasticRoundingOptimizer

OFFSET, LR, STEPS, HIDDEN = 1.0, 1e-4, 300, 32


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16, torch.tensor(data.target)


def _init(dtype: torch.dtype) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    shapes = [((HIDDEN, 64), 64), ((HIDDEN,), 64), ((10, HIDDEN), HIDDEN), ((10,), HIDDEN)]
    return [
        nn.Parameter((OFFSET + (2 * torch.rand(shape, generator=g) - 1) / fan_in**0.5).to(dtype))
        for shape, fan_in in shapes
    ]


def _loss(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w1, b1, w2, b2 = (p.float() - OFFSET for p in params)
    return F.cross_entropy(F.linear(torch.relu(F.linear(x, w1, b1)), w2, b2), y)


def _train(kind: str, x: torch.Tensor, y: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    params = _init(torch.float32 if kind == "fp32" else torch.bfloat16)
    opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    if kind == "master":
        opt = MasterWeightOptimizer(opt)
    elif kind == "stochastic":
        opt = StochasticRoundingOptimizer(opt, seed=0)
    elif kind == "kahan":
        opt = KahanOptimizer(opt)
    for _ in range(STEPS):
        opt.zero_grad()
        _loss(params, x, y).backward()
        opt.step()
    with torch.no_grad():
        return _loss(params, x, y).item(), params


def test_round_to_nearest_stalls_and_the_three_cures_recover(digits):
    x, y = digits
    with torch.no_grad():
        initial = _loss(_init(torch.bfloat16), x, y).item()
    fp32, _ = _train("fp32", x, y)
    stalled, params = _train("bf16", x, y)
    assert fp32 < initial - 0.2  # fp32 learns
    assert all(torch.equal(p, q) for p, q in zip(params, _init(torch.bfloat16), strict=True))
    assert stalled == initial  # every single update was rounded away
    for kind in ("master", "stochastic", "kahan"):
        loss, _ = _train(kind, x, y)
        assert abs(loss - fp32) / fp32 < 0.05, (kind, loss, fp32)
