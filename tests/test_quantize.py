"""quantize against torch's casts (bit for bit); stochastic rounding against its definition."""

import math

import pytest
import torch

from mixprec import quantize
from mixprec.formats import BF16, FORMATS, FP8_E4M3, FP8_E5M2, FP16, FP32, TF32, Format
from mixprec.quantize import _round_low_bits, round_to_grid

TORCH_FORMATS = [FP16, BF16, FP8_E4M3, FP8_E5M2]
_INT_OF_WIDTH = {8: torch.uint8, 16: torch.int16, 32: torch.int32}


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor) -> None:
    """Equal bit patterns (so -0.0 != 0.0), NaN where the reference is NaN (payloads may differ)."""
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), x[torch.isnan(got) != nan][:8]
    wrong = (bits(got) != bits(want)) & ~nan
    assert not wrong.any(), (
        f"{int(wrong.sum())} mismatches, e.g. x={x[wrong][:4].tolist()} "
        f"got={got[wrong][:4].tolist()} want={want[wrong][:4].tolist()}"
    )


def random_bit_patterns(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31, (n,), generator=g, dtype=torch.int64).to(torch.int32)


def values_in_range(fmt: Format, n: int, seed: int) -> torch.Tensor:
    """Random fp32 values whose exponents span the format's subnormals to beyond its max."""
    g = torch.Generator().manual_seed(seed)
    lo = fmt.min_exponent - fmt.mantissa_bits - 3
    hi = fmt.max_exponent + 2
    exponent = torch.randint(lo, hi, (n,), generator=g)
    mantissa = torch.randint(0, 2**23, (n,), generator=g)
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    x = sign * (1 + mantissa.double() / 2**23) * torch.pow(2.0, exponent.double())
    return x.float()


def boundary_cases(fmt: Format) -> torch.Tensor:
    """Every edge the issue names, built from the format's own numbers, both signs."""
    ulp_max = 2.0 ** (fmt.max_exponent - fmt.mantissa_bits)
    sub = fmt.min_subnormal
    eps = fmt.eps
    fp32_ulp = 2.0**-23
    cases = [
        0.0,
        fmt.max,
        fmt.max + ulp_max / 2,  # tie just above max
        (fmt.max + ulp_max / 2) * (1 - fp32_ulp),
        (fmt.max + ulp_max / 2) * (1 + fp32_ulp),
        fmt.max + ulp_max,
        fmt.max * 4,
        fmt.min_normal,
        fmt.min_normal - sub / 2,  # tie between the largest subnormal and min normal
        fmt.min_normal - sub,
        sub,
        sub / 2,  # tie with zero: rounds to even (0)
        sub / 2 * (1 + fp32_ulp),
        sub * 0.75,
        sub * 1.5,  # tie: rounds to 2 * sub
        sub * 2.5,  # tie: rounds to 2 * sub
        sub / 4,
        1.0,
        1.0 + eps / 2,  # tie: stays 1
        1.0 + 3 * eps / 2,  # tie: goes to 1 + 2 eps
        1.0 + eps / 2 * (1 + fp32_ulp),
        2.0 - eps / 4,
        1e-45,  # an fp32 subnormal
        1.1754942e-38,  # the largest fp32 subnormal
        3.4028235e38,  # fp32 max
        math.inf,
        math.nan,
    ]
    x = torch.tensor(cases, dtype=torch.float32)
    return torch.cat([x, -x])


@pytest.mark.parametrize("fmt", TORCH_FORMATS, ids=str)
def test_nearest_matches_torch_cast_on_random_bit_patterns(fmt):
    x = random_bit_patterns(2_000_000, seed=1).view(torch.float32)
    want = x.to(fmt.dtype).float()
    assert_same_bits(quantize(x, fmt), want, x)
    assert_same_bits(round_to_grid(x, fmt), want, x)


@pytest.mark.parametrize("fmt", TORCH_FORMATS, ids=str)
def test_nearest_matches_torch_cast_across_the_formats_range(fmt):
    x = values_in_range(fmt, 1_000_000, seed=2)
    want = x.to(fmt.dtype).float()
    assert_same_bits(quantize(x, fmt), want, x)
    assert_same_bits(round_to_grid(x, fmt), want, x)


@pytest.mark.parametrize("fmt", TORCH_FORMATS, ids=str)
def test_nearest_matches_torch_cast_on_boundaries(fmt):
    x = boundary_cases(fmt)
    want = x.to(fmt.dtype).float()
    assert_same_bits(quantize(x, fmt), want, x)
    assert_same_bits(round_to_grid(x, fmt), want, x)


