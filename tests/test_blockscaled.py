"""fp4 e2m1 against ml_dtypes, the block-scaled formats against torchao's MXTensor/NVFP4Tensor."""

import math

import pytest
import torch

from mixprec import quantize
from mixprec.blockscaled import (
    MIN_TENSOR_SCALE,
    nvfp4_tensor_scale,
    quantize_mx,
    quantize_nvfp4,
    round_fp4_e2m1,
)
from mixprec.formats import BLOCK_FORMATS, FP4_E2M1, MXFP4, MXFP8, NVFP4

MX = [MXFP8, MXFP4]
SHAPES = [(32,), (4, 64), (2, 3, 96)]
# Binary exponents of the inputs' magnitude: fp32 subnormals, the E8M0 floor, ordinary, huge.
MAGNITUDES = [-149, -140, -130, -126, -120, -60, -8, 0, 8, 60, 120, 126]


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal bit patterns (so -0.0 != 0.0), NaN exactly where the reference is NaN."""
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), f"NaN at {torch.isnan(got).sum()} vs {nan.sum()}"
    mismatch = bits(got[~nan]) != bits(want[~nan])
    assert not mismatch.any(), (
        f"{int(mismatch.sum())} of {mismatch.numel()} differ, e.g. got "
        f"{got[~nan][mismatch][:4].tolist()} want {want[~nan][mismatch][:4].tolist()}"
    )


def random_bit_patterns(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(-(2**31), 2**31, (n,), generator=g, dtype=torch.int64)
    return raw.to(torch.int32).view(torch.float32)


def block_inputs(shape, exponent: int, seed: int) -> torch.Tensor:
    """Normal draws around 2**exponent, each element spread over 2**±6, first block all zero."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.randint(-6, 7, shape, generator=g).float()
    x = torch.randn(shape, generator=g) * torch.exp2(spread + exponent)
    x.view(-1)[:32] = 0.0
    return x


# -- fp4 e2m1 against ml_dtypes -----------------------------------------------------------------


def ml_dtypes_fp4(x: torch.Tensor) -> torch.Tensor:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    import numpy as np

    return torch.from_numpy(x.numpy().astype(ml_dtypes.float4_e2m1fn).astype(np.float32))


def fp4_edges() -> torch.Tensor:
    """Every fp4 value, the midpoints between them (ties), their fp32 neighbours, ±0, fp32
    subnormals, values beyond 6, ±inf and NaNs of both signs with payloads."""
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0])
    points = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, torch.tensor([7.0, 1e30, 3.4e38])])
    up = torch.nextafter(points, torch.tensor(math.inf))
    down = torch.nextafter(points, torch.tensor(-math.inf))
    near = torch.cat([points, up, down])
    specials = [0x00000001, 0x007FFFFF, 0x7F800000, 0x7FC00000, 0x7F800001, 0x7FFFFFFF]
    specials = torch.tensor(specials).to(torch.int32).view(torch.float32)
    values = torch.cat([near, specials])
    return torch.cat([values, -values])


def test_fp4_is_ml_dtypes_on_edges():
    x = fp4_edges()
    assert_same_bits(quantize(x, "fp4_e2m1"), ml_dtypes_fp4(x))


def test_fp4_is_ml_dtypes_on_random_bit_patterns():
    x = random_bit_patterns(1_000_000, seed=1)
    assert_same_bits(quantize(x, "fp4"), ml_dtypes_fp4(x))


def test_fp4_is_ml_dtypes_across_its_range():
    x = torch.randn(500_000, generator=torch.Generator().manual_seed(2)) * 3.0
    assert_same_bits(round_fp4_e2m1(x), ml_dtypes_fp4(x))


def test_fp4_values_are_the_formats_grid():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    import numpy as np

    every_code = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    x = torch.from_numpy(every_code)
    assert_same_bits(quantize(x, "e2m1"), x)  # every fp4 value is a fixed point
    assert FP4_E2M1.max == float(ml_dtypes.finfo(ml_dtypes.float4_e2m1fn).max)


