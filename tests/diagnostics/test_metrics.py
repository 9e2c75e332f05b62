"""MetricsWriter: the metrics.jsonl file after a short run, line by line."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from torch import nn

from mixprec.compute import autocast
from mixprec.diagnostics import (
    STEP_KEYS,
    MetricsWriter,
    nonfinite_grads,
    read_metrics,
    underflow_report,
)


def short_run(writer: MetricsWriter, steps: int = 5) -> list[dict]:
    """A tiny fp16 AMP loop that records what a session records; returns what it wrote."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x, y = torch.randn(32, 8), torch.arange(32) % 3
    written = []
    for step in range(steps):
        with autocast("cpu", dtype=torch.float16, backend="emulated"):
            loss = nn.functional.cross_entropy(model(x), y)
        if step == 2:
            loss = loss * math.inf  # an overflowing step: the scaler must skip it
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        bad = nonfinite_grads(model)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
        scale = scaler.get_scale()
        underflow = underflow_report(model, scale).metrics() if not bad else {}
        scaler.step(optimizer)
        scaler.update()
        row = {
            "loss": loss.item(),
            "loss_scale": scale,
            "skipped": scaler.get_scale() < scale,
            "grad_norm": grad_norm,
            "nonfinite_params": bad,
            **underflow,
        }
        writer.log(step, row)
        written.append({"step": step, **row})
        optimizer.zero_grad(set_to_none=True)
    return written


def test_metrics_file_after_a_short_run(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        written = short_run(writer)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5
    raw = [json.loads(line) for line in lines]  # every line is strict JSON on its own
    assert [r["step"] for r in raw] == [0, 1, 2, 3, 4]
    assert set(STEP_KEYS) - {"underflow_fraction", "overflow_fraction"} <= set(raw[0])
    assert raw[2]["loss"] == "inf" and raw[2]["skipped"] is True
    assert raw[2]["nonfinite_params"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert raw[3]["loss_scale"] == raw[2]["loss_scale"] / 2
    assert [r["skipped"] for r in raw] == [False, False, True, False, False]
    rows = read_metrics(tmp_path)
    for row, expected in zip(rows, written, strict=True):
        expected = {
            k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in expected.items()
        }
        assert row.keys() == expected.keys()
        for key, value in expected.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(row[key])
            else:
                assert row[key] == value, key
    assert 0.0 <= rows[0]["underflow_fraction"] <= 1.0


def test_the_file_is_appended_to_on_resume(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.log(0, loss=1.0)
    with MetricsWriter(tmp_path) as writer:
        writer.log(1, loss=float("nan"), skipped=True)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1] and math.isnan(rows[1]["loss"])


def test_tensorboard_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):  # as on a machine without the package
        return None if name.split(".")[0] == "tensorboard" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModuleNotFoundError, match="pip install tensorboard"):
        MetricsWriter(tmp_path, tensorboard=True)
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="not installed")
def test_tensorboard_gets_event_files(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=True) as writer:
        writer.log(0, loss=1.0, skipped=False)
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_bad_values(tmp_path):
    writer = MetricsWriter(tmp_path)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        writer.log(-1, loss=1.0)
    with pytest.raises(TypeError, match=r"step must be an int, got float 1\.5"):
        writer.log(1.5, loss=1.0)
    with pytest.raises(TypeError, match="metric 'model' must be a number"):
        writer.log(0, model=nn.Linear(1, 1))
    with pytest.raises(ValueError, match=r"metric 'loss' must be a single number.*\(2,\)"):
        writer.log(0, loss=torch.ones(2))
    with pytest.raises(TypeError, match="tensorboard must be a bool, got str 'yes'"):
        MetricsWriter(tmp_path, tensorboard="yes")
    writer.close()
    writer.close()
    with pytest.raises(RuntimeError, match="is closed"):
        writer.log(0, loss=1.0)
    assert read_metrics(tmp_path) == []


def test_a_nan_metric_is_written_as_json_null_and_read_back_as_nan(tmp_path):
    # A NaN used to be written as the string "nan": a string in a numeric column.
    with MetricsWriter(tmp_path) as writer:
        writer.log(0, loss=float("nan"), grad_norm=torch.tensor(float("nan")), seconds=None)
    raw = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert raw["loss"] is None and raw["grad_norm"] is None and raw["seconds"] is None
    assert "nan" not in (tmp_path / "metrics.jsonl").read_text().replace("nan_metrics", "")
    (row,) = read_metrics(tmp_path)
    assert math.isnan(row["loss"]) and math.isnan(row["grad_norm"])
    assert row["seconds"] is None  # a metric that is absent stays None, not NaN
    assert set(row) == {"step", "loss", "grad_norm", "seconds"}
    with MetricsWriter(tmp_path) as writer, pytest.raises(ValueError, match="nan_metrics"):
        writer.log(1, nan_metrics=["loss"])  # reserved: it says which nulls are NaN
