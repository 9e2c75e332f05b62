"""Inputs FP8 accepted and ignored, or failed on late (issue 19, items 10-12, 16, 19, 26)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixprec
from mixprec.compute.fp8 import RECIPES, Fp8Recipe
from mixprec.compute.fp8_convert import convert_to_fp8
from mixprec.compute.fp8_linear import Fp8Linear
from mixprec.policy import Policy

# -- item 10: fp8 formats where a recipe belongs -------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "output=fp8_e4m3",
        "compute=fp8_e5m2",
        "master=fp8_e4m3",
        "p=bf16,o=fp8_e5m2",
        "bf16; 0 -> o=fp8_e5m2",
    ],
)
def test_fp8_formats_outside_a_recipe_are_refused(spec):
    with pytest.raises(ValueError, match=r"fp8_e[45]m[32].*'compute=fp8:<recipe>'.*'rowwise'"):
        Policy.parse(spec)


def test_fp8_recipes_still_parse():
    assert Policy.parse("compute=fp8:rowwise").fp8 == "rowwise"


# -- item 11: recipe options that do not apply --------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "option"),
    [
        ("tensorwise:margin=4", "margin"),
        ("tensorwise:history=4", "history"),
        ("tensorwise:block=16", "block"),
        ("rowwise:block=16", "block"),
        ("mxfp8:pow2=false", "pow2"),
        ("tensorwise_delayed:block=8", "block"),
    ],
)
def test_recipe_options_that_do_not_apply_are_refused(spec, option):
    name = spec.partition(":")[0]
    with pytest.raises(ValueError, match=rf"option {option!r} does not apply to recipe {name!r}.*"
                       r"options it takes: "):  # fmt: skip
        Fp8Recipe.parse(spec)


def test_options_that_apply_are_accepted():
    assert Fp8Recipe.parse("tensorwise:scaling=delayed,margin=2").margin == 2
    assert Fp8Recipe.parse("tensorwise_delayed:history=4").history == 4
    assert Fp8Recipe.parse("blockwise:block=64").block == 64
    assert Fp8Recipe.parse("mxfp8:pow2=true") == RECIPES["mxfp8"]


def test_recipe_fields_that_do_not_apply_are_refused_at_construction():
    with pytest.raises(ValueError, match=r"margin=4 applies to delayed scaling only"):
        Fp8Recipe("tensorwise", margin=4)
    with pytest.raises(ValueError, match=r"block=16 applies to 'blockwise' and 'mxfp8' only"):
        Fp8Recipe("rowwise", "rowwise", block=16)


# -- item 26: a custom-named recipe is refused when it is built --------------------------------


def test_custom_recipe_name_is_refused_at_construction():
    with pytest.raises(
        ValueError, match=r"unknown fp8 recipe name 'custom'.*'tensorwise'.*replace"
    ):
        Fp8Recipe("custom", granularity="rowwise")


# -- item 16: integer input ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_input_is_refused_like_nn_linear(dtype):
    torch.manual_seed(0)
    plain = nn.Linear(4, 3)
    x = torch.ones(2, 4, dtype=dtype)
    with pytest.raises(RuntimeError) as expected:
        plain(x)
    layer = Fp8Linear.from_linear(plain, "tensorwise")
    with pytest.raises(type(expected.value), match=str(expected.value).split(",")[0]):
        layer(x)


# -- item 19: an empty batch --------------------------------------------------------------------


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_empty_batch_runs_like_nn_linear(recipe):
    torch.manual_seed(0)
    plain = nn.Linear(32, 32)
    layer = Fp8Linear.from_linear(nn.Linear(32, 32), recipe)
    layer.load_state_dict(plain.state_dict(), strict=False)
    for shape in [(0, 32), (2, 0, 32)]:
        x = torch.zeros(shape, requires_grad=True)
        x_ref = torch.zeros(shape, requires_grad=True)
        out, ref = layer(x), plain(x_ref)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        out.sum().backward()
        ref.sum().backward()
        assert x.grad.shape == x_ref.grad.shape
        assert torch.equal(layer.weight.grad, plain.weight.grad)  # zeros, as nn.Linear's
        assert torch.equal(layer.bias.grad, plain.bias.grad)
        layer.zero_grad()
        plain.zero_grad()


@pytest.mark.parametrize("recipe", ["tensorwise_delayed", "tensorwise_delayed:amax_reduce=true"])
def test_an_empty_batch_records_no_amax(recipe):
    """Alone, an empty batch observes nothing, with amax_reduce too (there is no other rank's
    amax to record): the delayed history stays as one non-empty step left it."""
    torch.manual_seed(0)
    layer = Fp8Linear.from_linear(nn.Linear(32, 32), recipe)
    layer(torch.randn(4, 32, requires_grad=True)).sum().backward()
    layer.end_step(True)
    before = layer.fp8_amax_history.clone()
    layer(torch.zeros(0, 32, requires_grad=True)).sum().backward()
    layer.end_step(True)
    assert torch.equal(layer.fp8_amax_history, before)


def test_functional_empty_batch():
    from mixprec.compute.fp8_linear import fp8_linear

    out = fp8_linear(torch.zeros(0, 16), torch.ones(8, 16), None, "rowwise")
    assert out.shape == F.linear(torch.zeros(0, 16), torch.ones(8, 16)).shape


# -- item 12: linear subclasses and models without linear layers --------------------------------


def test_linear_subclasses_are_listed_and_warned():
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    with pytest.warns(UserWarning, match=r"self_attn\.out_proj.*NonDynamicallyQuantizableLinear"):
        done = convert_to_fp8(model, "tensorwise")
    assert "self_attn.out_proj" in done.skipped
    assert sorted(done.converted) == ["linear1", "linear2"]


def test_fp8_session_on_a_model_without_linear_layers_warns():
    mp = mixprec.MixedPrecision("fp8-mixed", device="cpu", backend="emulated")
    with pytest.warns(UserWarning, match=r"no nn\.Linear.*nothing runs in FP8"):
        mp.prepare(nn.Sequential(nn.Conv1d(2, 2, 1), nn.ReLU()))


def test_a_model_with_linear_layers_converts_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        done = convert_to_fp8(nn.Sequential(nn.Linear(4, 4)), "tensorwise")
    assert done.converted == ["0"] and not done.skipped


def test_backend_is_resolved_once_per_layer(monkeypatch):
    import importlib

    fp8_linear_module = importlib.import_module("mixprec.compute.fp8_linear")

    calls = []
    real = fp8_linear_module.fp8_backend
    layer = Fp8Linear(16, 8, recipe="rowwise")
    monkeypatch.setattr(
        fp8_linear_module, "fp8_backend", lambda *a, **k: calls.append(a) or real(*a, **k)
    )
    for _ in range(3):
        layer(torch.ones(2, 16))
    assert len(calls) == 1
    layer.backend = "emulated"  # a changed setting is resolved again
    layer(torch.ones(2, 16))
    assert len(calls) == 2
