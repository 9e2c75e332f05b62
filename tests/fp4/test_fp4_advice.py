"""advise_fp8 under a 4-bit recipe: per-layer SNR of the 4-bit GEMMs; the layers kept in bf16."""

import math

import pytest
import torch
from torch import nn

from mixprec.compute.fp4_linear import fp4_linear
from mixprec.diagnostics.fp8_advice import DEFAULT_FP4_THRESHOLD_DB, advise_fp8, fp8_layer_snr


def snr(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.double(), test.double()
    return 20 * math.log10(ref.norm().item() / (ref - test).norm().item())


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(32, 64)
        self.second = nn.Linear(64, 64)
        self.out = nn.Linear(64, 10)  # 10 does not split into 16-element blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.second(torch.tanh(self.first(x)))))


def batch() -> torch.Tensor:
    x = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    x[:, ::16] *= 300.0  # one outlier feature per 16-element block
    return x


def loss_fn(out: torch.Tensor) -> torch.Tensor:
    return out.square().mean()


def test_fp4_snr_is_the_4bit_gemm_measured_against_bf16():
    torch.manual_seed(0)
    model, x = Net(), batch()
    layers = fp8_layer_snr(model, x, loss_fn, "nvfp4:sr_grad=false")
    assert [layer.name for layer in layers] == ["first", "second"]  # 'out' does not fit
    w, b = model.first.weight.detach(), model.first.bias.detach()
    x16 = x.bfloat16()
    bf16_out = (x16.float() @ w.bfloat16().float().T + b.bfloat16().float()).bfloat16()
    out4 = fp4_linear(x16, w, b, "nvfp4:sr_grad=false", out_dtype=torch.bfloat16)
    assert layers[0].output_db == pytest.approx(snr(bf16_out, out4), rel=1e-9)


@pytest.mark.parametrize("recipe", ["nvfp4", "mxfp4"])
def test_advice_keeps_the_layers_below_the_threshold_and_the_misfits_in_bf16(recipe):
    torch.manual_seed(0)
    model, x = Net(), torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    advice = advise_fp8(model, x, loss_fn, recipe)
    assert advice.threshold_db == DEFAULT_FP4_THRESHOLD_DB
    assert all(layer.worst_db > DEFAULT_FP4_THRESHOLD_DB for layer in advice.layers)
    assert advice.keep_bf16 == ("out",) and advice.misfits == ("out",)  # only the misfit
    worst = {layer.name: layer.worst_db for layer in advice.layers}
    between = (worst["first"] + worst["second"]) / 2
    low = min(worst, key=worst.__getitem__)
    advice = advise_fp8(model, x, loss_fn, recipe, threshold_db=between)
    assert advice.keep_bf16 == (low, "out")
    assert str(advice) == f"{recipe}; {low} -> bf16; out -> bf16"
    assert f"compute={recipe}" in advice.policy()
    assert "(shape does not fit the blocks)" in advice.report()
