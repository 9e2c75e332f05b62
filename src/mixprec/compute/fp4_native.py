"""Operands of the native block-scaled 4-bit GEMM (NVFP4, MXFP4), and a CPU model of that GEMM.

Design note: a Blackwell tensor core (compute capability 10.0+, cuBLAS through
``torch._scaled_mm``) multiplies 4-bit operands given as three things: the elements packed two
e2m1 codes to a byte (``torch.float4_e2m1fn_x2``; the first element of a pair in the low nibble,
as torchao and torch's tests pack them), one scale per block along the contraction (e4m3 for
NVFP4's 16-element blocks, E8M0 for MXFP4's 32-element blocks) rearranged into cuBLAS's swizzled
layout of 128x4 tiles, and, for NVFP4, the fp32 tensor scale, which ``_scaled_mm`` does not take
(torchao multiplies its output by the two tensor scales; so does :func:`native_gemm`).

Everything here is pure tensor math that runs on any device, so the packing, the scale layout
and the GEMM's reading of them are tested on a CPU: :func:`emulate_gemm` decodes exactly the
arguments :func:`native_gemm` hands to ``torch._scaled_mm`` (packed bytes, swizzled scales) and
multiplies them in fp32, which reproduces the emulated layer (:mod:`mixprec.compute.fp4_linear`)
bit for bit. The quantization itself is :mod:`mixprec.blockscaled`'s (the elements and scales the
emulation dequantizes), so the two backends quantize alike by construction; a GPU differs from
the emulation only in the order of its fp32 additions and in applying NVFP4's tensor scales to
the sum instead of to each operand.

Alignment: ``_scaled_mm`` wants the packed contraction a multiple of 16 bytes (32 elements) and
the output's columns a multiple of 16. The token dimension of the weight-gradient GEMM is padded
here with zero blocks (:func:`pad_contraction`, after quantizing, so stochastic rounding draws
what the emulation draws); a layer's ``in_features`` and ``out_features`` are each the
contraction of one GEMM and must be multiples of 32 (:func:`native_misfit`), else the layer runs
emulated with a warning.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mixprec.blockscaled import BlockQuantized, quantize_mx, quantize_nvfp4, quantize_tiles
from mixprec.fp4_recipes import Fp4Recipe
from mixprec.quantize import Rounding

__all__ = [
    "FP4_PACKED_DTYPE",
    "NATIVE_MULTIPLE",
    "Fp4Operand",
    "GemmArgs",
    "emulate_gemm",
    "gemm_args",
    "native_gemm",
    "native_misfit",
    "pack_fp4",
    "pad_contraction",
    "prepare_operand",
    "prepare_weight",
    "run_gemm",
    "swizzle_scales",
    "unpack_fp4",
    "unswizzle_scales",
]

FP4_PACKED_DTYPE: torch.dtype = getattr(torch, "float4_e2m1fn_x2", torch.uint8)
"""The dtype ``_scaled_mm`` reads packed fp4 as (``uint8`` on a torch without fp4 dtypes)."""
NATIVE_MULTIPLE = 32
"""What a contraction must be a multiple of, in elements: 16 packed bytes."""
_SCALE_TILE_ROWS, _SCALE_TILE_COLS = 128, 4  # cuBLAS's block-scaling factor tile
_FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # e2m1 codes 0..7
_SIGN_BIT = 0b1000
_FP32_MANTISSA_BITS = 23


# -- packing ------------------------------------------------------------------------------------


def pack_fp4(values: torch.Tensor) -> torch.Tensor:
    """fp32 values on the fp4 e2m1 grid, two to a byte along the last dimension.

    Element ``2i`` goes to the low nibble of byte ``i`` and ``2i + 1`` to the high one. A code
    keeps the value's sign bit (``-0.0`` is ``0b1000``); NaN, which e2m1 cannot hold, is stored
    as +0 (an MX block holding a NaN is NaN through its scale).

    Args:
        values: fp32 values in {0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6} (or NaN), last dimension even.

    Returns:
        A ``uint8`` tensor with half the last dimension.

    Example:
        >>> pack_fp4(torch.tensor([0.5, -6.0])).tolist()  # codes 0b0001, 0b1111
        [241]
    """
    if values.shape[-1] % 2:
        raise ValueError(
            f"fp4 packs two elements to a byte along the last dimension, got shape "
            f"{tuple(values.shape)!r}; give it an even last dimension"
        )
    a = values.abs()
    # the grid's spacing is 0.5 below 2, 1 in [2, 4), 2 from 4: codes 0-4, 4-6, 6-7
    magnitude = torch.where(a < 2.0, a * 2.0, torch.where(a < 4.0, a + 2.0, a * 0.5 + 4.0))
    magnitude = torch.where(torch.isnan(values), 0.0, magnitude)
    sign = torch.signbit(values) & ~torch.isnan(values)
    codes = magnitude.to(torch.uint8) | (sign.to(torch.uint8) << 3)
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """The fp32 values of packed fp4 (``uint8`` or ``float4_e2m1fn_x2``), twice as many.

    Example:
        >>> unpack_fp4(torch.tensor([241], dtype=torch.uint8)).tolist()
        [0.5, -6.0]
    """
    raw = packed.view(torch.uint8)
    codes = torch.stack([raw & 0x0F, raw >> 4], dim=-1).reshape(*raw.shape[:-1], -1)
    table = torch.tensor(_FP4_MAGNITUDES, device=raw.device)
    magnitude = table[(codes & 0b0111).long()]
    return torch.where((codes & _SIGN_BIT) != 0, -magnitude, magnitude)


# -- scales -------------------------------------------------------------------------------------


def _stored_scales(scales: torch.Tensor, e8m0: bool) -> torch.Tensor:
    """fp32 block scales as the GEMM stores them, as ``uint8`` bytes.

    MX scales are powers of two (2**-127, a subnormal, for code 0; NaN for code 255), so the
    E8M0 code is the fp32 exponent field; NVFP4 scales are e4m3 values, cast exactly.
    """
    if e8m0:
        return ((scales.view(torch.int32) >> _FP32_MANTISSA_BITS) & 0xFF).to(torch.uint8)
    return scales.to(torch.float8_e4m3fn).view(torch.uint8)


def _scale_values(stored: torch.Tensor, e8m0: bool) -> torch.Tensor:
    """fp32 values of stored scale bytes (E8M0: code 0 is 2**-127, 255 NaN)."""
    if e8m0:
        return stored.view(torch.float8_e8m0fnu).to(torch.float32)
    return stored.view(torch.float8_e4m3fn).to(torch.float32)


def swizzle_scales(scales: torch.Tensor) -> torch.Tensor:
    """A 2-D ``(rows, blocks)`` scale matrix in cuBLAS's block-scaling layout, flat.

    The matrix is padded with zero bytes to whole 128x4 tiles; tiles follow each other row-tile
    by row-tile, and inside a tile scale ``(r, c)`` sits at ``(r % 32) * 16 + (r // 32) * 4 + c``
    (cuBLAS's "1D block scaling factors layout"; torchao's ``to_blocked``).

    Args:
        scales: any 1-byte dtype (``uint8``, e4m3, E8M0), 2-D.

    Returns:
        A contiguous 1-D tensor of the same dtype, ``128 * ceil(rows / 128) * 4 *
        ceil(blocks / 4)`` long.

    Example:
        >>> s = torch.arange(8, dtype=torch.uint8).reshape(2, 4)
        >>> swizzle_scales(s)[:8].tolist(), swizzle_scales(s)[16:20].tolist()
        ([0, 1, 2, 3, 0, 0, 0, 0], [4, 5, 6, 7])
    """
    rows, cols = scales.shape
    row_tiles = -(-rows // _SCALE_TILE_ROWS)
    col_tiles = -(-cols // _SCALE_TILE_COLS)
    raw = scales.view(torch.uint8)
    padded = raw.new_zeros(row_tiles * _SCALE_TILE_ROWS, col_tiles * _SCALE_TILE_COLS)
    padded[:rows, :cols] = raw
    # (row tile, r // 32, r % 32, col tile, c) -> (row tile, col tile, r % 32, r // 32, c)
    tiles = padded.view(row_tiles, 4, 32, col_tiles, _SCALE_TILE_COLS).permute(0, 3, 2, 1, 4)
    return tiles.contiguous().view(-1).view(scales.dtype)


def unswizzle_scales(swizzled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The inverse of :func:`swizzle_scales`: the ``(rows, cols)`` matrix, padding dropped."""
    row_tiles = -(-rows // _SCALE_TILE_ROWS)
    col_tiles = -(-cols // _SCALE_TILE_COLS)
    raw = swizzled.view(torch.uint8).reshape(row_tiles, col_tiles, 32, 4, _SCALE_TILE_COLS)
    matrix = raw.permute(0, 3, 2, 1, 4).reshape(
        row_tiles * _SCALE_TILE_ROWS, col_tiles * _SCALE_TILE_COLS
    )
    return matrix[:rows, :cols].contiguous().view(swizzled.dtype)


# -- operands -----------------------------------------------------------------------------------


class Fp4Operand(NamedTuple):
    """One GEMM operand, ``(rows, k)`` quantized in blocks along ``k`` (the contraction).

    Attributes:
        data: the elements packed, ``uint8`` of shape ``(rows, k // 2)``, contiguous.
        scales: the block scales as stored, ``uint8`` bytes of shape ``(rows, k // block)``
            (e4m3 for NVFP4, E8M0 for MXFP4), row-major (not swizzled).
        tensor_scale: NVFP4's fp32 tensor scale (0-d), None for MXFP4.
        block: the block length, 16 or 32.
    """

    data: torch.Tensor
    scales: torch.Tensor
    tensor_scale: torch.Tensor | None
    block: int

    @property
    def e8m0(self) -> bool:
        """Whether the scales are E8M0 (MX) rather than e4m3 (NVFP4)."""
        return self.tensor_scale is None

    def dequantize(self) -> torch.Tensor:
        """The fp32 values ``element * (tensor_scale * scale)``, as the emulation computes them.

        Example:
            >>> op = prepare_operand(torch.full((1, 32), 3.0), Fp4Recipe("mxfp4"))
            >>> op.dequantize()[0, :2].tolist()
            [3.0, 3.0]
        """
        rows = self.data.shape[0]
        elements = unpack_fp4(self.data).reshape(rows, -1, self.block)
        scale = _scale_values(self.scales, self.e8m0).unsqueeze(-1)
        if self.tensor_scale is not None:
            scale = self.tensor_scale * scale
        return (elements * scale).reshape(rows, -1)


def _operand(q: BlockQuantized, rows: int, block: int, e8m0: bool) -> Fp4Operand:
    data = pack_fp4(q.elements.reshape(rows, -1))
    scales = _stored_scales(q.scales.reshape(rows, -1), e8m0)
    return Fp4Operand(data, scales, q.tensor_scale, block)


def prepare_operand(
    t: torch.Tensor,
    recipe: Fp4Recipe,
    stochastic: bool = False,
    tensor_scale: torch.Tensor | None = None,
) -> Fp4Operand:
    """A 2-D ``t`` quantized along its last dimension as the emulation quantizes it, packed.

    The elements and scales are :func:`mixprec.blockscaled.quantize_nvfp4`'s or
    :func:`~mixprec.blockscaled.quantize_mx`'s for ``t.float()`` (NVFP4's tensor scale
    ``tensor_scale``, by default from ``t``'s amax), with the same random draws for stochastic
    rounding.

    Example:
        >>> op = prepare_operand(torch.ones(2, 16), Fp4Recipe("nvfp4"))
        >>> tuple(op.data.shape), tuple(op.scales.shape)
        ((2, 8), (2, 1))
    """
    fmt = recipe.format
    rounding: Rounding = "stochastic" if stochastic else "nearest"
    x = t.float()
    if fmt.scale == "e8m0":
        q = quantize_mx(x, fmt, rounding)
    else:
        q = quantize_nvfp4(x, tensor_scale, rounding)
    return _operand(q, x.shape[0], recipe.block, fmt.scale == "e8m0")


def prepare_weight(weight: torch.Tensor, recipe: Fp4Recipe, gemm: str) -> Fp4Operand:
    """The weight as ``gemm`` takes it: ``"output"`` ``(out, in)`` along ``in_features``,
    ``"grad_input"`` ``(in, out)`` along ``out_features``.

    Square tiles (``weight_blocks=16x16``) quantize once; a tile's scale is every row's block
    scale inside it, so both GEMMs read the same elements and scales (transposed for the input
    gradient). 1-D blocks quantize along each GEMM's contraction.
    """
    w = weight.float()
    tile = recipe.weight_tile
    if tile is None:
        return prepare_operand(w if gemm == "output" else w.t(), recipe)
    q = quantize_tiles(w, recipe.format, tile)
    rows, cols = w.shape
    elements = q.elements.reshape(rows // tile, cols // tile, tile, tile).transpose(1, 2)
    elements = elements.reshape(rows, cols)
    scales = q.scales.reshape(rows // tile, cols // tile)
    if gemm != "output":
        elements, scales = elements.t(), scales.t()
    expanded = BlockQuantized(elements, scales.repeat_interleave(tile, dim=0), q.tensor_scale)
    return _operand(expanded, elements.shape[0], recipe.block, recipe.format.scale == "e8m0")


def pad_contraction(op: Fp4Operand, multiple: int = NATIVE_MULTIPLE) -> Fp4Operand:
    """``op`` with zero blocks appended along ``k`` up to a multiple of ``multiple`` elements.

    Zero elements add nothing to the GEMM whatever their scale; the scale bytes are zero too.
    """
    k = op.data.shape[1] * 2
    extra = -k % multiple
    if not extra:
        return op
    data = torch.cat([op.data, op.data.new_zeros(op.data.shape[0], extra // 2)], dim=1)
    scales = torch.cat([op.scales, op.scales.new_zeros(op.scales.shape[0], extra // op.block)], 1)
    return Fp4Operand(data, scales, op.tensor_scale, op.block)


def native_misfit(out_features: int, in_features: int) -> str | None:
    """Why a layer's GEMMs do not fit ``_scaled_mm``'s 4-bit alignment, or None if they do.

    Each feature count is the contraction of one GEMM (``in_features`` of the forward,
    ``out_features`` of the input gradient), so each must be a multiple of 32 elements.

    Example:
        >>> native_misfit(64, 48)
        'in_features 48 is not a multiple of 32 (16 packed bytes)'
    """
    for name, size in (("out_features", out_features), ("in_features", in_features)):
        if size % NATIVE_MULTIPLE:
            return f"{name} {size} is not a multiple of {NATIVE_MULTIPLE} (16 packed bytes)"
    return None


# -- the GEMM -----------------------------------------------------------------------------------


class GemmArgs(NamedTuple):
    """What ``torch._scaled_mm`` takes for ``a @ b.T``, plus NVFP4's tensor scales.

    Attributes:
        mat_a: ``(M, K // 2)`` packed, row-major, ``float4_e2m1fn_x2``.
        mat_b: ``(K // 2, N)`` packed, column-major (``b``'s rows transposed, no copy).
        scale_a, scale_b: the swizzled block scales (e4m3 or E8M0), flat and contiguous.
        tensor_scale_a, tensor_scale_b: NVFP4's fp32 tensor scales, None for MXFP4.
        block: the block length along ``K``.
    """

    mat_a: torch.Tensor
    mat_b: torch.Tensor
    scale_a: torch.Tensor
    scale_b: torch.Tensor
    tensor_scale_a: torch.Tensor | None
    tensor_scale_b: torch.Tensor | None
    block: int


def gemm_args(a: Fp4Operand, b: Fp4Operand) -> GemmArgs:
    """The arguments of ``a @ b.T`` for ``torch._scaled_mm`` (``a`` is ``(M, K)``, ``b``
    ``(N, K)``, both quantized along ``K``); the contraction is padded to whole 32 elements."""
    a, b = pad_contraction(a), pad_contraction(b)
    scale_dtype = torch.float8_e8m0fnu if a.e8m0 else torch.float8_e4m3fn
    return GemmArgs(
        a.data.view(FP4_PACKED_DTYPE),
        b.data.view(FP4_PACKED_DTYPE).t(),
        swizzle_scales(a.scales.view(scale_dtype)),
        swizzle_scales(b.scales.view(scale_dtype)),
        a.tensor_scale,
        b.tensor_scale,
        a.block,
    )


def native_gemm(args: GemmArgs) -> torch.Tensor:
    """``a @ b.T`` in fp32 on a block-scaled tensor core (``torch._scaled_mm``, CUDA 10.0+).

    The GEMM accumulates in fp32 and writes fp32, so the caller's rounding to the compute dtype
    is the only one; NVFP4's tensor scales multiply the result (``_scaled_mm`` takes none).
    """
    out = torch._scaled_mm(
        args.mat_a, args.mat_b, args.scale_a, args.scale_b, out_dtype=torch.float32
    )
    if args.tensor_scale_a is not None and args.tensor_scale_b is not None:
        out = out * (args.tensor_scale_a * args.tensor_scale_b)
    return out


def emulate_gemm(args: GemmArgs) -> torch.Tensor:
    """What :func:`native_gemm` computes, from the same arguments, on fp32 kernels.

    It decodes the packed elements and the swizzled scales, multiplies each operand by its
    scales (the tensor scale first, as :class:`~mixprec.blockscaled.BlockQuantized` does) and
    runs ``torch.mm``: the emulated layer's GEMM, bit for bit, on the tensor core's inputs.
    """
    m, n = args.mat_a.shape[0], args.mat_b.shape[1]
    blocks = args.mat_a.shape[1] * 2 // args.block
    a = Fp4Operand(
        args.mat_a.view(torch.uint8),
        unswizzle_scales(args.scale_a, m, blocks).view(torch.uint8),
        args.tensor_scale_a,
        args.block,
    )
    b = Fp4Operand(
        args.mat_b.view(torch.uint8).t(),
        unswizzle_scales(args.scale_b, n, blocks).view(torch.uint8),
        args.tensor_scale_b,
        args.block,
    )
    return torch.mm(a.dequantize(), b.dequantize().t())


def run_gemm(a: Fp4Operand, b: Fp4Operand) -> torch.Tensor:
    """``a @ b.T`` in fp32: on the tensor core for CUDA operands, else its CPU model."""
    args = gemm_args(a, b)
    return native_gemm(args) if args.mat_a.is_cuda else emulate_gemm(args)
