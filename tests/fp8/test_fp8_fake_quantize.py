"""The one-pass fake-quantize kernel equals dequantize(quantize_blocks(...)) bit for bit.

The reference is the torch-ops path (torch's own fp8 cast and decode); the kernel's values must
be the same bits for every format, block shape, scale rule and input dtype, NaN, inf, zeros of
both signs and values far below the format's subnormals included, and with given scales.
"""

from __future__ import annotations

import pytest
import torch

from mixprec.compute import emulate_build
from mixprec.scaled import dequantize, fake_quantize_blocks, quantize_blocks

BLOCKS = [(1000, 1000), (1, 1000), (1, 32), (32, 1), (128, 128), (1000, 1), (16, 16)]


def _operand(dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(37, 70, generator=gen) * torch.logspace(-12, 6, 70)
    x[0, 0], x[3, 5], x[4, 7], x[5, 5] = float("nan"), 0.0, -0.0, float("inf")
    x[6, 6], x[7, 1] = 1e-30, -1e-30
    return x.to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same bits, any NaN for NaN (the kernel need not keep the reference's NaN payload)."""
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(
        a[~nan].view(torch.int32), b[~nan].view(torch.int32)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_kernel_equals_the_torch_ops_path(dtype: torch.dtype, fmt: str) -> None:
    assert emulate_build.emulate_engine() is not None, "the kernel must build on this machine"
    for seed, block in enumerate(BLOCKS):
        x = _operand(dtype, seed)
        for rule in ("dynamic", "pow2", "e8m0"):
            got = fake_quantize_blocks(x, block, fmt, rule)
            want = dequantize(quantize_blocks(x, block, fmt, rule))
            assert _same(got, want), (block, rule)


@pytest.mark.parametrize("scale", [3.7, 0.0, float("nan"), 2.0**-20])
def test_given_scales_equal_the_torch_ops_path(scale: float) -> None:
    x = _operand(torch.bfloat16, 9)
    s = torch.tensor(scale)
    got = fake_quantize_blocks(x, tuple(x.shape), "e4m3", scale=s)
    assert _same(got, dequantize(quantize_blocks(x, tuple(x.shape), "e4m3", scale=s)))


def test_without_the_kernel_the_torch_ops_path_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _operand(torch.float32, 3)
    with_kernel = fake_quantize_blocks(x, (1, 32), "e4m3", "e8m0")
    monkeypatch.setattr(emulate_build._BUILD, "ops", None)  # as if the build had failed
    assert _same(fake_quantize_blocks(x, (1, 32), "e4m3", "e8m0"), with_kernel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_long_rows_over_the_whole_range_equal_the_torch_ops_path(dtype, fmt) -> None:
    """Rows long enough for the kernel's vector loops, each row at its own magnitude from 1e-40
    to 1e38, with computed and with given scales from 1e-45 to 3e38: results that are
    subnormal, tiny, huge or NaN included."""
    assert emulate_build.emulate_engine() is not None, "the kernel must build on this machine"
    gen = torch.Generator().manual_seed(7)
    rows = 64
    magnitude = torch.logspace(-40, 38, rows).unsqueeze(1)
    x = (torch.randn(rows, 200, generator=gen) * magnitude).to(dtype)
    x[5, 3], x[9, 100], x[11, 17] = float("nan"), 0.0, -0.0
    x[13, 64] = float("inf")
    for block in [(1, 200), (rows, 200), (8, 200)]:
        for rule in ("dynamic", "pow2", "e8m0"):
            got = fake_quantize_blocks(x, block, fmt, rule)
            assert _same(got, dequantize(quantize_blocks(x, block, fmt, rule))), (block, rule)
    scales = [*torch.logspace(-38, 38, 17).tolist(), 2.0**-130, 1e-45, 3.0e38]
    for scale in scales:
        s = torch.tensor(scale)
        got = fake_quantize_blocks(x, (rows, 200), fmt, scale=s)
        want = dequantize(quantize_blocks(x, (rows, 200), fmt, scale=s))
        assert _same(got, want), scale
