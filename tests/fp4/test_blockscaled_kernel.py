"""The one-pass block-scaled kernel against the torch path it replaces, bit for bit.

The reference is mixprec.blockscaled's torch-ops path (itself checked against torchao in
tests/test_blockscaled.py), run by making the kernel unavailable; inputs mix magnitudes across
fp32's whole range with NaN, ±inf, ±0, subnormals, all-zero and tiny blocks.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixprec import blockscaled
from mixprec.blockscaled import MIN_TENSOR_SCALE, fake_quantize, fake_quantize_tiles
from mixprec.blockscaled_build import blockscaled_engine, fake_quantize_blocks
from mixprec.formats import MXFP4, MXFP8, NVFP4

pytestmark = pytest.mark.skipif(
    blockscaled_engine() is None, reason="the block-scaled kernel could not be built here"
)

FORMATS = [NVFP4, MXFP4, MXFP8]


def _torch_path(fn, *args, **kwargs):
    """``fn`` with the kernel unavailable: the torch-ops path."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(blockscaled, "fake_quantize_blocks", lambda *a, **k: None)
        return fn(*args, **kwargs)


def _assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), "NaN positions differ"
    diff = (got.view(torch.int32) != want.view(torch.int32)) & ~nan
    assert not diff.any(), (
        f"{int(diff.sum())} elements differ, e.g. {got[diff][:5].tolist()} vs "
        f"{want[diff][:5].tolist()}"
    )