def test_bit_trick_for_fp32_exponent_range_matches_torch_bf16():
    x = torch.cat(
        [random_bit_patterns(1_000_000, seed=3).view(torch.float32), boundary_cases(BF16)]
    )
    assert_same_bits(_round_low_bits(x, BF16, "nearest", None), x.to(torch.bfloat16).float(), x)


def test_tf32_two_algorithms_agree():
    # tf32 has no torch dtype; the bit trick (tested above on bf16) and the grid arithmetic (tested
    # above on four formats) are independent algorithms and must give the same bits.
    x = torch.cat(
        [
            random_bit_patterns(1_000_000, seed=4).view(torch.float32),
            values_in_range(TF32, 200_000, seed=5),
            boundary_cases(TF32),
        ]
    )
    got = quantize(x, "tf32")
    assert_same_bits(got, round_to_grid(x, TF32), x)
    finite = torch.isfinite(got)
    assert torch.all(bits(got[finite]) & 0x1FFF == 0)  # only 10 mantissa bits remain


def test_e4m3_saturates_like_torch():
    x = torch.tensor([448.0, 464.0, 465.0, 1e9, math.inf, -math.inf])
    got = quantize(x, "e4m3")
    assert torch.equal(got, x.to(torch.float8_e4m3fn).float())
    assert got.abs().max().item() == 448.0


@pytest.mark.parametrize("fmt", [FP16, BF16, FP8_E5M2, TF32, FP8_E4M3], ids=str)
def test_saturate_turns_overflow_into_max(fmt):
    x = torch.cat([boundary_cases(fmt), values_in_range(fmt, 100_000, seed=6)])
    plain = quantize(x, fmt)
    got = quantize(x, fmt, saturate=True)
    overflowed = torch.isinf(plain)
    assert torch.equal(got[~overflowed].nan_to_num(7.0), plain[~overflowed].nan_to_num(7.0))
    assert torch.equal(got[overflowed], torch.copysign(torch.tensor(fmt.max), x[overflowed]))
    assert torch.isnan(got[torch.isnan(x)]).all()


def test_fp32_is_the_identity():
    x = values_in_range(FP32, 1000, seed=7)
    assert quantize(x, "fp32") is x
    assert quantize(x, "fp32", "stochastic") is x


def test_16bit_inputs_widen_exactly():
    x = torch.randn(1000).to(torch.float16)
    assert torch.equal(quantize(x, "fp16"), x.float())
    assert quantize(x, "bf16").dtype == torch.float32


# -- stochastic rounding ----------------------------------------------------------------------


