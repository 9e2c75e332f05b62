"""The built-in cnn and gpt2 tasks, and the default comparison.

References: a hand-written fp32 loop over the task's own batches (the runner must train exactly
that), the digits and charlm tasks' batches (the new tasks use the same data), HF's
``GPT2LMHeadModel`` called directly, and the fp32 run (mixed precision stays close to it).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from mixprec.app.cli import main
from mixprec.app.runner import Recipe, train
from mixprec.app.tasks import (
    DEFAULT_TASKS,
    TASKS,
    CharLMTask,
    CNNTask,
    DigitsTask,
    GPT2Task,
    TaskConfig,
    make_task,
)

transformers = pytest.importorskip("transformers")

SMALL = TaskConfig(steps=6, batch_size=8, lr=1e-3, seed=3)


def small(name: str):
    options = {"d_model": 32, "seq_len": 16} if name == "gpt2" else {}
    return make_task(name, SMALL, **options)


def hand_loop(task) -> tuple[list[float], dict[str, float]]:
    """The fp32 training loop a user would write for ``task``: losses and final metrics."""
    model = task.build_model()
    optimizer = task.build_optimizer(model)
    losses = []
    for step in range(task.config.steps):
        x, y = task.batch(step)
        loss = task.loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, task.evaluate(model, contextlib.nullcontext)


def test_the_new_tasks_are_registered_and_the_default_covers_a_transformer_and_a_cnn():
    assert (TASKS["cnn"], TASKS["gpt2"]) == (CNNTask, GPT2Task)
    assert DEFAULT_TASKS == ("charlm", "cnn")
    assert any(isinstance(m, nn.BatchNorm2d) for m in small("cnn").build_model().modules())


def test_the_cnn_trains_on_the_digits_batches():
    cnn, digits = CNNTask(SMALL), DigitsTask(SMALL)
    for step in (0, 5):
        for a, b in zip(cnn.batch(step), digits.batch(step), strict=True):
            assert torch.equal(a, b)


def test_gpt2_trains_on_the_charlm_windows_with_hf_gpt2():
    task = GPT2Task(SMALL, d_model=32, seq_len=16)
    charlm = CharLMTask(SMALL, seq_len=16)
    for a, b in zip(task.batch(2), charlm.batch(2), strict=True):
        assert torch.equal(a, b)
    model = task.build_model()
    hf = model.model
    assert isinstance(hf, transformers.GPT2LMHeadModel)
    assert hf.lm_head.weight is hf.transformer.wte.weight  # tied, as in GPT-2
    x, _ = task.batch(0)
    assert torch.equal(model(x), hf(input_ids=x).logits)


@pytest.mark.parametrize("name", ["cnn", "gpt2"])
def test_an_fp32_run_is_the_hand_written_loop(name, tmp_path):
    task = small(name)
    expected_losses, expected_metrics = hand_loop(small(name))
    result = train(task, Recipe.parse("fp32"), tmp_path / name)
    assert result.losses == expected_losses
    assert result.metrics == expected_metrics  # includes BatchNorm's running statistics


@pytest.mark.parametrize("name", ["cnn", "gpt2"])
def test_mixed_precision_stays_close_to_fp32(name, tmp_path):
    fp32 = train(small(name), Recipe.parse("fp32"), tmp_path / "fp32")
    for recipe in ("bf16-mixed", "fp16-mixed"):
        mixed = train(small(name), Recipe.parse(recipe), tmp_path / recipe, backend="emulated")
        assert mixed.skipped_steps == 0 or recipe == "fp16-mixed"
        assert mixed.metrics["val_loss"] == pytest.approx(fp32.metrics["val_loss"], rel=0.02)


def test_gpt2_without_transformers_says_how_to_install_it():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from mixprec.app.tasks import make_task\n"
        "make_task('gpt2')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "ImportError: the gpt2 task needs the transformers package" in done.stderr
    assert "pip install 'mixprec[transformers]'" in done.stderr


def test_compare_by_default_trains_charlm_and_cnn(tmp_path, capsys):
    out = tmp_path / "out"
    tiny = ["--steps", "2", "--batch-size", "4", "--precisions", "fp32,bf16-mixed"]
    assert main(["compare", "--out", str(out), *tiny]) == 0
    report = (out / "report.md").read_text()
    for name in DEFAULT_TASKS:
        metrics = (out / name / "bf16-mixed" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in metrics] == [0, 1]
        assert name in report
    assert not (out / "digits").exists()
