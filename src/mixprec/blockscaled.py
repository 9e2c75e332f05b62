"""fp4 e2m1 and the block-scaled formats (MXFP8, MXFP4, NVFP4): pure fp32 math on tensors.

Design note: a block-scaled tensor is three things — elements in a narrow format, one scale per
block of consecutive elements along the last dimension, and (NVFP4 only) one fp32 scale for the
whole tensor. :func:`quantize_mx` and :func:`quantize_nvfp4` return them as a
:class:`BlockQuantized` so that a recipe can feed elements and scales to a GEMM;
:func:`fake_quantize` is the round trip ``mixprec.quantize`` uses. The reference is torchao
(``MXTensor.to_mx(...).dequantize()``, ``NVFP4Tensor.to_nvfp4(...).dequantize()``) and every
operation here is the same fp32 operation in the same order, so the results are equal bit for
bit, not merely close: a division stays a division, a reciprocal a reciprocal.

The rules, as torchao 0.18 implements them:

* MX (OCP microscaling, torchao's default ``FLOOR`` mode): a block's scale is the power of two
  ``2**(floor(log2(amax)) - emax_elem)`` (``emax_elem`` 8 for e4m3, 2 for e2m1), taken from
  amax's exponent bits and clamped to E8M0's range. The floor rule maps a block's amax into
  [2**emax_elem, 2**(emax_elem + 1)), which reaches past the element's max (fp4: [4, 8) against
  6; e4m3: [256, 512) against 448), so a block's largest elements may saturate at ±max. A NaN
  anywhere makes the whole block NaN (scale code 255); an inf block keeps its ±inf, and its
  finite elements, divided by a scale of about 2**120, flush to zero.
  One quirk is kept for parity: a block whose amax is below ``2**(emax_elem - 126)`` gets scale
  code 0, which encodes with 2**-126 (torchao clamps to fp32's smallest normal) but decodes with
  2**-127, so such blocks come back halved.
* NVFP4: the tensor scale is ``amax(x) / (448 * 6)``, so the largest block scale lands on e4m3's
  max. Each block scale ``amax_block / 6 / tensor_scale`` is clamped to [2**-6, 448] and rounded
  to e4m3; elements are ``x * ((1 / tensor_scale) / block_scale)``, clamped to ±6 and rounded
  to fp4; the value is ``element * (tensor_scale * block_scale)``. A tensor scale of 1 gives
  torchao's single-level scaling. Where torchao breaks down mixprec departs, documented: the
  tensor scale from amax is floored at 2**-121 (:data:`MIN_TENSOR_SCALE`). Below 2**-122 the
  multiplier of an all-zero block overflows (0 * inf: torchao returns NaN for an all-zero
  tensor, a zero-initialised layer, whose scale is 0), below 2**-128 ``1 / tensor_scale`` itself
  does and every element comes out ±6 times its scale.
* fp4 e2m1 alone follows ``ml_dtypes.float4_e2m1fn``: round half to even, saturating (±inf and
  anything beyond ±6 become ±6), and NaN, which fp4 cannot hold, becomes a zero of the opposite
  sign (code ``0b1000``, -0.0, for a NaN whose sign bit is clear; +0.0 for one whose bit is set).

Stochastic rounding applies to the elements only (scales are always rounded to nearest, as in
NVIDIA's recipe): each element rounds to one of its two neighbours on the element grid with
probability by distance, so it is unbiased for elements within ±max; saturated elements stay at
±max.

The functions below are the reference, in torch ops. :func:`fake_quantize` and
:func:`fake_quantize_tiles` run a C++ kernel instead for CPU tensors
(:mod:`mixprec.blockscaled_build`): the same values bit for bit, the same stochastic draws from
the same generator, one pass per operand instead of about fifteen. NaNs come out in the same
places; which NaN (sign, payload) is not promised, as torch's own differs with its vector width.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mixprec.blockscaled_build import fake_quantize_blocks
from mixprec.formats import FP4_E2M1, FP8_E4M3, NVFP4, BlockFormat, Format
from mixprec.quantize import Rounding, round_to_grid

__all__ = [
    "MIN_TENSOR_SCALE",
    "BlockQuantized",
    "fake_quantize",
    "fake_quantize_tiles",
    "nvfp4_tensor_scale",
    "quantize_mx",
    "quantize_nvfp4",
    "quantize_tiles",
    "round_fp4_e2m1",
]

MIN_TENSOR_SCALE = 2.0**-121
"""Smallest NVFP4 tensor scale: ``(1 / scale) / 2**-6``, the largest multiplier, stays finite."""

_E4M3_MIN_NORMAL = 2.0**-6  # NVFP4 block scales are clamped to e4m3's normal range
_NVFP4_SCALE_DIVISOR = FP8_E4M3.max * FP4_E2M1.max  # 448 * 6 = 2688
_E8M0_NAN = 255
_FP32_MANTISSA_BITS = 23
_FP32_MIN_NORMAL = 2.0**-126


class BlockQuantized(NamedTuple):
    """A tensor in a block-scaled format, unpacked to fp32.

    Attributes:
        elements: values of the element format, shape ``(..., blocks, block_size)``.
        scales: each block's scale as stored (a power of two for MX, an e4m3 value for NVFP4,
            NaN for an MX block that held a NaN), shape ``(..., blocks, 1)``.
        tensor_scale: NVFP4's fp32 scale over the whole tensor (0-d), None for MX.
    """

    elements: torch.Tensor
    scales: torch.Tensor
    tensor_scale: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """The values as an fp32 tensor of the original shape: ``element * scale``.

        For NVFP4 the two scales are multiplied first, in fp32, as torchao does.
        """
        scale = self.scales if self.tensor_scale is None else self.tensor_scale * self.scales
        values = self.elements * scale
        *outer, blocks, size = values.shape
        return values.reshape(*outer, blocks * size)


def round_fp4_e2m1(
    x: torch.Tensor, rounding: Rounding = "nearest", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Round an fp32 tensor to fp4 e2m1 values, as ``ml_dtypes.float4_e2m1fn`` does.

    The values are 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives. Nearest rounding is half to
    even; beyond ±6 (±inf included) the result saturates to ±6; NaN becomes a zero of the
    opposite sign, bit for bit as ml_dtypes converts it.

    Args:
        x: a float32 tensor.
        rounding: ``"nearest"`` or ``"stochastic"`` (unbiased within ±6).
        generator: random source for stochastic rounding.

    Returns:
        A new float32 tensor of fp4 values.

    Example:
        >>> round_fp4_e2m1(torch.tensor([0.25, 0.75, 2.5, 5.0, 7.0, -float("inf")])).tolist()
        [0.0, 1.0, 2.0, 4.0, 6.0, -6.0]
    """
    rounded = round_to_grid(x, FP4_E2M1, rounding, generator=generator)
    sign_set = x.view(torch.int32) < 0
    nan_as_zero = torch.where(sign_set, 0.0, -0.0)
    return torch.where(torch.isnan(x), nan_as_zero, rounded)


