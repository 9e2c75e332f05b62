"""DTensor-safe clipping, skip diagnostics and scaler agreement, in this process (a 1-rank group).

A one-rank gloo group is enough for DTensors to exist and for collectives to run; the two-rank
behaviour is in ``test_two_ranks.py``. Reference: the same computation on plain tensors.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mixprec.diagnostics import nonfinite_grads
from mixprec.scaling import GradScaler
from mixprec.scaling.agreement import agreement_groups, mark_replicas
from mixprec.scaling.clip import global_norm


def test_no_agreement_without_a_process_group() -> None:  # first: before the group exists
    assert not dist.is_initialized()
    replica = nn.Linear(2, 2)
    mark_replicas(replica.parameters())
    assert agreement_groups(replica.parameters(), "auto") == []
    assert agreement_groups(replica.parameters(), "world") == []


@pytest.fixture(scope="module")
def group() -> Iterator[None]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def sharded_twin() -> tuple[nn.Module, nn.Module]:
    """A plain model and an FSDP2 copy of it, both with the same gradients."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
    torch.manual_seed(0)
    sharded = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
    fully_shard(sharded)
    x = torch.randn(6, 4)
    for model in (plain, sharded):
        model(x).pow(2).sum().backward()
    return plain, sharded


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.5, math.inf])
def test_global_norm_of_dtensor_grads_is_the_plain_norm(group: None, norm_type: float) -> None:
    plain, sharded = sharded_twin()
    expected = torch.nn.utils.get_total_norm([p.grad for p in plain.parameters()], norm_type)
    grads = [p.grad for p in sharded.parameters()]
    assert all(type(g).__name__ == "DTensor" for g in grads)
    norm = global_norm({(grads[0].device, torch.float32): grads}, norm_type, torch.device("cpu"))
    assert type(norm) is torch.Tensor
    torch.testing.assert_close(norm, expected)


def test_clip_grad_norm_on_dtensors_matches_torch(group: None) -> None:
    plain, sharded = sharded_twin()
    expected = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.1)
    scaler = GradScaler("cpu", init_scale=4.0)
    opt = torch.optim.SGD(sharded.parameters(), lr=0.1)
    scaler.scale(torch.ones(()))  # starts the iteration; the gradients below are "scaled"
    for p in sharded.parameters():
        p.grad.mul_(4.0)
    norm = scaler.clip_grad_norm_(opt, 0.1)
    torch.testing.assert_close(norm, expected)
    for mine, ref in zip(sharded.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(mine.grad.full_tensor(), ref.grad)


def test_nonfinite_grads_names_dtensor_params(group: None) -> None:
    plain, sharded = sharded_twin()
    for model in (plain, sharded):
        grad = model[1].weight.grad
        local = grad.to_local() if hasattr(grad, "to_local") else grad
        local.view(-1)[2] = float("nan")
    assert nonfinite_grads(sharded) == nonfinite_grads(plain) == ["1.weight"]


def test_auto_agrees_only_over_known_replicas_and_meshes(group: None) -> None:
    _, sharded = sharded_twin()
    mesh_groups = agreement_groups(sharded.parameters(), "auto")
    assert mesh_groups == sharded[0].weight.device_mesh.get_all_groups()
    side = nn.Linear(2, 2)
    assert agreement_groups(side.parameters(), "auto") == []  # a side model stays local
    assert agreement_groups(side.parameters(), None) == []
    assert agreement_groups(side.parameters(), "world") == [None]
    replica = nn.Linear(2, 2)
    mark_replicas(replica.parameters(), dist.group.WORLD)
    assert agreement_groups(replica.parameters(), "auto") == [dist.group.WORLD]


@pytest.mark.parametrize("spec", ["fp32", "bf16-mixed", "fp16-mixed", "bf16-pure"])
def test_mixed_precision_policy_follows_the_policy_fields(spec: str) -> None:
    from mixprec.distributed import mixed_precision_policy
    from mixprec.policy import Policy

    policy = Policy.parse(spec)
    mapped = mixed_precision_policy(policy)
    gathered = mapped.param_dtype or policy.param.dtype
    assert gathered == policy.compute.dtype  # the forward runs in the compute format
    assert mapped.reduce_dtype == policy.reduce.dtype  # always explicit
    assert (mapped.output_dtype or gathered) == policy.output.dtype


def test_fully_shard_gives_islands_their_own_precision(group: None) -> None:
    from mixprec import MixedPrecision

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    mp = MixedPrecision("bf16-mixed; class:Linear -> params=fp32,compute=bf16,output=bf16")
    seen: dict[str, torch.dtype] = {}
    outputs: dict[str, torch.dtype] = {}
    for name, sub in model.named_children():
        sub.register_forward_pre_hook(
            lambda module, args, name=name: seen.__setitem__(name, module.weight.dtype)
        )
        sub.register_forward_hook(
            lambda module, args, out, name=name: outputs.__setitem__(name, out.dtype)
        )
    model = mp.fully_shard(model)
    assert all(type(p).__name__ == "DTensor" for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 shards
    out = model(torch.randn(3, 4))
    # Linears gather their weights in bf16; the LayerNorm (an FP32 island) in fp32.
    assert seen == {"0": torch.bfloat16, "1": torch.float32, "2": torch.bfloat16}
    assert outputs["2"] == torch.bfloat16  # the Linear rule's output=bf16 ...
    assert out.dtype == torch.float32  # ... and the root's output=fp32
    with pytest.raises(RuntimeError, match=r"already sharded by fully_shard"):
        mp.fully_shard(model)
