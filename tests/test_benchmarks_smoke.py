"""Smoke runs of the compile benchmark and the GPU check in their smallest modes, on the CPU.

The compile benchmark runs in a subprocess (its own dynamo caches and thread settings), with this
checkout's ``src`` first on the path. ``bench_compile.py --quick`` compiles with ``aot_eager``
(the dispatcher path mixprec's kernels take under ``torch.compile``, without inductor's C++ build)
and must find every compiled twin's losses equal to its eager twin's. ``gpu_check.py`` must skip
cleanly with CUDA hidden (a subprocess); its argument handling, and its quick autocast and scaler
checks with ``--device cpu``, whose references are ``torch.autocast`` and
``torch.amp.GradScaler``, run in-process.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _run(script: str, *args: str, hide_cuda: bool = False) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    if hide_cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.slow
def test_bench_compile_quick_compiled_losses_match_eager():
    result = _run("bench_compile.py", "--quick", "--threads", "1", "--compile-backend", "aot_eager")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "1 threads" in out and "AVX512_BF16" in out and "AMX_BF16" in out
    rows = [line for line in out.splitlines() if line.endswith((" ok", " MISMATCH"))]
    names = [
        "fp32",
        "torch.autocast bf16",
        "mixprec bf16 native",
        "mixprec bf16 emulated",
        "mixprec fp16 emulated",
        "MixedPrecision bf16-mixed",
    ]
    assert [line[:27].strip() for line in rows] == names
    assert all(line.endswith(" ok") for line in rows), out
    assert "compiled mixprec bf16 native / compiled torch.autocast bf16 =" in out
    assert "compiled / eager, fp16 emulated" in out


@pytest.fixture
def script(monkeypatch):
    """Load a benchmark script as a module (its folder on ``sys.path`` for its own imports)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module

    return load


def test_bench_compile_refuses_zero_steps(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script("bench_compile").main(["--steps", "0"])
    assert exit_info.value.code == 2
    assert "--steps and --warmup must be >= 1 (got 0 and 2)" in capsys.readouterr().err


def test_gpu_check_help_names_its_options(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script("gpu_check").main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--sections", "--quick", "--steps", "--device"):
        assert option in out


def test_gpu_check_rejects_an_unknown_section(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script("gpu_check").main(["--sections", "autocast,speed"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown sections ['speed']; valid sections: autocast, scaler, presets" in err


def test_gpu_check_without_cuda_skips_and_exits_zero():
    result = _run("gpu_check.py", hide_cuda=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "no CUDA device: gpu_check skipped"


def test_gpu_check_fp4_section_says_why_it_skipped_without_blackwell(script, capsys):
    code = script("gpu_check").main(["--device", "cpu", "--sections", "fp4"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "fp4 native checks skipped: device 'cpu' is not a CUDA GPU" in out
    assert "== fp4: ok, 2 checks passed, 0 failed" in out


@pytest.mark.slow
def test_gpu_check_on_cpu_matches_torch_amp(script, capsys):
    code = script("gpu_check").main(["--device", "cpu", "--quick", "--sections", "autocast,scaler"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "== autocast: ok" in out and "== scaler: ok" in out
    assert "native equal to torch.autocast in" in out
    assert "AdamW fused" in out and "AdamW foreach" in out
