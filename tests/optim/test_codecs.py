"""The block-wise 8-bit codecs of optimizer states: against a direct reference and torchao."""

from __future__ import annotations

import pytest
import torch

from mixprec.optim.codecs import (
    BLOCK_SIZE,
    dequantize_fp8,
    dequantize_int8,
    dynamic_map,
    quantize_fp8,
    quantize_int8,
)


def _values(rows: int, cols: int, seed: int = 0, signed: bool = True) -> torch.Tensor:
    """Values over several decades, as optimizer states are."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.exp(3 * torch.randn(rows, cols, generator=g))
    return x if signed else x.abs()


def _reference_int8(x: torch.Tensor, signed: bool, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Element by element: the nearest map entry of x / absmax (the upper one on a tie)."""
    qmap = dynamic_map(signed).double()
    rows, cols = x.shape
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    scales = []
    for r in range(rows):
        row_scales = []
        for start in range(0, cols, block):
            chunk = x[r, start : start + block]
            scale = max(chunk.abs().max().item(), 1e-12)
            row_scales.append(scale)
            y = (chunk / torch.tensor(scale, dtype=torch.float32)).double()
            distance = (y[:, None] - qmap[None, :]).abs()
            best = distance.min(dim=1, keepdim=True).values
            # the upper of two equally near entries
            ties = (distance <= best + 1e-12).int() * torch.arange(256)
            codes[r, start : start + block] = ties.max(dim=1).values.to(torch.uint8)
        scales.append(row_scales)
    return codes, torch.tensor(scales, dtype=torch.float32)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("shape", [(2, 512), (3, 300), (1, 7)], ids=["whole", "ragged", "short"])
def test_int8_against_direct_reference(signed: bool, shape: tuple[int, int]) -> None:
    x = _values(*shape, signed=signed)
    codes, scale = quantize_int8(x, signed)
    ref_codes, ref_scale = _reference_int8(x, signed, BLOCK_SIZE)
    assert torch.equal(scale, ref_scale)
    # the reference decides in float64, the codec in fp32 as torchao: a value within an fp32
    # rounding of a midpoint may go either way, and then to a neighbouring entry only
    assert (codes.int() - ref_codes.int()).abs().max() <= 1
    assert (codes != ref_codes).float().mean() < 0.01
    values = dequantize_int8(codes, scale, signed)
    qmap = dynamic_map(signed)
    for r in range(shape[0]):
        for b, start in enumerate(range(0, shape[1], BLOCK_SIZE)):
            chunk = slice(start, start + BLOCK_SIZE)
            expected = qmap[codes[r, chunk].long()] * scale[r, b]
            assert torch.equal(values[r, chunk], expected)


def test_fp8_against_direct_reference() -> None:
    x = _values(3, 300)
    codes, scale = quantize_fp8(x)
    for b, start in enumerate(range(0, 300, BLOCK_SIZE)):
        chunk = x[:, start : start + BLOCK_SIZE]
        ref_scale = chunk.abs().amax(1).clamp(min=1e-12) / 448.0
        assert torch.equal(scale[:, b], ref_scale)
        ref = (chunk / ref_scale[:, None]).to(torch.float8_e4m3fn)
        assert torch.equal(
            codes[:, start : start + BLOCK_SIZE].view(torch.uint8), ref.view(torch.uint8)
        )
    back = dequantize_fp8(codes, scale)
    assert torch.equal(back, codes.float() * scale.repeat_interleave(BLOCK_SIZE, 1)[:, :300])
    # e4m3 keeps 3 fraction bits: a relative error of at most 2**-4 in the normal range
    normal = x.abs() >= 2**-6 * scale.repeat_interleave(BLOCK_SIZE, 1)[:, :300]
    assert ((back - x).abs() <= 2**-4 * x.abs())[normal].all()


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_int8_bit_exact_against_torchao(signed: bool) -> None:
    quant_utils = pytest.importorskip("torchao.optim.quant_utils")
    qmap = torch.tensor(quant_utils.create_dynamic_map(signed=signed), dtype=torch.float32)
    assert torch.equal(dynamic_map(signed), qmap)
    x = _values(1, 16 * BLOCK_SIZE, seed=1, signed=signed).view(-1)
    scaled, ref_scale = quant_utils.scale_tensor(x, BLOCK_SIZE)
    ref_codes = quant_utils.quantize_8bit_with_qmap(scaled, qmap)
    codes, scale = quantize_int8(x.view(1, -1), signed)
    assert torch.equal(codes.view(-1), ref_codes)
    assert torch.equal(scale.view(-1), ref_scale)
    ref_values = quant_utils.dequant_with_qmap(ref_codes, qmap, ref_scale)
    assert torch.equal(dequantize_int8(codes, scale, signed).view(-1), ref_values)


