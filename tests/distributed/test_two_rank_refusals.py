"""Two gloo ranks that disagree are refused before anything goes wrong (issue 19: 7, 8, 21), and
a sharded save that fails on one rank fails on both and keeps the previous checkpoint.

One spawn runs every check; each rank records what it saw and the assertions run here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from dist_spawn import spawn
from torch import nn

from mixprec import MixedPrecision
from mixprec.checkpoint import CheckpointError
from mixprec.distributed import check_replicas
from mixprec.distributed import checkpoint as sharded


def make() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def refusal(call: Any) -> str:
    try:
        call()
    except (ValueError, CheckpointError) as err:
        return f"{type(err).__name__}: {err}"
    return "accepted"


def session(policy: str = "fp32") -> tuple[MixedPrecision, nn.Module, torch.optim.Optimizer]:
    mp = MixedPrecision(policy, "cpu", backend="emulated")
    model = make()
    model, opt = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    return mp, mp.ddp(model), opt


def one_step(mp: MixedPrecision, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    mp.backward(model(torch.ones(3, 4)).pow(2).mean())
    mp.step(opt)
    opt.zero_grad()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def worker(rank: int, out: str) -> None:
    seen: dict[str, Any] = {}
    # 7: different presets on the ranks, refused where data parallelism starts
    policy = "bf16-mixed" if rank == 0 else "fp16-mixed"
    mp = MixedPrecision(policy, "cpu", backend="emulated")
    plain = make()
    model, _ = mp.prepare(plain, torch.optim.SGD(plain.parameters(), lr=0.1))
    seen["ddp"] = refusal(lambda: mp.ddp(model))
    seen["fully_shard"] = refusal(lambda: MixedPrecision(policy, "cpu").fully_shard(make()))
    # 21: models with different parameter counts: compared before any hash is gathered
    other = make() if rank == 0 else nn.Sequential(make(), nn.Linear(2, 2))
    seen["replicas"] = refusal(lambda: check_replicas(other))

    # 8: a two-rank checkpoint without rank1.pt
    folder = Path(out) / "ckpt"
    mp, model, opt = session()
    one_step(mp, model, opt)
    mp.save(folder, model, opt, epoch=1)
    saved = snapshot(model)
    dist.barrier()
    version = folder / (folder / "LATEST").read_text().strip()
    if rank == 0:
        (version / "rank1.pt").rename(folder / "rank1.pt.aside")
    dist.barrier()
    mp2, model2, opt2 = session()
    before = snapshot(model2)
    seen["missing_rank_file"] = refusal(lambda: mp2.load(folder, model2, opt2))
    seen["missing_unchanged"] = same(before, snapshot(model2)) and not opt2.state
    dist.barrier()
    if rank == 0:
        (folder / "rank1.pt.aside").rename(version / "rank1.pt")
    dist.barrier()

    # a save that fails on rank 1 only (its disk is full): both raise, the previous one stays
    one_step(mp, model, opt)
    if rank == 1:
        real = sharded.save_checkpoint

        def full(*args: Any, **kwargs: Any) -> Any:
            raise OSError(28, "No space left on device")

        sharded.save_checkpoint = full
    listing = sorted(os.listdir(folder))
    seen["failed_save"] = refusal(lambda: mp.save(folder, model, opt, epoch=2))
    if rank == 1:
        sharded.save_checkpoint = real
    dist.barrier()
    seen["failed_save_listing"] = sorted(os.listdir(folder)) == listing
    mp3, model3, opt3 = session()
    seen["previous_loads"] = mp3.load(folder, model3, opt3) == {"epoch": 1} and same(
        saved, snapshot(model3)
    )
    torch.save(seen, Path(out) / f"seen{rank}.pt")


def test_disagreeing_ranks_are_refused(tmp_path: Path) -> None:
    spawn(worker, str(tmp_path))
    for rank in (0, 1):
        seen = torch.load(tmp_path / f"seen{rank}.pt", weights_only=True)
        for call in ("ddp", "fully_shard"):
            assert seen[call].startswith("ValueError: the ranks use different precision poli")
            assert "fp16" in seen[call] and "bf16" in seen[call]
        assert seen["replicas"].startswith("ValueError: the ranks' models differ: parameter co")
        assert "[4, 6]" in seen["replicas"], seen["replicas"]
        assert seen["missing_rank_file"].startswith("CheckpointError"), seen["missing_rank_file"]
        assert "rank1.pt is missing" in seen["missing_rank_file"]
        assert seen["missing_unchanged"]
        assert seen["failed_save"].startswith("CheckpointError"), seen["failed_save"]
        assert "no space left on device" in seen["failed_save"]
        assert seen["failed_save_listing"] and seen["previous_loads"]
