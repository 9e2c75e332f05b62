"""`mixprec compare` and `mixprec train` end to end, their error paths, and crash-safe resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mixprec.checkpoint import load_checkpoint
from mixprec.cli import main
from mixprec.runner import Recipe

TINY = ["--steps", "6", "--batch-size", "8"]


def run_cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "mixprec.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    return path


@pytest.mark.slow
def test_compare_end_to_end_writes_table_report_and_plots(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    code = main(["compare", "--task", "all", "--out", str(out), "--data", str(corpus), *TINY])
    assert code == 0
    printed = capsys.readouterr().out
    assert "bf16-pure/stochastic" in printed and "×time" in printed
    report = (out / "report.md").read_text()
    for name in ("digits", "charlm"):
        for recipe in (
            "fp32",
            "bf16-mixed",
            "fp16-mixed",
            "bf16-pure/nearest",
            "bf16-pure/stochastic",
        ):
            assert f"| {recipe} |" in report
            metrics = (out / name / recipe.replace("/", "_") / "metrics.jsonl").read_text()
            assert [json.loads(line)["step"] for line in metrics.splitlines()] == list(range(6))
        for plot in ("loss", "loss_scale", "grad_hist"):
            png = out / f"{name}_{plot}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"({png.name})" in report


def test_compare_results_reflect_the_runs(tmp_path):
    out = tmp_path / "out"
    main(
        ["compare", "--task", "digits", "--out", str(out), "--precisions", "fp32,fp16-mixed", *TINY]
    )
    fp16 = json.loads((out / "digits" / "fp16-mixed" / "result.json").read_text())
    fp32 = json.loads((out / "digits" / "fp32" / "result.json").read_text())
    assert fp16["final_scale"] == 2.0**16 and fp32["final_scale"] == 1.0
    assert fp16["activation_bytes"] == fp32["activation_bytes"] // 2  # 16-bit activations
    # fp32 AdamW: 4 + 4 + 8 bytes, plus a few bytes of per-tensor step counters in total
    assert fp32["state_bytes_per_param"] == pytest.approx(16.0, abs=0.01)


def test_recipes_parse_and_reject():
    assert Recipe.parse("bf16-pure/kahan") == Recipe("bf16-pure/kahan", "bf16-pure", "kahan")
    with pytest.raises(ValueError, match=r"unknown update mode 'sr' in precision 'bf16-pure/sr'"):
        Recipe.parse("bf16-pure/sr")
    with pytest.raises(ValueError, match=r"unknown precision 'bf17'"):
        Recipe.parse("bf17")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compare", "--task", "mnist"], "invalid choice: 'mnist'"),
        (["compare", "--precisions", "fp32,bf17"], "unknown precision 'bf17'"),
        (["compare", "--bogus"], "unrecognized arguments: --bogus"),
        (
            ["train", "--task", "charlm", "--out", "{tmp}/o", "--data", "{tmp}/empty.txt"],
            "is empty",
        ),
        (
            ["train", "--task", "charlm", "--out", "{tmp}/o", "--data", "{tmp}/bin.dat"],
            "looks binary",
        ),
        (
            ["train", "--task", "charlm", "--out", "{tmp}/o", "--data", "{tmp}/short.txt"],
            "has 5 bytes",
        ),
        (["train", "--task", "digits", "--out", "{tmp}/file.txt"], "is a file; give a folder path"),
        (
            ["train", "--task", "digits", "--out", "{tmp}/o", "--steps", "0"],
            "steps must be a positive",
        ),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bin.dat").write_bytes(b"\x00\x01\x02" * 1000)
    (tmp_path / "short.txt").write_text("hello")
    (tmp_path / "file.txt").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        main([a.replace("{tmp}", str(tmp_path)) for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_resuming_from_another_task_or_a_corrupt_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--task", "digits", "--out", str(out), *TINY]) == 0
    checkpoint = out / "checkpoint.pt"
    saved = checkpoint.read_bytes()
    with pytest.raises(SystemExit):
        main(["train", "--task", "digits", "--precision", "fp16-mixed", "--out", str(out),
              "--resume", *TINY])  # fmt: skip
    assert "cannot resume from" in capsys.readouterr().err
    assert checkpoint.read_bytes() == saved  # untouched
    checkpoint.write_bytes(saved[: len(saved) // 2])
    with pytest.raises(SystemExit):
        main(["train", "--task", "digits", "--out", str(out), "--resume", *TINY])
    assert "corrupt or truncated" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_reaches_the_same_weights(tmp_path):
    args = ["train", "--task", "digits", "--precision", "bf16-pure/stochastic", "--steps", "120",
            "--checkpoint-every", "10"]  # fmt: skip
    straight = run_cli(*args, "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr

    killed_dir = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "mixprec.cli", *args, "--out", str(killed_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    metrics = killed_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 40:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    steps_done = len(metrics.read_text().splitlines())
    assert 40 <= steps_done < 120, "the run must be killed mid-way"
    resumed = run_cli(*args, "--out", str(killed_dir), "--resume")
    assert resumed.returncode == 0, resumed.stderr

    final = load_checkpoint(killed_dir / "checkpoint.pt")
    reference = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    for name, tensor in reference["model"].items():
        assert torch.equal(final["model"][name], tensor), name
    log = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(120))


def test_advise_recommends_a_policy_the_session_accepts(capsys):
    from mixprec import MixedPrecision

    assert main(["advise", "--task", "digits", "--json", "--steps", "1"]) == 0
    advice = json.loads(capsys.readouterr().out)
    assert advice["reasons"]
    MixedPrecision(advice["policy"], "cpu")  # accepted as is