def neighbours(x: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """The representable values just below and above x, by stepping torch's dtype bit patterns.

    tf32 has no dtype: its neighbours come from clearing the 13 low mantissa bits of |x|.
    """
    if not fmt.stored_exactly:
        dropped = 23 - fmt.mantissa_bits
        toward = (x.abs().view(torch.int32) & -(1 << dropped)).view(torch.float32)
        away = (toward.view(torch.int32) + (1 << dropped)).view(torch.float32)
        lower = torch.where(x > 0, toward, -away)
        upper = torch.where(x > 0, away, -toward)
        return torch.where(lower == x, x, lower), torch.where(upper == x, x, upper)
    nearest = x.to(fmt.dtype)
    as_int = nearest.view(_INT_OF_WIDTH[fmt.bits]).to(torch.int32)
    # One step of the bit pattern moves away from zero for positive values, towards it for
    # negative ones (sign-magnitude encoding).
    away = (as_int + 1).to(_INT_OF_WIDTH[fmt.bits]).view(fmt.dtype).float()
    toward = (as_int - 1).to(_INT_OF_WIDTH[fmt.bits]).view(fmt.dtype).float()
    near = nearest.float()
    up = torch.where(x > 0, away, toward)
    down = torch.where(x > 0, toward, away)
    lower = torch.where(near <= x, near, down)
    upper = torch.where(near >= x, near, up)
    return lower, upper


def sr_inputs(fmt: Format, n: int, seed: int) -> torch.Tensor:
    # Stay inside the finite range (overflow is checked separately) and away from zero crossings.
    x = values_in_range(fmt, n, seed)
    return x[(x.abs() < fmt.max / 2) & (x.abs() > fmt.min_subnormal)]


@pytest.mark.parametrize("fmt", [*TORCH_FORMATS, TF32], ids=str)
def test_stochastic_only_ever_gives_the_two_neighbours(fmt):
    x = sr_inputs(fmt, 20_000, seed=8)
    lower, upper = neighbours(x, fmt)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        got = quantize(x, fmt, "stochastic", generator=g)
        assert torch.all((got == lower) | (got == upper))


@pytest.mark.parametrize("fmt", [*TORCH_FORMATS, TF32], ids=str)
def test_stochastic_is_unbiased(fmt):
    draws = 4000
    x = sr_inputs(fmt, 300, seed=9)
    g = torch.Generator().manual_seed(1)
    total = torch.zeros_like(x, dtype=torch.float64)
    for _ in range(draws):
        total += quantize(x, fmt, "stochastic", generator=g).double()
    mean = total / draws
    lower, upper = neighbours(x, fmt)
    gap = (upper - lower).double()
    p = torch.where(gap > 0, (x.double() - lower.double()) / gap, 0.0)
    # Each draw is lower + gap * Bernoulli(p): the mean of `draws` of them is within 6 sigma.
    sigma = gap * torch.sqrt(p * (1 - p) / draws)
    error = (mean - x.double()).abs()
    # Deep subnormal fractions get P(up) rounded to a multiple of 2**-24 (documented): 2**-24 gap.
    assert torch.all(error <= 6 * sigma + 2.0**-24 * gap), (error / gap).max()
    # And the aggregate relative bias is tiny compared with rounding to nearest.
    assert ((mean - x.double()) / gap).mean().abs() < 0.01


@pytest.mark.parametrize("fmt", [BF16, FP16, FP8_E5M2], ids=str)
def test_stochastic_rounds_up_with_probability_of_the_fraction(fmt):
    # x sits a quarter of the way from 1 to the next value up: P(up) must be 1/4.
    x = torch.full((200_000,), 1.0 + fmt.eps / 4)
    got = quantize(x, fmt, "stochastic", generator=torch.Generator().manual_seed(3))
    up = (got == 1.0 + fmt.eps).double().mean().item()
    assert set(got.unique().tolist()) == {1.0, 1.0 + fmt.eps}
    assert abs(up - 0.25) < 6 * math.sqrt(0.25 * 0.75 / x.numel())


def test_stochastic_leaves_representable_values_alone():
    for fmt in [*TORCH_FORMATS, TF32]:
        x = quantize(values_in_range(fmt, 10_000, seed=10), fmt, saturate=True)
        x = x[torch.isfinite(x)]
        assert torch.equal(quantize(x, fmt, "stochastic"), x)


def test_stochastic_is_reproducible_with_a_generator():
    x = torch.randn(10_000)
    for fmt in ("bf16", "fp16", "e4m3"):
        a = quantize(x, fmt, "stochastic", generator=torch.Generator().manual_seed(42))
        b = quantize(x, fmt, "stochastic", generator=torch.Generator().manual_seed(42))
        c = quantize(x, fmt, "stochastic", generator=torch.Generator().manual_seed(43))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_stochastic_keeps_specials_and_signs():
    x = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -1e-30])
    got = quantize(x, "fp16", "stochastic", generator=torch.Generator().manual_seed(0))
    assert torch.equal(bits(got[:4]), bits(x[:4]))
    assert torch.isnan(got[4])
    assert bits(got[5]) == bits(torch.tensor(-0.0))  # far below the smallest subnormal
    assert quantize(torch.tensor([1e9]), "e4m3", "stochastic").item() == 448.0


def test_stochastic_overflow_follows_the_saturate_flag():
    x = torch.full((1000,), 65519.0)  # between max and the tie: may round up past max
    g = torch.Generator().manual_seed(0)
    assert torch.isinf(quantize(x, "fp16", "stochastic", generator=g)).any()
    assert quantize(x, "fp16", "stochastic", saturate=True, generator=g).max().item() == 65504.0


# -- bad input ----------------------------------------------------------------------------------


def test_rejects_integer_tensors():
    with pytest.raises(TypeError, match=r"expects a float32 tensor .* got dtype torch.int64"):
        quantize(torch.arange(3), "bf16")


def test_rejects_float64_with_the_fix():
    with pytest.raises(TypeError, match=r"got dtype torch.float64; valid dtypes: .*x.float\(\)"):
        quantize(torch.zeros(3, dtype=torch.float64), "bf16")


def test_rejects_non_tensors():
    with pytest.raises(TypeError, match=r"expects a torch.Tensor, got list"):
        quantize([1.0], "bf16")


def test_rejects_unknown_rounding():
    with pytest.raises(ValueError, match=r"unknown rounding mode 'up'; valid modes: 'nearest', "):
        quantize(torch.zeros(3), "bf16", rounding="up")


