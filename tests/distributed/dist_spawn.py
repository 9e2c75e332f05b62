"""Spawn helpers for the two-process gloo tests (imported by the test modules)."""

from __future__ import annotations

import datetime
import faulthandler
import gc
import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entry(rank: int, port: int, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    # A rank killed by a signal (an abort in a C++ thread) prints every thread's Python stack,
    # so the failure report says where it was, not only "terminated with signal SIGABRT".
    faulthandler.enable(all_threads=True)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),  # a collective that hangs fails the test instead
    )
    try:
        fn(rank, *args)
        # Both ranks are done with their collectives, and what holds tensors of pending gloo
        # work (FSDP2 states, sessions) is gone, before the group's threads are torn down.
        dist.barrier()
        gc.collect()
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., None], *args: Any) -> None:
    """Run ``fn(rank, *args)`` in two gloo processes; raises if either fails."""
    mp.spawn(_entry, args=(free_port(), fn, args), nprocs=WORLD, join=True)