# -- MX formats against torchao's MXTensor --------------------------------------------------------


def torchao_mx(x: torch.Tensor, fmt) -> torch.Tensor:
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    elem = {MXFP8: torch.float8_e4m3fn, MXFP4: torch.float4_e2m1fn_x2}[fmt]
    return mx.MXTensor.to_mx(x.contiguous(), elem, fmt.block_size).dequantize(torch.float32)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fmt", MX, ids=str)
def test_mx_is_torchao_bit_for_bit(fmt, shape):
    for i, exponent in enumerate(MAGNITUDES):
        x = block_inputs(shape, exponent, seed=10 + i)
        assert_same_bits(quantize(x, fmt.name), torchao_mx(x, fmt))


@pytest.mark.parametrize("fmt", MX, ids=str)
def test_mx_is_torchao_with_nan_and_inf(fmt):
    x = block_inputs((6, 64), 0, seed=3)
    x[1, 3], x[2, 40], x[3, 5], x[4, 0] = math.nan, math.inf, -math.inf, -math.nan
    x[5, 32:] = math.inf
    got = quantize(x, fmt)
    assert_same_bits(got, torchao_mx(x, fmt))
    assert torch.isnan(got[1, :32]).all()  # a NaN takes its block with it, no more
    assert torch.isfinite(got[1, 32:]).all()
    assert got[2, 40] == math.inf and got[3, 5] == -math.inf


def test_mx_tiny_blocks_exercise_the_scale_code_zero():
    # torchao encodes with 2**-126 but decodes with 2**-127 at scale code 0: parity must hold
    # there, so the parity inputs must reach it.
    x = block_inputs((4, 64), -130, seed=4)
    for fmt in MX:
        assert (quantize_mx(x, fmt).scales == 2.0**-127).any()


# -- NVFP4 against torchao's NVFP4Tensor ----------------------------------------------------------


def torchao_nvfp4(x: torch.Tensor, per_tensor_scale) -> torch.Tensor:
    nv = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    scale = None if per_tensor_scale is None else torch.as_tensor(per_tensor_scale)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # torchao takes 2-d (or 3-d) tensors
    t = nv.NVFP4Tensor.to_nvfp4(x2, per_tensor_scale=scale)
    return t.dequantize(torch.float32).reshape(x.shape)


def torchao_amax_scale(x: torch.Tensor) -> torch.Tensor:
    nv = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    return nv.per_tensor_amax_to_scale(x.abs().amax())


@pytest.mark.parametrize("shape", [(2, 32), (4, 64), (2, 3, 96)], ids=str)
def test_nvfp4_is_torchao_with_the_tensor_scale_from_amax(shape):
    # Down to amax ~ 2**-100: above MIN_TENSOR_SCALE's floor, where torchao's math holds.
    for i, exponent in enumerate(e for e in MAGNITUDES if e >= -100):
        x = block_inputs(shape, exponent, seed=20 + i)
        assert_same_bits(quantize(x, "nvfp4"), torchao_nvfp4(x, torchao_amax_scale(x)))


def test_nvfp4_is_torchao_with_an_explicit_tensor_scale():
    x = block_inputs((8, 64), 0, seed=5)
    for scale in [2.0**-121, 1e-3, 0.37, 1.0, 3.0, 1e30]:
        want = torchao_nvfp4(x, torch.tensor(scale, dtype=torch.float32))
        assert_same_bits(quantize(x, "nvfp4", per_tensor_scale=scale), want)
        assert_same_bits(quantize(x, NVFP4, per_tensor_scale=torch.tensor(scale)), want)