def quantize_mx(
    x: torch.Tensor,
    fmt: BlockFormat,
    rounding: Rounding = "nearest",
    generator: torch.Generator | None = None,
) -> BlockQuantized:
    """Quantize ``x`` to an MX format (E8M0 block scales, torchao's ``FLOOR`` rule).

    Args:
        x: a float32 tensor whose last dimension is a multiple of ``fmt.block_size``.
        fmt: ``MXFP8`` or ``MXFP4`` (any block format with E8M0 scales).
        rounding: rounding of the elements, ``"nearest"`` or ``"stochastic"``.
        generator: random source for stochastic rounding.

    Returns:
        The elements and power-of-two block scales; ``.dequantize()`` equals torchao's
        ``MXTensor.to_mx(x, elem_dtype, block_size).dequantize(torch.float32)`` bit for bit.

    Raises:
        ValueError: ``x`` has no dimensions or a last dimension that is not a multiple of the
            block size, or ``fmt`` has no E8M0 scales.

    Example:
        >>> from mixprec.formats import MXFP4
        >>> q = quantize_mx(torch.full((32,), 5.0), MXFP4)
        >>> q.scales.item(), q.elements[0, 0].item()
        (1.0, 4.0)
    """
    if fmt.scale != "e8m0":
        raise ValueError(
            f"quantize_mx needs a format with E8M0 block scales (mxfp8, mxfp4), got {fmt.name!r} "
            f"with {fmt.scale} scales; use quantize_nvfp4 for nvfp4"
        )
    return _mx_blocks(_as_blocks(x, fmt), fmt.element, rounding, generator)


