"""The 4-bit linear custom op and module against a reference built from ``mixprec.quantize``."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import mixprec
from mixprec.blockscaled import fake_quantize_tiles
from mixprec.compute import autocast
from mixprec.compute.fp4_linear import Fp4Linear, fp4_linear
from mixprec.compute.fp8_convert import convert_to_fp8
from mixprec.formats import NVFP4
from mixprec.fp4_recipes import Fp4Recipe, random_hadamard, rht

RECIPES = [
    "nvfp4",
    "nvfp4:rht=false",
    "nvfp4:sr_grad=false",
    "nvfp4:weight_blocks=1x16",
    "nvfp4:rht=false,sr_grad=false,weight_blocks=1x16",
    "mxfp4",
    "mxfp4:rht=true,sr_grad=true,weight_blocks=32x32",
    "nvfp4:amax_reduce=true",  # no process group: the tensor scale of the amax it has
]


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a, b)


def inputs(m=40, k=64, n=32, seed=0, dtype=torch.float32):
    """``m`` tokens, not a multiple of 16 or 32: the weight-gradient GEMM pads."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    x[3, 5] = 40.0  # an outlier, what RHT spreads
    w = torch.randn(n, k, generator=g) / 8
    b = torch.randn(n, generator=g)
    grad = (torch.randn(m, n, generator=g) * 1e-3).to(dtype)
    return x, w, b, grad


def ref_linear(x, w, b, grad, spec, out_dtype):
    """The recipe written out with ``mixprec.quantize`` calls, in the op's order of draws."""
    r = Fp4Recipe.parse(spec)
    fmt, q = r.format.name, mixprec.quantize
    sr = "stochastic" if r.sr_grad else "nearest"
    if r.weight_tile:
        wq_out = wq_gi = fake_quantize_tiles(w.float(), r.format, r.weight_tile)
    else:
        wq_out, wq_gi = q(w.float(), fmt), q(w.float().t(), fmt).t()
    out = (q(x.float(), fmt) @ wq_out.t() + b.float()).to(out_dtype)
    gi = (q(grad.float(), fmt, sr) @ wq_gi).to(out_dtype).to(x.dtype)
    pad = -x.shape[0] % r.block
    g2, x2 = (F.pad(t.float(), (0, 0, 0, pad)) for t in (grad, x))
    if r.rht:
        g2, x2 = rht(g2), rht(x2)
    gw = (q(g2.t(), fmt, sr) @ q(x2.t(), fmt).t()).to(out_dtype).float()
    return out, gi, gw, grad.sum(0).float()


@pytest.mark.parametrize("spec", RECIPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fp4_linear_is_the_reference_bit_for_bit(spec, dtype):
    x, w, b, grad = inputs(dtype=dtype)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    torch.manual_seed(7)
    out = fp4_linear(xr, wr, br, spec)
    out.backward(grad)
    torch.manual_seed(7)
    want = ref_linear(x, w, b, grad, spec, dtype)
    for got, ref in zip((out, xr.grad, wr.grad, br.grad), want, strict=True):
        assert bits_equal(got, ref)


def test_rht_is_orthogonal_and_cancels_in_the_weight_gradient():
    r = random_hadamard(16)
    assert torch.allclose(r @ r.t(), torch.eye(16), atol=1e-6)
    assert set(r.abs().unique().tolist()) == {0.25}  # a Hadamard matrix with random signs
    assert not torch.equal(r, r.abs() * torch.sign(r[0]).unsqueeze(0))  # signs do vary by row
    g, x = torch.randn(48, 24, dtype=torch.float64), torch.randn(48, 40, dtype=torch.float64)
    exact = g.t() @ x
    rotated = rht(g.float()).t() @ rht(x.float())
    assert torch.allclose(rotated.double(), exact, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="groups of 16 rows, got 20"):
        rht(torch.ones(20, 3))


def test_rht_spreads_a_token_outlier_over_its_16_tokens():
    """What RHT is for: one outlier token becomes 16 values of a quarter of its magnitude, so
    the other tokens of its block are no longer crushed by its scale."""
    x = torch.zeros(32, 3)
    x[5, 0] = 64.0
    spread = rht(x)
    assert torch.equal(spread[:16, 0].abs(), torch.full((16,), 16.0))
    assert not spread[16:].any() and not spread[:, 1:].any()  # other groups and columns untouched


def test_each_option_changes_only_its_gemm():
    x, w, b, grad = inputs()
    results = {}
    for spec in ("nvfp4", "nvfp4:rht=false", "nvfp4:sr_grad=false", "nvfp4:weight_blocks=1x16"):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        torch.manual_seed(3)
        out = fp4_linear(xr, wr, b, spec)
        out.backward(grad)
        results[spec] = (out, xr.grad, wr.grad)
    base = results["nvfp4"]
    same = [[bits_equal(a, c) for a, c in zip(base, results[s], strict=True)] for s in results]
    assert same[1] == [True, True, False]  # rht: the weight gradient only
    assert same[2] == [True, False, False]  # sr_grad: both gradient GEMMs
    assert same[3] == [False, False, True]  # 1x16 weights: the GEMMs that read the weight
    # Stochastic rounding draws: another seed, another gradient; the same seed, the same one.
    xr = x.clone().requires_grad_()
    torch.manual_seed(4)
    fp4_linear(xr, w, b, "nvfp4").backward(grad)
    assert not bits_equal(xr.grad, base[1])


def test_square_weight_tiles_make_w_and_its_transpose_quantize_alike():
    w = torch.randn(48, 32) * torch.logspace(-2, 2, 32)
    assert bits_equal(fake_quantize_tiles(w.t(), NVFP4, 16), fake_quantize_tiles(w, NVFP4, 16).t())
    # A tile whose every row holds the tile's amax quantizes as those rows do in 1x16 blocks.
    tile = torch.randn(16, 16)
    tile[:, 0] = 5.0
    assert bits_equal(fake_quantize_tiles(tile, NVFP4, 16), mixprec.quantize(tile, "nvfp4"))
    with pytest.raises(ValueError, match=r"multiples of 16, got shape \(20, 16\)"):
        fake_quantize_tiles(torch.ones(20, 16), NVFP4, 16)


def test_output_rounds_once_to_the_compute_dtype_under_autocast():
    x, w, b, _ = inputs()
    layer = Fp4Linear.from_linear(nn.Linear(64, 32), "nvfp4")
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    with autocast("cpu", dtype=torch.bfloat16, backend="emulated"):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert bits_equal(out, fp4_linear(x.bfloat16(), w, b, "nvfp4"))


@pytest.mark.parametrize("spec", ["nvfp4", "nvfp4:amax_reduce=true"])
def test_compiled_equals_eager(spec):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32))
    convert_to_fp8(model, spec)
    twin = copy.deepcopy(model)
    x = torch.randn(24, 64)
    torch.manual_seed(1)
    eager = model(x)
    eager.square().sum().backward()
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    torch.manual_seed(1)
    out = compiled(x)
    out.square().sum().backward()
    assert bits_equal(out, eager)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert bits_equal(p.grad, q.grad)


