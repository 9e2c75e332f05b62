"""Parity with the peer: torchao's ``Float8Linear`` with ``Float8LinearConfig(emulate=True)``.

Bit for bit, with one documented exception: with a bias and a bf16 (or fp16) output, torchao rounds
the GEMM result to bf16 and then adds the bias in bf16 (two roundings), where mixprec adds the
bias in fp32 before its one rounding, as a GEMM epilogue does. torchao's first rounding errs by up
to half an ulp of the GEMM result, which can be many ulps of the output where the bias cancels it,
and each side's last rounding errs by up to half an ulp of the output, so there the bound is half a
bf16 ulp of the GEMM result plus one ulp of the output (about three elements in four agree
exactly). Gradients are bit for bit in every case.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torchao_float8 = pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

from mixprec.compute.fp8_convert import convert_to_fp8
from mixprec.compute.fp8_linear import Fp8Linear


def torchao_layer(linear: nn.Linear, recipe: str) -> nn.Module:
    config = torchao_float8.Float8LinearConfig.from_recipe_name(recipe)
    config = torchao_float8.Float8LinearConfig(**{**config.__dict__, "emulate": True})
    return Float8Linear.from_float(copy.deepcopy(linear), config)


def within_double_rounding(ours: torch.Tensor, peer: torch.Tensor, gemm: torch.Tensor) -> bool:
    """|ours - peer| <= half a bf16 ulp of the GEMM result + one ulp of the output."""
    half_ulp = 2.0**-8  # relative: bf16 has 8 significant bits
    bound = half_ulp * (gemm.abs() + 2 * peer.float().abs()) * (1 + 2.0**-6)
    return bool(((ours.float() - peer.float()).abs() <= bound).all())


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_outputs_and_gradients_match_torchao_emulate(recipe, dtype, bias):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=bias).to(dtype)
    peer, ours = torchao_layer(linear, recipe), Fp8Linear.from_linear(copy.deepcopy(linear), recipe)
    x = (torch.randn(4, 24, 256) * 3).to(dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_peer, out_ours = peer(xa), ours(xb)
    grad = (torch.randn(out_peer.shape) * 1e-2).to(dtype)
    out_peer.backward(grad)
    out_ours.backward(grad)
    if bias and dtype != torch.float32:
        gemm = out_peer.detach().float() - linear.bias.float()  # torchao's rounded GEMM result
        assert within_double_rounding(out_ours, out_peer, gemm)
        assert (out_ours == out_peer).float().mean() > 0.5
    else:
        assert torch.equal(out_ours, out_peer)
    assert torch.equal(xb.grad, xa.grad)
    assert torch.equal(ours.weight.grad, peer.weight.grad)
    if bias:
        assert torch.equal(ours.bias.grad, peer.bias.grad)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_a_converted_model_trains_like_torchaos(recipe):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128, bias=False), nn.GELU(), nn.Linear(128, 64, bias=False))
    peer = copy.deepcopy(model)
    convert_to_fp8(model, recipe)
    peer[0], peer[2] = torchao_layer(peer[0], recipe), torchao_layer(peer[2], recipe)
    x = torch.randn(32, 64)
    for net in (model, peer):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(3):
            loss = (net(x) - x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p, q in zip(model.parameters(), peer.parameters(), strict=True):
        assert torch.equal(p, q)