def _mx_blocks(
    blocks: torch.Tensor, element: Format, rounding: Rounding, generator: torch.Generator | None
) -> BlockQuantized:
    """MX quantization of ``(..., blocks, length)``: one E8M0 scale per last-dim block."""
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    biased_exponent = (amax.view(torch.int32) >> _FP32_MANTISSA_BITS) & 0xFF
    # amax's exponent minus the element's top exponent, in E8M0's range; 255 is E8M0's NaN.
    code = (biased_exponent - element.max_exponent).clamp(0, _E8M0_NAN)
    code = torch.where(torch.isnan(amax), _E8M0_NAN, code)
    power = (code << _FP32_MANTISSA_BITS).view(torch.float32)  # code 255 gives inf
    # Encoding divides by at least fp32's smallest normal (torchao's clamp); decoding reads the
    # E8M0 value, 2**-127 for code 0, and NaN for code 255.
    encode = power.clamp(min=_FP32_MIN_NORMAL)
    decode = torch.where(code == 0, 2.0**-127, power)
    decode = torch.where(code == _E8M0_NAN, float("nan"), decode)
    scaled = (blocks / encode).clamp(-element.max, element.max)
    return BlockQuantized(_round_elements(scaled, element, rounding, generator), decode)


def nvfp4_tensor_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """NVFP4's fp32 tensor scale from a tensor's amax: ``amax / (448 * 6)``, floored.

    The quotient is torchao's ``per_tensor_amax_to_scale``; the floor at
    :data:`MIN_TENSOR_SCALE` (2**-121) only touches amax below about 1e-33, where torchao's
    arithmetic overflows (an all-zero tensor would come back NaN).

    Args:
        amax: the largest magnitude in the tensor (NaN and inf pass through and poison the
            result, as in torchao).

    Returns:
        A 0-d float32 tensor.

    Example:
        >>> nvfp4_tensor_scale(2688.0).item(), nvfp4_tensor_scale(0.0).item() == 2.0**-121
        (1.0, True)
    """
    amax = torch.as_tensor(amax).to(torch.float32)
    return (amax / _NVFP4_SCALE_DIVISOR).clamp(min=MIN_TENSOR_SCALE)


def quantize_nvfp4(
    x: torch.Tensor,
    per_tensor_scale: torch.Tensor | float | None = None,
    rounding: Rounding = "nearest",
    generator: torch.Generator | None = None,
) -> BlockQuantized:
    """Quantize ``x`` to NVFP4: fp4 elements, e4m3 scales per 16, an fp32 tensor scale.

    Args:
        x: a float32 tensor whose last dimension is a multiple of 16.
        per_tensor_scale: the fp32 tensor scale; by default :func:`nvfp4_tensor_scale` of
            ``x``'s amax. 1.0 gives single-level scaling (torchao's ``per_tensor_scale=None``).
        rounding: rounding of the elements, ``"nearest"`` or ``"stochastic"``.
        generator: random source for stochastic rounding.

    Returns:
        Elements, e4m3 block scales and the tensor scale; ``.dequantize()`` equals torchao's
        ``NVFP4Tensor.to_nvfp4(x, per_tensor_scale=s).dequantize(torch.float32)`` bit for bit.

    Raises:
        ValueError: a ragged last dimension, or a ``per_tensor_scale`` that is not a finite
            number of at least :data:`MIN_TENSOR_SCALE`.
        TypeError: ``per_tensor_scale`` is neither a number nor a one-element tensor.

    Example:
        >>> x = torch.linspace(-1.0, 1.0, 16)
        >>> q = quantize_nvfp4(x)
        >>> round(q.tensor_scale.item() * 2688, 6), q.scales.item()  # amax 1 lands on 448
        (1.0, 448.0)
    """
    blocks = _as_blocks(x, NVFP4)
    if per_tensor_scale is None:
        tensor_scale = nvfp4_tensor_scale(x.abs().amax()) if x.numel() else torch.tensor(1.0)
    else:
        tensor_scale = _checked_tensor_scale(per_tensor_scale)
    return _nvfp4_blocks(blocks, tensor_scale.to(x.device), rounding, generator)


