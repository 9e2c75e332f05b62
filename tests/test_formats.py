import json
import math

import pytest
import torch

from mixprec.formats import (
    ALL_FORMATS,
    BF16,
    BLOCK_FORMATS,
    FORMATS,
    FP4_E2M1,
    FP8_E4M3,
    FP8_E5M2,
    FP16,
    FP32,
    MXFP4,
    MXFP8,
    NVFP4,
    TF32,
    resolve_block_format,
    resolve_format,
)

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


# -- fp4 e2m1 and the block-scaled formats -----------------------------------------------------


def test_fp4_numbers_match_ml_dtypes_finfo():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    info = ml_dtypes.finfo(ml_dtypes.float4_e2m1fn)
    assert FP4_E2M1.bits == info.bits
    assert FP4_E2M1.max == float(info.max)
    assert FP4_E2M1.min_normal == float(info.smallest_normal)
    assert FP4_E2M1.min_subnormal == float(info.smallest_subnormal)
    assert FP4_E2M1.eps == float(info.eps)
    assert (FP4_E2M1.has_inf, FP4_E2M1.has_nan) == (False, False)
    assert FP4_E2M1.dtype == torch.float32 and not FP4_E2M1.stored_exactly


def test_block_formats_match_torchaos_constants():
    constants = pytest.importorskip("torchao.prototype.mx_formats.constants")
    assert MXFP8.block_size == MXFP4.block_size == constants.BLOCK_SIZE_DEFAULT
    assert MXFP8.element.max == constants.F8E4M3_MAX
    assert MXFP4.element.max == NVFP4.element.max == constants.F4_E2M1_MAX
    assert MXFP4.element.max_exponent == constants.F4_E2M1_MAX_POW2
    assert MXFP8.element.max_exponent == constants.F8E4M3_MAX_POW2
    assert NVFP4.block_size == 16 and NVFP4.scale == "fp8_e4m3" and NVFP4.tensor_scale == "fp32"
    assert (MXFP8.bits_per_value, MXFP4.bits_per_value, NVFP4.bits_per_value) == (8.25, 4.25, 4.5)


def test_the_tables_keep_storage_formats_apart():
    assert list(ALL_FORMATS) == [*FORMATS, "fp4_e2m1", *BLOCK_FORMATS]
    assert FP4_E2M1.name not in FORMATS and not set(BLOCK_FORMATS) & set(FORMATS)


@pytest.mark.parametrize("alias", ["fp4", "e2m1", "FP4-E2M1", "float4_e2m1fn", FP4_E2M1])
def test_fp4_aliases_resolve(alias):
    assert resolve_format(alias) is FP4_E2M1


@pytest.mark.parametrize(
    ("alias", "expected"),
    [("mxfp8", MXFP8), ("MX-FP8", MXFP8), ("mxfp4", MXFP4), ("nvfp4", NVFP4), ("NV-FP4", NVFP4)],
)
def test_block_aliases_resolve(alias, expected):
    assert resolve_block_format(alias) is expected
    assert resolve_block_format(expected) is expected


def test_a_block_format_is_not_a_single_number_format():
    with pytest.raises(ValueError, match=r"'nvfp4' is a block-scaled format \(fp4_e2m1 values in"):
        resolve_format("nvfp4")


def test_unknown_block_format_lists_the_valid_ones():
    with pytest.raises(
        ValueError, match=r"unknown block-scaled format 'bf16'.*mxfp8, mxfp4, nvfp4"
    ):
        resolve_block_format("bf16")
    with pytest.raises(TypeError, match=r"got int 4"):
        resolve_block_format(4)  # type: ignore[arg-type]


def test_block_describe_is_json_ready():
    described = json.loads(json.dumps(NVFP4.describe()))
    assert described["element"] == "fp4_e2m1" and described["block_size"] == 16
    assert "nv_fp4" in described["aliases"] and "nvfp4" not in described["aliases"]
