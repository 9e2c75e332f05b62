"""Scaled FP8 quantization against a per-block Python reference, and recipes as data."""

import math

import pytest
import torch
from fp8_reference import RECIPE_TABLE, ref_block, ref_operand, ref_quantize, ref_scale

from mixprec.compute.fp8 import (
    RECIPES,
    Fp8Recipe,
    delayed_scale,
    dequantize,
    dynamic_scale,
    e8m0_scale,
    fp8_quantize,
    quantize_blocks,
    round_down_to_power_of_two,
)

ROLES_AND_DIMS = [
    ("input", 1, "output"),
    ("weight", 1, "output"),
    ("grad_output", 1, "grad_input"),
    ("weight", 0, "grad_input"),
    ("grad_output", 0, "grad_weight"),
    ("input", 0, "grad_weight"),
]


def awkward_tensor(rows: int = 160, cols: int = 288, seed: int = 0) -> torch.Tensor:
    """Gaussian values over a wide range, a zero-only block, tiny values and huge outliers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-8, 8, cols, base=2)
    x[:32, :128] = 0.0  # a zero-only block under every block rule with blocks <= 128 rows
    x[:, 1] = 0.0  # a zero-only column
    x[40, 5] = 3.0e4
    x[-1, -1] = -2.0e-30
    return x


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical up to NaN payloads."""
    both_nan = torch.isnan(a) & torch.isnan(b)
    return bool(torch.all(both_nan | (a.view(torch.int32) == b.view(torch.int32))))


@pytest.mark.parametrize("recipe", list(RECIPE_TABLE))
@pytest.mark.parametrize(("role", "dim", "gemm"), ROLES_AND_DIMS)
@pytest.mark.parametrize("shape", [(160, 288), (128, 256), (48, 32)], ids=str)
def test_quantize_matches_the_per_block_reference(recipe, role, dim, gemm, shape):
    x = awkward_tensor(*shape)
    got = dequantize(fp8_quantize(x, RECIPES[recipe], role, dim, gemm))
    assert same(got, ref_operand(x, recipe, role, dim, gemm))
    assert torch.isfinite(got).all() and (got == 0).any() and got.abs().max() > 1e3


@pytest.mark.parametrize("recipe", list(RECIPE_TABLE))
def test_block_shapes_follow_the_recipe_table(recipe):
    for role, dim, gemm in ROLES_AND_DIMS:
        q = fp8_quantize(torch.randn(256, 384), RECIPES[recipe], role, dim, gemm)
        assert q.block == ref_block(recipe, role, (256, 384), dim, gemm)


@pytest.mark.parametrize("recipe", list(RECIPE_TABLE))
def test_non_finite_values_poison_their_block_only(recipe):
    x = awkward_tensor(seed=1)
    x[50, 200] = float("nan")
    x[100, 10] = float("inf")
    x[120, 250] = float("-inf")
    for role, dim, gemm in ROLES_AND_DIMS:
        got = dequantize(fp8_quantize(x, RECIPES[recipe], role, dim, gemm))
        assert same(got, ref_operand(x, recipe, role, dim, gemm))
        assert torch.isnan(got[50, 200]) and torch.isnan(got[100, 10])
    if recipe != "tensorwise":  # a finite block far away is untouched by the NaN
        got = dequantize(fp8_quantize(x, RECIPES[recipe], "input", 1, "output"))
        assert torch.isfinite(got[0]).all()


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_given_scale_saturates_to_the_format_max(fmt):
    x = awkward_tensor(seed=2)
    scale = torch.tensor(4.0)
    got = dequantize(quantize_blocks(x, tuple(x.shape), fmt, scale=scale))
    want = ref_quantize(x, tuple(x.shape), fmt, "dynamic", scale=4.0)
    assert same(got, want)
    fmax = torch.finfo(torch.float8_e4m3fn if fmt == "e4m3" else torch.float8_e5m2).max
    assert got.abs().max().item() == fmax / 4.0  # the outlier saturated, not inf


def test_zero_block_keeps_a_finite_scale_and_stays_zero():
    x = torch.zeros(4, 64)
    for rule in ("dynamic", "pow2", "e8m0"):
        q = quantize_blocks(x, (1, 32), "e4m3", rule)  # type: ignore[arg-type]
        assert torch.isfinite(q.scale).all()
        assert torch.equal(dequantize(q), x)


