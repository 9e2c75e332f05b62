"""Smoke runs of the optimizer-step and rounding benchmarks in their smallest modes.

Each script's ``main`` runs in-process on about a million parameters (or one MiB) with one
repeat; the checks are that every row is printed, with the thread count and CPU flags in the
header, and that the fused rows did use the one-pass kernels where they apply. Nothing here
looks at a time.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from mixprec.optim import fused

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_master_prints_every_wrapper_on_both_paths(capsys):
    _load("bench_master").main(["--millions", "0.5", "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert "1 threads" in out and "cpu flags:" in out
    rows = [line.split() for line in out.splitlines()[2:]]
    assert len(rows) == 2 * 4 * 2  # inner x wrapper x path
    if fused.engine() is not None:
        # "fp32 master, kept" keeps fp32 gradient buffers, which the one-pass kernels never need
        fused_rows = [r for r in rows if r[-5] == "auto" and "kept" not in r]
        assert fused_rows and all(r[-1] == "2" for r in fused_rows)  # weight and bias
    assert all(r[-1] == "0" for r in rows if r[-5] == "off")


def test_bench_quantize_prints_the_counter_based_rows(capsys):
    _load("bench_quantize").main(["--mib", "1", "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert "1 threads" in out and "cpu flags:" in out
    for name in ("bf16", "fp16"):
        assert f"stochastic {name}, counter-based, torch ops" in out
        assert f"stochastic {name}, counter-based, one-pass kernel" in out or fused.engine() is None


def test_bench_session_step_prints_both_setups(capsys):
    _load("bench_session_step").main(["--millions", "0.5", "--pairs", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert "1 threads" in out and "cpu flags:" in out
    for setup in ("fp16-mixed", "bf16 + fp32 master"):
        assert any(line.startswith(setup) for line in out.splitlines())
