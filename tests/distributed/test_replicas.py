"""Replica drift checks on two gloo ranks: identical replicas pass, one flipped bit on one rank
is named on both, FSDP2's shards are not replicas, HSDP's replicate dim is compared.

The reference is the ranks' own weights: each worker also all-gathers the full tensors and
compares them directly, so the hash's verdict is checked against exact equality.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_spawn import WORLD, spawn
from torch import nn

from mixprec import MixedPrecision
from mixprec.distributed import ReplicaDifference, check_replicas
from mixprec.distributed.replicas import check_replicas_every_arg, tensor_hash

NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10 + rank)  # each rank its own slice
    return torch.randn(4, 4, generator=gen), torch.randn(4, 3, generator=gen)


def flip_lowest_bit(tensor: torch.Tensor) -> None:
    with torch.no_grad():
        bits = tensor.view(-1).view(torch.int32 if tensor.element_size() == 4 else torch.int16)
        bits[1] ^= 1


def steps(mp: MixedPrecision, model: nn.Module, opt: torch.optim.Optimizer, rank: int, n: int):
    x, y = batch(rank)
    for _ in range(n):
        with mp.autocast():
            loss = (model(x).float() - y).pow(2).mean()
        mp.backward(loss)
        mp.step(opt)
        opt.zero_grad()


def exact_equal_across_ranks(tensor: torch.Tensor) -> bool:
    gathered = [torch.empty_like(tensor) for _ in range(WORLD)]
    dist.all_gather(gathered, tensor.detach().contiguous())
    return all(torch.equal(gathered[0], t) for t in gathered[1:])


def _ddp(rank: int, res: dict[str, Any]) -> None:
    mp = MixedPrecision("fp32", device="cpu")
    model = make_model()
    model, opt = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    ddp_model = mp.ddp(model)
    steps(mp, ddp_model, opt, rank, 2)
    res["ddp_same"] = check_replicas(ddp_model)
    res["ddp_same_exact"] = all(exact_equal_across_ranks(p) for p in model.parameters())
    if rank == 1:
        flip_lowest_bit(model[2].weight)
    res["ddp_flipped"] = check_replicas(ddp_model)
    res["ddp_flipped_session"] = mp.check_replicas()  # the prepared model, the same params
    res["ddp_flipped_exact"] = [exact_equal_across_ranks(p) for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"drifted apart.*'2\.weight' \(ranks \[0\] vs \[1\]\)"):
        res["ddp_flipped"].raise_if_differ()


def _session_option(rank: int, res: dict[str, Any]) -> None:
    # bf16-pure with stochastic rounding: the same seed keeps replicas identical; one bit that
    # changes on rank 1 after the first step (a drift) stops the run on both ranks at the check.
    for key in ("same_seed", "drifted"):
        mp = MixedPrecision(
            "bf16-pure", device="cpu", backend="emulated", update="stochastic", seed=0,
            check_replicas_every=2,
        )  # fmt: skip
        model = make_model()
        model, opt = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.01))
        ddp_model = mp.ddp(model)
        try:
            steps(mp, ddp_model, opt, rank, 1)
            if key == "drifted" and rank == 1:
                flip_lowest_bit(model[0].weight)
            steps(mp, ddp_model, opt, rank, 3)
            res[key] = "ok"
        except RuntimeError as err:
            res[key] = str(err)
        res[f"{key}_exact"] = all(exact_equal_across_ranks(p) for p in model.parameters())
    # A seed per rank would make the replicas round apart: refused before training starts.
    with pytest.raises(ValueError, match=r"different seeds \[0, 1\]") as refused:
        MixedPrecision("bf16-pure", device="cpu", seed=rank).ddp(make_model().bfloat16())
    res["seed_per_rank"] = str(refused.value)


def _fsdp(rank: int, res: dict[str, Any]) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mp = MixedPrecision("fp32", device="cpu")
    model = mp.fully_shard(make_model())
    model, opt = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    steps(mp, model, opt, rank, 1)
    if rank == 1:
        flip_lowest_bit(model[0].weight.to_local())
    res["fsdp"] = check_replicas(model)  # shards differ by design: nothing is a replica

    # HSDP: replicated over a dim of 2 ranks, sharded over a dim of 1: a replica per shard.
    mesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard"))
    mp_h = MixedPrecision("fp32", device="cpu")
    hsdp = mp_h.fully_shard(make_model(), mesh=mesh)
    hsdp, opt_h = mp_h.prepare(hsdp, torch.optim.SGD(hsdp.parameters(), lr=0.1))
    steps(mp_h, hsdp, opt_h, rank, 1)
    res["hsdp_placements"] = [str(p) for p in hsdp[0].weight.placements]
    res["hsdp_same"] = check_replicas(hsdp)
    if rank == 1:
        flip_lowest_bit(hsdp[0].bias.to_local())
    res["hsdp_flipped"] = check_replicas(hsdp)


def worker(rank: int, out: str) -> None:
    res: dict[str, Any] = {}
    _ddp(rank, res)
    _session_option(rank, res)
    _fsdp(rank, res)
    torch.save(res, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], ...]:
    out = tmp_path_factory.mktemp("replicas")
    spawn(worker, str(out))
    return tuple(torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD))


@pytest.mark.slow
def test_identical_ddp_replicas_pass(ranks: tuple[dict[str, Any], ...]) -> None:
    for res in ranks:
        assert res["ddp_same_exact"]  # the reference: the full tensors are equal
        assert res["ddp_same"].ok and res["ddp_same"].compared == tuple(NAMES)
        assert res["ddp_same"].world == WORLD and res["ddp_same"].skipped == ()


@pytest.mark.slow
def test_one_flipped_bit_on_rank_1_is_named_on_both_ranks(
    ranks: tuple[dict[str, Any], ...],
) -> None:
    expected = (ReplicaDifference("2.weight", ((0,), (1,))),)
    for res in ranks:
        assert res["ddp_flipped_exact"] == [name != "2.weight" for name in NAMES]
        assert res["ddp_flipped"].differences == expected
        assert res["ddp_flipped_session"].differences == expected
        assert not res["ddp_flipped"]


@pytest.mark.slow
def test_the_session_option_stops_a_run_whose_replicas_drift(
    ranks: tuple[dict[str, Any], ...],
) -> None:
    for res in ranks:
        assert res["same_seed_exact"] and res["same_seed"] == "ok"  # the same seed everywhere
        assert not res["drifted_exact"]  # the weights really differ
        assert "replicas have drifted apart" in res["drifted"]
        assert "'0.weight' (ranks [0] vs [1])" in res["drifted"]
        assert "different seeds [0, 1]" in res["seed_per_rank"]
    assert ranks[0]["drifted"] == ranks[1]["drifted"]  # one verdict on both ranks


@pytest.mark.slow
def test_fsdp2_shards_are_not_replicas_but_hsdp_replicas_are(
    ranks: tuple[dict[str, Any], ...],
) -> None:
    for res in ranks:
        assert res["fsdp"].ok and res["fsdp"].compared == () and res["fsdp"].skipped == tuple(NAMES)
        assert res["hsdp_placements"] == ["R", "S(0)"]  # Replicate, Shard(0)
        assert res["hsdp_same"].ok and res["hsdp_same"].compared == tuple(NAMES)
        assert res["hsdp_flipped"].differences == (ReplicaDifference("0.bias", ((0,), (1,))),)


# -- one process --------------------------------------------------------------------------------


def test_without_a_process_group_there_is_nothing_to_compare() -> None:
    assert not dist.is_initialized()
    result = check_replicas(make_model())
    assert result.ok and result.world == 1 and result.compared == ()
    assert "no replicas" in str(result)
    result.raise_if_differ()  # nothing differs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_hash_sees_every_single_bit_and_a_swap(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    tensor = torch.randn(64).to(dtype)
    base = tensor_hash(tensor)
    assert torch.equal(base, tensor_hash(tensor.clone()))
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    for bit in range(8 * tensor.element_size()):  # every bit of one element, one at a time
        flipped = tensor.clone()
        flipped.view(bits)[3] ^= torch.tensor(1, dtype=bits) << bit
        assert not torch.equal(tensor_hash(flipped), base), bit
    swapped = tensor.clone()
    swapped[[5, 6]] = tensor[[6, 5]]
    assert not torch.equal(swapped, tensor) and not torch.equal(tensor_hash(swapped), base)


def test_bad_arguments_are_refused_with_the_fix() -> None:
    with pytest.raises(TypeError, match=r"expects an nn\.Module, got list"):
        check_replicas([])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"check_replicas_every must be >= 1.*got 0"):
        MixedPrecision("fp32", device="cpu", check_replicas_every=0)
    with pytest.raises(TypeError, match=r"check_replicas_every must be an int.*got float 2\.5"):
        MixedPrecision("fp32", device="cpu", check_replicas_every=2.5)  # type: ignore[arg-type]
    assert check_replicas_every_arg(None) is None
    with pytest.raises(RuntimeError, match=r"check_replicas has no model.*mp\.prepare"):
        MixedPrecision("fp32", device="cpu").check_replicas()
