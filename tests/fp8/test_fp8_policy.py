"""FP8 in the policy syntax: ``compute=fp8:<recipe>``, round trips, rules, and applying it."""

import pytest
import torch
from torch import nn

from mixprec.compute.fp8 import RECIPES, Fp8Recipe
from mixprec.compute.fp8_advice import advise_fp8
from mixprec.compute.fp8_convert import apply_fp8_policy
from mixprec.compute.fp8_linear import Fp8Linear
from mixprec.policy import FP8_RECIPE_NAMES, Policy


def test_policy_recipe_names_are_the_fp8_recipes():
    assert FP8_RECIPE_NAMES == tuple(RECIPES)


@pytest.mark.parametrize("recipe", FP8_RECIPE_NAMES)
def test_fp8_compute_round_trips(recipe):
    policy = Policy.parse(f"params=fp32,compute=fp8:{recipe},output=fp32; lm_head -> bf16-mixed")
    assert (policy.fp8, policy.compute.name, policy.output.name) == (recipe, "bf16", "fp32")
    assert Policy.parse(str(policy)) == policy
    assert str(policy).startswith(f"params=fp32,compute=fp8:{recipe},output=fp32; lm_head -> ")
    assert policy.for_module("model.lm_head").fp8 is None
    assert policy.for_module("blocks.0.fc1").fp8 == recipe


def test_bare_fp8_means_tensorwise_and_plain_policies_are_unchanged():
    assert Policy.parse("c=fp8").fp8 == "tensorwise"
    assert Policy.parse("bf16-mixed").fp8 is None
    assert str(Policy.parse("bf16-mixed")) == "params=fp32,compute=bf16,output=fp32"


def test_bad_fp8_policies_name_the_choices():
    with pytest.raises(
        ValueError, match=r"unknown fp8 recipe 'colwise'; valid recipes: tensorwise"
    ):
        Policy.parse("compute=fp8:colwise")
    with pytest.raises(ValueError, match=r"needs compute=bf16, got compute=fp16"):
        Policy(compute="fp16", fp8="rowwise")
    with pytest.raises(ValueError, match=r"policy key 'compute' is given twice"):
        Policy.parse("compute=fp8:rowwise,compute=bf16")


def test_apply_fp8_policy_converts_by_rule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
    model.append(nn.Linear(32, 4))
    policy = "params=fp32,compute=fp8:rowwise,output=fp32; 4 -> bf16-mixed; 2 -> compute=fp8:mxfp8"
    done = apply_fp8_policy(model, policy)
    assert done.converted == ["0", "2"] and done.excluded == ["4"]
    assert model[0].recipe == RECIPES["rowwise"] and model[2].recipe == RECIPES["mxfp8"]
    assert type(model[4]) is nn.Linear


def test_apply_fp8_policy_falls_back_or_refuses_a_misfit():
    model = nn.Sequential(nn.Linear(64, 10))
    with pytest.warns(UserWarning, match=r"layer '0' stays in high precision"):
        done = apply_fp8_policy(model, "compute=fp8:blockwise")
    assert list(done.fallbacks) == ["0"] and type(model[0]) is nn.Linear
    with pytest.raises(ValueError, match=r"exclude it: a rule '0 -> bf16-mixed'"):
        apply_fp8_policy(model, "compute=fp8:blockwise", on_mismatch="error")


def test_advice_as_a_policy_string():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    batch = torch.randn(8, 16)
    measured = advise_fp8(model, batch, lambda out: out.square().mean())
    worst = min(measured.layers, key=lambda layer: layer.worst_db)
    threshold = worst.worst_db + 1e-9  # just above the worst layer: it alone stays in bf16
    advice = advise_fp8(model, batch, lambda out: out.square().mean(), threshold_db=threshold)
    policy = Policy.parse(advice.policy("bf16-mixed"))
    assert policy.fp8 == "tensorwise" and policy.output.name == "fp32"
    assert policy.for_module(worst.name).fp8 is None
    done = apply_fp8_policy(model, policy)
    assert done.excluded == [worst.name]
    assert all(isinstance(model.get_submodule(n), Fp8Linear) for n in done.converted)


def test_convert_to_fp8_takes_a_policy_like_its_recipe_shorthand():
    import copy

    from mixprec.compute.fp8_convert import convert_to_fp8

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 4))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    by_policy = convert_to_fp8(a, "params=fp32,compute=fp8:rowwise,output=fp32; 3 -> bf16-mixed")
    by_shorthand = convert_to_fp8(b, "rowwise; 3 -> bf16")
    assert by_policy.converted == by_shorthand.converted == ["0", "2"]
    assert by_policy.excluded == by_shorthand.excluded == ["3"]
    # torchao's module_filter_fn(module, fqn) narrows the policy's choice
    c = copy.deepcopy(model)
    done = convert_to_fp8(c, Policy.parse("fp8-mixed"), module_filter_fn=lambda m, fqn: fqn != "2")
    assert done.converted == ["0", "3"] and done.excluded == ["2"]


def test_fp8_plan_is_a_deprecated_alias_that_builds_a_policy():
    from mixprec.compute.fp8_convert import Fp8Plan

    with pytest.warns(DeprecationWarning, match=r"Fp8Plan is deprecated.*compute=fp8:rowwise"):
        plan = Fp8Plan.parse("rowwise; lm_head -> bf16")
    policy = plan.to_policy()
    assert policy.fp8 == "rowwise" and policy.for_module("model.lm_head").fp8 is None
    assert policy == Policy.parse(
        "params=fp32,compute=fp8:rowwise,output=fp32; lm_head -> bf16-mixed"
    )


def test_a_policy_carries_a_recipe_with_options():
    from mixprec.compute.fp8_convert import convert_to_fp8

    text = (
        "params=fp32,compute=fp8:tensorwise(scaling=delayed,history=4),output=fp32; "
        "2 -> compute=fp8:blockwise(block=16)"
    )
    policy = Policy.parse(text)
    assert Policy.parse(str(policy)) == policy
    assert Fp8Recipe.parse(policy.fp8) == Fp8Recipe.parse("tensorwise:scaling=delayed,history=4")
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    done = convert_to_fp8(model, policy)
    assert done.converted == ["0", "2"]
    assert model[0].recipe == Fp8Recipe.parse("tensorwise:scaling=delayed,history=4")
    assert model[2].recipe == Fp8Recipe.parse("blockwise:block=16")
    with pytest.raises(ValueError, match=r"option 'history' does not apply to recipe 'rowwise'"):
        Policy.parse("compute=fp8:rowwise(history=4)")
