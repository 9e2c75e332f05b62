"""`mixprec compare` and `mixprec train` end to end, their error paths, and crash-safe resume."""

import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from mixprec.app.cli import build_parser, main
from mixprec.app.runner import (
    Recipe,
    activation_bytes,
    bytes_per_sample,
    check_batch_memory,
    train,
)
from mixprec.app.tasks import MAX_SEED, CharLMTask, DigitsTask, TaskConfig
from mixprec.checkpoint import CheckpointError, load_checkpoint
from mixprec.session import MixedPrecision

TINY = ["--steps", "6", "--batch-size", "8"]


def run_cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "mixprec.app.cli", *args],
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
            "fp8-mixed",
        ):
            assert f"| {recipe} |" in report
            metrics = (out / name / recipe.replace("/", "_") / "metrics.jsonl").read_text()
            assert [json.loads(line)["step"] for line in metrics.splitlines()] == list(range(6))
        for plot in ("loss", "loss_scale", "grad_hist", "explain"):
            png = out / f"{name}_{plot}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"({png.name})" in report
    assert report.count("### Where the memory and the precision go: `params=fp32,compute=bf16") == 4


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
    "spec", ["fp32/stochastic", "bf16-mixed/kahan", "fp8-mixed/master", "fp16-mixed/nearest"]
)
def test_an_update_mode_on_fp32_parameters_is_refused(spec, capsys, tmp_path):
    policy, _, update = spec.partition("/")
    with pytest.raises(
        ValueError,
        match=rf"update mode {update!r} in precision {spec!r} does not apply: {policy!r} keeps "
        r"parameters in fp32.*bf16-pure/" + update,
    ):
        Recipe.parse(spec)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--task", "digits", "--precision", spec, "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert not (tmp_path / "r").exists()  # refused before anything is written
    assert f"update mode {update!r} in precision {spec!r} does not apply" in capsys.readouterr().err
    assert Recipe.parse(policy).update == "auto"  # the policy alone stays valid


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
        *(
            (
                ["train", "--task", "digits", "--out", "{tmp}/o", "--lr", lr],
                f"argument --lr: lr must be a finite number in (0, 1], got {lr!r}",
            )
            for lr in ("inf", "1e308", "nan", "0", "-0.001", "2")
        ),
        *(
            (
                ["train", "--task", "digits", "--out", "{tmp}/o", "--checkpoint-every", every],
                f"argument --checkpoint-every: checkpoint-every must be a positive integer, got "
                f"{every}",
            )
            for every in ("-1", "0")
        ),
        (["train", "--task", "digits", "--out", ""], "argument --out: the folder is an empty"),
        (["compare", "--out", " "], "argument --out: the folder is an empty path"),
        (
            ["train", "--task", "digits", "--out", "{tmp}/o", "--data", "{tmp}/short.txt"],
            "is for the charlm task only",
        ),
        (
            ["advise", "--task", "digits", "--data", "{tmp}/short.txt"],
            "is for the charlm task only",
        ),
        *(
            (
                ["train", "--task", "digits", "--out", "{tmp}/o", "--seed", seed],
                f"argument --seed: seed must be an integer from 0 to {MAX_SEED}",
            )
            for seed in (str(2**70), "-1")
        ),
        (
            ["train", "--task", "digits", "--out", "{tmp}/o", "--batch-size", "1000000000"],
            "batch size 1000000000 needs about",
        ),
        (
            ["advise", "--task", "digits", "--batch-size", "1000000000"],
            "batch size 1000000000 needs about",
        ),
        (
            ["train", "--task", "digits", "--out", "{tmp}/o", "--resume", "--overwrite"],
            "argument --overwrite: not allowed with argument --resume",
        ),
        (["advise", "--task", "digits", "--threshold-db", "nan"], "must be a finite number"),
        (
            [
                "train",
                "--task",
                "digits",
                "--out",
                "{tmp}/o",
                "--precision",
                "fp16-mixed",
                "--step-in-backward",
            ],
            "step_in_backward=True cannot run with dynamic loss scaling",
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
    assert not (tmp_path / "o").exists()  # a refused run leaves nothing behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["train", "--out", "{tmp}/o"], ["advise"]])
def test_a_missing_cuda_device_is_one_line(tmp_path, capsys, command):
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--task", "digits", "--device", "cuda", *TINY])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"mixprec {command[0]}: error: device 'cuda' is not available" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_the_short_data_error_names_only_real_flags(tmp_path, capsys):
    (tmp_path / "one.txt").write_text("x")
    with pytest.raises(SystemExit):
        main(["train", "--task", "charlm", "--out", str(tmp_path / "o"), "--data",
              str(tmp_path / "one.txt")])  # fmt: skip
    err = capsys.readouterr().err
    assert "has 1 bytes" in err
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    known = {flag for action in train_parser._actions for flag in action.option_strings}
    assert set(re.findall(r"--[a-z][a-z-]*", err)) <= known


def _run_files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_step_in_backward_trains_the_same_run(tmp_path):
    runs = {}
    for flag in ([], ["--step-in-backward"]):
        out = tmp_path / ("inside" if flag else "ordinary")
        args = ["train", "--task", "digits", "--precision", "bf16-pure/stochastic"]
        assert main([*args, "--out", str(out), *TINY, *flag]) == 0
        runs[bool(flag)] = json.loads((out / "result.json").read_text())
    assert runs[True]["final_train_loss"] == runs[False]["final_train_loss"]
    assert runs[True]["metrics"] == runs[False]["metrics"]


def test_train_refuses_to_overwrite_a_run_unless_asked(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--task", "digits", "--out", str(out), *TINY]) == 0
    before = _run_files(out)
    assert set(before) == {"checkpoint.pt", "metrics.jsonl", "result.json"}
    capsys.readouterr()
    again = ["train", "--task", "digits", "--precision", "fp16-mixed", "--out", str(out), *TINY]
    with pytest.raises(SystemExit) as exit_info:
        main(again)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "already holds a run (checkpoint.pt, metrics.jsonl, result.json)" in err
    assert "--resume" in err and "--overwrite" in err
    assert _run_files(out) == before  # nothing of the earlier run was touched
    assert main([*again, "--overwrite"]) == 0
    assert json.loads((out / "result.json").read_text())["recipe"] == "fp16-mixed"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(6))


def test_resume_without_a_checkpoint_says_it_starts_from_scratch(tmp_path, capsys):
    assert main(["train", "--task", "digits", "--out", str(tmp_path / "plain"), *TINY]) == 0
    capsys.readouterr()
    resumed = tmp_path / "resumed"
    assert main(["train", "--task", "digits", "--out", str(resumed), "--resume", *TINY]) == 0
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and "starting from scratch" in err
    want = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")["model"]
    got = load_checkpoint(resumed / "checkpoint.pt")["model"]
    assert all(torch.equal(got[name], tensor) for name, tensor in want.items())


def test_resume_with_another_backend_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--task", "digits", "--precision", "fp16-mixed", "--out", str(out), *TINY]
    assert main([*args, "--backend", "emulated", "--checkpoint-every", "3"]) == 0
    saved = (out / "checkpoint.pt").read_bytes()
    assert load_checkpoint(out / "checkpoint.pt")["extra"]["backend"] == "emulated"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*args, "--backend", "native", "--resume"])
    err = capsys.readouterr().err
    assert "trained with autocast backend 'emulated', here the backend is 'native'" in err
    assert (out / "checkpoint.pt").read_bytes() == saved


