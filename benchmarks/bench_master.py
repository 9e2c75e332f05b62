"""Optimizer step time of MasterWeightOptimizer vs the bare fp32 optimizer, on a >= 10M-param model.

The baseline is the torch optimizer stepping fp32 parameters with fp32 gradients (plain fp32
training). The wrapper steps bf16 parameters with bf16 gradients: it copies the gradients into
fp32, steps the same optimizer on fp32 masters and rounds them back, so the ratio is the cost of
keeping fp32 master weights. Steps alternate between the two (so drift in machine load hits both)
and the median is reported. Both use the inner optimizer's foreach implementation. The pure 16-bit
wrappers are timed too, for reference; "kept" keeps the fp32 gradient buffers between steps
(``keep_grad_buffers=True``: no fresh pages to fault in at each step, 4 B/param more). Target from
the issue: ratio <= 1.3.

On Linux CPUs most of the default wrapper's extra time is glibc handing the freed fp32 gradient
memory back to the kernel after every step and faulting it in again on the next (GPU caching
allocators keep it). Letting glibc keep freed memory removes that cost without the 4 B/param:

    MALLOC_TRIM_THRESHOLD_=2000000000 MALLOC_MMAP_THRESHOLD_=2000000000 \
        python benchmarks/bench_master.py

    python benchmarks/bench_master.py [--millions 12] [--repeats 21] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from mixprec.optim import KahanOptimizer, MasterWeightOptimizer, StochasticRoundingOptimizer

WRAPPERS: dict[str, Callable[[torch.optim.Optimizer], torch.optim.Optimizer]] = {
    "fp32 master": MasterWeightOptimizer,
    "fp32 master, kept": lambda inner: MasterWeightOptimizer(inner, keep_grad_buffers=True),
    "stochastic rounding": StochasticRoundingOptimizer,
    "kahan": KahanOptimizer,
}
INNER: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
    "SGD momentum": lambda ps: torch.optim.SGD(ps, lr=1e-4, momentum=0.9, foreach=True),
}


def _params(millions: float, dtype: torch.dtype, device: str) -> list[nn.Parameter]:
    """Transformer-like shapes: 1024x1024 matrices with biases, about ``millions`` M elements."""
    g = torch.Generator().manual_seed(0)
    count = max(1, round(millions * 1e6 / (1024 * 1024 + 1024)))
    params = []
    for _ in range(count):
        weight = (torch.randn(1024, 1024, generator=g) * 0.02).to(device, dtype)
        params.append(nn.Parameter(weight))
        params.append(nn.Parameter(torch.zeros(1024, dtype=dtype, device=device)))
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device, dtype)
    return params


def _time(step: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--millions", type=float, default=12.0, help="model size, M params")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base_params = _params(args.millions, torch.float32, args.device)
    n = sum(p.numel() for p in base_params)
    print(
        f"{n / 1e6:.1f}M parameters on {args.device}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} alternating steps; MALLOC_TRIM_THRESHOLD_="
        f"{os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}"
    )
    print(f"{'inner':14} {'wrapper':20} {'fp32 ms':>9} {'wrapped ms':>11} {'ratio':>6}")
    for inner_name, make_inner in INNER.items():
        baseline = make_inner(base_params)
        for wrapper_name, wrap in WRAPPERS.items():
            params16 = _params(args.millions, torch.bfloat16, args.device)
            wrapped = wrap(make_inner(params16))
            baseline.step()  # warm-up: optimizer state and allocator
            wrapped.step()
            base_times, wrapped_times = [], []
            for _ in range(args.repeats):
                base_times.append(_time(baseline.step, args.device))
                wrapped_times.append(_time(wrapped.step, args.device))
            base_ms = 1e3 * statistics.median(base_times)
            wrapped_ms = 1e3 * statistics.median(wrapped_times)
            print(
                f"{inner_name:14} {wrapper_name:20} {base_ms:9.1f} {wrapped_ms:11.1f} "
                f"{wrapped_ms / base_ms:6.2f}"
            )
            del wrapped, params16


if __name__ == "__main__":
    main()
