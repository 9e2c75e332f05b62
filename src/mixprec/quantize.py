"""Rounding fp32 tensors to a lower-precision format, without the hardware for it.

Design note: every format here is a sign plus a grid of equally spaced values in each binade. For a
finite ``|x|`` the grid step (one ulp of the target format) is ``2**(max(e, emin) - mantissa_bits)``
where ``e`` is the binary exponent of ``x`` and ``emin`` the format's smallest normal exponent (the
clamp is what makes subnormals come out right). Dividing by a power of two and multiplying back is
exact in fp32, so rounding reduces to rounding ``|x| / step`` to an integer: half-to-even for
``nearest``, up with probability equal to the fractional part for ``stochastic``. Overflow, inf, NaN
and the sign are settled afterwards with ``where``/``copysign``.

That grid rounding needs no dtype for the target; the tests check it bit for bit against torch's
own casts for fp16, bf16 and both fp8 formats. It serves stochastic rounding to fp16 and fp8.
Formats with fp32's exponent range (bf16, tf32) share fp32's grid in every binade, so for them
rounding is cheaper integer arithmetic on the bit pattern (stochastic bf16, tf32). Where torch has
the dtype, nearest rounding calls torch's single fused cast: the same bits, several times faster
than a dozen elementwise passes, which keeps it memory-bound.

Overflow, as torch's casts do it: fp16, bf16 and fp8 e5m2 overflow to ±inf; fp8 e4m3 (``fn``) has no
inf, and torch saturates it: anything beyond 448, ±inf included, becomes ±448. ``saturate=True``
applies that rule to every format (finite overflow and ±inf become ±max). NaN stays NaN.

fp4 e2m1 and the block-scaled formats (mxfp8, mxfp4, nvfp4) are rounded by
:mod:`mixprec.blockscaled`, bit for bit as ml_dtypes and torchao do it; ``quantize`` dispatches to
it and adds the gradient rule below.

Gradients: rounding is a step function, whose true derivative is zero almost everywhere, so a
``quantize`` inside a model would stop all learning below it. Every mode follows one rule instead,
the straight-through estimator: the backward pass treats the rounding as the identity and hands
the incoming gradient on unchanged (gradient 1, not rounded to the format), for every format,
both rounding modes and saturated or overflowing elements alike. Without it the gradient would
depend on the implementation path: a torch cast passes the gradient through (rounded to the
format on the way back), the grid and bit arithmetic pass none.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch

from mixprec.formats import (
    FP4_E2M1,
    FP32,
    BlockFormat,
    Format,
    FormatLike,
    resolve_block_format,
    resolve_format,
)

__all__ = ["Rounding", "quantize"]

Rounding = Literal["nearest", "stochastic"]
_ROUNDINGS: tuple[str, ...] = get_args(Rounding)
_LOSSLESS_INPUTS = (torch.float32, torch.float16, torch.bfloat16)

_FP32_MANTISSA_BITS = 23
_FP32_BIAS = 127
_FP32_MIN_NORMAL_EXPONENT = -126
_FP32_MIN_SUBNORMAL_EXPONENT = -149


def quantize(
    x: torch.Tensor,
    fmt: FormatLike | BlockFormat,
    rounding: Rounding = "nearest",
    saturate: bool = False,
    generator: torch.Generator | None = None,
    *,
    per_tensor_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Round ``x`` to the values representable in ``fmt``, returned as a float32 tensor.

    ``nearest`` rounds half to even and is bit-identical to ``x.to(dtype).float()`` for every format
    torch has a dtype for (subnormals, signed zeros, inf and NaN included). ``stochastic`` rounds up
    with probability equal to the distance from the lower neighbour, in ulps, so the expected result
    is ``x`` itself; only the two neighbours of ``x`` can come out, and the same ``generator`` state
    gives the same result.

    ``fp4_e2m1`` rounds as ``ml_dtypes.float4_e2m1fn`` converts (saturating at ±6; NaN, which fp4
    cannot hold, becomes a zero). The block-scaled formats ``mxfp8``, ``mxfp4`` (32-element
    blocks, E8M0 scales) and ``nvfp4`` (16-element blocks, e4m3 scales under an fp32 tensor scale)
    scale blocks along the last dimension and return the dequantized values, bit for bit those of
    torchao's ``MXTensor.to_mx(...).dequantize()`` and ``NVFP4Tensor.to_nvfp4(...).dequantize()``;
    ``stochastic`` rounds their elements and keeps their scales (see :mod:`mixprec.blockscaled`).

    Args:
        x: a float32 tensor (float16 and bfloat16 are accepted too: they widen to fp32 exactly).
        fmt: the target format: a name such as ``"bf16"`` or ``"nvfp4"``, a torch dtype, a
            :class:`Format` or a :class:`~mixprec.formats.BlockFormat`.
        rounding: ``"nearest"`` (half to even) or ``"stochastic"``.
        saturate: overflow (and ±inf) becomes ±max instead of ±inf. fp8 e4m3, fp4 e2m1 and the
            block formats' elements have no inf and always saturate, as torch's cast does.
        generator: the random source for stochastic rounding, on ``x``'s device.
        per_tensor_scale: nvfp4 only: the fp32 tensor scale (a float or 0-d tensor, at least
            2**-121); by default ``amax(|x|) / (448 * 6)``, as torchao's
            ``per_tensor_amax_to_scale``. 1.0 gives single-level scaling.

    Returns:
        A new float32 tensor of the same shape (``x`` itself when both ``fmt`` and ``x`` are
        fp32).

    Raises:
        TypeError: ``x`` is not a tensor, or not fp32/fp16/bf16; ``saturate`` is not a bool.
        ValueError: unknown format or rounding mode, a ``generator`` with nearest rounding, a
            last dimension that is not a multiple of a block format's block size, or a
            ``per_tensor_scale`` for another format than nvfp4 (or out of range).

    Gradient:
        Straight-through: the gradient with respect to ``x`` is the incoming gradient, unchanged,
        in every format and mode (see the module's design note).

    Example:
        >>> x = torch.tensor([1.0 + 2.0**-9, 70000.0])
        >>> quantize(x, "bf16").tolist()
        [1.0, 70144.0]
        >>> quantize(x, "fp16").tolist()
        [1.001953125, inf]
        >>> quantize(x, "fp16", saturate=True).tolist()
        [1.001953125, 65504.0]
        >>> quantize(torch.tensor([2.5, 7.0]), "fp4_e2m1").tolist()
        [2.0, 6.0]
        >>> quantize(torch.tensor([0.1, 1.0] * 16), "mxfp4")[:2].tolist()
        [0.125, 1.0]
    """
    fmt = _resolve(fmt)
    x = _as_fp32(x)
    _check_saturate(saturate)
    if rounding not in _ROUNDINGS:
        raise ValueError(
            f"unknown rounding mode {rounding!r}; valid modes: {', '.join(map(repr, _ROUNDINGS))}"
        )
    if generator is not None and rounding != "stochastic":
        raise ValueError(
            f"a generator was given with rounding={rounding!r}, which uses no randomness; "
            "pass rounding='stochastic' or drop the generator"
        )
    has_tensor_scale = isinstance(fmt, BlockFormat) and fmt.tensor_scale is not None
    if per_tensor_scale is not None and not has_tensor_scale:
        raise ValueError(
            f"per_tensor_scale={per_tensor_scale!r} was given for format {fmt.name!r}; only "
            "nvfp4 has a tensor scale: pass fmt='nvfp4' or drop per_tensor_scale"
        )
    if fmt == FP32:
        return x
    if x.requires_grad and torch.is_grad_enabled():
        return _StraightThrough.apply(x, fmt, rounding, saturate, generator, per_tensor_scale)
    return _round(x, fmt, rounding, saturate, generator, per_tensor_scale)


