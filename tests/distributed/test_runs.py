"""Runs at scale: ``torchrun -m mixprec train`` and the runner on two gloo ranks, against one
process on the same global batch; rank-aware metrics; sharded resume; the batch a world cannot
split."""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_spawn import WORLD, free_port
from torch import nn

from mixprec import MixedPrecision
from mixprec.app.cli import main
from mixprec.app.report import world_line
from mixprec.app.runner import RUN_FILES, Recipe, RunResult, train
from mixprec.app.tasks import DigitsTask, TaskConfig
from mixprec.checkpoint import CheckpointError, load_checkpoint
from mixprec.diagnostics import read_metrics
from mixprec.distributed import checkpoint as sharded_checkpoint
from mixprec.distributed.launch import check_divisible, local_slice

STEPS = 4
BATCH = 8
TINY = ["--steps", str(STEPS), "--batch-size", str(BATCH), "--seed", "3", "--lr", "1e-3"]


def digits(batch: int = BATCH, steps: int = STEPS) -> DigitsTask:
    return DigitsTask(TaskConfig(steps=steps, batch_size=batch, lr=1e-3, seed=3), hidden=32)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_world_that_does_not_divide_the_batch_is_refused_with_the_sizes_that_work():
    check_divisible(12, 4)
    with pytest.raises(ValueError, match=r"batch size 10 cannot be split over 4 ranks.*8 or 12"):
        check_divisible(10, 4)
    with pytest.raises(ValueError, match=r"batch size 3 cannot be split over 4 ranks.*size 4,"):
        check_divisible(3, 4)


def test_a_strategy_without_a_process_group_is_refused_naming_torchrun(tmp_path, capsys):
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match=r"strategy 'fsdp2' trains over a process group.*torchrun"):
        train(digits(), Recipe.parse("fp32"), tmp_path / "run", strategy="fsdp2")
    with pytest.raises(ValueError, match=r"unknown strategy 'zero3'; valid strategies: ddp, fsdp2"):
        train(digits(), Recipe.parse("fp32"), tmp_path / "run", strategy="zero3")
    with pytest.raises(SystemExit):
        main(["train", "--task", "digits", "--strategy", "ddp", "--out", str(tmp_path / "cli")])
    assert "torchrun --nproc-per-node 2 -m mixprec train" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cli").exists()  # nothing written


def test_local_slices_cover_the_global_batch_once():
    batch = torch.arange(12).reshape(6, 2)
    pieces = [local_slice(batch, r, 3) for r in range(3)]
    assert torch.equal(torch.cat(pieces), batch)


def test_the_report_states_the_world_and_the_bytes_each_run_reduced():
    def result(recipe: str, **parallel: Any) -> RunResult:
        return RunResult(recipe, {}, "fp32", 1, 0.0, {}, 1.0, 0, 16.0, 0, 1.0, **parallel)

    assert world_line([result("fp32")]) == "World size: 1 (one process)."
    runs = [
        result("fp32", world_size=2, strategy="ddp", reduce_format="float32",
               reduce_bytes_per_step=4096.0),
        result("bf16-mixed", world_size=2, strategy="ddp", reduce_format="bfloat16",
               reduce_bytes_per_step=2048.0),
    ]  # fmt: skip
    line = world_line(runs)
    assert line.startswith("World size: 2 (ddp")
    assert "fp32 4.0 KiB in float32" in line and "bf16-mixed 2.0 KiB in bfloat16" in line


# -- two ranks ---------------------------------------------------------------------------------


