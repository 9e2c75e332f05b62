"""The floating-point number formats of mixed precision training.

Design note: a format is described by its exponent and mantissa widths plus how it spends its
top exponent code (IEEE-style inf/NaN, or the ``fn`` variant of fp8 e4m3 that has no inf and only
one NaN pattern). Every derived number (max, min normal, min subnormal, epsilon) is computed from
those widths, and the tests check the result against ``torch.finfo`` wherever torch has the dtype,
so the table cannot drift from torch. tf32 has no storage dtype of its own: it is fp32 with 10
mantissa bits, stored in fp32 tensors; ``Format.stored_exactly`` says whether ``Format.dtype`` *is*
the format.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

__all__ = [
    "BF16",
    "FORMATS",
    "FP8_E4M3",
    "FP8_E5M2",
    "FP16",
    "FP32",
    "TF32",
    "Format",
    "FormatLike",
    "resolve_format",
]


@dataclass(frozen=True)
class Format:
    """A binary floating-point format: its bit layout and the numbers that follow from it.

    Args:
        name: canonical name (``"fp32"``, ``"tf32"``, ``"fp16"``, ``"bf16"``, ``"fp8_e4m3"``,
            ``"fp8_e5m2"``).
        exponent_bits: width of the exponent field.
        mantissa_bits: width of the stored fraction (the leading 1 is implicit).
        has_inf: whether the format encodes infinities. fp8 e4m3 (``fn``) does not: its all-ones
            exponent still holds normal numbers, up to 448, and only ``S.1111.111`` is NaN.
        dtype: the torch dtype that stores values of this format.
        stored_exactly: whether ``dtype`` is exactly this format (False for tf32, which is stored in
            fp32 tensors).

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
        """Largest finite value (fp16 65504, bf16 ~3.39e38, e4m3 448, e5m2 57344)."""
        # Without inf the all-ones exponent keeps its numbers except all-ones mantissa (NaN).
        top_mantissa_codes_lost = 1 if self.has_inf else 2
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

FORMATS: Mapping[str, Format] = MappingProxyType(
    {f.name: f for f in (FP32, TF32, FP16, BF16, FP8_E4M3, FP8_E5M2)}
)
"""Every format by canonical name, widest first."""

_ALIASES: dict[str, Format] = {
    **{name: fmt for name, fmt in FORMATS.items()},
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
    ``"e4m3"`` fp8 e4m3.

    Args:
        fmt: a format name or alias, a torch floating dtype, or a :class:`Format` (returned as is).

    Returns:
        The format.

    Raises:
        ValueError: the name or dtype is not a known format; the message lists the valid names.
        TypeError: ``fmt`` is neither a string, a ``torch.dtype`` nor a ``Format``.

    Example:
        >>> resolve_format("e5m2").max
        57344.0
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
        try:
            return _ALIASES[_normalise(fmt)]
        except KeyError:
            raise ValueError(
                f"unknown number format {fmt!r}; valid formats: {', '.join(FORMATS)} "
                f"(aliases: {', '.join(a for a in _ALIASES if a not in FORMATS)})"
            ) from None
    raise TypeError(
        f"expected a format name, a torch.dtype or a mixprec Format, got {type(fmt).__name__} "
        f"{fmt!r}; for example 'bf16' or torch.bfloat16"
    )
