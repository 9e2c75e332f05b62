"""benchmarks/bench_emulation.py builds and times a step of each model under each preset."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_a_small_model_steps_under_each_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(
        "_bench_emulation", BENCHMARKS / "bench_emulation.py"
    )
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    for preset in ("fp32", "bf16-mixed", "fp8-mixed"):
        assert module.make_step("digits", preset)() > 0
    for variant in module.BREAKDOWN:  # --breakdown's layers, each one step
        assert module.make_breakdown("digits", variant)() > 0