def test_scale_rules_match_their_definitions():
    amax = torch.tensor([0.0, 1e-30, 0.3, 1.0, 448.0, 500.0, 3e38, math.inf, math.nan])
    for fmt in ("e4m3", "e5m2"):
        for rule, got in (
            ("dynamic", dynamic_scale(amax, fmt)),
            ("pow2", dynamic_scale(amax, fmt, power_of_two=True)),
            ("e8m0", e8m0_scale(amax, fmt)),
        ):
            want = torch.tensor([ref_scale(a, fmt, rule) for a in amax.tolist()])
            assert same(got, want), (fmt, rule)


def test_e8m0_scales_are_representable_in_torchs_e8m0_dtype():
    scale = e8m0_scale(torch.tensor([1e-38, 0.0, 1.0, 3e38]), "e4m3")
    stored = (1 / scale).to(torch.float8_e8m0fnu).float()  # the scale MX stores
    assert torch.equal(stored, 1 / scale)


def test_round_down_to_power_of_two_is_exact_at_binade_edges():
    below = torch.tensor([2.0**k for k in range(-20, 40)]).nextafter(torch.tensor(0.0))
    got = round_down_to_power_of_two(below)
    want = torch.tensor([2.0 ** (k - 1) for k in range(-20, 40)])
    assert torch.equal(got, want)


def test_delayed_scale_uses_the_history_max_and_the_margin():
    history = torch.tensor([3.0, 7.0, 1.0])
    got = delayed_scale(history, torch.tensor(100.0), "e4m3", margin=2)
    assert got.item() == ref_scale(7.0, "e4m3", "dynamic") / 4
    fresh = delayed_scale(torch.zeros(3), torch.tensor(100.0), "e4m3")
    assert fresh.item() == ref_scale(100.0, "e4m3", "dynamic")


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_round_trips_through_its_string(name):
    recipe = RECIPES[name]
    assert Fp8Recipe.parse(str(recipe)) == recipe
    # Options a recipe does not read are refused (test_recipe_options_that_do_not_apply_are_
    # refused): change pow2 where it applies and block where the recipe has blocks.
    options = [] if recipe.granularity == "mxfp8" else [f"pow2={not recipe.power_of_two!s}"]
    options += ["block=64"] if recipe.granularity in ("blockwise", "mxfp8") else []
    changed = Fp8Recipe.parse(f"{name}:{','.join(options).lower()}")
    assert Fp8Recipe.parse(str(changed)) == changed != recipe


def test_delayed_recipe_string_form():
    recipe = Fp8Recipe.parse("tensorwise:scaling=delayed,history=32,margin=1")
    assert (recipe.scaling, recipe.history, recipe.margin) == ("delayed", 32, 1)
    assert str(recipe) == "tensorwise:scaling=delayed,history=32,margin=1"


def test_unknown_recipe_name_lists_the_choices():
    with pytest.raises(
        ValueError, match=r"unknown fp8 recipe 'colwise'; valid recipes: 'tensorwise'"
    ):
        Fp8Recipe.parse("colwise")


def test_history_below_one_is_refused():
    with pytest.raises(ValueError, match=r"history of at least 1 step, got history=0"):
        Fp8Recipe.parse("tensorwise_delayed:history=0")


def test_delayed_needs_tensorwise():
    with pytest.raises(ValueError, match=r"needs granularity='tensorwise', got 'rowwise'"):
        Fp8Recipe.parse("rowwise:scaling=delayed")


def test_bad_option_and_format_are_refused():
    with pytest.raises(ValueError, match=r"malformed fp8 recipe option 'speed=9'.*valid keys"):
        Fp8Recipe.parse("rowwise:speed=9")
    with pytest.raises(ValueError, match=r"must be an fp8 format, got 'bf16'"):
        Fp8Recipe.parse("rowwise:grad=bf16")
    with pytest.raises(ValueError, match=r"unknown high_precision GEMM 'loss'"):
        Fp8Recipe.parse("rowwise:hp=loss")
    with pytest.raises(TypeError, match=r"an fp8 recipe is a name"):
        Fp8Recipe.parse(3)  # type: ignore[arg-type]