def _nvfp4_blocks(
    blocks: torch.Tensor,
    tensor_scale: torch.Tensor,
    rounding: Rounding,
    generator: torch.Generator | None,
) -> BlockQuantized:
    """NVFP4 quantization of ``(..., blocks, length)`` under ``tensor_scale``."""
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    block_scale = amax / FP4_E2M1.max
    scales = (block_scale / tensor_scale).clamp(min=_E4M3_MIN_NORMAL, max=FP8_E4M3.max)
    scales = scales.to(FP8_E4M3.dtype).to(torch.float32)
    multiplier = (1.0 / tensor_scale) / scales
    scaled = (blocks * multiplier).clamp(-FP4_E2M1.max, FP4_E2M1.max)
    elements = _round_elements(scaled, FP4_E2M1, rounding, generator)
    return BlockQuantized(elements, scales, tensor_scale)


def fake_quantize(
    x: torch.Tensor,
    fmt: BlockFormat,
    rounding: Rounding = "nearest",
    generator: torch.Generator | None = None,
    per_tensor_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Quantize ``x`` to a block-scaled format and back: what ``mixprec.quantize`` returns.

    Args:
        x: a float32 tensor whose last dimension is a multiple of ``fmt.block_size`` (bfloat16
            and float16 are taken as their exact float32 values).
        fmt: the block-scaled format.
        rounding: rounding of the elements.
        generator: random source for stochastic rounding.
        per_tensor_scale: NVFP4's tensor scale (see :func:`quantize_nvfp4`); only for nvfp4.

    Returns:
        A new float32 tensor of ``x``'s shape.

    Raises:
        ValueError: a ragged last dimension, or ``per_tensor_scale`` for a format without one.

    Example:
        >>> from mixprec.formats import MXFP8
        >>> fake_quantize(torch.tensor([1.0, 3.3] * 16), MXFP8)[:2].tolist()
        [1.0, 3.25]
    """
    if fmt.tensor_scale is None and per_tensor_scale is not None:
        raise ValueError(
            f"per_tensor_scale={per_tensor_scale!r} was given for {fmt.name!r}, which has no "
            f"tensor scale (only nvfp4 has one); drop per_tensor_scale"
        )
    _check_blocks(x, fmt)  # a ragged shape is refused even when empty
    if x.numel() == 0:
        return x.clone()
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # a 2-D x may lie transposed
    block = (1, fmt.block_size)
    fast = _kernel(rows, fmt, block, rounding, generator, per_tensor_scale)
    if fast is not None:
        return fast.reshape(x.shape)
    if x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()  # exact
    if fmt.scale == "e8m0":
        quantized = quantize_mx(x, fmt, rounding, generator)
    else:
        quantized = quantize_nvfp4(x, per_tensor_scale, rounding, generator)
    return quantized.dequantize()


def fake_quantize_tiles(
    x: torch.Tensor,
    fmt: BlockFormat,
    tile: int,
    per_tensor_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Quantize a 2-D ``x`` in square ``tile x tile`` blocks and back (round to nearest).

    Each tile gets one scale from its amax, by the same rule :func:`fake_quantize` applies to a
    1-D block of ``fmt`` (E8M0 for MX; e4m3 under the tensor scale for NVFP4), so a tile whose
    every row has the tile's amax quantizes as those rows do along the last dimension. A square
    tile does not care which dimension is the contraction: ``fake_quantize_tiles(w.T, ...)`` is
    ``fake_quantize_tiles(w, ...).T`` bit for bit, which is why NVIDIA's NVFP4 recipe quantizes
    weights this way (the forward and the input-gradient GEMM use the same quantized weight).

    Args:
        x: a 2-D float32 tensor, both dimensions multiples of ``tile``.
        fmt: ``NVFP4``, ``MXFP4`` or ``MXFP8``.
        tile: the tile's side (16 for NVFP4's recipe).
        per_tensor_scale: NVFP4's tensor scale; by default from ``x``'s amax.

    Returns:
        A new float32 tensor of ``x``'s shape.

    Raises:
        ValueError: ``x`` is not 2-D or a dimension is not a multiple of ``tile``.

    Example:
        >>> from mixprec.formats import NVFP4
        >>> w = torch.linspace(-1, 1, 32 * 16).reshape(32, 16)
        >>> bool((fake_quantize_tiles(w.T, NVFP4, 16) == fake_quantize_tiles(w, NVFP4, 16).T).all())
        True
    """
    _check_tiles(x, fmt, tile)
    fast = _kernel(x, fmt, (tile, tile), "nearest", None, per_tensor_scale)
    if fast is not None:
        return fast
    q = quantize_tiles(x, fmt, tile, per_tensor_scale)
    rows, cols = x.shape
    scale = q.scales if q.tensor_scale is None else q.tensor_scale * q.scales
    values = (q.elements * scale).reshape(rows // tile, cols // tile, tile, tile)
    return values.transpose(1, 2).reshape(rows, cols)


def quantize_tiles(
    x: torch.Tensor,
    fmt: BlockFormat,
    tile: int,
    per_tensor_scale: torch.Tensor | float | None = None,
) -> BlockQuantized:
    """Quantize a 2-D ``x`` in square ``tile x tile`` blocks (round to nearest), unpacked.

    The quantization :func:`fake_quantize_tiles` dequantizes; a GEMM that takes the elements and
    scales themselves (a block-scaled tensor core) needs them as they are.

    Args:
        x: a 2-D float32 tensor, both dimensions multiples of ``tile``.
        fmt: ``NVFP4``, ``MXFP4`` or ``MXFP8``.
        tile: the tile's side.
        per_tensor_scale: NVFP4's tensor scale; by default from ``x``'s amax.

    Returns:
        Elements of shape ``(rows // tile, cols // tile, tile * tile)`` (each tile's rows one
        after the other), scales of shape ``(rows // tile, cols // tile, 1)``, and NVFP4's tensor
        scale.

    Raises:
        ValueError: ``x`` is not 2-D or a dimension is not a multiple of ``tile``.
    """
    _check_tiles(x, fmt, tile)
    rows, cols = x.shape
    tiles = x.reshape(rows // tile, tile, cols // tile, tile).transpose(1, 2)
    tiles = tiles.reshape(rows // tile, cols // tile, tile * tile)
    if fmt.scale == "e8m0":
        return _mx_blocks(tiles, fmt.element, "nearest", None)
    if per_tensor_scale is None:
        scale = nvfp4_tensor_scale(x.abs().amax()) if x.numel() else torch.tensor(1.0)
    else:
        scale = _checked_tensor_scale(per_tensor_scale)
    return _nvfp4_blocks(tiles, scale.to(x.device), "nearest", None)


def _check_tiles(x: torch.Tensor, fmt: BlockFormat, tile: int) -> None:
    if x.dim() != 2 or x.shape[0] % tile or x.shape[1] % tile:
        raise ValueError(
            f"{fmt.name} {tile}x{tile} tiles need a 2-D tensor with both dimensions multiples of "
            f"{tile}, got shape {tuple(x.shape)!r}; pad it or use 1-D blocks"
        )


def _kernel(
    x: torch.Tensor,
    fmt: BlockFormat,
    block: tuple[int, int],
    rounding: Rounding,
    generator: torch.Generator | None,
    per_tensor_scale: torch.Tensor | float | None,
) -> torch.Tensor | None:
    """The one-pass kernel's fake quantization of a validated 2-D ``x`` in ``block`` blocks
    (:mod:`mixprec.blockscaled_build`), or None where it does not apply: the torch path runs."""
    scale = None
    if fmt.tensor_scale is not None and per_tensor_scale is not None:
        scale = _checked_tensor_scale(per_tensor_scale)
    return fake_quantize_blocks(x, fmt, block, rounding, generator, scale)


def _round_elements(
    scaled: torch.Tensor,
    element: Format,
    rounding: Rounding,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Round scaled values (already within ±max, or NaN) to the element format."""
    if element == FP8_E4M3 and rounding == "nearest":
        return scaled.to(FP8_E4M3.dtype).to(torch.float32)  # torch's cast, as torchao's
    if element == FP4_E2M1 and rounding == "nearest":
        return _round_fp4_in_range(scaled)
    return round_to_grid(scaled, element, rounding, generator=generator)


def _round_fp4_in_range(scaled: torch.Tensor) -> torch.Tensor:
    """Nearest fp4 e2m1 of values within ±6 (or NaN), fewer passes than the general grid.

    The grid's spacing is 0.5 below 2, 1 in [2, 4) and 2 in [4, 6], so each range is a
    ``torch.round`` (half to even) of the value over its spacing; the even multiples of a
    spacing are the even fp4 codes there, so the ties land as ``round_to_grid``'s do.
    """
    a = scaled.abs()
    spacing = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))
    return torch.copysign(torch.round(a / spacing) * spacing, scaled)


def _as_blocks(x: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    """``x`` viewed as ``(..., blocks, block_size)``; refuses a shape that does not split."""
    _check_blocks(x, fmt)
    *outer, last = x.shape
    return x.reshape(*outer, last // fmt.block_size, fmt.block_size)


def _check_blocks(x: torch.Tensor, fmt: BlockFormat) -> None:
    """Refuse a shape whose last dimension does not split into blocks (without a copy)."""
    if x.dim() == 0:
        raise ValueError(
            f"{fmt.name} quantizes blocks of {fmt.block_size} along the last dimension, but x is "
            f"a 0-d tensor; give it a last dimension that is a multiple of {fmt.block_size}"
        )
    last = x.shape[-1]
    if last % fmt.block_size:
        padded = -(-last // fmt.block_size) * fmt.block_size
        raise ValueError(
            f"{fmt.name} quantizes blocks of {fmt.block_size} along the last dimension, but x "
            f"has shape {tuple(x.shape)!r}: {last} is not a multiple of the block size "
            f"{fmt.block_size}; pad the last dimension (to {padded}) or choose a format without "
            f"blocks"
        )


def _checked_tensor_scale(scale: object) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise TypeError(
                f"per_tensor_scale must be one number, got a tensor of shape "
                f"{tuple(scale.shape)!r}; pass a float or a 0-d tensor"
            )
        value = scale.detach().reshape(()).to(torch.float32)
    elif isinstance(scale, (int, float)) and not isinstance(scale, bool):
        value = torch.tensor(float(scale), dtype=torch.float32)
    else:
        raise TypeError(
            f"per_tensor_scale must be a float or a 0-d tensor, got {type(scale).__name__} "
            f"{scale!r}; for example nvfp4_tensor_scale(x.abs().amax())"
        )
    if not (torch.isfinite(value) and value >= MIN_TENSOR_SCALE):
        raise ValueError(
            f"per_tensor_scale must be a finite fp32 number of at least 2**-121 "
            f"(MIN_TENSOR_SCALE), got {scale!r}; below it the reciprocal overflows. Use "
            f"nvfp4_tensor_scale(amax) for the scale that puts the largest block on e4m3's max"
        )
    return value
