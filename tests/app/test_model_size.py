"""``--model-size``: the shape rule, the meta-built run, and its memory figures."""

from __future__ import annotations

import json

import pytest
import torch

from mixprec.app.cli import main
from mixprec.app.memory_figures import memory_line, resident_bytes
from mixprec.app.model_size import (
    charlm_lr,
    charlm_params,
    charlm_shape,
    parse_model_size,
    sized_task_options,
)
from mixprec.app.tasks import CharLMTask, TaskConfig
from mixprec.app.tasks.transformer import TinyTransformer
from mixprec.distributed.plan import memory_plan


@pytest.mark.parametrize(
    ("text", "count"),
    [("3e9", 3_000_000_000), ("3B", 3_000_000_000), ("350M", 350_000_000), ("1.3b", 1_300_000_000),
     ("2e6", 2_000_000), ("500k", 500_000), (7e9, 7_000_000_000)],
)  # fmt: skip
def test_parse_model_size(text, count):
    assert parse_model_size(text) == count


@pytest.mark.parametrize("text", ["", "3X", "big", "-1e9", "0", "3e9B"])
def test_parse_model_size_refuses_what_is_not_a_count(text):
    with pytest.raises(ValueError, match=r"model size .* (not a parameter count|at least one)"):
        parse_model_size(text)


@pytest.mark.parametrize("params", [100_000, 2_000_000, 3e7, 2e8, 1e9, 3e9, 1e10])
def test_shape_rule_reaches_the_count_within_half_a_block(params):
    shape = charlm_shape(int(params))
    assert shape.d_model % 64 == 0 and shape.n_heads * 64 == shape.d_model
    per_block = charlm_params(shape.d_model, 1) - charlm_params(shape.d_model, 0)
    assert abs(shape.params - params) <= per_block / 2 + 1
    if params >= 1e8:  # GPT-3's proportions: width / depth between about 40 and 130
        assert 40 <= shape.d_model / shape.n_layers <= 130


@pytest.mark.parametrize(("d_model", "n_layers"), [(64, 1), (192, 4), (2496, 40)])
def test_charlm_params_counts_the_model(d_model, n_layers):
    with torch.device("meta"):
        model = TinyTransformer(256, d_model, n_layers, d_model // 64, 64)
    assert charlm_params(d_model, n_layers) == sum(p.numel() for p in model.parameters())


def test_model_size_below_the_smallest_model_and_other_tasks_refused():
    with pytest.raises(ValueError, match=r"below the smallest charlm model \(87232"):
        charlm_shape(10_000)
    with pytest.raises(ValueError, match=r"task 'cnn' has a fixed model.*--task charlm"):
        sized_task_options("cnn", "2e6")


def test_sized_task_builds_on_meta_and_trains_like_eager(tmp_path):
    """The meta-built model of a sized task trains exactly as the same shape built eagerly."""
    from mixprec.app.runner import Recipe, train

    options = sized_task_options("charlm", "2e5")
    config = TaskConfig(steps=2, batch_size=4, lr=1e-3)
    meta = CharLMTask(config, **options)
    meta.meta = True
    assert all(p.is_meta for p in meta.build_model().parameters())
    eager = CharLMTask(config, **options)
    results = [
        train(task, Recipe.parse("bf16-pure"), tmp_path / name)
        for name, task in (("meta", meta), ("eager", eager))
    ]
    assert results[0].losses == results[1].losses
    assert results[0].metrics == results[1].metrics


def test_train_model_size_reports_peak_beside_the_plan(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--task", "charlm", "--model-size", "2e5", "--precision", "bf16-pure"]
    assert main([*args, "--steps", "2", "--batch-size", "4", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    task, memory = result["task"], result["memory"]
    shape = charlm_shape(200_000)
    assert (task["d_model"], task["n_layers"], task["n_heads"]) == (
        shape.d_model, shape.n_layers, shape.n_heads,
    )  # fmt: skip
    assert memory["params"] == shape.params
    with torch.device("meta"):
        tensors = len(list(TinyTransformer(256, shape.d_model, shape.n_layers, 1, 64).parameters()))
    plan = memory_plan(
        shape.params, 1, "single", presets=["fp32", "bf16-pure"], num_tensors=tensors,
        layers=shape.n_layers, hidden=shape.d_model, seq=64, heads=shape.n_heads, batch=4,
    )  # fmt: skip
    assert memory["plan_fp32_bytes"] == plan.row("fp32").total_bytes
    assert memory["plan_policy_bytes"] == plan.row("bf16-pure", "stochastic").total_bytes
    assert 0 < memory["measured_at_start_bytes"] <= memory["measured_peak_bytes"]
    assert memory["measured_peak_bytes"] <= resident_bytes(peak=True)
    assert memory_line("bf16-pure", memory) in capsys.readouterr().out


def test_model_size_for_a_fixed_task_is_refused_on_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--task", "digits", "--model-size", "2e6", "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2
    assert "task 'digits' has a fixed model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sized_learning_rate_follows_gpt3_and_the_command_line_uses_it(tmp_path):
    assert charlm_lr(2_000_000, 2e-3) == 2e-3  # the small task's own rate
    for params, lr in [(125e6, 6e-4), (350e6, 3e-4), (2.7e9, 1.6e-4), (175e9, 0.6e-4)]:
        assert charlm_lr(int(params), 2e-3) == pytest.approx(lr)  # GPT-3's table
    assert 1.6e-4 < charlm_lr(2_000_000_000, 2e-3) < 2e-4  # between 1.3B and 2.7B
    assert charlm_lr(10**9, 1e-4) == 1e-4  # never above the task's default
    out = tmp_path / "run"
    args = ["train", "--task", "charlm", "--model-size", "2e5", "--steps", "1", "--batch-size"]
    assert main([*args, "2", "--out", str(out)]) == 0
    assert json.loads((out / "result.json").read_text())["task"]["lr"] == 2e-3
    # a stated --lr wins over the size's rate
    assert main([*args, "2", "--lr", "1e-4", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "result.json").read_text())["task"]["lr"] == 1e-4


def test_step_in_backward_run_plans_no_gradient_buffer(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--task", "charlm", "--model-size", "2e5", "--precision", "bf16-lean"]
    assert (
        main([*args, "--step-in-backward", "--steps", "1", "--batch-size", "2", "--out", str(out)])
        == 0
    )
    memory = json.loads((out / "result.json").read_text())["memory"]
    shape = charlm_shape(200_000)
    with torch.device("meta"):
        model = TinyTransformer(256, shape.d_model, shape.n_layers, shape.n_heads, 64)
    sizes = {
        "num_tensors": len(list(model.parameters())),
        "shapes": [tuple(p.shape) for p in model.parameters()],
        "layers": shape.n_layers, "hidden": shape.d_model, "seq": 64, "heads": shape.n_heads,
        "batch": 2,
    }  # fmt: skip
    lean = memory_plan(
        shape.params, 1, "single", presets="bf16-lean", step_in_backward=True, **sizes
    )
    fp32 = memory_plan(shape.params, 1, "single", presets="fp32", **sizes)
    assert memory["plan_policy_bytes"] == lean.row("bf16-lean", "stochastic").total_bytes
    assert memory["plan_fp32_bytes"] == fp32.row("fp32").total_bytes  # plain fp32 AdamW
    assert lean.row("bf16-lean", "stochastic").grads == 0
