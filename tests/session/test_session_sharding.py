"""Sharding a prepared model with torch's own fully_shard: the error names the order that works.

A one-rank gloo group in this process is enough for FSDP2 to replace the parameters.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mixprec import MixedPrecision


@pytest.fixture
def group() -> Iterator[None]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_torch_fully_shard_after_prepare_names_the_replaced_parameters(group: None) -> None:
    """Issue 19 item 18: not "none of the optimizers' parameters has a gradient"."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
    mp = MixedPrecision("bf16-mixed", "cpu", backend="emulated")
    model, optimizer = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    old = [p.detach().clone() for group in optimizer.param_groups for p in group["params"]]
    fully_shard(model)
    mp.backward(model(torch.randn(2, 4)).float().pow(2).mean())
    expected = r"sharding \(fully_shard\) replaced.*mp\.fully_shard\(model\)"
    with pytest.raises(RuntimeError, match=expected) as error:
        mp.step(optimizer)
    assert "has a gradient" not in str(error.value)
    now = [p.detach() for group in optimizer.param_groups for p in group["params"]]
    assert all(torch.equal(a, b) for a, b in zip(old, now, strict=True))  # nothing changed
