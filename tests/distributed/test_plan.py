"""The memory plan against memory_report's measured bytes, and the ``mixprec plan`` command."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mixprec import MixedPrecision
from mixprec.app.cli import main
from mixprec.distributed import memory_plan
from mixprec.distributed.plan import activation_bytes_per_token, parse_bytes
from mixprec.optim import memory_report
from mixprec.policy import PRESETS

CASES = [
    (preset, update)
    for preset in PRESETS
    for update in (
        ("-",)
        if PRESETS[preset].param.dtype == torch.float32
        else ("master", "stochastic", "kahan", "nearest")
    )
]


@pytest.mark.parametrize(("preset", "update"), CASES)
def test_single_process_plan_equals_memory_report(preset: str, update: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8))
    opt = torch.optim.AdamW(model.parameters())
    mp = MixedPrecision(
        preset, device="cpu", update="auto" if update == "-" else update, backend="emulated"
    )
    model, opt = mp.prepare(model, opt)
    with mp.autocast():
        loss = model(torch.randn(4, 16)).float().pow(2).mean()
    mp.backward(loss)
    mp.step(opt)
    measured = memory_report(model, opt)
    tensors = len(list(model.parameters()))
    shapes = [p.shape for p in model.parameters()]  # which states are quantized (bf16-lean)
    plan = memory_plan(
        measured.num_params, 1, "single", presets=[preset], num_tensors=tensors, shapes=shapes
    )
    row = plan.row(preset, update)
    n = measured.num_params
    assert measured.params == row.params * n
    assert measured.grads == row.grads * n
    assert measured.master == row.master * n
    assert measured.compensation == row.compensation * n
    assert measured.optimizer_state == row.optimizer_state * n + 4 * tensors
    assert measured.total == row.total_bytes
    assert measured.global_ is not None and not measured.sharded  # no DTensors: one count
    assert measured.global_.total == measured.total


def test_zero3_shards_every_part() -> None:
    plan = memory_plan(7e9, world=64, strategy="fsdp2")
    ddp = memory_plan(7e9, world=64, strategy="ddp")
    for row, full in zip(plan.rows, ddp.rows, strict=True):
        assert row.state_per_param == pytest.approx(full.state_per_param / 64)
    assert plan.row("bf16-mixed").state_per_param == 16 / 64
    assert ddp.row("bf16-pure", "stochastic").state_per_param == 12


def test_activations_and_fit() -> None:
    per_token = activation_bytes_per_token(layers=32, hidden=4096, seq=4096)
    assert per_token == 32 * 34 * 4096  # Korthikanti et al.: 34·h bytes per layer and token
    plan = memory_plan(
        7e9, 64, "fsdp2", layers=32, hidden=4096, seq=4096, batch=1, device_memory="80GB"
    )
    row = plan.row("bf16-mixed")
    assert row.activations == per_token * 4096
    assert row.total_bytes == 16 / 64 * 7e9 + row.activations
    assert row.fits is True
    assert plan.row("fp32").activations == 2 * row.activations  # fp32 activations: twice
    small = memory_plan(7e9, 64, "fsdp2", layers=32, hidden=4096, seq=4096, device_memory=1e9)
    assert small.row("bf16-mixed").fits is False


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_params": 0}, ValueError, r"num_params must be a number > 0 .*got 0"),
        ({"world": 0}, ValueError, r"world must be an int >= 1 .*got 0"),
        ({"strategy": "zero9"}, ValueError, r"unknown strategy 'zero9'; valid strategies"),
        ({"strategy": "single", "world": 2}, ValueError, r"'single' runs one process"),
        ({"presets": ["bf17"]}, ValueError, r"unknown preset 'bf17'; valid presets: fp32"),
        ({"layers": 2}, ValueError, r"whole transformer shape or none"),
        ({"device_memory": "80XB"}, ValueError, r"device memory '80XB' is not a size"),
    ],
)
def test_bad_plan_input(kwargs: dict, error: type, match: str) -> None:
    args = {"num_params": 1e9, "world": 8, **kwargs}
    with pytest.raises(error, match=match):
        memory_plan(**args)


def test_parse_bytes() -> None:
    assert parse_bytes("80GB") == 80e9
    assert parse_bytes("80 GiB") == 80 * 2**30
    assert parse_bytes(1024) == 1024.0


def test_plan_command(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--params", "7e9", "--world", "64", "--strategy", "fsdp2", "--json"]
    assert main([*argv, "--layers", "32", "--hidden", "4096", "--seq", "4096"]) == 0
    record = json.loads(capsys.readouterr().out)
    expected = memory_plan(7e9, 64, "fsdp2", layers=32, hidden=4096, seq=4096)
    assert record["world"] == 64
    rows = {(r["preset"], r["update"]): r for r in record["rows"]}
    for row in expected.rows:
        assert rows[(row.preset, row.update)]["state_per_param"] == row.state_per_param
        assert rows[(row.preset, row.update)]["total_bytes"] == row.total_bytes
    assert main(["plan", "--params", "7e9", "--world", "64", "--device-memory", "80GB"]) == 0
    table = capsys.readouterr().out
    assert "bf16-mixed" in table and "0.25" in table and "yes" in table
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--params", "7e9", "--device-memory", "lots"])
    assert exit_info.value.code == 2
    assert "device memory 'lots' is not a size" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_params": float("nan")}, r"num_params must be a number > 0 and finite .*got nan"),
        ({"num_params": float("inf")}, r"num_params must be a number > 0 and finite .*got inf"),
        ({"num_params": -1}, r"num_params must be a number > 0 and finite .*got -1"),
        ({"num_tensors": -5}, r"num_tensors must be an int >= 0 .*got -5"),
        ({"batch": 0}, r"batch must be an int >= 1 .*got 0"),
        ({"heads": 0}, r"heads must be an int >= 1 .*got 0"),
        ({"device_memory": 1e400}, r"device memory must be a finite size > 0, got inf"),
        ({"device_memory": "1e400"}, r"device memory must be a finite size > 0, got '1e400'"),
        ({"presets": []}, r"presets is empty"),
        ({"presets": ""}, r"presets is empty"),
        ({"presets": ["bf16-mixed", ""]}, r"empty preset name"),
    ],
)
def test_plan_refuses_values_that_print_nan_or_negative_bytes(kwargs: dict, match: str) -> None:
    shape = {"layers": 2, "hidden": 64, "seq": 16}
    with pytest.raises(ValueError, match=match):
        memory_plan(**{"num_params": 1e9, "world": 8, **shape, **kwargs})


@pytest.mark.parametrize(
    "argv",
    [
        ["--params", "nan"],
        ["--params", "inf"],
        ["--params", "-1"],
        ["--tensors", "-5"],
        ["--batch", "0"],
        ["--heads", "0"],
        ["--device-memory", "1e400"],
        ["--presets", ""],
    ],
)
def test_plan_command_refuses_bad_values(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    base = ["plan", "--params", "7e9", "--layers", "2", "--hidden", "64", "--seq", "16"]
    with pytest.raises(SystemExit) as exit_info:
        main([*base, *argv])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert repr(argv[1]) in err or argv[1] in err, err


def test_parse_bytes_accepts_a_capital_exponent() -> None:
    assert parse_bytes("1E9") == parse_bytes("1e9") == 1e9
    assert parse_bytes("8E10B") == 8e10
    plan = memory_plan(7e9, 64, "fsdp2", device_memory="1E9", presets=["bf16-mixed"])
    assert plan.device_memory == 1e9


def test_plan_takes_one_preset_as_a_string() -> None:
    one = memory_plan(7e9, 64, "fsdp2", presets="bf16-mixed")
    assert one.rows == memory_plan(7e9, 64, "fsdp2", presets=["bf16-mixed"]).rows
    with pytest.raises(TypeError, match=r"presets must be a preset name or a sequence of them"):
        memory_plan(7e9, 64, "fsdp2", presets=3)  # type: ignore[arg-type]
