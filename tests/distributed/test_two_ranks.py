"""DDP and FSDP2 under a policy on two gloo processes, against one process on the global batch.

One spawn runs every two-rank check (spawning costs seconds); the worker saves what it saw and
the assertions against the one-process reference run here, in the parent.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_spawn import WORLD, spawn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mixprec import MixedPrecision
from mixprec.distributed.ddp import check_reducible
from mixprec.distributed.plan import memory_plan
from mixprec.formats import resolve_format
from mixprec.optim import memory_report
from mixprec.optim.memory import PARTS
from mixprec.scaling import GradScaler

pytestmark = pytest.mark.slow

STEPS = 4
LR = 0.1
MAX_NORM = 0.05  # below the gradients' norm: clipping is active on every step
INF_STEP = 1


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # Linear(6, 3).weight has 3 rows: FSDP2 shards it unevenly (2 and 1) over two ranks.
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=gen), torch.randn(8, 3, generator=gen)


def local_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = global_batch()
    per_rank = x.shape[0] // WORLD
    return x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.float() - y).pow(2).mean()


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)


def train(
    mp: MixedPrecision,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
) -> list[float]:
    norms = []
    for _ in range(steps):
        with mp.autocast():
            loss = loss_fn(model(x), y)
        mp.backward(loss)
        report = mp.step(opt, max_grad_norm=MAX_NORM)
        opt.zero_grad()
        assert report.grad_norm is not None
        norms.append(report.grad_norm)
    return norms


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The global weights (FSDP2's DTensors gathered), keyed as in a plain model."""
    out = {}
    for name, value in model.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        out[name.removeprefix("module.")] = full.detach().clone()
    return out


