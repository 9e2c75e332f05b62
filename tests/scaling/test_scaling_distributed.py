"""Two real processes on gloo: only one rank sees an inf, both must skip together."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mixprec.scaling import GradScaler

STEPS = 4
OVERFLOW_ON_RANK_1 = 2  # the iteration where rank 1 alone injects an inf


def set_grad_entry(param: torch.Tensor, value: float) -> None:
    """Overwrite the first entry of ``param``'s gradient: an injected overflow."""
    grad = param.grad
    assert grad is not None
    grad.view(-1)[0] = value


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {}
        for group in ("world", None):
            torch.manual_seed(0)  # same model on both ranks; rank-specific data
            model = torch.nn.Linear(3, 2)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            scaler = GradScaler("cpu", init_scale=2.0**10, growth_interval=1, process_group=group)
            x = torch.randn(4, 3, generator=torch.Generator().manual_seed(rank))
            skipped, scales = [], []
            for it in range(STEPS):
                opt.zero_grad()
                scaler.scale(model(x).pow(2).mean()).backward()
                if rank == 1 and it == OVERFLOW_ON_RANK_1:
                    set_grad_entry(model.weight, float("inf"))
                scaler.step(opt)
                scaler.update()
                skipped.append(scaler.step_skipped(opt))
                scales.append(scaler.get_scale())
            results[str(group)] = {"skipped": skipped, "scales": scales}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_agree_to_skip_when_one_sees_an_inf(tmp_path: Path) -> None:
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    expected = [it == OVERFLOW_ON_RANK_1 for it in range(STEPS)]
    # With agreement, both ranks skip the same iteration and keep the same scale.
    assert rank0["world"]["skipped"] == rank1["world"]["skipped"] == expected
    assert rank0["world"]["scales"] == rank1["world"]["scales"]
    # Without it (torch's behaviour), rank 0 would have stepped alone: the hook is what agrees.
    assert rank0["None"]["skipped"] == [False] * STEPS
    assert rank1["None"]["skipped"] == expected
    assert rank0["None"]["scales"] != rank1["None"]["scales"]


def test_world_without_init_is_a_single_process() -> None:
    assert not dist.is_initialized()
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = GradScaler("cpu", process_group="world")
    scaler.scale(model(torch.ones(1, 3)).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert not scaler.step_skipped()
