"""Per-layer FP8 SNR against bf16, and the plan that keeps the layers FP8 hurts in bf16."""

import math

import pytest
import torch
from fp8_reference import ref_linear
from torch import nn

from mixprec.compute.fp8_advice import advise_fp8, fp8_layer_snr
from mixprec.compute.fp8_convert import Fp8Plan, convert_to_fp8
from mixprec.compute.fp8_linear import Fp8Linear


def snr(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.double(), test.double()
    return 20 * math.log10(ref.norm().item() / (ref - test).norm().item())


class TwoLayers(nn.Module):
    """Two linear layers with a tanh between them."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(64, 64)
        self.second = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def batch() -> torch.Tensor:
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 3e4  # tensorwise scaling spends fp8's range on this one value
    return x


def loss_fn(out: torch.Tensor) -> torch.Tensor:
    return out.square().mean()


def test_snr_figures_are_the_gemms_measured_against_bf16():
    torch.manual_seed(0)
    model, x = TwoLayers(), batch()
    layers = fp8_layer_snr(model, x, loss_fn, "tensorwise")
    assert [layer.name for layer in layers] == ["first", "second"]
    # The first layer by hand: its gradient flows back from the second through tanh.
    xr = x.clone()
    hidden = model.first(xr)
    hidden.retain_grad()
    loss_fn(model.second(torch.tanh(hidden))).backward()
    g = hidden.grad.bfloat16()
    w, b = model.first.weight.detach(), model.first.bias.detach()
    x16 = x.bfloat16()
    bf16_out = (x16.float() @ w.bfloat16().float().T + b.bfloat16().float()).bfloat16()
    bf16_gi = (g.float() @ w.bfloat16().float()).bfloat16()
    bf16_gw = (g.float().T @ x16.float()).bfloat16()
    out8, gi8, gw8, _ = ref_linear(x16, w, b, g, "tensorwise", torch.bfloat16)
    first = layers[0]
    assert first.output_db == pytest.approx(snr(bf16_out, out8), rel=1e-9)
    assert first.grad_input_db == pytest.approx(snr(bf16_gi, gi8), rel=1e-9)
    assert first.grad_weight_db == pytest.approx(snr(bf16_gw, gw8), rel=1e-9)


def test_advice_keeps_the_layers_below_the_threshold_and_its_plan_converts():
    torch.manual_seed(0)
    model, x = TwoLayers(), batch()
    grads_before = [p.grad for p in model.parameters()]
    measured = fp8_layer_snr(model, x, loss_fn, "tensorwise")
    worse, better = sorted(measured, key=lambda layer: layer.worst_db)
    threshold = (worse.worst_db + better.worst_db) / 2
    advice = advise_fp8(model, x, loss_fn, "tensorwise", threshold_db=threshold)
    assert advice.layers == measured
    assert advice.keep_bf16 == (worse.name,)
    assert str(advice) == f"tensorwise; {worse.name} -> bf16"
    assert f"{worse.output_db:8.1f}" in advice.report()
    assert [p.grad for p in model.parameters()] == grads_before  # the model is left as it was
    done = convert_to_fp8(model, Fp8Plan.parse(str(advice)))
    assert done.excluded == [worse.name] and done.converted == [better.name]
    assert isinstance(model.get_submodule(better.name), Fp8Linear)


def test_default_threshold_keeps_every_layer_of_a_plain_mlp_in_fp8():
    torch.manual_seed(0)
    advice = advise_fp8(TwoLayers(), torch.randn(32, 64), loss_fn, "rowwise")
    assert all(layer.worst_db >= advice.threshold_db for layer in advice.layers)
    assert advice.keep_bf16 == () and str(advice) == "rowwise"


def test_a_model_without_linear_layers_is_refused():
    with pytest.raises(ValueError, match=r"no nn.Linear layer of Conv1d ran on the batch"):
        fp8_layer_snr(nn.Conv1d(2, 2, 1), torch.randn(1, 2, 4), loss_fn)
    with pytest.raises(TypeError, match=r"threshold_db must be a number of dB, got '20'"):
        advise_fp8(TwoLayers(), batch(), loss_fn, threshold_db="20")  # type: ignore[arg-type]