def _resolve(fmt: FormatLike | BlockFormat) -> Format | BlockFormat:
    if isinstance(fmt, BlockFormat):
        return fmt
    if isinstance(fmt, str):
        try:
            return resolve_block_format(fmt)
        except ValueError:
            pass  # not a block format: resolve_format names every valid format if it is unknown
    return resolve_format(fmt)


class _StraightThrough(torch.autograd.Function):
    """Rounding in the forward pass, the identity in the backward pass."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        fmt: Format,
        rounding: Rounding,
        saturate: bool,
        generator: torch.Generator | None,
        per_tensor_scale: torch.Tensor | float | None,
    ) -> torch.Tensor:
        return _round(x, fmt, rounding, saturate, generator, per_tensor_scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None, None]:
        return grad, None, None, None, None, None


def _round(
    x: torch.Tensor,
    fmt: Format | BlockFormat,
    rounding: Rounding,
    saturate: bool,
    generator: torch.Generator | None,
    per_tensor_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """:func:`quantize` on validated arguments, without autograd: the fastest exact path."""
    # mixprec.blockscaled is imported here, not above: it builds on round_to_grid below.
    if isinstance(fmt, BlockFormat):
        from mixprec.blockscaled import fake_quantize

        return fake_quantize(x, fmt, rounding, generator, per_tensor_scale)
    if fmt == FP4_E2M1:
        from mixprec.blockscaled import round_fp4_e2m1

        return round_fp4_e2m1(x, rounding, generator)
    if rounding == "nearest" and fmt.stored_exactly:
        rounded = x.to(fmt.dtype).to(torch.float32)
    elif fmt.exponent_bits == FP32.exponent_bits:
        rounded = _round_low_bits(x, fmt, rounding, generator)
    else:
        return round_to_grid(x, fmt, rounding, saturate=saturate, generator=generator)
    if saturate and fmt.has_inf:
        rounded.clamp_(-fmt.max, fmt.max)  # in place: `rounded` is always a new tensor here
    return rounded


def round_to_grid(
    x: torch.Tensor,
    fmt: Format,
    rounding: Rounding = "nearest",
    saturate: bool = False,
    generator: torch.Generator | None = None,
    *,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """The emulated rounding behind :func:`quantize`: pure fp32 arithmetic on ``x``'s grid step.

    It needs no dtype for ``fmt``; for formats that have one, ``rounding="nearest"`` gives the same
    bits as torch's cast. Prefer :func:`quantize`, which validates its input and takes the fastest
    exact path.

    Args:
        x: a float32 tensor.
        fmt: the target format.
        rounding: ``"nearest"`` or ``"stochastic"``.
        saturate: overflow becomes ±max instead of ±inf (always the case without inf).
        generator: random source for stochastic rounding.
        uniform: the draws of stochastic rounding, given instead of a ``generator``: a float32
            tensor of ``x``'s shape with values in [0, 1) that are multiples of 2**-24 (a
            counter-based generator's, for instance). Element ``i`` rounds up when
            ``uniform[i]`` is below its fraction of an ulp.

    Returns:
        A new float32 tensor holding values of ``fmt``.

    Raises:
        TypeError: ``saturate`` is not a bool.
        ValueError: ``uniform`` is given with a ``generator`` or nearest rounding, or has
            another shape than ``x``.
    """
    _check_saturate(saturate)
    if uniform is not None and (generator is not None or rounding != "stochastic"):
        raise ValueError(
            f"uniform draws were given with rounding={rounding!r} and generator={generator!r}; "
            "they replace the generator of rounding='stochastic': pass one or the other"
        )
    if uniform is not None and uniform.shape != x.shape:
        raise ValueError(
            f"uniform has shape {tuple(uniform.shape)!r} but x {tuple(x.shape)!r}; "
            "give one draw per element"
        )
    magnitude = x.abs()
    step = _grid_step(magnitude, fmt)
    scaled = magnitude / step  # exact: step is a power of two and the quotient fits 24 bits
    if rounding == "nearest":
        units = torch.round(scaled)  # half to even
    else:
        units = torch.floor(scaled)
        fraction = scaled - units  # exact
        # rand() yields multiples of 2**-24, so P(up) == fraction exactly whenever the fraction is
        # a multiple of 2**-24 (all inputs in the format's normal range); deep in the subnormal
        # range it is rounded up to the next multiple: a bias below 2**-24 ulp.
        draws = (
            torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
            if uniform is None
            else uniform
        )
        units += draws < fraction
    rounded = units * step
    overflow_to_max = saturate or not fmt.has_inf
    limit = torch.tensor(fmt.max if overflow_to_max else float("inf"), device=x.device)
    rounded = torch.where(rounded > fmt.max, limit, rounded)
    rounded = torch.where(torch.isnan(x), x, rounded)
    return torch.copysign(rounded, x)


def _round_low_bits(
    x: torch.Tensor, fmt: Format, rounding: Rounding, generator: torch.Generator | None
) -> torch.Tensor:
    """Round to a format with fp32's exponent range (bf16, tf32) by dropping low mantissa bits.

    With the same exponent range every fp32 value, subnormals included, shares its grid with the
    target, so rounding is integer arithmetic on the bit pattern: add half an ulp minus one plus the
    kept lowest bit (half to even), or a uniform random integer below one ulp (stochastic), then
    clear the dropped bits. A carry moves into the exponent by itself, up to inf. This is several
    times faster than :func:`round_to_grid`.
    """
    dropped = _FP32_MANTISSA_BITS - fmt.mantissa_bits
    bits = x.view(torch.int32)
    if rounding == "nearest":
        increment = ((bits >> dropped) & 1) + ((1 << (dropped - 1)) - 1)
    else:
        increment = torch.empty_like(bits).random_(0, 1 << dropped, generator=generator)
    increment += bits
    increment &= -(1 << dropped)
    rounded = increment.view(torch.float32)
    return torch.where(torch.isnan(x), x, rounded)  # a NaN payload in the low bits must not vanish


def _grid_step(magnitude: torch.Tensor, fmt: Format) -> torch.Tensor:
    """One ulp of ``fmt`` at each element of ``magnitude`` (>= 0), as an exact power of two.

    Built directly from fp32 bits so that steps below fp32's normal range (bf16 subnormals have a
    step of 2**-133) are exact too. Elements that are inf or NaN get a finite, meaningless step.
    """
    biased = magnitude.view(torch.int32) >> _FP32_MANTISSA_BITS  # sign bit is 0 for |x|
    exponent = (biased - _FP32_BIAS).clamp(min=fmt.min_exponent, max=fmt.max_exponent)
    step_exponent = exponent - fmt.mantissa_bits
    normal_bits = (step_exponent + _FP32_BIAS).clamp(min=1) << _FP32_MANTISSA_BITS
    subnormal_bits = 1 << (step_exponent - _FP32_MIN_SUBNORMAL_EXPONENT).clamp(min=0, max=22)
    bits = torch.where(step_exponent >= _FP32_MIN_NORMAL_EXPONENT, normal_bits, subnormal_bits)
    return bits.view(torch.float32)


def _check_saturate(saturate: object) -> None:
    if not isinstance(saturate, bool):
        raise TypeError(
            f"saturate must be True or False, got {type(saturate).__name__} {saturate!r}; "
            "pass saturate=True to turn overflow into ±max, or leave the default False"
        )


def _as_fp32(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize expects a torch.Tensor, got {type(x).__name__} {x!r}")
    if x.dtype not in _LOSSLESS_INPUTS:
        raise TypeError(
            f"quantize expects a float32 tensor (float16 and bfloat16 also widen exactly), got "
            f"dtype {x.dtype!r}; valid dtypes: {', '.join(map(str, _LOSSLESS_INPUTS))}. "
            "Convert explicitly first, e.g. x.float(), knowing that float64 -> float32 rounds once."
        )
    return x.to(torch.float32)