def test_fp8_bit_exact_against_torchao() -> None:
    subclass_fp8 = pytest.importorskip("torchao.optim.subclass_fp8")
    x = _values(1, 16 * BLOCK_SIZE, seed=2).view(-1)
    ref_codes, ref_scale = subclass_fp8.quantize_fp8(x, BLOCK_SIZE)
    codes, scale = quantize_fp8(x.view(1, -1))
    assert torch.equal(codes.view(-1).view(torch.uint8), ref_codes.view(torch.uint8))
    assert torch.equal(scale.view(-1), ref_scale)
    state = subclass_fp8.OptimStateFp8(ref_codes, ref_scale)
    assert torch.equal(dequantize_fp8(codes, scale).view(-1), state.dequantize())


def test_ragged_rows_are_blocks_of_their_own() -> None:
    """A row of 300 is a block of 256 and one of 44; the padding changes nothing stored."""
    x = _values(2, 300, seed=3)
    codes, scale = quantize_int8(x)
    assert codes.shape == (2, 300) and scale.shape == (2, 2)
    head, head_scale = quantize_int8(x[:, :256].contiguous())
    tail, tail_scale = quantize_int8(x[:, 256:].contiguous())
    assert torch.equal(codes, torch.cat([head, tail], 1))
    assert torch.equal(scale, torch.cat([head_scale, tail_scale], 1))
    assert torch.equal(scale[:, 1], x[:, 256:].abs().amax(1))


@pytest.mark.parametrize("codec", ["int8", "fp8"])
def test_zeros_decode_to_zeros(codec: str) -> None:
    x = torch.zeros(2, 300)
    x[1, :10] = 3.0  # one block with values, the others all zero
    if codec == "int8":
        back = dequantize_int8(*quantize_int8(x))
    else:
        back = dequantize_fp8(*quantize_fp8(x))
    assert torch.equal(back, x)


@pytest.mark.parametrize("codec", ["int8", "fp8"])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_poisons_its_block_only(codec: str, bad: float) -> None:
    x = _values(1, 600, seed=4)
    x[0, 300] = bad  # in the second block
    if codec == "int8":
        back = dequantize_int8(*quantize_int8(x))
        clean = dequantize_int8(*quantize_int8(x[:, :256].contiguous()))
    else:
        back = dequantize_fp8(*quantize_fp8(x))
        clean = dequantize_fp8(*quantize_fp8(x[:, :256].contiguous()))
    assert back[0, 256:512].isnan().all()
    assert torch.equal(back[:, :256], clean)
    assert back[0, 512:].isfinite().all()


def test_bad_layout_is_refused() -> None:
    with pytest.raises(ValueError, match=r"2-D \(rows, cols\).*\(4,\)"):
        quantize_int8(torch.zeros(4))
    with pytest.raises(ValueError, match="block_size must be a positive int, got 0"):
        quantize_fp8(torch.zeros(1, 4), block_size=0)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_int8_rounding_at_every_decision_point_against_torchao(signed: bool) -> None:
    """Each value where the code changes, and its fp32 neighbours, coded as torchao codes it."""
    quant_utils = pytest.importorskip("torchao.optim.quant_utils")
    qmap = dynamic_map(signed)
    midpoints = (qmap[:-1] + qmap[1:]) / 2
    points = torch.cat([qmap, midpoints])
    neighbours = [points]
    for direction in (1.0, -1.0):
        step = points
        for _ in range(3):
            step = torch.nextafter(step, torch.full_like(step, direction))
            neighbours.append(step)
    y = torch.cat(neighbours).clamp(qmap[0].item(), 1.0)
    y = torch.cat([y, torch.zeros((-len(y)) % BLOCK_SIZE)])
    y[0] = 1.0  # each block's absmax is 1: the codec sees y itself
    y = y.view(-1, BLOCK_SIZE)
    y[:, 0] = 1.0
    codes, scale = quantize_int8(y, signed)
    assert (scale == 1.0).all()
    assert torch.equal(codes.view(-1), quant_utils.quantize_8bit_with_qmap(y.view(-1), qmap))
