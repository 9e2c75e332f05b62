"""The advisor on the classic T5 overflow: fp16 ruled out for that block, and the advice trains."""

from __future__ import annotations

import math

import pytest
import torch
from diag_models import lm_loss, t5_overflow_model, tiny_transformer, tokens
from torch import nn

from mixprec import Policy
from mixprec.compute import autocast, fp32_islands
from mixprec.diagnostics import advise, nonfinite_grads
from mixprec.hardware import HardwareReport, tensor_core_formats

V100 = HardwareReport(
    device="cuda:0",
    kind="cuda",
    name="Tesla V100",
    compute_capability=(7, 0),
    tensor_core_formats=tensor_core_formats("cuda", (7, 0), frozenset()),
)
CPU_WITHOUT_16_BIT_UNITS = HardwareReport("cpu", "cpu", "test CPU", cpu_flags=frozenset({"avx2"}))


@pytest.fixture(scope="module")
def t5_advice():
    model = t5_overflow_model(block=1)
    x = tokens()
    return {
        "cpu": advise(model, (x, x), lm_loss, "cpu", hardware=CPU_WITHOUT_16_BIT_UNITS),
        "v100": advise(model, (x, x), lm_loss, hardware=V100),
    }


def train(policy: Policy, steps: int = 8, init_scale: float | None = None):
    """A short run under emulated autocast; returns losses, skipped steps, non-finite grads."""
    model = t5_overflow_model(block=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    low = policy.compute.dtype
    scaler = torch.amp.GradScaler(
        "cpu", init_scale=init_scale or 1.0, enabled=init_scale is not None
    )
    losses, skipped, bad = [], 0, []
    with fp32_islands(model, policy):
        for i in range(steps):
            x = tokens(seed=10 + i % 2)
            with autocast("cpu", dtype=low, backend="emulated"):
                loss = lm_loss(model(x), x)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            bad.extend(nonfinite_grads(model))
            scale_before = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            skipped += scaler.get_scale() < scale_before
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    return losses, skipped, bad


def test_on_a_cpu_the_advice_is_bf16_and_rules_out_fp16_for_the_block(t5_advice):
    advice = t5_advice["cpu"]
    assert Policy.parse(advice.policy) == Policy.parse("bf16-mixed")
    assert advice.init_scale is None and advice.backend == "emulated"
    assert advice.fp16_ruled_out == ("blocks.1.fc1", "blocks.1.fc2")
    assert (
        advice.activation_absmax["blocks.1.fc1"] > 65504 > advice.activation_absmax["blocks.0.fc1"]
    )
    assert any("fp16 is ruled out for blocks.1.fc1" in r and "65504" in r for r in advice.reasons)
    assert advice.comparison.proposed_rules == ()
    assert "recommended policy: bf16-mixed" in str(advice)


def test_bf16_advice_trains_without_non_finite_values(t5_advice):
    losses, skipped, bad = train(Policy.parse(t5_advice["cpu"].policy))
    assert all(math.isfinite(v) for v in losses) and bad == [] and skipped == 0
    assert losses[-1] < losses[0]


def test_on_an_fp16_only_gpu_the_block_becomes_an_fp32_island(t5_advice):
    advice = t5_advice["v100"]
    policy = Policy.parse(advice.policy)  # the string parses as is
    assert policy.compute.name == "fp16"
    for name in ("blocks.1.fc1", "blocks.1.fc2"):
        assert policy.for_module(name, nn.Linear).compute.name == "fp32"
    assert policy.for_module("blocks.0.fc1", nn.Linear).compute.name == "fp16"
    assert advice.init_scale is not None and advice.init_scale <= 2.0**16
    assert advice.init_scale == min(2.0**16, advice.underflow.largest_safe_scale)
    assert advice.underflow.format == "fp16" and advice.underflow.scale == advice.init_scale


def test_fp16_advice_trains_without_skipped_steps_where_plain_fp16_overflows(t5_advice):
    advice = t5_advice["v100"]
    losses, skipped, bad = train(Policy.parse(advice.policy), init_scale=advice.init_scale)
    assert all(math.isfinite(v) for v in losses) and bad == [] and skipped == 0
    assert losses[-1] < losses[0]
    plain, _, _ = train(Policy.parse("fp16-mixed"), steps=1, init_scale=advice.init_scale)
    assert not math.isfinite(plain[0])  # without the islands the same block overflows


def test_a_well_behaved_model_gets_the_hardware_choice_without_islands():
    model = tiny_transformer(n_layers=1)
    x = tokens()
    advice = advise(model, (x, x), lm_loss, hardware=V100)
    assert advice.fp16_ruled_out == ()
    assert Policy.parse(advice.policy) == Policy.parse("fp16-mixed")


def test_bad_arguments():
    x = tokens()
    model = tiny_transformer(n_layers=1)
    with pytest.raises(ValueError, match="advise needs a model with parameters, got ReLU"):
        advise(nn.ReLU(), (x, x), lm_loss)
    with pytest.raises(ValueError, match=r"threshold_db=200 is out of range; valid range"):
        advise(model, (x, x), lm_loss, threshold_db=200)
    with pytest.raises(TypeError, match=r"hardware must be a mixprec\.hardware\.HardwareReport"):
        advise(model, (x, x), lm_loss, hardware="V100")
    with pytest.raises(ValueError, match="max_rounds must be an integer >= 1, got 0"):
        advise(model, (x, x), lm_loss, hardware=V100, max_rounds=0)


def test_wrong_shape_batch_raises_the_models_own_error_unchanged():
    model = tiny_transformer(n_layers=1)
    bad = torch.zeros(2, 3, 4, 5, dtype=torch.long)
    with pytest.raises(Exception) as direct:
        model(bad)
    with pytest.raises(type(direct.value)) as advised:
        advise(model, (bad, bad), lm_loss, hardware=V100)
    assert str(advised.value) == str(direct.value)


@pytest.mark.parametrize(
    "loss_fn", [nn.functional.cross_entropy, nn.CrossEntropyLoss(), lambda out, target: out.sum()]
)
def test_a_tensor_batch_with_a_two_argument_loss_says_what_advise_expects(loss_fn):
    # advise(model, tensor, loss) used to fail inside cross_entropy ("missing target").
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match=r"batch is a Tensor without a target.*\(inputs, target\)"):
        advise(model, x, loss_fn, hardware=V100)


def test_a_tensor_batch_with_a_one_argument_loss_still_runs():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    advice = advise(model, torch.randn(4, 8), lambda out: out.pow(2).mean(), hardware=V100)
    assert Policy.parse(advice.policy) == Policy.parse("fp16-mixed")


@pytest.mark.parametrize(
    "batch",
    [
        (torch.randn(0, 8), torch.zeros(0, dtype=torch.long)),
        {"input": torch.randn(0, 8)},
        ((torch.randn(0, 8),), torch.zeros(0, dtype=torch.long)),
    ],
    ids=["pair", "dict", "positional"],
)
def test_an_empty_batch_is_refused(batch):
    # advise() on an empty batch used to measure nothing (a NaN loss) and return a policy.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

        def forward(self, input):
            return self.body(input)

    def loss_fn(out, target=None):
        return (
            out.float().pow(2).mean()
            if target is None
            else nn.functional.cross_entropy(out, target)
        )

    with pytest.raises(ValueError, match=r"batch is empty: .* has 0 elements"):
        advise(Net(), batch, loss_fn, hardware=V100)
