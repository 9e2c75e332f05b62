"""The one-pass block-scaled fake-quantize kernel (``_blockscaled.cpp``) and when it applies.

Design note: :func:`mixprec.blockscaled.fake_quantize` through torch ops takes about fifteen
elementwise passes per operand (abs, amax, the scale's shifts and clamps, a division, a clamp,
the element rounding's comparisons, rounds and copysign, a multiply), each a new tensor: an
emulated NVFP4 step spent some ten times the fp32 step on them. The kernel reads each block
twice from cache (its amax, then scale, round and dequantize each element) and writes the result
once, doing the same fp32 operations in the same order as the torch path, so the results are the
same bits. Stochastic rounding keeps its draws: the numbers ``torch.rand(x.shape,
generator=...)`` returns (torch's global generator by default), one per element in ``x``'s
logical order, leaving the generator in the same state, so a seed gives the values it gave
before. The kernel draws them itself, running ``at::mt19937``'s own steps on the generator's
state: ``torch.rand`` calls the engine once per number and cost more than the rest of the
quantization. It draws and rounds an operand piece by piece (2**17 draws, which stay in
cache, then that piece's blocks) rather than drawing all of it into memory first. A transposed
operand (``w.t()``, ``grad.t()`` in the weight-gradient GEMM) is read as it lies, its blocks
running down the columns of the contiguous ``x.t()``; its draws, in the order of ``x.t()``, are
made a strip of columns at a time and transposed in cache. The in-place ops (``mx_``,
``nvfp4_``) write the result over an fp32 operand the caller owns (the weight-gradient GEMM's
RHT outputs). :func:`hadamard_rows` (``_hadamard.cpp``, the same library) is the random
Hadamard transform of a 16-bit operand in one pass. The kernel
is built on first use by the same mechanism and flags as the other kernels (:mod:`mixprec._cpp`)
and loaded as ``torch.ops.mixprec_blockscaled``; where it cannot be built, or the input is not a
CPU fp32 tensor, the functions here return None and the caller takes the torch path (same values).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from mixprec import _cpp
from mixprec.formats import FP4_E2M1, FP8_E4M3, BlockFormat

__all__ = ["blockscaled_engine", "fake_quantize_blocks", "hadamard_rows"]

_SOURCES = [Path(__file__).with_name(name) for name in ("_blockscaled.cpp", "_hadamard.cpp")]
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the kernel widens 16-bit exactly


def blockscaled_engine() -> Any | None:
    """``torch.ops.mixprec_blockscaled``, built on first call; None where it cannot be built."""
    return _BUILD.get()


_BUILD = _cpp.LazyBuild(
    functools.partial(_cpp.library, "mixprec_blockscaled", _SOURCES, "rht"),
    "mixprec: the block-scaled fake-quantize kernel",
    "block-scaled formats take the torch-ops path (same results, slower). Install a C++ "
    "compiler and ninja to get it",
)


def fake_quantize_blocks(
    x: torch.Tensor,
    fmt: BlockFormat,
    block: tuple[int, int],
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    tensor_scale: torch.Tensor | None = None,
    in_place: bool = False,
) -> torch.Tensor | None:
    """``x`` (2-D, validated by the caller) quantized in ``block`` blocks and back, in one pass;
    None where the kernel does not apply.

    Args:
        x: a 2-D tensor whose dimensions are multiples of ``block``: fp32, or bf16 or fp16
            (read as their exact fp32 values, without an fp32 copy).
        fmt: ``NVFP4``, ``MXFP4`` or ``MXFP8``.
        block: ``(rows, cols)`` of a block: ``(1, fmt.block_size)`` or a square tile.
        rounding: ``"nearest"`` or ``"stochastic"`` (the draws: those of ``torch.rand`` of
            ``x``'s shape from ``generator``, as the torch path draws them).
        generator: random source for stochastic rounding.
        tensor_scale: NVFP4's checked fp32 tensor scale (0-d); None for the default from amax.
        in_place: write the result over an fp32 ``x`` (a tensor the caller owns, such as an
            intermediate of its own) instead of allocating it; None (``x`` untouched) for any
            other dtype.

    Returns:
        A new fp32 tensor of ``x``'s shape (transposed in memory where ``x`` is, as ``w.t()``:
        the kernel reads such an ``x`` as it lies instead of copying it), or None: no kernel,
        not a CPU fp32, bf16 or fp16 tensor, a tensor that needs gradients, or an element
        format without a kernel.
    """
    if (
        x.device.type != "cpu"
        or x.dtype not in _DTYPES
        or x.dim() != 2
        or rounding not in ("nearest", "stochastic")
        or fmt.element not in (FP4_E2M1, FP8_E4M3)
        or (x.requires_grad and torch.is_grad_enabled())
        or (generator is not None and generator.device.type != "cpu")
        or (in_place and x.dtype != torch.float32)
    ):
        return None
    ops = blockscaled_engine()
    if ops is None:
        return None
    stochastic = rounding == "stochastic"
    shape = x.shape
    given = x
    transposed = not x.is_contiguous() and x.t().is_contiguous()
    if transposed:  # e.g. w.t(): the kernel walks blocks down the columns of the contiguous x.t()
        x, block = x.t(), (block[1], block[0])
    elif in_place and not x.is_contiguous():
        return None
    else:
        x = x.contiguous()
        if block[0] == 1:  # blocks along rows: one long row, cut into chunks of blocks
            x = x.view(1, -1)
    args: tuple[Any, ...] = (block[0], block[1])
    if fmt.scale == "e8m0":
        fp4 = fmt.element == FP4_E2M1
        op, args = (ops.mx_ if in_place else ops.mx), (*args, fp4)
    else:
        op, args = (ops.nvfp4_ if in_place else ops.nvfp4), (tensor_scale, *args)
    out = op(x, *args, stochastic, generator, transposed)
    if in_place:
        return given
    return out.t() if transposed else out.view(shape)  # type: ignore[no-any-return]


def hadamard_rows(x: torch.Tensor, r: torch.Tensor, rows_out: int) -> torch.Tensor | None:
    """``rht`` of ``x`` widened to fp32 and padded with zero rows to ``rows_out``, in one pass
    (:func:`mixprec.fp4_recipes.rht_padded`); None where the kernel does not apply.

    The kernel sums each output's 16 products in the order ``rht`` defines, with fused
    multiply-adds, which is ``rht``'s bits only where every product is exact: a 16-bit ``x``
    times ``r``'s entries of +-1/4. So it takes a CPU bf16 or fp16 ``x`` whose column count is a
    multiple of 16 (its vector width; a 4-bit layer's features are) and that needs no gradient;
    anything else returns None.

    Args:
        x: ``(rows, cols)``, the rows in groups of 16 (the last group completed by zeros).
        r: the 16x16 fp32 transform (:func:`mixprec.fp4_recipes.random_hadamard`).
        rows_out: ``rows`` rounded up to a multiple of 16 or more.

    Returns:
        A new fp32 ``(rows_out, cols)`` tensor, or None.
    """
    if (
        x.device.type != "cpu"
        or x.dtype not in (torch.bfloat16, torch.float16)
        or x.dim() != 2
        or x.shape[1] % 16
        or rows_out % 16
        or rows_out < x.shape[0]
        or (x.requires_grad and torch.is_grad_enabled())
    ):
        return None
    ops = blockscaled_engine()
    if ops is None:
        return None
    return ops.rht(x.contiguous(), r.float().contiguous(), rows_out)  # type: ignore[no-any-return]
