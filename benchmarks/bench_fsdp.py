"""FSDP2 training steps under each preset and update mode against torch's own FSDP2, 2 gloo ranks.

Baseline: ``torch.distributed.fsdp.fully_shard`` on an fp32 MLP with ``torch.optim.AdamW`` (plain
fp32 training). Then ``MixedPrecision`` sessions sharded with ``mp.fully_shard``: fp32,
bf16-mixed (fp32 shards, gathered in bf16), fp32 master weights over bf16 shards, and bf16-pure
with stochastic rounding and with Kahan compensation, where the update works on each rank's local
shards and the inner AdamW steps DTensors. All train the same model on the same data, interleaved
step by step so drift in machine load hits each alike. Printed per variant: the median whole step
(forward, backward, reduce-scatter, update), the median update alone (``mp.step`` or
``optimizer.step``), each as a ratio to the baseline, and the model-state bytes this rank holds
(``memory_report``: local shards, after ``zero_grad``), per parameter of the model.

Measured on a 2-core AMD EPYC (avx2 avx512f avx512_bf16), 1 thread per rank, 4.2M parameters:
whole step 1.06 (fp32), 0.79 (bf16-mixed), 0.69 (fp32 master), 0.65 (stochastic rounding), 0.64
(Kahan) of torch's fp32 FSDP2 step (native bf16 GEMMs); the update alone 1.78, 1.58, 1.45, 1.32,
1.31 of torch's AdamW on the fp32 shards (the 16-bit ones through the one-pass kernels on the
local shards; 1.77, 2.92, 2.35 through the inner optimizer on DTensors); 6, 6, 7, 5, 6 B/param
per rank. Run to run, the ratios move by about 0.1.

    python benchmarks/bench_fsdp.py [--millions 4] [--steps 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard

from mixprec import MixedPrecision
from mixprec.hardware import probe
from mixprec.optim import memory_report

WORLD = 2
SESSIONS = {
    "mixprec fp32": ("fp32", "auto"),
    "mixprec bf16-mixed": ("bf16-mixed", "auto"),
    "mixprec bf16 + fp32 master": ("params=bf16,compute=bf16,output=bf16,master=fp32", "master"),
    "mixprec bf16-pure stochastic": ("bf16-pure", "stochastic"),
    "mixprec bf16-pure kahan": ("bf16-pure", "kahan"),
}


def _model(millions: float) -> nn.Module:
    width = 1024
    blocks = max(1, round(millions * 1e6 / (width * width + width)))
    torch.manual_seed(0)
    return nn.Sequential(
        *[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(blocks)]
    )


def _variants(millions: float) -> dict[str, tuple[nn.Module, Any, Callable[[Any], None]]]:
    """name -> (model, optimizer, backward-and-update function of a loss)."""
    torch_model = _model(millions)
    for block in torch_model:
        fully_shard(block)
    fully_shard(torch_model)
    torch_opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-4, foreach=True)
    variants: dict[str, tuple[nn.Module, Any, Callable[[Any], None]]] = {
        "torch FSDP2 (fp32)": (torch_model, torch_opt, lambda loss: loss.backward())
    }
    for name, (policy, update) in SESSIONS.items():
        session = MixedPrecision(policy, device="cpu", update=update)
        model = session.fully_shard(_model(millions), wrap=(nn.Sequential,))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        model, opt = session.prepare(model, opt)
        variants[name] = (model, (session, opt), session.backward)
    return variants


def _update(opt: Any) -> None:
    if isinstance(opt, tuple):
        session, inner = opt
        session.step(inner)
        inner.zero_grad()
    else:
        opt.step()
        opt.zero_grad()


def _worker(rank: int, port: int, args: argparse.Namespace) -> None:
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        variants = _variants(args.millions)
        x = torch.randn(16, 1024, generator=torch.Generator().manual_seed(rank))
        steps: dict[str, list[float]] = {k: [] for k in variants}
        updates: dict[str, list[float]] = {k: [] for k in variants}
        for step in range(args.steps + 2):
            for name, (model, opt, backward) in variants.items():
                dist.barrier()
                start = time.perf_counter()
                backward(model(x).float().pow(2).mean())
                middle = time.perf_counter()
                _update(opt)
                end = time.perf_counter()
                if step >= 2:  # the first steps allocate states and warm up
                    steps[name].append(end - start)
                    updates[name].append(end - middle)
        if rank == 0:
            print(f"CPU flags: {_cpu_flags()}; torch threads per rank: {torch.get_num_threads()}")
            base_model = variants["torch FSDP2 (fp32)"][0]
            numel = sum(p.numel() for p in base_model.parameters())
            print(f"{numel / 1e6:.1f}M parameters, {WORLD} gloo ranks, {args.steps} steps")
            header = f"{'ms/step':>9}{'ratio':>7}{'update ms':>11}{'ratio':>7}{'B/param/rank':>14}"
            print(f"{'':30}{header}")
            base_step = statistics.median(steps["torch FSDP2 (fp32)"])
            base_update = statistics.median(updates["torch FSDP2 (fp32)"])
            for name, (model, opt, _) in variants.items():
                inner = opt[1] if isinstance(opt, tuple) else opt
                report = memory_report(model, inner)
                step, update = statistics.median(steps[name]), statistics.median(updates[name])
                print(
                    f"{name:30}{step * 1e3:>9.1f}{step / base_step:>7.2f}"
                    f"{update * 1e3:>11.1f}{update / base_update:>7.2f}"
                    f"{report.per_param['total']:>14.2f}"
                )
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--millions", type=float, default=4.0, help="parameters, in millions")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(port, args), nprocs=WORLD, join=True)


def _cpu_flags() -> str:
    """The CPU's flags that matter for 16-bit compute, as mixprec.hardware.probe reads them."""
    return " ".join(sorted(probe("cpu", measure=False).cpu_flags)) or "none"


if __name__ == "__main__":
    main()
