"""Optimizer step time of the wrappers vs the bare fp32 optimizer, on a >= 10M-param model.

The baseline is the torch optimizer stepping fp32 parameters with fp32 gradients (plain fp32
training). The wrappers step bf16 parameters with bf16 gradients, each on two paths side by side:
``auto``, the one-pass kernels of :mod:`mixprec.optim.fused` (reads the 16-bit weight or fp32
master, the 16-bit gradient and the fp32 states once, writes them once), and ``off``, the
reference path (widen the gradients, step the inner optimizer's foreach implementation on fp32
masters or scratch, round back). The ``fused`` column counts the parameters the last step
updated in one pass. "kept" keeps fp32 gradient buffers between steps (``keep_grad_buffers=True``,
4 B/param more; always the reference path). Steps alternate between baseline and wrapper, and
the ratio is the median over the pairs of (wrapped / bare), which cancels slow drifts of machine
load. Targets: master-weight steps <= 1.2x the bare step, stochastic rounding and Kahan <= 1.3x.

Measured (11.5M parameters, 1 thread, AMD EPYC with AVX512_BF16, shared and noisy; ratios):

| inner | wrapper | fused (auto) | reference (off) | before the fused kernels |
|---|---|---|---|---|
| AdamW | fp32 master | 0.42 | 0.80 | 0.73 |
| AdamW | stochastic rounding | 0.67 | 1.29 | 1.28 |
| AdamW | kahan | 0.68 | 1.80 | 1.06 |
| SGD momentum | fp32 master | 0.80 | 1.40 | 1.68 |
| SGD momentum | stochastic rounding | 0.65 | 1.76 | 3.41 |
| SGD momentum | kahan | 0.58 | 2.47 | 2.50 |

(The one-pass AdamW is faster than torch's own fp32 AdamW, whose foreach CPU path makes about
ten passes over memory; about a third of its time is torch's CPU sqrt, which it calls on
cache-sized blocks to keep the reference path's bits. Runs with 2 threads on this shared
machine were dominated by the other processes' load and are not shown.)

``--chunk-numel 0`` steps the reference path in one call instead of chunks; glibc can also be
told to keep freed memory:

    MALLOC_TRIM_THRESHOLD_=2000000000 MALLOC_MMAP_THRESHOLD_=2000000000 \
        python benchmarks/bench_master.py

    python benchmarks/bench_master.py [--millions 12] [--repeats 21] [--threads N] [--device cpu]
        [--chunk-numel N] [--only master,stochastic,kahan] [--paths auto,off]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from mixprec.hardware import probe
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--millions", type=float, default=12.0, help="model size, M params")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--chunk-numel", type=int, default=None, help="override the wrappers' chunk (0: none)"
    )
    parser.add_argument("--only", default="", help="comma-separated substrings of wrapper names")
    parser.add_argument(
        "--paths",
        default="auto,off",
        help="comma-separated fused settings to time: auto (one-pass kernels), off (reference)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base_params = _params(args.millions, torch.float32, args.device)
    n = sum(p.numel() for p in base_params)
    print(
        f"torch {torch.__version__}; {n / 1e6:.1f}M parameters on {args.device}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} alternating steps; "
        f"cpu flags: {_cpu_flags()}; MALLOC_TRIM_THRESHOLD_="
        f"{os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}; chunk_numel="
        f"{'default' if args.chunk_numel is None else args.chunk_numel}"
    )
    paths = [p for p in args.paths.split(",") if p]
    print(
        f"{'inner':14} {'wrapper':20} {'path':9} {'fp32 ms':>9} {'wrapped ms':>11} {'ratio':>6} "
        f"{'fused':>6}"
    )
    only = [w for w in args.only.split(",") if w]
    for inner_name, make_inner in INNER.items():
        baseline = make_inner(base_params)
        for wrapper_name, wrap in WRAPPERS.items():
            if only and not any(w in wrapper_name for w in only):
                continue
            for path in paths:
                params16 = _params(args.millions, torch.bfloat16, args.device)
                wrapped = wrap(make_inner(params16))
                wrapped.fused = path  # type: ignore[attr-defined]
                if args.chunk_numel is not None:
                    wrapped.chunk_numel = args.chunk_numel or None  # type: ignore[attr-defined]
                baseline.step()  # warm-up: optimizer state, allocator, the kernels' build
                wrapped.step()
                base_times, wrapped_times = [], []
                for _ in range(args.repeats):
                    base_times.append(_time(baseline.step, args.device))
                    wrapped_times.append(_time(wrapped.step, args.device))
                base_ms = 1e3 * statistics.median(base_times)
                wrapped_ms = 1e3 * statistics.median(wrapped_times)
                ratio = statistics.median(
                    w / b for w, b in zip(wrapped_times, base_times, strict=True)
                )
                fused_params = wrapped.last_step_fused  # type: ignore[attr-defined]
                print(
                    f"{inner_name:14} {wrapper_name:20} {path:9} {base_ms:9.1f} {wrapped_ms:11.1f} "
                    f"{ratio:6.2f} {fused_params:6d}"
                )
                del wrapped, params16


def _cpu_flags() -> str:
    """The CPU's flags that matter for 16-bit compute, as mixprec.hardware.probe reads them."""
    return " ".join(sorted(probe("cpu", measure=False).cpu_flags)) or "none"


if __name__ == "__main__":
    main()
