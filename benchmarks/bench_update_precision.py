"""Where the update happens: FP32 vs pure bf16 (round to nearest) vs the three cures.

The digits classifier from scikit-learn's bundled 8x8 digits: an MLP 64-H-10 trained full batch
with AdamW at lr 1e-4. Every parameter is stored as ``1.0 + w`` (the layer uses the stored value
minus 1.0), so all stored weights sit near 1.0, where a bf16 ulp is 2**-8 or 2**-7 and AdamW's
steps of about 1e-4 are far below half an ulp. The forward pass upcasts the stored weights to fp32
(only the storage is 16-bit), so this runs at fp32 speed on CPUs without bf16 units.

Prints the final train loss and accuracy of each way of applying the update and its relative
difference to FP32. Expected: pure bf16 with round to nearest stalls at the initial loss;
fp32 master weights, stochastic rounding and Kahan summation each end within 5% of FP32.

    python benchmarks/bench_update_precision.py [--steps 3000] [--hidden 64] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from mixprec.optim import (
    KahanOptimizer,
    MasterWeightOptimizer,
    StochasticRoundingOptimizer,
    memory_report,
)

OFFSET = 1.0
Wrap = Callable[[torch.optim.Optimizer], torch.optim.Optimizer]
RUNS: dict[str, tuple[torch.dtype, Wrap]] = {
    "FP32": (torch.float32, lambda opt: opt),
    "pure bf16, round to nearest": (torch.bfloat16, lambda opt: opt),
    "bf16 + fp32 master": (torch.bfloat16, MasterWeightOptimizer),
    "bf16 + stochastic rounding": (torch.bfloat16, StochasticRoundingOptimizer),
    "bf16 + Kahan summation": (torch.bfloat16, KahanOptimizer),
    "bf16 + SR, bf16 Adam states": (
        torch.bfloat16,
        lambda opt: StochasticRoundingOptimizer(opt, state_dtype=torch.bfloat16),
    ),
}


class _Params(nn.Module):
    """The MLP's parameters, stored near 1.0 (``OFFSET + w`` with the usual uniform init of w)."""

    def __init__(self, hidden: int, dtype: torch.dtype) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        shapes = [((hidden, 64), 64), ((hidden,), 64), ((10, hidden), hidden), ((10,), hidden)]
        self.tensors = nn.ParameterList(
            nn.Parameter((OFFSET + (2 * torch.rand(s, generator=g) - 1) / fan**0.5).to(dtype))
            for s, fan in shapes
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = (p.float() - OFFSET for p in self.tensors)  # fp32 compute
        return F.linear(torch.relu(F.linear(x, w1, b1)), w2, b2)


def _train(
    dtype: torch.dtype, wrap: Wrap, x: torch.Tensor, y: torch.Tensor, steps: int, hidden: int
) -> tuple[float, float, float]:
    model = _Params(hidden, dtype)
    opt = wrap(torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0))
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    bytes_per_param = memory_report(model, opt).per_param["total"]
    with torch.no_grad():
        logits = model(x)
        loss = F.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(1) == y).float().mean().item()
    return loss, accuracy, bytes_per_param


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    with torch.no_grad():
        initial = F.cross_entropy(_Params(args.hidden, torch.bfloat16)(x), y).item()
    print(
        f"digits MLP 64-{args.hidden}-10, weights stored near {OFFSET}, AdamW lr 1e-4, "
        f"{args.steps} full-batch steps, {torch.get_num_threads()} thread(s); "
        f"initial loss {initial:.4f}"
    )
    print(f"{'update':30} {'loss':>8} {'vs FP32':>8} {'acc':>6} {'B/param':>8} {'time s':>7}")
    reference = None
    for name, (dtype, wrap) in RUNS.items():
        start = time.perf_counter()
        loss, accuracy, bytes_per_param = _train(dtype, wrap, x, y, args.steps, args.hidden)
        seconds = time.perf_counter() - start
        reference = loss if reference is None else reference
        relative = (loss - reference) / reference
        print(
            f"{name:30} {loss:8.4f} {relative:+8.1%} {accuracy:6.1%} {bytes_per_param:8.2f} "
            f"{seconds:7.1f}"
        )


if __name__ == "__main__":
    main()
