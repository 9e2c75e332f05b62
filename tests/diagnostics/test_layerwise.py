"""Per-layer SNR against FP32: hand-computed SNRs, an independent twin run, island proposals."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diag_models import lm_loss, t5_overflow_model, tiny_transformer, tokens
from torch import nn

from mixprec import Policy
from mixprec.compute import autocast
from mixprec.diagnostics import compare_layers, snr_db


@pytest.mark.parametrize(
    ("reference", "test", "expected"),
    [
        ([3.0, 4.0], [3.0, 4.5], 10 * math.log10(25 / 0.25)),  # 20 dB
        ([1.0, 0.0], [1.0, 0.1], 10 * math.log10(1 / 0.01)),  # 20 dB
        ([1.0, 1.0, 1.0, 1.0], [1.5, 0.5, 1.5, 0.5], 10 * math.log10(4 / 1)),  # 6.02 dB
        ([2.0, -2.0], [2.0, -2.0], math.inf),
        ([1.0, 2.0], [1.0, math.inf], -math.inf),
        ([0.0, 0.0], [0.0, 1.0], -math.inf),
    ],
)
def test_snr_against_hand_computed_cases(reference, test, expected):
    assert snr_db(torch.tensor(reference), torch.tensor(test)) == pytest.approx(expected)


def test_snr_of_mismatched_sizes_and_broken_reference():
    with pytest.raises(ValueError, match=r"differ in size: \(2,\) vs \(3,\)"):
        snr_db(torch.zeros(2), torch.zeros(3))
    assert math.isnan(snr_db(torch.tensor([math.nan]), torch.tensor([1.0])))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def mlp_batch():
    generator = torch.Generator().manual_seed(2)
    return torch.randn(8, 16, generator=generator), torch.arange(8) % 4


def test_output_snr_matches_an_independent_twin_run():
    model = mlp()
    x, y = mlp_batch()
    result = compare_layers(model, (x, y), nn.functional.cross_entropy, "bf16-mixed")
    # By hand: the fp32 output of the model, and a copy of it run under emulated bf16 autocast.
    reference = model(x)
    with autocast("cpu", dtype=torch.bfloat16, backend="emulated"):
        test = copy.deepcopy(model)(x)
    by_name = {layer.name: layer for layer in result.layers}
    assert by_name["2"].output_snr_db == pytest.approx(snr_db(reference, test.float()))
    assert 30 < by_name["2"].output_snr_db < 80  # bf16 keeps 8 significant bits
    assert result.reference_loss == pytest.approx(nn.functional.cross_entropy(reference, y).item())


def test_fp32_policy_has_no_error_and_model_is_left_alone():
    model = mlp()
    state = copy.deepcopy(model.state_dict())
    result = compare_layers(model, mlp_batch(), nn.functional.cross_entropy, "fp32")
    assert all(
        layer.output_snr_db in (None, math.inf) and layer.grad_input_snr_db in (None, math.inf)
        for layer in result.layers
    )
    assert result.flagged == [] and result.proposed_rules == ()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_fp16_overflow_in_a_t5_block_proposes_an_island_where_it_starts():
    model = t5_overflow_model(block=1)
    x = tokens()
    result = compare_layers(model, (x, x), lm_loss, "fp16-mixed", backend="emulated")
    by_name = {layer.name: layer for layer in result.layers}
    assert result.proposed_rules == ("blocks.1.fc1 -> fp32",)
    assert by_name["blocks.1.fc1"].origin and by_name["blocks.1.fc1"].output_snr_db == -math.inf
    assert by_name["blocks.1.fc1"].output_absmax == pytest.approx(2e5, rel=1e-5)
    # the error propagates to later layers, which are flagged but not proposed
    assert by_name["blocks.2.fc1"].flagged and not by_name["blocks.2.fc1"].origin
    assert by_name["blocks.0.fc1"].output_snr_db > 40  # before the overflow all is well
    proposed = result.proposed_policy
    assert proposed == Policy.parse("fp16-mixed; blocks.1.fc1 -> fp32")
    assert "blocks.1.fc1" in result.table()


def test_bf16_on_the_same_model_needs_no_island():
    model = t5_overflow_model(block=1)
    x = tokens()
    result = compare_layers(model, (x, x), lm_loss, "bf16-mixed", backend="emulated")
    assert result.proposed_rules == ()
    assert math.isfinite(result.policy_loss)


@pytest.mark.parametrize("threshold", [0, -5.0, 151, math.nan, math.inf])
def test_threshold_out_of_range(threshold):
    with pytest.raises(
        ValueError, match=r"threshold_db=.* is out of range; valid range \(0, 150\]"
    ):
        compare_layers(
            mlp(), mlp_batch(), nn.functional.cross_entropy, "bf16-mixed", threshold_db=threshold
        )


def test_bad_arguments():
    loss = nn.functional.cross_entropy
    with pytest.raises(TypeError, match="threshold_db must be a number of dB, got str '20'"):
        compare_layers(mlp(), mlp_batch(), loss, "bf16-mixed", threshold_db="20")
    with pytest.raises(ValueError, match="compare_layers needs a model with parameters"):
        compare_layers(nn.ReLU(), mlp_batch(), loss, "bf16-mixed")
    with pytest.raises(
        TypeError, match=r"batch must be a tensor, a dict of keyword arguments or a pair"
    ):
        compare_layers(mlp(), (torch.zeros(8, 16),) * 3, loss, "bf16-mixed")
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        compare_layers(mlp(), mlp_batch(), "mse", "bf16-mixed")
    with pytest.raises(ValueError, match="unknown precision 'bf17'"):
        compare_layers(mlp(), mlp_batch(), loss, "bf17")
    with pytest.raises(ValueError, match="loss_fn must return a scalar tensor"):
        compare_layers(mlp(), mlp_batch(), lambda out, y: out, "bf16-mixed")


def test_wrong_shape_batch_raises_the_models_own_error_unchanged():
    model = tiny_transformer(n_layers=1)
    bad = torch.zeros(2, 3, 4, 5, dtype=torch.long)
    with pytest.raises(Exception) as direct:
        model(bad)
    with pytest.raises(type(direct.value)) as compared:
        compare_layers(model, (bad, bad), lm_loss, "bf16-mixed", backend="emulated")
    assert str(compared.value) == str(direct.value)
