"""The floating-point number formats of mixed precision training.

Design note: a format is described by its exponent and mantissa widths plus how it spends its
top exponent code (IEEE-style inf/NaN, or the ``fn`` variant of fp8 e4m3 that has no inf and only
one NaN pattern). Every derived number (max, min normal, min subnormal, epsilon) is computed from
those widths, and the tests check the result against ``torch.finfo`` wherever torch has the dtype,
so the table cannot drift from torch. tf32 has no storage dtype of its own: it is fp32 with 10
mantissa bits, stored in fp32 tensors; ``Format.stored_exactly`` says whether ``Format.dtype`` *is*
the format.

fp4 e2m1 has no inf and no NaN at all (``has_nan=False``), so its top code is a number: max 6;
the tests check it against ``ml_dtypes.float4_e2m1fn``. It has no elementwise torch dtype
(``torch.float4_e2m1fn_x2`` packs two values in a byte), so like tf32 it is stored in fp32
tensors. fp4 and the block-scaled formats are formats to *round to*
(``mixprec.quantize``), not formats a tensor is kept in: :data:`FORMATS`, the table a precision
policy draws from, holds the six storage formats only, :data:`BLOCK_FORMATS` the block-scaled ones,
and :data:`ALL_FORMATS` everything (what ``mixprec formats`` lists).

A block-scaled format (:class:`BlockFormat`) is an element format plus one scale per block of
``block_size`` consecutive elements along the last dimension: a power of two (E8M0) for the OCP
MX formats ``mxfp8``/``mxfp4``, an fp8 e4m3 number under an fp32 per-tensor scale for ``nvfp4``.
The rounding itself lives in :mod:`mixprec.blockscaled`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

__all__ = [
    "ALL_FORMATS",
    "BF16",
    "BLOCK_FORMATS",
    "FORMATS",
    "FP4_E2M1",
    "FP8_E4M3",
    "FP8_E5M2",
    "FP16",
    "FP32",
    "MXFP4",
    "MXFP8",
    "NVFP4",
    "STATE_FORMATS",
    "TF32",
    "BlockFormat",
    "Format",
    "FormatLike",
    "resolve_block_format",
    "resolve_format",
    "resolve_state_format",
]


@dataclass(frozen=True)
class Format:
    """A binary floating-point format: its bit layout and the numbers that follow from it.

    Args:
        name: canonical name (``"fp32"``, ``"tf32"``, ``"fp16"``, ``"bf16"``, ``"fp8_e4m3"``,
            ``"fp8_e5m2"``, ``"fp4_e2m1"``).
        exponent_bits: width of the exponent field.
        mantissa_bits: width of the stored fraction (the leading 1 is implicit).
        has_inf: whether the format encodes infinities. fp8 e4m3 (``fn``) does not: its all-ones
            exponent still holds normal numbers, up to 448, and only ``S.1111.111`` is NaN.
        dtype: the torch dtype that stores values of this format.
        stored_exactly: whether ``dtype`` is exactly this format (False for tf32 and fp4 e2m1,
            which are stored in fp32 tensors).
        has_nan: whether some code is NaN. Only meaningful without inf: fp8 e4m3 (``fn``) keeps
            one NaN pattern, fp4 e2m1 none, so its all-ones code is its max, 6.

    Example:
        >>> from mixprec.formats import resolve_format
        >>> resolve_format("half").max
        65504.0
        >>> resolve_format(torch.bfloat16).eps == 2.0**-7
        True
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    has_inf: bool
    dtype: torch.dtype
    stored_exactly: bool = True
    has_nan: bool = True

    @property
    def bits(self) -> int:
        """Total width in bits (sign + exponent + mantissa); tf32 counts 19."""
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def bias(self) -> int:
        """The exponent bias, ``2**(exponent_bits - 1) - 1``."""
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def min_exponent(self) -> int:
        """Unbiased exponent of the smallest normal number."""
        return 1 - self.bias

    @property
    def max_exponent(self) -> int:
        """Unbiased exponent of the largest finite number.

        IEEE-style formats reserve the all-ones exponent for inf/NaN; fp8 e4m3 (``fn``) does not.
        """
        return self.bias if self.has_inf else self.bias + 1

    @property
    def max(self) -> float:
        """Largest finite value (fp16 65504, bf16 ~3.39e38, e4m3 448, e5m2 57344, e2m1 6)."""
        # Without inf the all-ones exponent keeps its numbers except all-ones mantissa (NaN),
        # and that one too where there is no NaN (fp4 e2m1).
        top_mantissa_codes_lost = 2 if not self.has_inf and self.has_nan else 1
        return (2.0 - top_mantissa_codes_lost * 2.0**-self.mantissa_bits) * 2.0**self.max_exponent

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value (fp16 2**-14, bf16 2**-126)."""
        return 2.0**self.min_exponent

    @property
    def min_subnormal(self) -> float:
        """Smallest positive subnormal value (fp16 2**-24)."""
        return 2.0 ** (self.min_exponent - self.mantissa_bits)

    @property
    def eps(self) -> float:
        """Machine epsilon: the gap between 1.0 and the next larger value, ``2**-mantissa_bits``."""
        return 2.0**-self.mantissa_bits

    def describe(self) -> dict[str, object]:
        """The format as a JSON-serialisable dict (what ``mixprec formats --json`` prints)."""
        return {
            "name": self.name,
            "bits": self.bits,
            "exponent_bits": self.exponent_bits,
            "mantissa_bits": self.mantissa_bits,
            "max": self.max,
            "min_normal": self.min_normal,
            "min_subnormal": self.min_subnormal,
            "eps": self.eps,
            "has_inf": self.has_inf,
            "has_nan": self.has_nan,
            "dtype": str(self.dtype).removeprefix("torch."),
            "stored_exactly": self.stored_exactly,
            "aliases": sorted(a for a, f in _ALIASES.items() if f is self and a != self.name),
        }

    def __str__(self) -> str:
        return self.name


FP32 = Format("fp32", 8, 23, has_inf=True, dtype=torch.float32)
TF32 = Format("tf32", 8, 10, has_inf=True, dtype=torch.float32, stored_exactly=False)
FP16 = Format("fp16", 5, 10, has_inf=True, dtype=torch.float16)
BF16 = Format("bf16", 8, 7, has_inf=True, dtype=torch.bfloat16)
FP8_E4M3 = Format("fp8_e4m3", 4, 3, has_inf=False, dtype=torch.float8_e4m3fn)
FP8_E5M2 = Format("fp8_e5m2", 5, 2, has_inf=True, dtype=torch.float8_e5m2)

FP4_E2M1 = Format(
    "fp4_e2m1", 2, 1, has_inf=False, dtype=torch.float32, stored_exactly=False, has_nan=False
)

FORMATS: Mapping[str, Format] = MappingProxyType(
    {f.name: f for f in (FP32, TF32, FP16, BF16, FP8_E4M3, FP8_E5M2)}
)
"""The storage formats by canonical name, widest first: what a tensor (and a policy) can be in."""


@dataclass(frozen=True)
class BlockFormat:
    """A block-scaled format: ``block_size`` consecutive elements share one scale.

    Blocks run along the last dimension. A value is ``element * block_scale`` (times
    ``tensor_scale`` where there is one): the scale stretches the element format's small range
    over each block's magnitude, so one outlier costs precision in its own block only.

    Args:
        name: canonical name (``"mxfp8"``, ``"mxfp4"``, ``"nvfp4"``).
        element: the format of each element (fp8 e4m3 or fp4 e2m1).
        block_size: elements per scale (32 for the OCP MX formats, 16 for NVFP4).
        scale: the format of the block scales: ``"e8m0"`` (an unsigned power of two,
            2**-127 to 2**127, and NaN) or ``"fp8_e4m3"`` (used unsigned).
        tensor_scale: the format of a scale over the whole tensor, or None (NVFP4: ``"fp32"``).

    Example:
        >>> NVFP4.block_size, NVFP4.element.max, NVFP4.bits_per_value
        (16, 6.0, 4.5)
        >>> resolve_block_format("MX-FP4") is MXFP4
        True
    """

    name: str
    element: Format
    block_size: int
    scale: str
    tensor_scale: str | None = None

    @property
    def bits_per_value(self) -> float:
        """Storage per value: element bits plus the block's 8-bit scale shared out (4.25 for mxfp4).

        A per-tensor scale (32 bits for the whole tensor) is not counted.
        """
        return self.element.bits + 8 / self.block_size

    def describe(self) -> dict[str, object]:
        """The format as a JSON-serialisable dict (what ``mixprec formats --json`` prints)."""
        return {
            "name": self.name,
            "bits_per_value": self.bits_per_value,
            "element": self.element.name,
            "element_max": self.element.max,
            "block_size": self.block_size,
            "scale": self.scale,
            "tensor_scale": self.tensor_scale,
            "aliases": sorted(a for a, f in _BLOCK_ALIASES.items() if f is self and a != self.name),
        }

    def __str__(self) -> str:
        return self.name


MXFP8 = BlockFormat("mxfp8", FP8_E4M3, block_size=32, scale="e8m0")
MXFP4 = BlockFormat("mxfp4", FP4_E2M1, block_size=32, scale="e8m0")
NVFP4 = BlockFormat("nvfp4", FP4_E2M1, block_size=16, scale="fp8_e4m3", tensor_scale="fp32")

BLOCK_FORMATS: Mapping[str, BlockFormat] = MappingProxyType(
    {f.name: f for f in (MXFP8, MXFP4, NVFP4)}
)
"""The block-scaled formats by canonical name."""

ALL_FORMATS: Mapping[str, Format | BlockFormat] = MappingProxyType(
    {**FORMATS, FP4_E2M1.name: FP4_E2M1, **BLOCK_FORMATS}
)
"""Every format ``mixprec.quantize`` rounds to, storage formats first (what ``mixprec formats``
lists)."""

_ALIASES: dict[str, Format] = {
    **{name: fmt for name, fmt in FORMATS.items()},
    "fp4_e2m1": FP4_E2M1,
    "float32": FP32,
    "float": FP32,
    "single": FP32,
    "f32": FP32,
    "tensorfloat32": TF32,
    "float16": FP16,
    "half": FP16,
    "f16": FP16,
    "bfloat16": BF16,
    "e4m3": FP8_E4M3,
    "e4m3fn": FP8_E4M3,
    "fp8_e4m3fn": FP8_E4M3,
    "float8_e4m3fn": FP8_E4M3,
    "e5m2": FP8_E5M2,
    "float8_e5m2": FP8_E5M2,
    "fp4": FP4_E2M1,
    "e2m1": FP4_E2M1,
    "e2m1fn": FP4_E2M1,
    "fp4_e2m1fn": FP4_E2M1,
    "float4_e2m1fn": FP4_E2M1,
}
_BLOCK_ALIASES: dict[str, BlockFormat] = {
    **{name: fmt for name, fmt in BLOCK_FORMATS.items()},
    "mx_fp8": MXFP8,
    "mxfp8_e4m3": MXFP8,
    "mx_fp4": MXFP4,
    "mxfp4_e2m1": MXFP4,
    "nv_fp4": NVFP4,
}
_BY_DTYPE: dict[torch.dtype, Format] = {f.dtype: f for f in FORMATS.values() if f.stored_exactly}

FormatLike = str | torch.dtype | Format
"""Anything :func:`resolve_format` accepts: a name or alias, a torch dtype, or a :class:`Format`."""


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def resolve_format(fmt: FormatLike) -> Format:
    """Return the :class:`Format` named by ``fmt``.

    Names are case-insensitive and ``-``/``_`` are interchangeable, so ``"bf16"``,
    ``"bfloat16"``, ``"BF16"``, ``torch.bfloat16`` all give :data:`BF16`; ``"half"`` gives fp16,
    ``"e4m3"`` fp8 e4m3, ``"fp4"`` or ``"e2m1"`` fp4 e2m1. Block-scaled formats (``"nvfp4"``) are
    no single number format: :func:`resolve_block_format` returns them.

    Args:
        fmt: a format name or alias, a torch floating dtype, or a :class:`Format` (returned as is).

    Returns:
        The format.

    Raises:
        ValueError: the name or dtype is not a known format (the message lists the valid names),
            or it names a block-scaled format.
        TypeError: ``fmt`` is neither a string, a ``torch.dtype`` nor a ``Format``.

    Example:
        >>> resolve_format("e5m2").max
        57344.0
        >>> resolve_format("fp4").max
        6.0
    """
    if isinstance(fmt, Format):
        return fmt
    if isinstance(fmt, torch.dtype):
        try:
            return _BY_DTYPE[fmt]
        except KeyError:
            raise ValueError(
                f"dtype {fmt!r} is not a supported number format; "
                f"valid dtypes: {', '.join(str(d) for d in _BY_DTYPE)}"
            ) from None
    if isinstance(fmt, str):
        key = _normalise(fmt)
        if key in _ALIASES:
            return _ALIASES[key]
        names = [*FORMATS, FP4_E2M1.name]
        valid = ", ".join(names)
        if key in _BLOCK_ALIASES:
            block = _BLOCK_ALIASES[key]
            raise ValueError(
                f"{fmt!r} is a block-scaled format ({block.element} values in blocks of "
                f"{block.block_size} with {block.scale} scales), not a single number format: "
                f"mixprec.quantize(x, {block.name!r}) rounds to it, but here one number format "
                f"is needed; valid formats: {valid}"
            )
        raise ValueError(
            f"unknown number format {fmt!r}; valid formats: {valid} "
            f"(aliases: {', '.join(a for a in _ALIASES if a not in names)}; block-scaled "
            f"formats: {', '.join(BLOCK_FORMATS)})"
        )
    raise TypeError(
        f"expected a format name, a torch.dtype or a mixprec Format, got {type(fmt).__name__} "
        f"{fmt!r}; for example 'bf16' or torch.bfloat16"
    )


def resolve_block_format(fmt: str | BlockFormat) -> BlockFormat:
    """Return the :class:`BlockFormat` named by ``fmt`` (case and ``-``/``_`` do not matter).

    Args:
        fmt: ``"mxfp8"``, ``"mxfp4"``, ``"nvfp4"`` (or an alias such as ``"mx-fp4"``), or a
            :class:`BlockFormat` (returned as is).

    Returns:
        The block-scaled format.

    Raises:
        ValueError: ``fmt`` names no block-scaled format; the message lists them.
        TypeError: ``fmt`` is neither a string nor a ``BlockFormat``.

    Example:
        >>> resolve_block_format("mxfp8").element.name
        'fp8_e4m3'
    """
    if isinstance(fmt, BlockFormat):
        return fmt
    if not isinstance(fmt, str):
        raise TypeError(
            f"expected a block-scaled format name or a mixprec BlockFormat, got "
            f"{type(fmt).__name__} {fmt!r}; for example 'nvfp4'"
        )
    try:
        return _BLOCK_ALIASES[_normalise(fmt)]
    except KeyError:
        raise ValueError(
            f"unknown block-scaled format {fmt!r}; valid block-scaled formats: "
            f"{', '.join(BLOCK_FORMATS)} (aliases: "
            f"{', '.join(a for a in _BLOCK_ALIASES if a not in BLOCK_FORMATS)})"
        ) from None


STATE_FORMATS: tuple[str, ...] = ("fp32", "bf16", "fp16", "fp8", "int8")
"""The formats an optimizer's per-element states can be stored in between steps (a policy's
``state``): fp32 as torch makes them, bf16 (rounded stochastically) and fp16 (rounded by the
update rule), and the block-scaled 8-bit ones, ``fp8`` (e4m3 codes, an fp32 scale per block of
256) and ``int8`` (block-wise dynamic codes, an fp32 absmax per block of 256); see
:mod:`mixprec.optim.quantized_states`."""
_STATE_ALIASES = {"fp8_e4m3": "fp8", "e4m3": "fp8", "float32": "fp32", "bfloat16": "bf16"}
_STATE_REFUSED = {
    "tf32": "tf32 is a matmul mode, not a storage format (its tensors are fp32)",
    "fp8_e5m2": "e5m2 keeps 2 fraction bits, too few for moments under block scales",
    "e5m2": "e5m2 keeps 2 fraction bits, too few for moments under block scales",
}


def resolve_state_format(state: object) -> str:
    """The canonical name in :data:`STATE_FORMATS` of an optimizer-state format.

    Names are case-insensitive; ``"fp8_e4m3"`` is ``"fp8"``.

    Raises:
        TypeError: ``state`` is not a string.
        ValueError: another name (``tf32`` and ``fp8_e5m2`` are refused with the reason).

    Example:
        >>> resolve_state_format("FP8_E4M3")
        'fp8'
    """
    if not isinstance(state, str):
        raise TypeError(
            f"an optimizer-state format is a name, one of "
            f"{', '.join(map(repr, STATE_FORMATS))}; got {type(state).__name__} {state!r}"
        )
    name = state.strip().lower().replace("-", "_")
    name = _STATE_ALIASES.get(name, name)
    if name in STATE_FORMATS:
        return name
    why = _STATE_REFUSED.get(name, "not an optimizer-state format")
    raise ValueError(f"state={state!r}: {why}; choose one of {', '.join(map(repr, STATE_FORMATS))}")