def test_a_task_checkpoint_records_every_hyperparameter(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    config = TaskConfig(steps=2, batch_size=2, lr=1e-3)

    def charlm(n_heads):
        return CharLMTask(config, data=corpus, d_model=16, n_layers=1, n_heads=n_heads, seq_len=8)

    for task in (charlm(4), DigitsTask(config, hidden=16)):
        described = task.describe()
        hyper = set(inspect.signature(type(task).__init__).parameters) - {"self", "config"}
        assert hyper <= set(described), hyper - set(described)
        assert set(config.__dict__) <= set(described)
    train(charlm(4), Recipe.parse("fp32"), tmp_path / "run")
    # Same parameter shapes (d_model is split among the heads), another model:
    changed = r"cannot resume from .*: another task \(n_heads 4 there, 2 here\)"
    with pytest.raises(CheckpointError, match=changed):
        train(charlm(2), Recipe.parse("fp32"), tmp_path / "run", resume=True)


def test_check_batch_memory_refuses_only_what_does_not_fit():
    check_batch_memory(8, per_sample=100, available=800)  # exactly fits
    check_batch_memory(10**12, per_sample=100, available=None)  # unknown: no check
    with pytest.raises(ValueError, match=r"batch size 9 needs .* use a batch size of at most 8$"):
        check_batch_memory(9, per_sample=100, available=899)


@pytest.mark.parametrize("policy", ["fp32", "bf16-mixed"])
def test_bytes_per_sample_predicts_a_full_batch(policy):
    task = DigitsTask(TaskConfig(steps=1, batch_size=64, lr=1e-3))
    mp = MixedPrecision(policy, "cpu", backend="emulated")
    model = mp.prepare(task.build_model())
    x, y = task.batch(0)

    def forward():
        with mp.autocast():
            return model(x)

    measured = x.nbytes + y.nbytes + 2 * activation_bytes(model, forward)
    assert bytes_per_sample(task, model, mp.autocast) * 64 == pytest.approx(measured, rel=0.02)


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
        [sys.executable, "-m", "mixprec.app.cli", *args, "--out", str(killed_dir)],
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


def test_compare_prints_a_line_per_run_when_output_is_a_log(tmp_path):
    """A log (output not a terminal) shows each run as it finishes, not only at the end."""
    out = tmp_path / "out"
    done = run_cli(
        "compare", "--task", "digits", "--precisions", "fp32,bf16-mixed", "--out", str(out), *TINY
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for recipe in ("fp32", "bf16-mixed"):
        result = json.loads((out / "digits" / recipe / "result.json").read_text())
        line = next(line for line in lines if line.startswith(f"digits {recipe}: "))
        assert f"{result['steps']} steps in " in line
        assert f"train loss {result['final_train_loss']:.4g}" in line
    table = next(i for i, line in enumerate(lines) if "×time" in line)
    assert all(lines.index(f) < table for f in lines if f.startswith("digits "))
