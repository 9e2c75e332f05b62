"""FP8 and NVFP4 with ``amax_reduce=true`` on two gloo ranks equal one process on the whole batch.

One spawn runs every recipe with and without the option; each rank trains on its half of the
batch (halves of very different magnitude, so per-rank scales differ), sums the gradients over
the ranks and steps. The parent compares with one process on the whole batch:

* with the option the first forward's outputs and input gradients are those rows of one process
  to fp32 rounding (the fp8 operands are the same; a BLAS may sum a 32-row GEMM in another order
  than a 64-row one, as MKL's AVX2 kernels do), and so is every step's loss;
* without it the tensor-scaled recipes' outputs are not within that tolerance (so the test can
  fail);
* a rank whose batch is empty still takes part in every reduction: the other rank, holding the
  whole batch, gets one process's results instead of waiting forever for its partner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_spawn import WORLD, spawn
from torch import nn

from mixprec.compute.fp4_linear import Fp4Linear
from mixprec.compute.fp8_linear import Fp8Linear
from mixprec.fp4_recipes import Fp4Recipe, parse_recipe
from mixprec.recipes import Fp8Recipe
from mixprec.scaled import reduce_amax

STEPS, ROWS, LR = 3, 64, 1e-3
# rowwise reduces the weight-gradient GEMM's column amaxes; mxfp8 needs no reduction (its
# 32-row blocks are the same on a 32-row rank), so the option must leave it exact too. nvfp4
# reduces its tensor scales (stochastic rounding off: its random draws differ between ranks);
# mxfp4 has none, like mxfp8.
RECIPES = ("tensorwise", "tensorwise_delayed", "rowwise", "mxfp8", "nvfp4:sr_grad=false", "mxfp4")


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal to fp32 rounding (a GEMM's order of summation), far inside what different fp8 or
    fp4 scales change (a few percent)."""
    return torch.allclose(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def _with(name: str, reduce: bool) -> str:
    """``name`` with the option ``amax_reduce`` set to ``reduce``."""
    return f"{name}{',' if ':' in name else ':'}amax_reduce={str(reduce).lower()}"


def _data() -> torch.Tensor:
    x = torch.randn(ROWS, 32, generator=torch.Generator().manual_seed(1))
    x[ROWS // 2 :] *= 100.0  # rank 1's half has a 100x larger amax
    return x


def _model(recipe: str) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    first, second = nn.Linear(32, 64), nn.Linear(64, 32)
    with torch.no_grad():
        for p in (*first.parameters(), *second.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    layer = Fp4Linear if isinstance(parse_recipe(recipe), Fp4Recipe) else Fp8Linear
    return nn.Sequential(
        layer.from_linear(first, recipe, "emulated"),
        nn.ReLU(),
        layer.from_linear(second, recipe, "emulated"),
    )


def _train(recipe: str, x: torch.Tensor, distributed: bool) -> dict[str, Any]:
    """``STEPS`` SGD steps on ``x``; a sum loss, so a rank's rows get one process's gradients."""
    model = _model(recipe)
    seen: dict[str, Any] = {"loss": []}
    for step in range(STEPS):
        x_in = x.clone().requires_grad_(True)
        out = model(x_in)
        loss = out.pow(2).sum()
        loss.backward()
        total = loss.detach().clone()
        if distributed:
            dist.all_reduce(total)
            for p in model.parameters():
                dist.all_reduce(p.grad)
        seen["loss"].append(total)
        if step == 0:
            seen["out"], seen["grad_x"] = out.detach(), x_in.grad
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
                p.grad = None
    return seen


def _worker(rank: int, path: str) -> None:
    half = _data().chunk(WORLD)[rank]
    seen: dict[str, Any] = {}
    for name in RECIPES:
        for reduce in (True, False):
            recipe = _with(name, reduce)
            seen[recipe] = _train(recipe, half, distributed=True)
    whole = _data() if rank == 0 else _data()[:0]  # rank 1 has nothing this time
    for name in RECIPES:
        seen[f"{name} empty"] = _train(_with(name, True), whole, distributed=True)
    # NaN on one rank is NaN on both (a step one rank skips, every rank skips)
    amax = torch.tensor([1.0, 2.0]) if rank == 0 else torch.tensor([float("nan"), 3.0])
    seen["nan"] = reduce_amax(amax)
    torch.save(seen, Path(path) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    path = tmp_path_factory.mktemp("amax_reduce")
    spawn(_worker, str(path))
    return [torch.load(path / f"rank{r}.pt") for r in range(WORLD)]


def test_the_option_parses_and_prints() -> None:
    recipe = Fp8Recipe.parse("tensorwise:amax_reduce=true")
    assert recipe.amax_reduce and str(recipe) == "tensorwise:amax_reduce=true"
    with pytest.raises(ValueError, match="amax_reduce='yes'"):
        Fp8Recipe.parse("rowwise:amax_reduce=yes")
    fp4 = Fp4Recipe.parse("nvfp4:amax_reduce=true")
    assert fp4.amax_reduce and str(fp4) == "nvfp4:amax_reduce=true"
    assert not Fp4Recipe("mxfp4").amax_reduce
    with pytest.raises(ValueError, match="amax_reduce='yes'"):
        Fp4Recipe.parse("nvfp4:amax_reduce=yes")
    with pytest.raises(TypeError, match="amax_reduce must be a bool"):
        Fp4Recipe("nvfp4", amax_reduce=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", RECIPES)
def test_two_ranks_with_amax_reduce_equal_one_process(runs: list[dict[str, Any]], name: str):
    recipe = _with(name, True)
    one = _train(recipe, _data(), distributed=False)
    rows = [rows for rows in one["out"].chunk(WORLD)]
    grads = [g for g in one["grad_x"].chunk(WORLD)]
    for rank, seen in enumerate(runs):
        got = seen[recipe]
        assert _close(got["out"], rows[rank]) and _close(got["grad_x"], grads[rank])
        torch.testing.assert_close(
            torch.stack(got["loss"]), torch.stack(one["loss"]), rtol=1e-5, atol=0
        )


@pytest.mark.parametrize("name", ["tensorwise", "tensorwise_delayed", "nvfp4:sr_grad=false"])
def test_without_amax_reduce_each_rank_scales_its_own_half(
    runs: list[dict[str, Any]], name: str
) -> None:
    one = _train(name, _data(), distributed=False)
    local = runs[0][_with(name, False)]["out"]
    assert not _close(local, one["out"].chunk(WORLD)[0])


def test_a_nan_amax_on_one_rank_is_nan_on_every_rank(runs: list[dict[str, Any]]) -> None:
    for seen in runs:
        assert torch.isnan(seen["nan"][0]) and seen["nan"][1] == 3.0


@pytest.mark.parametrize("name", RECIPES)
def test_a_rank_with_an_empty_batch_still_reduces(runs: list[dict[str, Any]], name: str) -> None:
    one = _train(_with(name, True), _data(), distributed=False)
    full, empty = runs[0][f"{name} empty"], runs[1][f"{name} empty"]
    assert _close(full["out"], one["out"]) and _close(full["grad_x"], one["grad_x"])
    assert empty["out"].shape == (0, 32)
    for seen in (full, empty):
        torch.testing.assert_close(
            torch.stack(seen["loss"]), torch.stack(one["loss"]), rtol=1e-5, atol=0
        )