def test_activation_checkpointing_equals_plain_backward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    convert_to_fp8(model, "mxfp4:rht=true,sr_grad=true")
    twin = copy.deepcopy(model)
    x = torch.randn(20, 32, requires_grad=True)
    torch.manual_seed(2)
    model(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    torch.manual_seed(2)
    checkpoint(twin, x2, use_reentrant=False).square().sum().backward()
    assert bits_equal(x.grad, x2.grad)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert bits_equal(p.grad, q.grad)


def test_conversion_falls_back_visibly_or_refuses_a_misfit_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 10))
    with pytest.warns(UserWarning, match="'2' stays in high precision: nvfp4 needs"):
        done = convert_to_fp8(net, "nvfp4")
    assert done.converted == ["0"] and "divisible by 16, got 10 and 48" in done.fallbacks["2"]
    assert isinstance(net[0], Fp4Linear) and type(net[2]) is nn.Linear
    net = nn.Sequential(nn.Linear(32, 48))  # 48 is not a multiple of mxfp4's 32
    with pytest.raises(ValueError, match=r"layer '0' \(48x32\) does not fit recipe 'mxfp4'"):
        convert_to_fp8(net, "mxfp4", on_mismatch="error")
    assert type(net[0]) is nn.Linear  # refused: nothing changed
    with pytest.raises(ValueError, match="blocks of 16 along in_features and out_features"):
        fp4_linear(torch.ones(2, 24), torch.ones(16, 24))


def test_bad_recipes_and_backends_name_the_choices():
    with pytest.raises(ValueError, match=r"unknown 4-bit recipe option 'hadamard=true'.*rht=true"):
        Fp4Recipe.parse("nvfp4:hadamard=true")
    with pytest.raises(ValueError, match=r"unknown weight_blocks '16x16' for recipe 'mxfp4'"):
        Fp4Recipe.parse("mxfp4:weight_blocks=16x16")
    with pytest.raises(ValueError, match=r"rht='yes'.*'true' and 'false'"):
        Fp4Recipe.parse("nvfp4:rht=yes")
    with pytest.raises(ValueError, match=r"fp4 backend 'native' cannot run here: device 'cpu'"):
        Fp4Linear(32, 32, backend="native")  # a CPU has no block-scaled fp4 GEMM
    with pytest.raises(ValueError, match=r"unknown fp4 backend 'gpu'; valid backends: 'auto'"):
        Fp4Linear(32, 32, backend="gpu")  # type: ignore[arg-type]
    assert str(Fp4Recipe.parse("nvfp4:rht=false")) == "nvfp4:rht=false"
    assert Fp4Recipe.parse("nvfp4:rht=true") == Fp4Recipe("nvfp4")  # defaults restated


def test_fast_nearest_fp4_rounding_equals_the_grid_rounding_bit_for_bit():
    from mixprec.blockscaled import _round_fp4_in_range
    from mixprec.formats import FP4_E2M1
    from mixprec.quantize import round_to_grid

    bits = torch.randint(
        -(2**31), 2**31 - 1, (1 << 20,), generator=torch.Generator().manual_seed(0)
    )
    x = bits.to(torch.int32).view(torch.float32)
    x = x[x.abs() <= 6.0]  # within ±6, as scaled elements are (about half of all patterns)
    ties = torch.arange(-12, 13) * 0.25  # every tie and grid point, with signed zeros
    x = torch.cat([x, ties, -ties, torch.tensor([float("nan"), -0.0, 0.0])])
    want = round_to_grid(x, FP4_E2M1, "nearest")
    assert torch.equal(_round_fp4_in_range(x).view(torch.int32), want.view(torch.int32))
