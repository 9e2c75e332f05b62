import math

import pytest
import torch

from mixprec.formats import BF16, FORMATS, FP8_E4M3, FP8_E5M2, FP16, FP32, TF32, resolve_format

WITH_DTYPE = [f for f in FORMATS.values() if f.stored_exactly]


@pytest.mark.parametrize("fmt", WITH_DTYPE, ids=str)
def test_numbers_match_torch_finfo(fmt):
    info = torch.finfo(fmt.dtype)
    assert fmt.bits == info.bits
    assert fmt.max == info.max
    assert fmt.min_normal == info.tiny
    assert fmt.min_subnormal == _bit_pattern_one(fmt.dtype)
    assert fmt.eps == info.eps


def _bit_pattern_one(dtype):
    """The smallest positive value of a dtype: the bit pattern 0...01."""
    int_dtype = {8: torch.uint8, 16: torch.int16, 32: torch.int32}[torch.finfo(dtype).bits]
    return torch.ones(1, dtype=int_dtype).view(dtype).float().item()


@pytest.mark.parametrize("fmt", WITH_DTYPE, ids=str)
def test_max_and_inf_agree_with_torch_cast(fmt):
    # The largest value torch's cast keeps finite is max; inf survives only where the format has it.
    assert torch.tensor(fmt.max).to(fmt.dtype).float().item() == fmt.max
    inf_cast = torch.tensor(float("inf")).to(fmt.dtype).float().item()
    assert math.isinf(inf_cast) == fmt.has_inf


def test_tf32_is_fp32_with_ten_mantissa_bits():
    # Largest fp32 whose 13 low mantissa bits are zero; smallest subnormal keeps only the top bit.
    largest = torch.tensor([0x7F7FE000], dtype=torch.int32).view(torch.float32).item()
    assert TF32.max == largest
    assert TF32.min_subnormal == 2.0**-136
    assert TF32.min_normal == FP32.min_normal
    assert TF32.dtype == torch.float32 and not TF32.stored_exactly


def test_anchor_numbers_from_design():
    assert (FP16.max, FP16.min_normal, FP16.min_subnormal, FP16.eps) == (
        65504.0,
        2.0**-14,
        2.0**-24,
        2.0**-10,
    )
    assert BF16.min_normal == 2.0**-126 and BF16.eps == 2.0**-7
    assert FP8_E4M3.max == 448.0 and not FP8_E4M3.has_inf
    assert FP8_E5M2.max == 57344.0 and FP8_E5M2.has_inf


@pytest.mark.parametrize(
    ("alias", "expected"),
    [
        ("bf16", BF16),
        ("bfloat16", BF16),
        ("BF16", BF16),
        (torch.bfloat16, BF16),
        ("half", FP16),
        ("float16", FP16),
        (torch.float16, FP16),
        ("fp32", FP32),
        ("float", FP32),
        (torch.float32, FP32),
        ("tf32", TF32),
        ("e4m3", FP8_E4M3),
        ("fp8-e4m3", FP8_E4M3),
        ("float8_e4m3fn", FP8_E4M3),
        (torch.float8_e4m3fn, FP8_E4M3),
        ("e5m2", FP8_E5M2),
        (torch.float8_e5m2, FP8_E5M2),
        (FP16, FP16),
    ],
)
def test_aliases_resolve(alias, expected):
    assert resolve_format(alias) is expected


def test_unknown_name_lists_valid_formats():
    with pytest.raises(
        ValueError, match=r"unknown number format 'fp12'; valid formats: fp32, tf32"
    ):
        resolve_format("fp12")


def test_unsupported_dtype_is_named():
    with pytest.raises(ValueError, match=r"dtype torch.float64 is not a supported number format"):
        resolve_format(torch.float64)


def test_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match=r"got int 16"):
        resolve_format(16)


def test_describe_is_json_ready_and_lists_aliases():
    described = FP16.describe()
    assert described["dtype"] == "float16"
    assert "half" in described["aliases"] and "fp16" not in described["aliases"]
