"""4-bit recipes in policies and sessions: spelling, presets, bad input, a tiny model trains."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixprec
from mixprec.compute.fp4_linear import Fp4Linear
from mixprec.policy import PRESETS, Policy


@pytest.mark.parametrize(
    "spec, fp8",
    [
        ("params=fp32,compute=nvfp4,output=fp32", "nvfp4"),
        (
            "params=fp32,compute=nvfp4(rht=false,sr_grad=false),output=fp32",
            "nvfp4:rht=false,sr_grad=false",
        ),
        ("params=fp32,compute=mxfp4(weight_blocks=32x32),output=fp32", "mxfp4:weight_blocks=32x32"),
        ("nvfp4-mixed(rht=false)", "nvfp4:rht=false"),
        ("mxfp4-mixed(sr_grad=true)", "mxfp4:sr_grad=true"),
    ],
)
def test_4bit_recipes_are_spelled_compute_name_and_round_trip(spec, fp8):
    policy = Policy.parse(spec)
    assert (policy.fp8, policy.compute.name, policy.output.name) == (fp8, "bf16", "fp32")
    assert Policy.parse(str(policy)) == policy
    assert f"compute={fp8.partition(':')[0]}" in str(policy) and "fp8:" not in str(policy)


def test_4bit_presets_keep_the_head_in_bf16_and_user_rules_come_first():
    for name in ("nvfp4-mixed", "mxfp4-mixed"):
        policy = PRESETS[name]
        assert policy.for_module("model.lm_head").fp8 is None
        assert policy.for_module("blocks.0.fc1").fp8 == name.partition("-")[0]
    policy = Policy.parse("nvfp4-mixed(rht=false); blocks.1.* -> bf16-mixed")
    assert policy.for_module("blocks.1.fc1").fp8 is None
    assert policy.for_module("lm_head").fp8 is None  # the preset's own rule stays
    assert policy.for_module("blocks.0.fc1").fp8 == "nvfp4:rht=false"


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            "params=fp32,compute=fp4_e2m1",
            r"compute=fp4_e2m1 is not applied by anything.*'compute=nvfp4'",
        ),
        ("fp4_e2m1", r"fp4_e2m1 is not applied by anything.*presets 'nvfp4-mixed'"),
        (
            "params=fp32,compute=fp8:nvfp4",
            r"'nvfp4' is a 4-bit recipe, not an fp8 one; write 'compute=nvfp4'",
        ),
        (
            "nvfp4-mixed(hadamard=true)",
            r"unknown 4-bit recipe option 'hadamard=true'.*valid options",
        ),
        (
            "bf16-mixed(rht=false)",
            r"options in parentheses go to a preset with a low-precision recipe",
        ),
        (
            "params=fp32,compute=mxfp4(weight_blocks=16x16)",
            r"unknown weight_blocks '16x16'.*'1x32'",
        ),
    ],
)
def test_bad_4bit_policies_are_refused_with_the_fix(spec, message):
    with pytest.raises(ValueError, match=message):
        Policy.parse(spec)


def _train(preset, steps=40):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 32))
    model.add_module("head", nn.Linear(32, 4))
    mp = mixprec.MixedPrecision(preset, backend="emulated")
    model, opt = mp.prepare(model, torch.optim.AdamW(model.parameters(), lr=3e-3))
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(256, 32, generator=g), torch.randn(32, 4, generator=g)
    y = (x @ w).argmax(-1)
    losses = []
    for _ in range(steps):
        with mp.autocast():
            loss = F.cross_entropy(model(x).float(), y)
        mp.backward(loss)
        mp.step(opt)
        opt.zero_grad()
        losses.append(loss.item())
    return model, losses


@pytest.mark.parametrize("preset", ["nvfp4-mixed", "mxfp4-mixed"])
def test_a_tiny_model_trains_under_the_4bit_presets_close_to_bf16(preset):
    model, losses = _train(preset)
    _, bf16 = _train("bf16-mixed")
    assert isinstance(model[0], Fp4Linear) and isinstance(model[3], Fp4Linear)
    assert type(model.head) is nn.Linear  # the preset's rule keeps the head in bf16
    assert losses[-1] < 0.5 * losses[0]
    assert abs(losses[-1] - bf16[-1]) < 0.05 * bf16[0]