def reference(steps: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    """fp32 in one process on the whole global batch: what every two-rank fp32 run must match."""
    mp = MixedPrecision("fp32", device="cpu")
    model = make_model()
    model, opt = mp.prepare(model, sgd(model))
    norms = train(mp, model, opt, *global_batch(), steps)
    return weights(model), norms


def _ddp_checks(rank: int, out: Path, res: dict[str, Any]) -> None:
    x, y = local_batch(rank)
    # fp32 under DDP through the session's helper: the reduce hook, clipping, replicas.
    mp = MixedPrecision("fp32", device="cpu")
    model = make_model()
    model, opt = mp.prepare(model, sgd(model))
    ddp_model = mp.ddp(model)
    res["ddp_norms"] = train(mp, ddp_model, opt, x, y, STEPS)
    res["ddp_weights"] = weights(ddp_model)
    mp.save(out / "ddp", ddp_model, opt)  # keys without DDP's "module." prefix

    # reduce=bf16: the bucket travels in bf16; the expected mean is built from the gathered
    # local gradients of a plain twin, rounded the way the hook promises (divide, round, sum).
    mp_bf16 = MixedPrecision("params=fp32,reduce=bf16", device="cpu")
    ddp_bf16 = mp_bf16.ddp(mp_bf16.prepare(make_model()))
    loss_fn(ddp_bf16(x), y).backward()
    twin = make_model()
    loss_fn(twin(x), y).backward()
    exact, differs = True, False
    for reduced, param in zip(ddp_bf16.parameters(), twin.parameters(), strict=True):
        assert param.grad is not None and reduced.grad is not None
        gathered = [torch.empty_like(param.grad) for _ in range(WORLD)]
        dist.all_gather(gathered, param.grad)
        in_bf16 = sum(g.div(WORLD).bfloat16().float() for g in gathered)
        expected = torch.as_tensor(in_bf16).bfloat16().float()
        exact = exact and torch.equal(reduced.grad, expected)
        differs = differs or not torch.equal(reduced.grad, sum(gathered) / WORLD)
    res["bf16_exact"], res["bf16_differs_from_fp32"] = exact, differs
    res["bf16_bytes"] = ddp_bf16.mixprec_reduce.bytes_reduced
    res["reported_bf16_bytes"] = memory_report(ddp_bf16).reduce_bytes_per_step["bf16"]
    res["fp32_bytes_per_step"] = ddp_model.mixprec_reduce.bytes_reduced / STEPS
    res["numel"] = sum(p.numel() for p in twin.parameters())

    # fp16-mixed under DDP: an inf in rank 1's gradient after the all-reduce; both must skip.
    mp16 = MixedPrecision(
        "fp16-mixed",
        device="cpu",
        backend="emulated",
        scaler_options={"init_scale": 2.0**10, "growth_interval": 1},
    )
    model = make_model()
    model, opt = mp16.prepare(model, sgd(model))
    ddp16 = mp16.ddp(model)
    stepped, scales = [], []
    for it in range(3):
        with mp16.autocast():
            loss = loss_fn(ddp16(x), y)
        mp16.backward(loss)
        if rank == 1 and it == INF_STEP:
            model[0].weight.grad.view(-1)[0] = float("inf")
        report = mp16.step(opt)
        opt.zero_grad()
        stepped.append(report.stepped)
        scales.append(mp16.scaler.get_scale())
    res["ddp_inf"] = {"stepped": stepped, "scales": scales}

    # A scaler used on rank 0 only (a side model) must not wait for rank 1.
    if rank == 0:
        side = nn.Linear(3, 1)
        side_opt = torch.optim.SGD(side.parameters(), lr=0.1)
        scaler = GradScaler("cpu")  # process_group="auto": the default
        scaler.scale(side(torch.ones(2, 3)).sum()).backward()
        assert side.weight.grad is not None
        side.weight.grad[0, 0] = float("inf")
        scaler.step(side_opt)
        scaler.update()
        res["side_skipped"] = scaler.step_skipped()
    dist.barrier()

    # Orders that cannot work are refused, with the order that does.
    with pytest.raises(RuntimeError, match=r"does not stack on DDP.*ddp_model\.module"):
        mp.fully_shard(ddp_model)
    pure = MixedPrecision("bf16-pure", device="cpu")
    with pytest.raises(RuntimeError, match=r"Prepare the plain model first.*mp\.ddp\(model\)"):
        pure.prepare(DistributedDataParallel(make_model()))
    with pytest.raises(RuntimeError, match=r"ddp was called before prepare.*'0\.weight'"):
        pure.ddp(make_model())
    with pytest.raises(ValueError, match=r"reduces gradients in fp8_e4m3.*reduce=bf16"):
        MixedPrecision("params=fp32,reduce=fp8_e4m3", device="cpu")
    refused = r"reduce format 'fp8_e4m3' cannot be all-reduced by backend 'gloo'.*'reduce=bf16'"
    with pytest.raises(ValueError, match=refused):
        check_reducible(resolve_format("fp8_e4m3"))


def _fsdp_checks(rank: int, out: Path, res: dict[str, Any]) -> None:
    x, y = local_batch(rank)
    mp = MixedPrecision("fp32", device="cpu")
    model = mp.fully_shard(make_model())
    model, opt = mp.prepare(model, sgd(model))
    res["fsdp_norms"] = train(mp, model, opt, x, y, STEPS)
    res["fsdp_weights"] = weights(model)

    # A sharded checkpoint, then an uninterrupted continuation and a resumed one.
    torch.manual_seed(100 + rank)  # a different RNG stream per rank
    mp.save(out / "two_ranks", model, opt, note="two")
    res["saved"] = weights(model)
    res["rng_at_save"] = torch.get_rng_state()
    train(mp, model, opt, x, y, 2)
    res["continued"] = weights(model)
    torch.manual_seed(12345)
    mp2 = MixedPrecision("fp32", device="cpu")
    model2 = mp2.fully_shard(make_model())
    model2, opt2 = mp2.prepare(model2, sgd(model2))
    res["extra"] = mp2.load(out / "two_ranks", model2, opt2)
    res["rng_restored"] = torch.equal(torch.get_rng_state(), res["rng_at_save"])
    train(mp2, model2, opt2, x, y, 2)
    res["resumed"] = weights(model2)

    # A checkpoint written by one process loads on two ranks.
    mp3 = MixedPrecision("fp32", device="cpu")
    model3 = mp3.fully_shard(make_model())
    model3, opt3 = mp3.prepare(model3, sgd(model3))
    mp3.load(out / "one_rank", model3, opt3)
    res["from_one_rank"] = weights(model3)

    # fp16-mixed under FSDP2: an inf in rank 1's local shard; clipping and skip diagnostics.
    mp16 = MixedPrecision(
        "fp16-mixed",
        device="cpu",
        backend="emulated",
        scaler_options={"init_scale": 2.0**10, "growth_interval": 1},
    )
    model = mp16.fully_shard(make_model())
    model, opt = mp16.prepare(model, sgd(model))
    stepped, scales, names = [], [], []
    for it in range(3):
        with mp16.autocast():
            loss = loss_fn(model(x), y)
        mp16.backward(loss)
        if rank == 1 and it == INF_STEP:
            model[2].weight.grad.to_local().view(-1)[0] = float("inf")
        report = mp16.step(opt, max_grad_norm=MAX_NORM)
        opt.zero_grad()
        stepped.append(report.stepped)
        scales.append(mp16.scaler.get_scale())
        names.append(list(report.nonfinite_params))
    res["fsdp_inf"] = {"stepped": stepped, "scales": scales, "names": names}


def plan_model() -> nn.Module:
    """A model whose every tensor splits evenly over two ranks."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))


def plan_step(mp: MixedPrecision, model: nn.Module, x: torch.Tensor) -> torch.optim.Optimizer:
    """bf16-mixed AdamW: one step on ``x``; returns the prepared optimizer."""
    model, opt = mp.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    with mp.autocast():
        loss = model(torch.cat([x, x], dim=1)).float().pow(2).mean()
    mp.backward(loss)
    mp.step(opt)
    return opt


def _plan_checks(rank: int, res: dict[str, Any]) -> None:
    mp = MixedPrecision("bf16-mixed", device="cpu", backend="emulated")
    model = mp.fully_shard(plan_model())
    opt = plan_step(mp, model, local_batch(rank)[0])
    measured = memory_report(model, opt)
    assert measured.global_ is not None
    res["plan_measured"] = {part: getattr(measured, part) for part in PARTS}
    res["plan_global"] = {part: getattr(measured.global_, part) for part in PARTS}
    res["plan_num_params"] = measured.num_params
    res["plan_local_params"] = measured.local_params
    res["plan_num_tensors"] = len(list(model.parameters()))
    res["plan_text"] = str(measured)


def worker(rank: int, out: str) -> None:
    res: dict[str, Any] = {}
    _ddp_checks(rank, Path(out), res)
    _fsdp_checks(rank, Path(out), res)
    _plan_checks(rank, res)
    torch.save(res, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], ...]:
    out = tmp_path_factory.mktemp("two_ranks")
    # The one-process checkpoint the workers load on two ranks (2 steps of fp32 training).
    mp = MixedPrecision("fp32", device="cpu")
    model = make_model()
    model, opt = mp.prepare(model, sgd(model))
    train(mp, model, opt, *global_batch(), 2)
    (out / "one_rank").mkdir()
    mp.save(out / "one_rank", model, opt)
    torch.save(weights(model), out / "one_rank_weights.pt")
    spawn(worker, str(out))
    ranks = tuple(torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    return (*ranks, {"out": out})


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=1e-7, msg=name)


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_fp32_matches_one_process_and_replicas_agree(two_ranks: tuple) -> None:
    rank0, rank1, _ = two_ranks
    ref_weights, ref_norms = reference(STEPS)
    assert identical(rank0["ddp_weights"], rank1["ddp_weights"])
    close(rank0["ddp_weights"], ref_weights)
    assert rank0["ddp_norms"] == pytest.approx(ref_norms, rel=1e-5)


def test_ddp_checkpoint_loads_into_a_plain_model(two_ranks: tuple) -> None:
    rank0, _, info = two_ranks
    mp = MixedPrecision("fp32", device="cpu")
    model = make_model()
    model, opt = mp.prepare(model, sgd(model))
    mp.load(info["out"] / "ddp", model, opt)
    assert identical(weights(model), rank0["ddp_weights"])
    assert mp.state_dict()["steps"] == STEPS


def test_reduce_bf16_travels_in_bf16(two_ranks: tuple) -> None:
    rank0, rank1, _ = two_ranks
    assert rank0["bf16_exact"] and rank1["bf16_exact"]
    assert rank0["bf16_differs_from_fp32"]  # the check could tell bf16 from fp32
    assert rank0["bf16_bytes"] == 2 * rank0["numel"]
    assert rank0["reported_bf16_bytes"] == rank0["bf16_bytes"]  # memory_report's figure
    assert rank0["fp32_bytes_per_step"] == 4 * rank0["numel"]


def test_inf_on_one_rank_makes_both_skip(two_ranks: tuple) -> None:
    rank0, rank1, _ = two_ranks
    expected = [it != INF_STEP for it in range(3)]
    for key in ("ddp_inf", "fsdp_inf"):
        assert rank0[key]["stepped"] == rank1[key]["stepped"] == expected, key
        assert rank0[key]["scales"] == rank1[key]["scales"], key
        assert rank0[key]["scales"][INF_STEP] < rank0[key]["scales"][0], key  # backed off
    # Rank 0's own shard was finite: the name comes from rank 1's verdict, reduced.
    assert rank0["fsdp_inf"]["names"][INF_STEP] == rank1["fsdp_inf"]["names"][INF_STEP]
    assert rank0["fsdp_inf"]["names"][INF_STEP] == ["2.weight"]


def test_scaler_on_one_rank_stays_local(two_ranks: tuple) -> None:
    assert two_ranks[0]["side_skipped"] is True


def test_fsdp_fp32_global_norm_and_weights_match_one_process(two_ranks: tuple) -> None:
    rank0, rank1, _ = two_ranks
    ref_weights, ref_norms = reference(STEPS)
    assert rank0["fsdp_norms"] == rank1["fsdp_norms"]
    assert rank0["fsdp_norms"] == pytest.approx(ref_norms, rel=1e-5)
    assert all(n > MAX_NORM for n in ref_norms)  # clipping was active
    close(rank0["fsdp_weights"], ref_weights)
    assert identical(rank0["fsdp_weights"], rank1["fsdp_weights"])


def test_two_rank_checkpoint_resumes_bit_identically(two_ranks: tuple) -> None:
    for res in two_ranks[:2]:
        assert identical(res["resumed"], res["continued"])
        assert res["rng_restored"]
        assert res["extra"] == {"note": "two"}
    assert not torch.equal(two_ranks[0]["rng_at_save"], two_ranks[1]["rng_at_save"])


def test_two_rank_checkpoint_loads_on_one_process(two_ranks: tuple) -> None:
    rank0, _, info = two_ranks
    mp = MixedPrecision("fp32", device="cpu")
    model = make_model()
    model, opt = mp.prepare(model, sgd(model))
    assert mp.load(info["out"] / "two_ranks", model, opt) == {"note": "two"}
    assert identical(weights(model), rank0["saved"])
    # The global weights at save time: the continuation from them matches the two-rank one.
    train(mp, model, opt, *global_batch(), 2)
    close(weights(model), rank0["continued"])
    assert mp.state_dict()["steps"] == STEPS + 2


def test_one_process_checkpoint_loads_on_two_ranks(two_ranks: tuple) -> None:
    rank0, rank1, info = two_ranks
    saved = torch.load(info["out"] / "one_rank_weights.pt", weights_only=True)
    assert identical(rank0["from_one_rank"], saved)
    assert identical(rank1["from_one_rank"], saved)
    assert math.isfinite(sum(float(v.sum()) for v in saved.values()))


def test_plan_equals_the_measured_per_rank_memory_under_fsdp2(two_ranks: tuple) -> None:
    for res in two_ranks[:2]:
        plan = memory_plan(
            res["plan_num_params"],
            world=WORLD,
            strategy="fsdp2",
            num_tensors=res["plan_num_tensors"],
        )
        row = plan.row("bf16-mixed")
        n = res["plan_num_params"]
        measured = res["plan_measured"]
        assert measured["params"] == row.params * n == 4 * n / WORLD
        assert measured["grads"] == row.grads * n
        assert measured["master"] == row.master * n == 0
        steps = 4 * res["plan_num_tensors"]  # AdamW's step counters live on every rank
        assert measured["optimizer_state"] == row.optimizer_state * n + steps
        assert sum(measured.values()) == row.total_bytes
        assert res["plan_local_params"] == n // WORLD
        assert "bytes/rank" in res["plan_text"] and "global bytes" in res["plan_text"]
    # The global figures are one unsharded copy: what one process holds after the same step.
    mp = MixedPrecision("bf16-mixed", device="cpu", backend="emulated")
    model = plan_model()
    one = memory_report(model, plan_step(mp, model, global_batch()[0]))
    assert two_ranks[0]["plan_global"] == {part: getattr(one, part) for part in PARTS}
    assert two_ranks[0]["plan_global"]["params"] == WORLD * two_ranks[0]["plan_measured"]["params"]
