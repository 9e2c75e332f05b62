"""The weight-gradient GEMM's one-pass random Hadamard transform against the composition it
replaces (widen to fp32, pad with zero rows, ``rht``, quantize), bit for bit.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from mixprec import fp4_recipes
from mixprec.blockscaled_build import blockscaled_engine, hadamard_rows
from mixprec.compute.fp4_linear import quantize_fp4_operand
from mixprec.fp4_recipes import Fp4Recipe, random_hadamard, rht, rht_padded

fp4_linear_module = importlib.import_module("mixprec.compute.fp4_linear")

pytestmark = pytest.mark.skipif(
    blockscaled_engine() is None, reason="the block-scaled kernel could not be built here"
)

SHAPES = [(1, 16), (15, 32), (16, 16), (17, 48), (40, 64), (100, 256), (2047, 96), (256, 1024)]


def _composition(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """What the weight-gradient GEMM did before the kernel: widen, pad, transform."""
    wide = t.float()
    return rht(F.pad(wide, (0, 0, 0, -wide.shape[0] % multiple)))


def _specimen(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Values over the 16-bit type's range with zeros of both signs, its smallest subnormal
    and its largest value (sums that overflow)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-20, 20, shape, generator=g))
    picks = torch.rand(shape, generator=g)
    tiny = torch.finfo(dtype).smallest_normal * 2.0**-7
    x[picks < 0.05] = 0.0
    x[(picks >= 0.05) & (picks < 0.08)] = -0.0
    x[(picks >= 0.08) & (picks < 0.09)] = tiny if dtype == torch.bfloat16 else 2.0**-24
    x[(picks >= 0.09) & (picks < 0.095)] = torch.finfo(dtype).max
    return x.to(dtype)


def _assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype == torch.float32
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), "NaN positions differ"
    diff = (got.view(torch.int32) != want.view(torch.int32)) & ~nan
    assert not diff.any(), f"{int(diff.sum())} elements differ, e.g. {got[diff][:5].tolist()}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("multiple", [16, 32])
def test_one_pass_rht_is_the_composition_bit_for_bit(dtype, shape, multiple):
    x = _specimen(shape, dtype, seed=shape[0] * 7 + multiple)
    rows_out = shape[0] + -shape[0] % multiple
    fused = hadamard_rows(x, random_hadamard(16), rows_out)
    assert fused is not None  # the kernel ran: this compares it, not the fallback
    _assert_same_bits(fused, _composition(x, multiple))
    _assert_same_bits(rht_padded(x, multiple), _composition(x, multiple))


def test_all_negative_zero_products_sum_to_positive_zero():
    r = random_hadamard(16)
    x = torch.where(r[:, 3:4] > 0, -0.0, 0.0).expand(16, 32).contiguous().bfloat16()
    _assert_same_bits(rht_padded(x), _composition(x, 16))


@pytest.mark.parametrize(
    "x",
    [
        torch.randn(20, 32),  # fp32: inexact products near underflow, no fused multiply-add
        torch.randn(20, 24).bfloat16(),  # ragged columns: not the kernel's vector width
        torch.randn(20, 32).bfloat16().requires_grad_(),
    ],
    ids=["fp32", "ragged-columns", "requires-grad"],
)
def test_rht_padded_takes_the_composition_where_the_kernel_does_not_apply(x):
    assert hadamard_rows(x, random_hadamard(16), 32) is None
    with torch.no_grad():
        _assert_same_bits(rht_padded(x, 16), _composition(x, 16))


def test_rht_padded_refuses_a_multiple_that_splits_a_group():
    with pytest.raises(ValueError, match=r"groups of 16 rows, got multiple=24.*multiple of 16"):
        rht_padded(torch.ones(4, 16), 24)


def _grad_weight_by_composition(grad, x, spec):
    """The weight-gradient GEMM written out: widen, pad, rht, quantize (draws as the op's)."""
    r = Fp4Recipe.parse(spec)
    g, xs = _composition(grad, r.block), _composition(x, r.block)
    a = quantize_fp4_operand(g.t(), r, stochastic=r.sr_grad)
    b = quantize_fp4_operand(xs.t(), r)
    return torch.mm(a, b.t()).to(grad.dtype)


@pytest.mark.parametrize("spec", ["nvfp4", "nvfp4:sr_grad=false", "mxfp4:rht=true,sr_grad=true"])
@pytest.mark.parametrize("tokens", [37, 64, 130])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_weight_gradient_gemm_is_the_composition_bit_for_bit(spec, tokens, dtype):
    g = torch.Generator().manual_seed(tokens)
    grad = (torch.randn(tokens, 64, generator=g) * 1e-3).to(dtype)
    x = (torch.randn(tokens, 96, generator=g) * 3).to(dtype)
    x[5, 7] = 60.0  # an outlier: what the transform spreads
    torch.manual_seed(11)  # stochastic rounding's draws from the global generator
    got = fp4_linear_module._fp4_grad_weight(grad, x, spec, dtype, False)
    after_op = torch.rand(3)
    torch.manual_seed(11)
    want = _grad_weight_by_composition(grad, x, spec)
    assert torch.equal(torch.rand(3), after_op)  # the same draws taken
    assert got.dtype == want.dtype and torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_weight_gradient_gemm_uses_the_one_pass_transform(monkeypatch):
    calls = []

    def counting(*args):
        out = hadamard_rows(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(fp4_recipes, "hadamard_rows", counting)
    grad, x = torch.randn(40, 32).bfloat16(), torch.randn(40, 64).bfloat16()
    fp4_linear_module._fp4_grad_weight(grad, x, "nvfp4", torch.bfloat16, False)
    assert calls == [True, True]
