"""Counter-based stochastic rounding: the hash against a pure-Python twin, statistics, errors."""

from __future__ import annotations

import pytest
import torch

from mixprec import quantize
from mixprec.stochastic import counter_key, random_bits, stochastic_round_

M32 = 0xFFFFFFFF


def _reference_bits(numel: int, key: tuple[int, int], offset: int = 0) -> list[int]:
    """The documented hash in Python integers (mod 2**32), as signed int32 values."""
    k1, k2 = (k & M32 for k in key)
    out = []
    for i in range(offset, offset + numel):
        h = (i * 0x9E3779B9 + k1) & M32
        h ^= h >> 16
        h = (h * 0x7FEB352D) & M32
        h ^= k2
        h ^= h >> 15
        h = (h * 0x846CA68B) & M32
        h ^= h >> 16
        out.append(h - (1 << 32) if h >= 1 << 31 else h)
    return out


@pytest.mark.parametrize("offset", [0, 5, 2**31 + 3])
def test_random_bits_are_the_documented_hash(offset):
    key = counter_key(123, 4, 56)
    got = random_bits(300, key, offset=offset)
    assert got.tolist() == _reference_bits(300, key, offset)


def test_random_bits_of_a_range_do_not_depend_on_how_it_is_split():
    key = counter_key(7, 0, 3)
    whole = random_bits(1000, key)
    parts = torch.cat([random_bits(300, key), random_bits(700, key, offset=300)])
    assert torch.equal(whole, parts)
    out, tmp = torch.empty(1000, dtype=torch.int32), torch.empty(1000, dtype=torch.int32)
    assert random_bits(1000, key, out=out, tmp=tmp) is out
    assert torch.equal(out, whole)


def test_keys_differ_by_seed_stream_and_step_and_repeat_for_equal_inputs():
    keys = {counter_key(s, stream, step) for s in (0, 1) for stream in (0, 1) for step in (0, 1)}
    assert len(keys) == 8
    assert counter_key(2**64 - 1, 3, 9) == counter_key(2**64 - 1, 3, 9)


def test_random_bits_are_uniform_per_bit_and_per_byte():
    """Each of the 32 bits is set half the time, and the 16-bit halves fill 256 bins evenly."""
    n = 1 << 16
    bits = random_bits(n, counter_key(0, 0, 0)).long() & M32
    ones = torch.stack([(bits >> b) & 1 for b in range(32)]).double().mean(dim=1)
    assert (ones - 0.5).abs().max().item() < 5 * (0.25 / n) ** 0.5
    halves = torch.cat([bits & 0xFFFF, bits >> 16]) >> 8  # top byte of each 16-bit draw
    counts = torch.bincount(halves, minlength=256).double()
    expected = 2 * n / 256
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 255 + 6 * (2 * 255) ** 0.5  # mean 255, sd sqrt(510) for 255 degrees of freedom


def test_consecutive_steps_are_uncorrelated():
    a = random_bits(1 << 15, counter_key(0, 0, 0)).double()
    b = random_bits(1 << 15, counter_key(0, 0, 1)).double()
    correlation = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(correlation) < 5 / (1 << 15) ** 0.5


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (2**64, ValueError, r"seed must be in \[0, 2\*\*64\), got 18446744073709551616"),
        (-1, ValueError, r"seed must be in \[0, 2\*\*64\), got -1"),
        (1.0, TypeError, r"seed must be an int, got float 1.0"),
        (True, TypeError, r"seed must be an int, got bool True"),
    ],
)
def test_counter_key_refuses_seeds_that_do_not_fit(bad, error, message):
    with pytest.raises(error, match=message):
        counter_key(bad, 0, 0)


def _neighbours(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The representable values of ``dtype`` just below and above ``x`` (by torch's casts)."""
    nearest = x.to(dtype)
    up = nearest.view(torch.int16) + torch.where(nearest.float() >= 0, 1, -1).to(torch.int16)
    down = nearest.view(torch.int16) - torch.where(nearest.float() >= 0, 1, -1).to(torch.int16)
    step_up = up.to(torch.int16).view(dtype).float()
    step_down = down.to(torch.int16).view(dtype).float()
    n = nearest.float()
    lower = torch.where(n <= x, n, step_down)
    upper = torch.where(n <= x, torch.where(n == x, n, step_up), n)
    return torch.minimum(lower, upper), torch.maximum(lower, upper)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounds_to_a_neighbour_with_the_probability_of_the_fraction(dtype):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, generator=g) * torch.logspace(-6, 3, 64)  # fp16 subnormals too
    n = 4096
    x = base.repeat_interleave(n)
    out = torch.empty_like(x, dtype=dtype)
    stochastic_round_(x.clone(), out, counter_key(5, 0, 0))
    lower, upper = _neighbours(x, dtype)
    got = out.float()
    assert torch.all((got == lower) | (got == upper))
    span = (upper - lower).view(64, n)[:, 0]
    fraction = torch.where(span > 0, (base - lower.view(64, n)[:, 0]) / span, 0.0)
    up_rate = (got == upper).view(64, n).double().mean(dim=1).float()
    moving = span > 0
    sigma = (fraction * (1 - fraction) / n).sqrt()
    assert torch.all((up_rate - fraction)[moving].abs() <= 6 * sigma[moving] + 1e-6)


def test_fp16_keeps_specials_and_overflow_like_quantize():
    x = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e6, -1e6, 0.0, -0.0, 65504.0])
    out = torch.empty_like(x, dtype=torch.float16)
    stochastic_round_(x, out, counter_key(0, 0, 0))
    want = quantize(x, "fp16")  # these values have no choice to make
    assert torch.equal(out.float().isnan(), want.isnan())
    keep = ~want.isnan()
    assert torch.equal(out.float()[keep], want[keep])
    assert torch.equal(torch.signbit(out.float()), torch.signbit(want))


def test_bf16_batch_equals_the_tensors_one_at_a_time_at_their_offsets():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(s, generator=g) for s in ((7,), (4, 5), (1,), (33,))]
    key = counter_key(9, 0, 2)
    batch = [torch.empty_like(x, dtype=torch.bfloat16) for x in xs]
    stochastic_round_([x.clone() for x in xs], batch, key, offset=3)
    offset = 3
    for x, got in zip(xs, batch, strict=True):
        alone = torch.empty_like(x, dtype=torch.bfloat16)
        stochastic_round_(x.clone(), alone, key, offset)
        assert torch.equal(got, alone)
        offset += x.numel()


def test_errors():
    with pytest.raises(TypeError, match=r"float32 tensor, got dtype torch.float64; widen"):
        stochastic_round_(torch.zeros(2, dtype=torch.float64), torch.zeros(2), counter_key(0, 0, 0))
    with pytest.raises(TypeError, match=r"float32 tensor, got dtype torch.int32; .*quantize"):
        stochastic_round_(torch.zeros(2), torch.zeros(2, dtype=torch.int32), counter_key(0, 0, 0))


def test_the_old_import_path_still_works():
    from mixprec.optim import rounding

    assert rounding.counter_key is counter_key and rounding.random_bits is random_bits