def _specimen(seed: int, shape: tuple[int, ...], block: int) -> torch.Tensor:
    """Normal values times a per-block power of two over fp32's range, with specials."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    flat = x.view(-1, block)
    exponents = torch.randint(-150, 128, (flat.shape[0], 1), generator=g).float()
    common = torch.randint(-4, 5, (flat.shape[0], 1), generator=g).float()  # mostly ordinary
    use_wide = torch.rand(flat.shape[0], 1, generator=g) < 0.5
    flat.mul_(torch.exp2(torch.where(use_wide, exponents, common)))
    n = flat.numel()
    nan, inf = float("nan"), float("inf")
    specials = torch.tensor([nan, -nan, inf, -inf, 0.0, -0.0, 1e-45, -1e-40, 6.0, 448.0, 3e38])
    picks = torch.randint(0, n, (max(1, n // 50),), generator=g)
    flat.view(-1)[picks] = specials[torch.randint(0, len(specials), picks.shape, generator=g)]
    rows = torch.randperm(flat.shape[0], generator=g)
    if flat.shape[0] >= 4:
        flat[rows[0]] = 0.0  # an all-zero block
        flat[rows[1]] = torch.randn(block, generator=g) * 2.0**-130  # below E8M0's range
        flat[rows[2]] = torch.randn(block, generator=g).abs() * 2.0**-140
    return x


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 12))
def test_1d_blocks_equal_torch_path(fmt, rounding, seed, rows):
    x = _specimen(seed, (rows, 2, 64), fmt.block_size)
    torch.manual_seed(seed)
    got = fake_quantize(x, fmt, rounding)
    torch.manual_seed(seed)
    want = _torch_path(fake_quantize, x, fmt, rounding)
    _assert_same_bits(got, want)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_stochastic_with_a_generator_equals_torch_path(fmt):
    x = _specimen(3, (40, 128), fmt.block_size)
    got = fake_quantize(x, fmt, "stochastic", torch.Generator().manual_seed(5))
    want = _torch_path(fake_quantize, x, fmt, "stochastic", torch.Generator().manual_seed(5))
    _assert_same_bits(got, want)
    # the draws are the generator's: another seed rounds differently
    other = fake_quantize(x, fmt, "stochastic", torch.Generator().manual_seed(6))
    assert not torch.equal(other, got)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("tile", [16, 32])
@pytest.mark.parametrize("seed", range(4))
def test_tiles_equal_torch_path(fmt, tile, seed):
    x = _specimen(seed, (tile * 3, tile * 2), tile * tile)
    got = fake_quantize_tiles(x, fmt, tile)
    want = _torch_path(fake_quantize_tiles, x, fmt, tile)
    _assert_same_bits(got, want)
    _assert_same_bits(fake_quantize_tiles(x.T, fmt, tile), want.T)  # non-contiguous input


@pytest.mark.parametrize(
    "scale", [1.0, MIN_TENSOR_SCALE, 3.7e-5, torch.tensor(0.02), torch.tensor([2.0**-100])]
)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_nvfp4_given_tensor_scales_equal_torch_path(scale, rounding):
    x = _specimen(11, (32, 96), 16)
    torch.manual_seed(0)
    got = fake_quantize(x, NVFP4, rounding, per_tensor_scale=scale)
    torch.manual_seed(0)
    want = _torch_path(fake_quantize, x, NVFP4, rounding, per_tensor_scale=scale)
    _assert_same_bits(got, want)
    tiles = fake_quantize_tiles(x, NVFP4, 16, per_tensor_scale=scale)
    _assert_same_bits(tiles, _torch_path(fake_quantize_tiles, x, NVFP4, 16, scale))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize(
    "fill", [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45, 2.0**-127, 3e38]
)
def test_uniform_tensors_equal_torch_path(fmt, fill):
    # whole-tensor specials: NVFP4's default tensor scale is then NaN, inf or floored
    x = torch.full((32, 64), fill)
    x[1, 3] = 1.0
    for t in (torch.full((32, 64), fill), x):
        _assert_same_bits(fake_quantize(t, fmt), _torch_path(fake_quantize, t, fmt))
        want = _torch_path(fake_quantize_tiles, t, fmt, 16)
        _assert_same_bits(fake_quantize_tiles(t, fmt, 16), want)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_every_fp32_exponent_and_tie_equals_torch_path(fmt):
    # every exponent, and values on and between the element grid's points (the ties)
    grid = torch.arange(0, 8 * 256, dtype=torch.float32) / 256
    scales = torch.exp2(torch.arange(-149, 128, 7, dtype=torch.float32))
    x = (grid[None, :] * scales[:, None]).reshape(-1, 64)
    x = torch.cat([x, -x])
    _assert_same_bits(fake_quantize(x, fmt), _torch_path(fake_quantize, x, fmt))
    torch.manual_seed(1)
    got = fake_quantize(x, fmt, "stochastic")
    torch.manual_seed(1)
    _assert_same_bits(got, _torch_path(fake_quantize, x, fmt, "stochastic"))


def test_the_kernel_runs_for_cpu_fp32_and_not_where_gradients_flow(monkeypatch):
    calls = []
    real = blockscaled.fake_quantize_blocks

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(blockscaled, "fake_quantize_blocks", spy)
    x = torch.randn(8, 32)
    fake_quantize(x, NVFP4)
    fake_quantize_tiles(x.repeat(2, 1), MXFP4, 16)
    assert calls == [True, True]
    y = x.clone().requires_grad_()
    fake_quantize(y, NVFP4)  # the torch path, which autograd can follow
    assert calls[-1] is False


def test_compiled_kernel_path_is_eager_bit_for_bit():
    x = _specimen(2, (8, 64), 16)
    compiled = torch.compile(lambda t: fake_quantize(t, NVFP4), fullgraph=False)
    _assert_same_bits(compiled(x), fake_quantize(x, NVFP4))


@pytest.mark.parametrize("scale", [None, 3.7e-5, 0.3])
def test_nvfp4_block_scales_over_many_amaxes_equal_torch_path(scale):
    # block amaxes densely over e4m3's range under a tensor scale: the scale's roundings
    # (amax / 6, then / tensor_scale, then to e4m3) meet many e4m3 ties and near-ties
    g = torch.Generator().manual_seed(4)
    blocks = torch.rand(20000, 16, generator=g) * 2 - 1
    amax = torch.exp2(torch.rand(20000, 1, generator=g) * 20 - 10)
    x = blocks / blocks.abs().amax(dim=1, keepdim=True) * amax
    tiles = x.reshape(-1, 256)[:256]
    _assert_same_bits(
        fake_quantize(x, NVFP4, per_tensor_scale=scale),
        _torch_path(fake_quantize, x, NVFP4, per_tensor_scale=scale),
    )
    _assert_same_bits(
        fake_quantize_tiles(tiles, NVFP4, 16, per_tensor_scale=scale),
        _torch_path(fake_quantize_tiles, tiles, NVFP4, 16, per_tensor_scale=scale),
    )


def _untemper(y: int) -> int:
    """The mt19937 state word whose tempered output is ``y``."""
    y ^= y >> 18
    y ^= (y << 15) & 0xEFC60000
    t = y
    for _ in range(5):
        t = y ^ ((t << 7) & 0x9D2C5680)
    y = t & 0xFFFFFFFF
    t = y
    for _ in range(3):
        t = y ^ (t >> 11)
    return t & 0xFFFFFFFF


def _generator_drawing(draws: torch.Tensor) -> torch.Generator:
    """A CPU generator whose next ``torch.rand`` values are ``draws`` (multiples of 2**-24, at
    most 623 of them): mt19937 state words chosen so that no regeneration comes first."""
    g = torch.Generator()
    state = g.get_state().clone()
    words = state[24 : 24 + 8 * 624].view(torch.int64)  # legacy layout: uint64 words
    for k, d in enumerate((draws.flatten() * 2**24).long().tolist()):
        words[k] = _untemper(d)
    state[8:12].view(torch.int32)[0] = 624  # left
    state[16:24].view(torch.int64)[0] = 0  # next
    g.set_state(state)
    return g


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_stochastic_draws_equal_to_the_fraction_equal_torch_path(fmt):
    # Elements a quarter or an eighth of a step off the grid under a scale of 1, and draws
    # that are multiples of 1/8: many draws equal an element's fraction, where "below the
    # fraction" must hold strictly, as in round_to_grid.
    g = torch.Generator().manual_seed(8)
    top = 6.0 if fmt.element.max == 6.0 else 256.0  # MX: a block scale of 1; NVFP4: s = 1
    x = torch.randint(-48, 49, (16, 32), generator=g).float() / (8 if top == 6.0 else 32)
    x[:, :: fmt.block_size] = top
    draws = torch.randint(0, 8, x.shape, generator=g).float() / 8
    assert torch.equal(torch.rand(x.shape, generator=_generator_drawing(draws)), draws)
    scale = 1.0 if fmt is NVFP4 else None
    got = fake_quantize(x, fmt, "stochastic", _generator_drawing(draws), scale)
    want = _torch_path(fake_quantize, x, fmt, "stochastic", _generator_drawing(draws), scale)
    _assert_same_bits(got, want)
    assert not torch.equal(got, fake_quantize(x, fmt, per_tensor_scale=scale))  # draws matter


def test_stochastic_leaves_the_generators_as_torch_rand_does():
    x = _specimen(0, (40, 96), 32)
    for fmt in FORMATS:
        for layout in (x, x.t().contiguous().t()):
            torch.manual_seed(3)
            fake_quantize(layout, fmt, "stochastic")
            after_kernel = torch.get_rng_state()
            torch.manual_seed(3)
            _torch_path(fake_quantize, layout, fmt, "stochastic")
            assert torch.equal(after_kernel, torch.get_rng_state())
    # several regenerations of the state, from a generator part-way through one
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    torch.rand(5, generator=g1), torch.rand(5, generator=g2)
    y = _specimen(1, (100, 64), 16)
    got = fake_quantize(y, NVFP4, "stochastic", g1)
    _assert_same_bits(got, _torch_path(fake_quantize, y, NVFP4, "stochastic", g2))
    assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.parametrize("scale", [0.3, 7.1e-3])
def test_nvfp4_block_scales_at_e4m3_ties_equal_torch_path(scale):
    # block amaxes a few ulps around each tie between two e4m3 scales, amax / 6 / tensor_scale
    # landing on the midpoint: where each rounding of the scale's arithmetic shows
    mantissas = torch.arange(8, dtype=torch.float32)
    exponents = torch.arange(-6, 9, dtype=torch.float32)
    ties = ((1 + (mantissas + 0.5) / 8)[None, :] * torch.exp2(exponents)[:, None]).flatten()
    centres = (ties * 6 * scale).view(torch.int32)
    amax = (centres[:, None] + torch.arange(-40, 41, dtype=torch.int32)).view(torch.float32)
    g = torch.Generator().manual_seed(5)
    x = torch.rand(amax.numel(), 16, generator=g) * amax.reshape(-1, 1)
    x[:, 7] = amax.reshape(-1)
    _assert_same_bits(
        fake_quantize(x, NVFP4, per_tensor_scale=scale),
        _torch_path(fake_quantize, x, NVFP4, per_tensor_scale=scale),
    )


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("seed", range(3))
def test_1d_blocks_of_a_transposed_tensor_equal_torch_path(fmt, rounding, seed):
    # w.t() and grad.t() in the GEMMs: the kernel reads them in place, blocks down the columns
    x = _specimen(seed, (64, 48), fmt.block_size).t()
    torch.manual_seed(seed)
    got = fake_quantize(x, fmt, rounding)
    torch.manual_seed(seed)
    want = _torch_path(fake_quantize, x, fmt, rounding)
    _assert_same_bits(got, want)
    torch.manual_seed(seed)  # and as a contiguous copy: the same draws land on the same elements
    _assert_same_bits(fake_quantize(x.contiguous(), fmt, rounding), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_16_bit_input_equals_the_torch_path_on_its_fp32_values(dtype, fmt, rounding):
    x = _specimen(4, (32, 64), fmt.block_size).to(dtype)
    for t in (x, x.t().contiguous().t()):
        torch.manual_seed(2)
        got = fake_quantize(t, fmt, rounding)
        torch.manual_seed(2)
        want = _torch_path(fake_quantize, t.float(), fmt, rounding)
        assert got.dtype == torch.float32
        _assert_same_bits(got, want)
        torch.manual_seed(2)  # and the torch path widens a 16-bit x itself
        _assert_same_bits(_torch_path(fake_quantize, t, fmt, rounding), want)


def test_threads_do_not_change_the_values():
    x = _specimen(6, (512, 256), 16)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            results.append(
                [
                    fake_quantize(x, NVFP4, "stochastic"),
                    fake_quantize(x.t(), MXFP4, "stochastic"),
                    fake_quantize_tiles(x, NVFP4, 16),
                ]
            )
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*results, strict=True):
        _assert_same_bits(two, one)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_stochastic_operands_drawn_in_many_pieces_equal_torch_path(fmt, dtype, threads):
    # the kernel draws and rounds a long operand piece by piece (2**17 draws each): rows of
    # blocks, and a transposed operand (the weight gradient's grad.t()) in strips of columns
    x = _specimen(8, (2080, 160), fmt.block_size).to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for t in (x, x.t()):
            torch.manual_seed(3)
            got = fake_quantize(t, fmt, "stochastic")
            after_kernel = torch.rand(2)
            torch.manual_seed(3)
            want = _torch_path(fake_quantize, t.float(), fmt, "stochastic")
            assert torch.equal(torch.rand(2), after_kernel)  # the generator left alike
            _assert_same_bits(got, want)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_in_place_kernel_writes_what_the_functional_one_returns(fmt, rounding):
    x = _specimen(9, (2080, 64), fmt.block_size)
    for view in (lambda t: t, lambda t: t.t()):  # an operand, and grad.t() of the weight gradient
        torch.manual_seed(4)
        want = fake_quantize_blocks(view(x), fmt, (1, fmt.block_size), rounding)
        own = x.clone()
        torch.manual_seed(4)
        got = fake_quantize_blocks(view(own), fmt, (1, fmt.block_size), rounding, in_place=True)
        assert got is not None and got.data_ptr() == own.data_ptr()
        _assert_same_bits(got, want)


def test_in_place_kernel_refuses_a_16_bit_tensor_and_leaves_it():
    x = torch.randn(4, 32).bfloat16()
    before = x.clone()
    assert fake_quantize_blocks(x, NVFP4, (1, 16), in_place=True) is None
    assert torch.equal(x, before)
