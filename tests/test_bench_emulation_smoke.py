"""benchmarks/bench_emulation.py builds and times a step of each model under each preset, and
counts what a forward keeps for backward."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from mixprec.compute import emulate_build

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(
        "_bench_emulation", BENCHMARKS / "bench_emulation.py"
    )
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_a_small_model_steps_under_each_preset(bench: ModuleType) -> None:
    for preset in ("fp32", "bf16-mixed", "fp8-mixed"):
        assert bench.make_step("digits", preset)() > 0
    for variant in bench.BREAKDOWN:  # --breakdown's layers, each one step
        assert bench.make_breakdown("digits", variant)() > 0


def test_saved_counts_torch_autocasts_weight_copies_that_the_session_does_not_keep(
    bench: ModuleType,
) -> None:
    """``--saved``: the digits MLP under bf16-mixed keeps for backward what torch.autocast keeps,
    less autocast's 16-bit weight copy of each layer whose input needs a gradient (all but the
    first), which the emulated layer nodes do not make."""
    if emulate_build.emulate_engine() is None:
        pytest.skip("the C++ kernels did not build here")
    build, _ = bench.MODELS["digits"]()
    linears = [m for m in build().modules() if isinstance(m, torch.nn.Linear)]
    copies = sum(2 * layer.weight.numel() for layer in linears[1:])
    mixed, native = (bench.saved_bytes("digits", p) for p in ("bf16-mixed", "torch.autocast"))
    assert native - mixed == copies
    assert mixed < bench.saved_bytes("digits", "fp32")
