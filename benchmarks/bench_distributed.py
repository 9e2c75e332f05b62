"""Data-parallel steps on 2 gloo processes: mixprec's DDP reduce hook, and FSDP2 under each preset.

Part ``ddp``: step time and bytes moved with mixprec's reduce hook in bf16 vs fp32.

Baseline: torch's own DDP (no hook: buckets all-reduced in fp32 as the gradients are). Then
mixprec's hook with ``reduce=fp32`` (the hook's overhead alone) and ``reduce=bf16`` (half the
bytes on the wire, one rounding per bucket). All three train the same fp32 MLP on the same data,
interleaved step by step so drift in machine load hits each alike; the median step time and the
bytes each rank handed to the all-reduce per step are printed, with ratios to the baseline.

On one machine gloo moves bytes through loopback TCP, which is fast next to the casts: there bf16
can be slower than fp32 (measured on a shared 2-core CPU, 2.1M parameters: 52.6 ms torch DDP,
58.4 ms reduce=fp32, 59.5 ms reduce=bf16, with 8.4 vs 4.2 MB per step and rank). The saving grows
with the time the wire takes (a real network, many ranks); the byte count is exact.

Also timed: ``check_replicas`` on the same model (two hash numbers per parameter from its bit
patterns, one all-gather), as a ratio to torch's DDP step — the cost of running the replica
check every step; ``check_replicas_every=N`` pays it once per N steps.

Part ``fsdp2``: training steps under each preset and update mode against torch's own FSDP2.
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

    python benchmarks/bench_distributed.py [--parts ddp,fsdp2] [--millions 4] [--steps 20]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from mixprec import MixedPrecision
from mixprec.distributed import check_replicas, ddp
from mixprec.hardware import probe
from mixprec.optim import memory_report

WORLD = 2
PARTS = ("ddp", "fsdp2")
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


def _worker(rank: int, port: int, args: argparse.Namespace) -> None:
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        if rank == 0:
            print(f"CPU flags: {_cpu_flags()}; torch threads per rank: {torch.get_num_threads()}")
        x = torch.randn(16, 1024, generator=torch.Generator().manual_seed(rank))
        if "ddp" in args.parts:
            _ddp_part(rank, args, x)
        if "fsdp2" in args.parts:
            _fsdp2_part(rank, args, x)
    finally:
        dist.destroy_process_group()


def _ddp_part(rank: int, args: argparse.Namespace, x: torch.Tensor) -> None:
    """torch's DDP against mixprec's reduce hook in fp32 and bf16; then check_replicas."""
    models: dict[str, nn.Module] = {
        "torch DDP (fp32)": DistributedDataParallel(_model(args.millions)),
        "mixprec reduce=fp32": ddp(_model(args.millions), "params=fp32,reduce=fp32"),
        "mixprec reduce=bf16": ddp(_model(args.millions), "params=fp32,reduce=bf16"),
    }
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for step in range(args.steps + 2):
        for name, model in models.items():
            dist.barrier()
            start = time.perf_counter()
            model(x).pow(2).mean().backward()
            opts[name].step()
            opts[name].zero_grad()
            if step >= 2:  # the first steps build buckets and warm up
                times[name].append(time.perf_counter() - start)
    checks = []
    for _ in range(5):
        dist.barrier()
        start = time.perf_counter()
        verdict = check_replicas(models["torch DDP (fp32)"])
        checks.append(time.perf_counter() - start)
    assert verdict.ok, str(verdict)
    if rank == 0:
        numel = sum(p.numel() for p in models["torch DDP (fp32)"].parameters())
        base = statistics.median(times["torch DDP (fp32)"])
        print(f"DDP: {numel / 1e6:.1f}M parameters, {WORLD} gloo ranks, {args.steps} steps")
        print(f"{'':22}{'ms/step':>9}{'ratio':>7}{'MB/step/rank':>14}{'ratio':>7}")
        for name, model in models.items():
            state = getattr(model, "mixprec_reduce", None)
            per_step = state.bytes_reduced / (args.steps + 2) if state is not None else numel * 4
            median = statistics.median(times[name])
            print(
                f"{name:22}{median * 1e3:>9.1f}{median / base:>7.2f}"
                f"{per_step / 1e6:>14.2f}{per_step / (numel * 4):>7.2f}"
            )
        check = statistics.median(checks)
        print(
            f"{'check_replicas':22}{check * 1e3:>9.1f}{check / base:>7.2f}"
            f"{16 * len(verdict.compared) * WORLD / 1e6:>14.6f}  (gathered hashes)"
        )


@dataclass
class _Variant:
    """One way to train the sharded model: its backward of a loss, its update, what it holds."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    backward: Callable[[torch.Tensor], None]
    update: Callable[[], object]