def _runner_checks(rank: int, out: Path, res: dict[str, Any]) -> None:
    # A batch the world cannot split: refused on every rank before anything is written.
    with pytest.raises(ValueError, match=r"batch size 7 cannot be split over 2 ranks"):
        train(digits(batch=7), Recipe.parse("fp32"), out / "odd")
    res["odd_written"] = (out / "odd").exists()
    # A one-process checkpoint file cannot continue as shards: refused, the run left as it was.
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (out / "single").iterdir())
    with pytest.raises(CheckpointError, match=r"one-process checkpoint file; resume it without"):
        train(digits(), Recipe.parse("fp32"), out / "single", resume=True)
    res["single_unchanged"] = before == sorted(
        (p.name, p.stat().st_mtime_ns) for p in (out / "single").iterdir()
    )

    # The runner, uninterrupted, and killed after its step-2 checkpoint then resumed.
    recipe = Recipe.parse("fp16-mixed")
    train(digits(), recipe, out / "straight", backend="emulated")

    def kill(done: int) -> None:
        if done == 2:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        train(digits(), recipe, out / "resumed", backend="emulated", checkpoint_every=2,
              on_step=kill)  # fmt: skip
    dist.barrier()
    train(digits(), recipe, out / "resumed", backend="emulated", resume=True)

    # The same under FSDP2, bf16-mixed: shards of the weights and of AdamW's state.
    sharded = Recipe.parse("bf16-mixed")
    train(digits(), sharded, out / "fsdp_straight", backend="emulated", strategy="fsdp2")
    with pytest.raises(KeyboardInterrupt):
        train(digits(), sharded, out / "fsdp_resumed", backend="emulated", checkpoint_every=2,
              on_step=kill, strategy="fsdp2")  # fmt: skip
    dist.barrier()
    train(digits(), sharded, out / "fsdp_resumed", backend="emulated", resume=True,
          strategy="fsdp2")  # fmt: skip

    # A session's metrics under DDP: one file, the loss of the global batch; a model local
    # to its rank: one file per rank.
    task = digits()
    mp = MixedPrecision("fp32", "cpu", metrics=out / "session")
    model = task.build_model()
    model, opt = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    res["local_loss"] = []
    with mp:
        ddp_model = mp.ddp(model)
        for step in range(2):
            x, y = (local_slice(t, rank, WORLD) for t in task.batch(step))
            loss = task.loss(ddp_model(x), y)
            mp.backward(loss)
            mp.step(opt)
            opt.zero_grad()
            res["local_loss"].append(float(loss))
    side = MixedPrecision("fp32", "cpu", metrics=out / "side")
    net = nn.Linear(2, 1)
    net, side_opt = side.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
    with side:
        side_loss = net(torch.full((1, 2), float(rank + 1))).sum()
        side.backward(side_loss)
        side.step(side_opt)
    res["side_loss"] = float(side_loss)


def _commands(out: Path) -> list[list[str]]:
    """What ``torchrun --nproc-per-node 2 -m mixprec ...`` runs in each rank."""
    return [
        ["train", "--task", "digits", "--precision", "fp32", "--out", str(out / "cli"), *TINY],
        ["compare", "--task", "digits", "--precisions", "fp32,bf16-mixed", "--backend",
         "emulated", "--out", str(out / "compare"), *TINY],
        ["train", "--task", "digits", "--precision", "fp32", "--out", str(out / "cli_fsdp"),
         "--strategy", "fsdp2", *TINY],
        ["compare", "--task", "digits", "--precisions", "fp32,bf16-mixed", "--backend",
         "emulated", "--out", str(out / "compare_fsdp"), "--strategy", "fsdp2", *TINY],
    ]  # fmt: skip


def _worker(rank: int, ports: list[int], out: Path) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    res: dict[str, Any] = {}
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{ports[0]}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        _runner_checks(rank, out, res)
    finally:
        dist.destroy_process_group()
    # The command as torchrun starts it: the environment names the rank and the rendezvous,
    # and the command opens (and closes) the process group itself.
    res["printed"] = []
    for port, argv in zip(ports[1:], _commands(out), strict=True):
        os.environ.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        )  # fmt: skip
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main(argv) == 0
        res["printed"].append(printed.getvalue())
        assert not dist.is_initialized()
    torch.save(res, out / f"res{rank}.pt")


