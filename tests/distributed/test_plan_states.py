"""The plan's optimizer-state formats, compressed masters and step in backward (issue 21 item 5),
against memory_report's measured bytes."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from mixprec import MixedPrecision
from mixprec.app.cli import main
from mixprec.distributed import memory_plan
from mixprec.optim import memory_report
from mixprec.policy import PRESETS

CASES = [
    *(("bf16-lean", update, None) for update in ("stochastic", "master", "kahan", "nearest")),
    ("bf16-pure", "stochastic", "fp8"),
    ("bf16-pure", "stochastic", "bf16"),
    ("bf16-pure", "master", "fp16"),
    ("bf16-mixed", "-", "int8"),
]


def measured_after_a_step(policy, update):
    torch.manual_seed(0)
    # ~2.2M parameters: two 1024-wide matrices (quantized), their biases (1-D: fp32 states),
    # and a 300-wide one (rows that are not whole blocks)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024), nn.Linear(1024, 300))
    mp = MixedPrecision(
        policy, "cpu", backend="emulated", update="auto" if update == "-" else update
    )
    model, opt = mp.prepare(model, torch.optim.AdamW(model.parameters()))
    with mp.autocast():
        loss = model(torch.randn(2, 1024)).float().pow(2).mean()
    mp.backward(loss)
    mp.step(opt)
    return model, memory_report(model, opt)


@pytest.mark.parametrize(("preset", "update", "state"), CASES)
def test_plan_equals_measured_states(preset, update, state):
    policy = PRESETS[preset] if state is None else replace(PRESETS[preset], state=state)
    model, measured = measured_after_a_step(policy, update)
    n, tensors = measured.num_params, len(list(model.parameters()))
    shapes = [p.shape for p in model.parameters()]
    exact = memory_plan(
        n, 1, "single", presets=[preset], num_tensors=tensors, shapes=shapes, state=state
    ).row(preset, update)
    assert exact.state == policy.state
    assert exact.optimizer_state * n + 4 * tensors == pytest.approx(measured.optimizer_state)
    assert exact.total_bytes == pytest.approx(measured.total)
    assert measured.params == exact.params * n and measured.master == exact.master * n
    # the formula without shapes (what `mixprec plan --params` gives): within 5%
    formula = memory_plan(n, 1, "single", presets=[preset], num_tensors=tensors, state=state)
    row = formula.row(preset, update)
    assert row.total_bytes == pytest.approx(measured.total, rel=0.05)
    assert row.optimizer_state * n == pytest.approx(measured.optimizer_state, rel=0.05)


def test_int8_states_cost_about_2_bytes_per_param():
    plan = memory_plan(2e9, 1, "single", presets=["bf16-lean", "bf16-pure"])
    lean, pure = plan.row("bf16-lean", "stochastic"), plan.row("bf16-pure", "stochastic")
    assert lean.optimizer_state == 2 * (1 + 4 / 256)  # a code per moment element, a scale/block
    assert pure.optimizer_state == 8
    assert lean.state_per_param == 2 + 2 + 2 * (1 + 4 / 256)
    assert "int8" in str(plan)


def test_compressed_masters_and_step_in_backward():
    base = memory_plan(1e9, 1, "single", presets=["bf16-pure", "bf16-mixed"], state="int8")
    lean = memory_plan(
        1e9,
        1,
        "single",
        presets=["bf16-pure", "bf16-mixed"],
        state="int8",
        master_remainder=16,
        step_in_backward=True,
    )
    row, before = lean.row("bf16-pure", "master"), base.row("bf16-pure", "master")
    assert (before.master, row.master) == (4, 2)
    assert (before.grads, row.grads) == (2, 0)
    assert lean.row("bf16-mixed").grads == 0 and base.row("bf16-mixed").grads == 4
    assert row.master_format == "bf16+16" and lean.row("bf16-pure", "stochastic").master == 0
    eight = memory_plan(1e9, 1, "single", presets=["bf16-pure"], master_remainder=8)
    assert eight.row("bf16-pure", "master").master == 1
    assert "masters bf16+16" in str(lean) and "step inside backward" in str(lean)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"state": "tf32"}, r"state='tf32'.*'int8'"),
        ({"master_remainder": 12}, r"master_remainder must be None.*got 12"),
        ({"shapes": [(4, 4)]}, r"shapes hold 16 parameter elements but num_params=1000"),
    ],
)
def test_bad_plan_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        memory_plan(1000, 1, "single", **kwargs)


def test_plan_command_shows_the_state_format(capsys):
    args = ["plan", "--params", "3e9", "--world", "1", "--strategy", "single"]
    assert main([*args, "--presets", "bf16-lean", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    row = next(r for r in rows if r["update"] == "stochastic")
    assert row["state"] == "int8" and row["optimizer_state"] == pytest.approx(2.03125)
    assert main([*args, "--presets", "bf16-pure", "--state", "fp8", "--step-in-backward"]) == 0
    out = capsys.readouterr().out
    assert "fp8" in out and "step inside backward" in out
