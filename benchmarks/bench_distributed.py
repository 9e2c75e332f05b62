"""DDP step time and bytes moved with mixprec's reduce hook in bf16 vs fp32, 2 gloo processes.

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

    python benchmarks/bench_distributed.py [--millions 4] [--steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mixprec.distributed import check_replicas, ddp
from mixprec.hardware import probe

WORLD = 2


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
        models: dict[str, nn.Module] = {
            "torch DDP (fp32)": DistributedDataParallel(_model(args.millions)),
            "mixprec reduce=fp32": ddp(_model(args.millions), "params=fp32,reduce=fp32"),
            "mixprec reduce=bf16": ddp(_model(args.millions), "params=fp32,reduce=bf16"),
        }
        opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in models.items()}
        x = torch.randn(16, 1024, generator=torch.Generator().manual_seed(rank))
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
            print(f"CPU flags: {_cpu_flags()}; torch threads per rank: {torch.get_num_threads()}")
            numel = sum(p.numel() for p in models["torch DDP (fp32)"].parameters())
            base = statistics.median(times["torch DDP (fp32)"])
            print(f"{numel / 1e6:.1f}M parameters, {WORLD} gloo ranks, {args.steps} steps")
            print(f"{'':22}{'ms/step':>9}{'ratio':>7}{'MB/step/rank':>14}{'ratio':>7}")
            for name, model in models.items():
                state = getattr(model, "mixprec_reduce", None)
                per_step = (
                    state.bytes_reduced / (args.steps + 2) if state is not None else numel * 4
                )
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
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--millions", type=float, default=4.0, help="parameters, in millions")
    parser.add_argument("--steps", type=int, default=20)
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
