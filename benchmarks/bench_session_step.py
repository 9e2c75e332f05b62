"""The whole ``MixedPrecision.step`` against a hand-written loop of torch's own pieces.

``mp.step(optimizer, max_grad_norm=1.0)`` unscales, clips, checks for inf/NaN, steps (or skips)
and updates the loss scale, and returns a step report. The twin does the same by hand on an
identical model and optimizer:

* ``fp16-mixed`` (fp32 parameters, dynamic loss scaling): ``torch.amp.GradScaler`` with
  ``unscale_``, ``torch.nn.utils.clip_grad_norm_``, ``scaler.step`` and ``scaler.update``;
* ``bf16 + fp32 master`` (bf16 parameters, fp32 master weights, no scaling): fp32 copies of the
  gradients into the masters, ``clip_grad_norm_`` on them, the AdamW step on the masters and a
  foreach copy back into the bf16 parameters.

Only the step is timed: before each timed step both models get the same gradients from one saved
copy (and a scaled dummy loss, so that the scalers have a scale). The two alternate pair by pair,
which one goes first alternating too, and the median over pairs of the time ratio is printed.
Target from the issue: within 3% (ratio <= 1.03).

Measured (12M parameters, 1 thread, AMD EPYC with AVX512_BF16, shared machine; median ratio
over 21 pairs): fp16-mixed 0.93 (0.95 before the fused kernels: that setup has fp32 parameters
and no wrapper, so the two differ by noise only); bf16 + fp32 master 0.58 (0.64 before): the
session's master-weight step is the one-pass AdamW of :mod:`mixprec.optim.fused`, and the clip
folds into the scale it hands the step.

    python benchmarks/bench_session_step.py [--millions 12] [--pairs 21] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from mixprec import MixedPrecision
from mixprec.hardware import probe

MAX_NORM = 1.0


def _model(millions: float) -> nn.Module:
    torch.manual_seed(0)
    depth = max(1, round(millions * 1e6 / (1024 * 1024 + 1024)))
    return nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(depth)])


def _grads(model: nn.Module, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(p.shape, generator=g) * 1e-2).to(dtype) for p in model.parameters()]


def _restore(model: nn.Module, grads: list[torch.Tensor], scale: float) -> None:
    for p, grad in zip(model.parameters(), grads, strict=True):
        p.grad = grad.mul(scale)


def _fp16_mixed(millions: float) -> tuple[Callable[[], None], Callable[[], None]]:
    model = _model(millions)
    twin = copy.deepcopy(model)
    mp = MixedPrecision("fp16-mixed", "cpu", backend="emulated")
    model, opt = mp.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True))
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-4, foreach=True)
    scaler = torch.amp.GradScaler("cpu")
    grads = _grads(twin, torch.float32)
    dummy = torch.zeros((), requires_grad=True)

    def ours() -> None:
        mp.backward(dummy * 1.0)  # sets the scale; the gradients come from the saved copy
        _restore(model, grads, mp.scaler.get_scale())
        start = time.perf_counter()
        mp.step(opt, max_grad_norm=MAX_NORM)
        _record(start)

    def theirs() -> None:
        scaler.scale(dummy * 1.0).backward()
        _restore(twin, grads, scaler.get_scale())
        start = time.perf_counter()
        scaler.unscale_(twin_opt)
        torch.nn.utils.clip_grad_norm_(twin.parameters(), MAX_NORM, foreach=True)
        scaler.step(twin_opt)
        scaler.update()
        _record(start)

    return ours, theirs


def _bf16_master(millions: float) -> tuple[Callable[[], None], Callable[[], None]]:
    model = _model(millions)
    twin = copy.deepcopy(model).to(torch.bfloat16)
    mp = MixedPrecision("params=bf16,compute=bf16,master=fp32", "cpu", backend="emulated")
    model, opt = mp.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True))
    params = list(twin.parameters())
    masters = [p.detach().float().requires_grad_() for p in params]
    twin_opt = torch.optim.AdamW(masters, lr=1e-4, foreach=True)
    grads = _grads(twin, torch.bfloat16)
    dummy = torch.zeros((), requires_grad=True)

    def ours() -> None:
        mp.backward(dummy * 1.0)  # bf16: no scaling, but the call order is the same
        _restore(model, grads, 1.0)
        start = time.perf_counter()
        mp.step(opt, max_grad_norm=MAX_NORM)
        _record(start)

    def theirs() -> None:
        _restore(twin, grads, 1.0)
        start = time.perf_counter()
        for master, p in zip(masters, params, strict=True):
            master.grad = p.grad.float()  # type: ignore[union-attr]
        norm = torch.nn.utils.clip_grad_norm_(masters, MAX_NORM, foreach=True)
        if torch.isfinite(norm):  # the skip check
            twin_opt.step()
            with torch.no_grad():
                torch._foreach_copy_(params, masters)
        for master in masters:
            master.grad = None
        _record(start)

    return ours, theirs


_TIMES: list[float] = []


def _record(start: float) -> None:
    _TIMES.append(time.perf_counter() - start)


def _timed(step: Callable[[], None]) -> float:
    _TIMES.clear()
    step()
    return _TIMES[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--millions", type=float, default=12.0, help="model size, M params")
    parser.add_argument("--pairs", type=int, default=21)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}; {torch.get_num_threads()} threads; cpu flags: "
        f"{_cpu_flags()}; median of {args.pairs} alternating pairs"
    )
    print(f"{'setup':22} {'torch ms':>9} {'mixprec ms':>11} {'ratio':>6}")
    for name, build in (("fp16-mixed", _fp16_mixed), ("bf16 + fp32 master", _bf16_master)):
        ours, theirs = build(args.millions)
        ours(), theirs()  # warm-up: optimizer state and allocator
        ratios, our_times, their_times = [], [], []
        for pair in range(args.pairs):
            if pair % 2:
                a, b = _timed(ours), _timed(theirs)
            else:
                b, a = _timed(theirs), _timed(ours)
            ratios.append(a / b)
            our_times.append(a)
            their_times.append(b)
        print(
            f"{name:22} {1e3 * statistics.median(their_times):9.1f} "
            f"{1e3 * statistics.median(our_times):11.1f} {statistics.median(ratios):6.3f}"
        )


def _cpu_flags() -> str:
    """The CPU's flags that matter for 16-bit compute, as mixprec.hardware.probe reads them."""
    return " ".join(sorted(probe("cpu", measure=False).cpu_flags)) or "none"


if __name__ == "__main__":
    main()