def tie_inputs(fmt, decode: torch.Tensor, seed: int) -> torch.Tensor:
    """Blocks of fp4 midpoints (ties) times each block's ``decode`` scale, and their fp32
    neighbours: where one ulp of difference in the scaling arithmetic changes the result."""
    g = torch.Generator().manual_seed(seed)
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    pick = torch.randint(0, len(mids), (*decode.shape[:-1], fmt.block_size), generator=g)
    signs = torch.randint(0, 2, pick.shape, generator=g) * 2.0 - 1.0
    elements = mids[pick] * signs
    elements[..., 0] = 6.0  # the block's amax maps back onto this block's scale
    x = (elements * decode).reshape(decode.shape[0], -1)
    return torch.cat([x, torch.nextafter(x, x * 2), torch.nextafter(x, x / 2)])


def test_nvfp4_is_torchao_at_rounding_ties():
    g = torch.Generator().manual_seed(17)
    e4m3 = torch.arange(8, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # >= 2**-6
    for tensor_scale in [0.37, 1.0, 3e-20, 1.1e15]:
        block = e4m3[torch.randint(0, len(e4m3), (64, 4, 1), generator=g)]
        scale = torch.tensor(tensor_scale)
        x = tie_inputs(NVFP4, scale * block, seed=18)
        want = torchao_nvfp4(x, scale)
        assert_same_bits(quantize(x, "nvfp4", per_tensor_scale=scale), want)


@pytest.mark.parametrize("fmt", MX, ids=str)
def test_mx_is_torchao_at_rounding_ties(fmt):
    g = torch.Generator().manual_seed(19)
    power = torch.exp2(torch.randint(-60, 60, (64, 2, 1), generator=g).float())
    x = tie_inputs(fmt, power, seed=20) * (32.0 if fmt == MXFP8 else 1.0)  # e4m3: ties too
    assert_same_bits(quantize(x, fmt), torchao_mx(x, fmt))


def test_nvfp4_tensor_scale_one_is_torchaos_single_level_scaling():
    x = block_inputs((4, 64), 2, seed=6)
    assert_same_bits(quantize(x, "nvfp4", per_tensor_scale=1.0), torchao_nvfp4(x, None))


@pytest.mark.parametrize("explicit", [True, False])
def test_nvfp4_is_torchao_with_nan_and_inf(explicit):
    x = block_inputs((4, 64), 0, seed=7)
    x[1, 3], x[2, 40], x[3, 5] = math.nan, math.inf, -math.inf
    scale = 0.01 if explicit else torchao_amax_scale(x)  # from amax: NaN poisons the tensor
    got = quantize(x, "nvfp4", per_tensor_scale=0.01 if explicit else None)
    assert_same_bits(got, torchao_nvfp4(x, scale))
    if explicit:  # the NaN block is NaN, ±inf saturates to ±6 under its block's scale
        assert torch.isnan(got[1, :16]).all() and torch.isfinite(got[1, 16:]).all()
        assert got[2, 40] == 6 * (torch.tensor(0.01) * 448)


@pytest.mark.parametrize("exponent", [-149, -130, -125, -121])
def test_nvfp4_tiny_tensors_use_the_floored_tensor_scale(exponent):
    # Below amax ~ 1e-33 torchao's reciprocal of the tensor scale overflows (an all-zero tensor
    # comes back NaN); mixprec floors the scale at MIN_TENSOR_SCALE, and is torchao with it.
    x = block_inputs((4, 64), exponent, seed=8)
    got = quantize(x, "nvfp4")
    assert torch.isfinite(got).all()
    assert_same_bits(got, torchao_nvfp4(x, torch.tensor(MIN_TENSOR_SCALE)))
    assert nvfp4_tensor_scale(x.abs().amax()).item() == MIN_TENSOR_SCALE


def test_an_all_zero_tensor_stays_zero_in_every_block_format():
    x = torch.zeros(3, 64)
    x[1] = -0.0
    for fmt in BLOCK_FORMATS.values():
        assert_same_bits(quantize(x, fmt), x)


def test_nvfp4_parts_recombine_as_torchao_scales_them():
    x = block_inputs((4, 32), 1, seed=9)
    q = quantize_nvfp4(x)
    assert q.tensor_scale.item() == torchao_amax_scale(x).item()
    assert q.scales.shape == (4, 2, 1) and q.scales.max().item() <= 448
    assert_same_bits(q.dequantize(), torchao_nvfp4(x, q.tensor_scale))


# -- shapes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", BLOCK_FORMATS.values(), ids=str)
def test_a_ragged_last_dimension_is_refused_naming_the_block_size(fmt):
    n = fmt.block_size + 8
    with pytest.raises(ValueError, match=rf"{fmt.name} quantizes blocks of {fmt.block_size} "):
        quantize(torch.ones(3, n), fmt)
    with pytest.raises(ValueError, match=rf"{n} is not a multiple of the block size"):
        quantize(torch.ones(0, n), fmt.name)
    with pytest.raises(ValueError, match=r"0-d tensor"):
        quantize(torch.tensor(1.0), fmt)


@pytest.mark.parametrize("fmt", BLOCK_FORMATS.values(), ids=str)
def test_empty_tensors_and_many_dimensions_keep_their_shape(fmt):
    assert quantize(torch.ones(0, 64), fmt).shape == (0, 64)
    x = block_inputs((2, 1, 3, 32), 0, seed=12)
    flat = quantize(x.reshape(-1, 32), fmt, per_tensor_scale=0.5 if fmt == NVFP4 else None)
    kept = quantize(x, fmt, per_tensor_scale=0.5 if fmt == NVFP4 else None)
    assert_same_bits(kept, flat.reshape(x.shape))  # blocks run along the last dimension only


# -- stochastic rounding ------------------------------------------------------------------------

ALL_FP4_AND_BLOCKS = [FP4_E2M1, *BLOCK_FORMATS.values()]


def sr_inputs(fmt, seed: int) -> torch.Tensor:
    """Random blocks of every size; in each block a top element that no format saturates."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(16, 32, generator=g) * 1.8 - 0.9
    if fmt == FP4_E2M1:
        return x * 6.0 / 0.9
    blocks = x.view(16, -1, fmt.block_size)  # a view: writes go to x
    blocks *= torch.exp2(torch.randint(-4, 5, blocks.shape[:2], generator=g).float()).unsqueeze(-1)
    top = blocks[..., 1:].abs().amax(dim=-1)
    # MX: a power of two lands on 2**emax, inside the element range. NVFP4: the other elements
    # stay below 0.9 of the block's amax, clear of 6 even if the e4m3 block scale rounds down.
    blocks[..., 0] = top / 0.9 if fmt == NVFP4 else torch.exp2(top.log2().ceil())
    return x


def neighbours(x: torch.Tensor, fmt) -> tuple[torch.Tensor, torch.Tensor]:
    """The element-grid values just below and above each element of ``x``, times its scale."""
    element = fmt if fmt == FP4_E2M1 else fmt.element
    if element == FP4_E2M1:
        grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    else:
        grid = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = torch.cat([-grid, grid]).unique()
    if fmt == FP4_E2M1:
        scale = torch.ones_like(x)
    else:
        parts = quantize_nvfp4(x) if fmt == NVFP4 else quantize_mx(x, fmt)
        scales = parts.scales if parts.tensor_scale is None else parts.tensor_scale * parts.scales
        scale = scales.expand(*x.shape[:-1], -1, fmt.block_size).reshape(x.shape)
    v = (x / scale).clamp(grid[0], grid[-1])  # beyond ±max both neighbours are ±max
    below = torch.searchsorted(grid, v, right=True) - 1
    above = torch.searchsorted(grid, v)
    return grid[below] * scale, grid[above] * scale


@pytest.mark.parametrize("fmt", ALL_FP4_AND_BLOCKS, ids=str)
def test_stochastic_is_unbiased_between_the_two_neighbours(fmt):
    x = sr_inputs(fmt, seed=13)
    lower, upper = neighbours(x, fmt)
    nearest = quantize(x, fmt)
    assert torch.all((nearest == lower) | (nearest == upper))  # the grid is the right one
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([quantize(x, fmt, "stochastic", generator=g) for _ in range(400)])
    assert torch.all((draws == lower) | (draws == upper))
    # Within the element range (all but an nvfp4 block's top element, which may saturate) the
    # mean is x within 6 standard errors of a coin between the two neighbours.
    inside = (lower <= x) & (x <= upper)
    block_size = getattr(fmt, "block_size", 1)
    assert inside.view(16, -1, block_size)[..., 1:].all()
    tolerance = 6 * (upper - lower) / 2 / math.sqrt(len(draws))
    error = (draws.double().mean(0) - x.double()).abs()  # double: a sum of 400 stays exact
    assert torch.all(error[inside] <= tolerance[inside])
    assert error[inside].mean() < (nearest - x).abs()[inside].double().mean() / 4


@pytest.mark.parametrize("fmt", ALL_FP4_AND_BLOCKS, ids=str)
def test_stochastic_follows_the_generator(fmt):
    x = sr_inputs(fmt, seed=14)
    first = quantize(x, fmt, "stochastic", generator=torch.Generator().manual_seed(3))
    again = quantize(x, fmt, "stochastic", generator=torch.Generator().manual_seed(3))
    other = quantize(x, fmt, "stochastic", generator=torch.Generator().manual_seed(4))
    assert torch.equal(bits(first), bits(again)) and not torch.equal(first, other)


def test_stochastic_block_scales_are_those_of_nearest():
    x = sr_inputs(MXFP4, seed=15)
    g = torch.Generator().manual_seed(1)
    assert torch.equal(quantize_mx(x, MXFP4, "stochastic", g).scales, quantize_mx(x, MXFP4).scales)
    x = sr_inputs(NVFP4, seed=15)
    assert torch.equal(quantize_nvfp4(x, None, "stochastic", g).scales, quantize_nvfp4(x).scales)


# -- gradients and bad input --------------------------------------------------------------------


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("fmt", ALL_FP4_AND_BLOCKS, ids=str)
def test_gradient_is_straight_through(fmt, rounding):
    x = block_inputs((4, 64), 0, seed=16).requires_grad_()
    upstream = torch.randn(4, 64)
    y = quantize(x, fmt, rounding)
    (got,) = torch.autograd.grad(y, x, upstream)
    assert torch.equal(bits(got), bits(upstream))


def test_per_tensor_scale_belongs_to_nvfp4_only():
    for fmt in ["mxfp4", "fp4_e2m1", "bf16"]:
        with pytest.raises(ValueError, match=rf"per_tensor_scale=0.5 was given for .*'{fmt}'"):
            quantize(torch.ones(2, 32), fmt, per_tensor_scale=0.5)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan, 2.0**-122])
def test_per_tensor_scale_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match=r"per_tensor_scale must be a finite fp32 number"):
        quantize(torch.ones(2, 32), "nvfp4", per_tensor_scale=bad)


def test_per_tensor_scale_of_the_wrong_type_is_refused():
    with pytest.raises(TypeError, match=r"got str '1'"):
        quantize(torch.ones(2, 32), "nvfp4", per_tensor_scale="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"one number, got a tensor of shape \(2,\)"):
        quantize(torch.ones(2, 32), "nvfp4", per_tensor_scale=torch.ones(2))


def test_unknown_format_lists_the_block_formats():
    with pytest.raises(ValueError, match=r"unknown number format 'mxfp6'.*mxfp8, mxfp4, nvfp4"):
        quantize(torch.ones(32), "mxfp6")


@pytest.mark.slow  # compiling takes seconds per format on a small CPU
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("fmt", ALL_FP4_AND_BLOCKS, ids=str)
def test_compiled_is_eager_bit_for_bit(fmt):
    x = block_inputs((8, 64), 0, seed=23) * torch.exp2(torch.randint(-20, 20, (8, 64)).float())
    compiled = torch.compile(lambda t: quantize(t, fmt))
    assert_same_bits(compiled(x), quantize(x, fmt))