def _fsdp2_variants(millions: float) -> dict[str, _Variant]:
    torch_model = _model(millions)
    for block in torch_model:
        fully_shard(block)
    fully_shard(torch_model)
    torch_opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-4, foreach=True)
    variants = {
        "torch FSDP2 (fp32)": _Variant(
            torch_model, torch_opt, lambda loss: loss.backward(), torch_opt.step
        )
    }
    for name, (policy, update) in SESSIONS.items():
        session = MixedPrecision(policy, device="cpu", update=update)
        model = session.fully_shard(_model(millions), wrap=(nn.Sequential,))
        model, opt = session.prepare(
            model, torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        )
        variants[name] = _Variant(model, opt, session.backward, lambda s=session, o=opt: s.step(o))
    return variants


def _fsdp2_part(rank: int, args: argparse.Namespace, x: torch.Tensor) -> None:
    """torch's FSDP2 in fp32 against MixedPrecision sessions sharded by mp.fully_shard."""
    variants = _fsdp2_variants(args.millions)
    steps: dict[str, list[float]] = {k: [] for k in variants}
    updates: dict[str, list[float]] = {k: [] for k in variants}
    for step in range(args.steps + 2):
        for name, variant in variants.items():
            dist.barrier()
            start = time.perf_counter()
            variant.backward(variant.model(x).float().pow(2).mean())
            middle = time.perf_counter()
            variant.update()
            variant.optimizer.zero_grad()
            end = time.perf_counter()
            if step >= 2:  # the first steps allocate states and warm up
                steps[name].append(end - start)
                updates[name].append(end - middle)
    if rank == 0:
        base = "torch FSDP2 (fp32)"
        numel = sum(p.numel() for p in variants[base].model.parameters())
        print(f"FSDP2: {numel / 1e6:.1f}M parameters, {WORLD} gloo ranks, {args.steps} steps")
        header = f"{'ms/step':>9}{'ratio':>7}{'update ms':>11}{'ratio':>7}{'B/param/rank':>14}"
        print(f"{'':30}{header}")
        base_step, base_update = statistics.median(steps[base]), statistics.median(updates[base])
        for name, variant in variants.items():
            report = memory_report(variant.model, variant.optimizer)
            step_time, update = statistics.median(steps[name]), statistics.median(updates[name])
            print(
                f"{name:30}{step_time * 1e3:>9.1f}{step_time / base_step:>7.2f}"
                f"{update * 1e3:>11.1f}{update / base_update:>7.2f}"
                f"{report.per_param['total']:>14.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--millions", type=float, default=4.0, help="parameters, in millions")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated parts to run (%(default)s)"
    )
    args = parser.parse_args()
    args.parts = args.parts.split(",")
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown parts {unknown!r}; valid parts: {', '.join(PARTS)}")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(port, args), nprocs=WORLD, join=True)


def _cpu_flags() -> str:
    """The CPU's flags that matter for 16-bit compute, as mixprec.hardware.probe reads them."""
    return " ".join(sorted(probe("cpu", measure=False).cpu_flags)) or "none"


if __name__ == "__main__":
    main()
