"""MixedPrecision("fp8-mixed"): linear layers in FP8, the rest in bf16, fp32 weights."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixprec
from mixprec.compute.fp8_linear import Fp8Linear


def _train(preset, steps=30):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 4))
    mp = mixprec.MixedPrecision(preset, backend="emulated")
    model, opt = mp.prepare(model, torch.optim.AdamW(model.parameters(), lr=3e-3))
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(256, 16, generator=g), torch.randn(16, 4, generator=g)
    y = (x @ w).argmax(-1)
    for _ in range(steps):
        with mp.autocast():
            loss = F.cross_entropy(model(x).float(), y)
        mp.backward(loss)
        mp.step(opt)
        opt.zero_grad()
    return mp, model, loss.item()


def test_fp8_mixed_puts_the_linear_layers_in_fp8_and_trains_like_bf16():
    mp, model, fp8_loss = _train("fp8-mixed")
    assert mp.fp8 is not None and mp.fp8.converted == ["0", "3"]
    assert isinstance(model[0], Fp8Linear) and model[0].weight.dtype == torch.float32
    _, _, bf16_loss = _train("bf16-mixed")
    assert fp8_loss == pytest.approx(bf16_loss, rel=0.05)


def test_a_rule_keeps_a_layer_out_of_fp8():
    mp = mixprec.MixedPrecision("fp8-mixed; 3 -> bf16-mixed", backend="emulated")
    model = mp.prepare(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2)))
    assert mp.fp8.converted == ["0", "2"] and mp.fp8.excluded == ["3"]
    assert type(model[3]) is nn.Linear


def test_delayed_scaling_state_reaches_the_metrics(tmp_path):
    from mixprec.diagnostics import read_metrics

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    mp = mixprec.MixedPrecision(
        "params=fp32,compute=fp8:tensorwise_delayed,output=fp32",
        backend="emulated",
        metrics=tmp_path,
    )
    model, opt = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(2):
        with mp.autocast():
            loss = model(torch.randn(8, 16)).float().square().mean()
        mp.backward(loss)
        mp.step(opt)
        opt.zero_grad()
    mp.close()
    last = read_metrics(tmp_path)[-1]
    assert last["fp8/0/amax_input"] == model[0].delayed_scaling_state()["amax_input"] > 0
    assert last["fp8/2/scale_weight"] == model[2].delayed_scaling_state()["scale_weight"]