@pytest.mark.slow
def test_two_rank_runs_match_one_process_resume_bit_identically_and_write_once(tmp_path):
    train(digits(), Recipe.parse("fp32"), tmp_path / "single")
    ports = [free_port() for _ in range(1 + len(_commands(tmp_path)))]
    torch.multiprocessing.spawn(_worker, args=(ports, tmp_path), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"res{r}.pt") for r in range(WORLD)]
    assert not any(r["odd_written"] for r in res)
    assert all(r["single_unchanged"] for r in res)

    def untimed(run: Path) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(run)]

    # Resume (DDP and FSDP2): the same weights and the same losses and scales as the
    # uninterrupted run.
    for kind in ("", "fsdp_"):
        straight, resumed = tmp_path / f"{kind}straight", tmp_path / f"{kind}resumed"
        want, got = digits().build_model(), digits().build_model()
        sharded_checkpoint.load(straight / "checkpoint.pt", want)
        sharded_checkpoint.load(resumed / "checkpoint.pt", got)
        for name, value in weights(want).items():
            assert torch.equal(weights(got)[name], value), (kind, name)
        assert untimed(resumed) == untimed(straight)  # the losses and scales, bit for bit
        assert [r["step"] for r in untimed(resumed)] == list(range(STEPS))
    fsdp_result = json.loads((tmp_path / "fsdp_resumed" / "result.json").read_text())
    assert fsdp_result["strategy"] == "fsdp2"

    # Session metrics: rank 0 alone writes, once per step, the mean of the ranks' losses.
    session = read_metrics(tmp_path / "session")
    assert [r["step"] for r in session] == [0, 1]
    for row, *local in zip(session, res[0]["local_loss"], res[1]["local_loss"], strict=True):
        assert row["loss"] == pytest.approx(sum(local) / WORLD, rel=1e-12)
    side = sorted(p.name for p in (tmp_path / "side").iterdir())
    assert side == ["metrics.rank0.jsonl", "metrics.rank1.jsonl"]
    for rank, name in enumerate(side):  # each rank its own loss, not averaged
        assert read_metrics(tmp_path / "side" / name)[0]["loss"] == res[rank]["side_loss"]

    # The command on two ranks equals one process on the same global batch.
    task = DigitsTask(TaskConfig(steps=STEPS, batch_size=BATCH, lr=1e-3, seed=3))
    one = train(task, Recipe.parse("fp32"), tmp_path / "one")
    cli = tmp_path / "cli"
    assert "on 2 ranks (ddp)" in res[0]["printed"][0]
    assert res[1]["printed"] == [""] * len(_commands(tmp_path))  # rank 1 prints nothing
    two = json.loads((cli / "result.json").read_text())
    assert (two["world_size"], two["strategy"], two["reduce_format"]) == (2, "ddp", "float32")
    numel = sum(p.numel() for p in task.build_model().parameters())
    assert two["reduce_bytes_per_step"] == numel * 4  # every fp32 gradient, once per step
    rows = read_metrics(cli)
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert sorted(p.name for p in cli.iterdir()) == sorted(RUN_FILES)  # no per-rank files
    assert [r["loss"] for r in rows] == pytest.approx(one.losses, rel=1e-5)
    model = task.build_model()
    sharded_checkpoint.load(cli / "checkpoint.pt", model)
    reference = load_checkpoint(tmp_path / "one" / "checkpoint.pt")["model"]
    # To fp32 rounding: a BLAS may sum a 4-row GEMM in another order than an 8-row one (MKL's
    # AVX2 kernels do), and Adam, dividing by a gradient's running size, magnifies that where a
    # gradient is near zero (1.2e-6 measured). 1e-5 is 1% of one step of lr 1e-3: a missed or
    # doubled gradient moves weights by whole steps.
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-5)

    # compare on two ranks: the report states the world and the bytes each reduce format moved.
    report = (tmp_path / "compare" / "report.md").read_text()
    results = [
        json.loads((tmp_path / "compare" / "digits" / name / "result.json").read_text())
        for name in ("fp32", "bf16-mixed")
    ]
    assert [r["reduce_bytes_per_step"] for r in results] == [numel * 4, numel * 4]
    assert "World size: 2 (ddp" in report and report.count("KiB in float32") == 2

    # FSDP2 from the command: the same losses as DDP (fp32 within 1e-5, bf16-mixed within the
    # DDP run's own bf16-vs-fp32 spread), a checkpoint of the same global weights, and each
    # rank holding half the state.
    fsdp_cli = tmp_path / "cli_fsdp"
    assert "on 2 ranks (fsdp2)" in res[0]["printed"][2]
    sharded = json.loads((fsdp_cli / "result.json").read_text())
    assert (sharded["world_size"], sharded["strategy"], sharded["reduce_format"]) == (
        2, "fsdp2", "float32"
    )  # fmt: skip
    assert sharded["reduce_bytes_per_step"] == numel * 4  # each rank's reduce-scatter input
    assert [r["loss"] for r in read_metrics(fsdp_cli)] == pytest.approx(one.losses, rel=1e-5)
    assert sharded["state_bytes_per_param"] == pytest.approx(
        two["state_bytes_per_param"] / WORLD, rel=0.01
    )
    model = task.build_model()
    sharded_checkpoint.load(fsdp_cli / "checkpoint.pt", model)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-5)  # as above
    fsdp_report = (tmp_path / "compare_fsdp" / "report.md").read_text()
    assert "World size: 2 (fsdp2" in fsdp_report and "reduce-scattered" in fsdp_report

    def losses(folder: str, recipe: str) -> list[float]:
        return [r["loss"] for r in read_metrics(tmp_path / folder / "digits" / recipe)]

    assert losses("compare_fsdp", "fp32") == pytest.approx(losses("compare", "fp32"), rel=1e-5)
    spread = max(
        abs(a - b)
        for a, b in zip(losses("compare", "bf16-mixed"), losses("compare", "fp32"), strict=True)
    )
    assert spread > 0
    mixed = zip(losses("compare_fsdp", "bf16-mixed"), losses("compare", "bf16-mixed"), strict=True)
    for a, b in mixed:
        assert abs(a - b) <= spread