def test_rejects_unknown_format():
    with pytest.raises(ValueError, match=r"unknown number format 'bf15'; valid formats: fp32"):
        quantize(torch.zeros(3), "bf15")


def test_rejects_a_generator_it_would_not_use():
    with pytest.raises(ValueError, match=r"generator was given with rounding='nearest'"):
        quantize(torch.zeros(3), "bf16", generator=torch.Generator())


def test_all_formats_are_covered():
    assert set(FORMATS.values()) == {FP32, TF32, *TORCH_FORMATS}


# -- gradients ----------------------------------------------------------------------------------


def incoming_gradient(n: int, seed: int) -> torch.Tensor:
    """Finite fp32 gradients of every magnitude, fp32 subnormals to 1e38: a rounding shows."""
    g = random_bit_patterns(n, seed).view(torch.float32)
    return torch.where(torch.isfinite(g), g, 1.0)


@pytest.mark.parametrize("saturate", [False, True])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("fmt", sorted(FORMATS.values(), key=str), ids=str)
def test_gradient_is_straight_through_in_every_format_and_mode(fmt, rounding, saturate):
    x = torch.cat([boundary_cases(fmt), values_in_range(fmt, 2000, seed=11)]).requires_grad_()
    upstream = incoming_gradient(x.numel(), seed=12)
    generator = torch.Generator().manual_seed(5) if rounding == "stochastic" else None
    y = quantize(x, fmt, rounding, saturate=saturate, generator=generator)
    (got,) = torch.autograd.grad(y, x, upstream)
    (want,) = torch.autograd.grad(x.clone(), x, upstream)  # the identity's gradient
    assert torch.equal(bits(got), bits(want))
    # The forward values are those of the same call without autograd.
    generator = torch.Generator().manual_seed(5) if rounding == "stochastic" else None
    plain = quantize(x.detach(), fmt, rounding, saturate=saturate, generator=generator)
    assert torch.equal(bits(y.detach()), bits(plain))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gradient_of_16bit_inputs_is_that_of_widening(dtype):
    x = torch.randn(1000).to(dtype).requires_grad_()
    upstream = torch.randn(1000)
    (got,) = torch.autograd.grad(quantize(x, "fp8_e4m3", "stochastic"), x, upstream)
    (want,) = torch.autograd.grad(x.float(), x, upstream)
    assert got.dtype == dtype
    assert torch.equal(got, want)


@pytest.mark.slow  # compiling takes several seconds on a small CPU
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_gradient_is_straight_through_when_compiled():
    x = torch.randn(64).requires_grad_()
    upstream = torch.randn(64)
    compiled = torch.compile(lambda t: quantize(t, "tf32") * 2.0, fullgraph=False)
    (got,) = torch.autograd.grad(compiled(x), x, upstream)
    (want,) = torch.autograd.grad(x * 2.0, x, upstream)
    assert torch.equal(got, want)
    assert torch.equal(compiled(x).detach(), quantize(x.detach(), "tf32") * 2.0)


def test_rejects_non_bool_saturate():
    for flag in ("no", 0, 1, None):
        with pytest.raises(TypeError, match=rf"saturate must be True or False, got \w+ {flag!r}"):
            quantize(torch.zeros(3), "fp16", saturate=flag)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"saturate must be True or False, got str 'no'"):
        round_to_grid(torch.zeros(3), FP16, saturate="no")  # type: ignore[arg-type]


# -- fp4 and the block-scaled formats through quantize (parity: tests/test_blockscaled.py) -------

NEW_FORMATS = ["fp4_e2m1", "mxfp8", "mxfp4", "nvfp4"]


@pytest.mark.parametrize("fmt", NEW_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp4_and_block_formats_take_16bit_inputs_as_widened(fmt, dtype):
    x = (torch.randn(4, 64, generator=torch.Generator().manual_seed(21)) * 3).to(dtype)
    assert torch.equal(bits(quantize(x, fmt)), bits(quantize(x.float(), fmt)))


@pytest.mark.parametrize("fmt", NEW_FORMATS)
def test_saturate_changes_nothing_for_fp4_and_block_formats(fmt):
    # Their elements have no inf and saturate (as fp8 e4m3); an MX block holding inf keeps it.
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(22)) * 100
    x[0, 0], x[1, 0] = math.inf, -math.inf
    assert torch.equal(bits(quantize(x, fmt)), bits(quantize(x, fmt, saturate=True)))
