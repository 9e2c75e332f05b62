"""Gradient underflow accounting: what a loss scale would lose when gradients are stored in fp16.

Dynamic loss scaling only sees overflow: it halves the scale when a gradient becomes inf and
never learns how many small gradients flushed to zero meanwhile. These pure functions count both.
A gradient element ``g`` (fp32, unscaled) is stored as ``round_fmt(g * scale)``; it is

* *flushed* when ``g != 0`` and the rounded value is 0,
* *subnormal* when the rounded value is non-zero but below the format's smallest normal number
  (it keeps fewer significant bits than the format's mantissa),
* *overflowed* when the rounded value is ±inf.

Fractions are of the finite non-zero elements. Rounding is :func:`mixprec.quantize`, bit-exact
with torch's cast. The counts describe the gradients you pass: gradients computed under 16-bit
autocast have already lost their flushed elements (they are zeros now), so for the true picture
pass gradients from an fp32 backward, as the advisor does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from mixprec.diagnostics._checks import check_scale
from mixprec.formats import Format, FormatLike, resolve_format
from mixprec.quantize import quantize

__all__ = [
    "UnderflowCounts",
    "UnderflowReport",
    "exponent_histogram",
    "gradient_counts",
    "largest_safe_scale",
    "underflow_report",
]


@dataclass(frozen=True)
class UnderflowCounts:
    """Element counts for one gradient (or the total) at one scale, in one format.

    Args:
        name: the parameter's name (``"total"`` for the sum).
        numel: elements.
        nonzero: finite non-zero elements in fp32.
        flushed: non-zero elements that round to zero.
        subnormal: elements that round to a non-zero subnormal.
        overflow: finite elements that round to ±inf.
        nonfinite: elements already inf or NaN in fp32.
        absmax: largest finite magnitude of the unscaled gradient (0.0 if none).
        absmin: smallest non-zero finite magnitude of the unscaled gradient (inf if none).
    """

    name: str
    numel: int
    nonzero: int
    flushed: int
    subnormal: int
    overflow: int
    nonfinite: int
    absmax: float
    absmin: float

    @property
    def flushed_fraction(self) -> float:
        """Flushed elements over finite non-zero elements (0.0 when there are none)."""
        return self.flushed / self.nonzero if self.nonzero else 0.0

    @property
    def subnormal_fraction(self) -> float:
        """Subnormal elements over finite non-zero elements."""
        return self.subnormal / self.nonzero if self.nonzero else 0.0

    @property
    def overflow_fraction(self) -> float:
        """Overflowed elements over finite non-zero elements."""
        return self.overflow / self.nonzero if self.nonzero else 0.0


@dataclass(frozen=True)
class UnderflowReport:
    """Underflow and overflow of a model's gradients at one loss scale, per parameter and total.

    Args:
        format: the storage format's name (``"fp16"``).
        scale: the loss scale the counts are for.
        params: per-parameter counts, in parameter order.
        total: the sums over all parameters.
        largest_safe_scale: the largest power of two at which no finite gradient element
            overflows (inf when every gradient is zero).
    """

    format: str
    scale: float
    params: tuple[UnderflowCounts, ...]
    total: UnderflowCounts
    largest_safe_scale: float

    def metrics(self) -> dict[str, float]:
        """The totals as flat numbers with stable keys, for a metrics.jsonl line."""
        return {
            "underflow_fraction": self.total.flushed_fraction,
            "subnormal_fraction": self.total.subnormal_fraction,
            "overflow_fraction": self.total.overflow_fraction,
            "largest_safe_scale": self.largest_safe_scale,
        }

    def worst(self, n: int = 5) -> list[UnderflowCounts]:
        """The ``n`` parameters with the largest flushed fraction."""
        return sorted(self.params, key=lambda c: c.flushed_fraction, reverse=True)[:n]

    def __str__(self) -> str:
        t = self.total
        return (
            f"{self.format} at scale {self.scale:g}: {t.flushed_fraction:.2%} of {t.nonzero} "
            f"non-zero gradient elements flush to zero, {t.subnormal_fraction:.2%} are subnormal, "
            f"{t.overflow_fraction:.2%} overflow; largest safe scale {self.largest_safe_scale:g}"
        )


def largest_safe_scale(absmax: float, fmt: FormatLike = "fp16") -> float:
    """The largest power of two ``s`` with ``absmax * s <= fmt.max``.

    Args:
        absmax: the largest gradient magnitude (unscaled), >= 0.
        fmt: the storage format.

    Returns:
        The scale; inf for ``absmax == 0`` (any scale is safe).

    Raises:
        ValueError: ``absmax`` is negative, inf or NaN.
        TypeError: ``absmax`` is not a number.

    Example:
        >>> largest_safe_scale(1.0)  # fp16 max is 65504 < 2**16
        32768.0
    """
    fmt = resolve_format(fmt)
    if isinstance(absmax, bool) or not isinstance(absmax, (int, float)):
        raise TypeError(f"absmax must be a number, got {type(absmax).__name__} {absmax!r}")
    if not (math.isfinite(absmax) and absmax >= 0):
        raise ValueError(
            f"absmax must be a finite magnitude >= 0, got {absmax!r}; an inf/NaN gradient "
            "overflows at every scale, so find its origin first (MixedPrecision(trace=True))"
        )
    if absmax == 0:
        return math.inf
    return 2.0 ** math.floor(math.log2(fmt.max / absmax))


def gradient_counts(
    grad: torch.Tensor, scale: float, fmt: FormatLike = "fp16", name: str = ""
) -> UnderflowCounts:
    """Count what one unscaled gradient would lose when stored in ``fmt`` at loss scale ``scale``.

    Args:
        grad: the unscaled gradient (fp32, fp16 or bf16; sparse gradients count their values).
        scale: the loss scale, a positive finite number.
        fmt: the storage format (default fp16).
        name: a label stored in the result.

    Returns:
        The counts (one host sync).

    Raises:
        TypeError: ``grad`` is not a floating tensor, or ``scale`` not a number.
        ValueError: ``scale`` is not positive and finite; unknown format.

    Example:
        >>> c = gradient_counts(torch.tensor([1e-9, 1e-6, 1.0, 0.0]), scale=1.0)
        >>> c.nonzero, c.flushed, c.subnormal
        (3, 1, 1)
    """
    fmt = resolve_format(fmt)
    scale = check_scale(scale)
    return _counts(_as_fp32(grad), scale, fmt, name)


def _as_fp32(grad: object) -> torch.Tensor:
    if not isinstance(grad, torch.Tensor) or not grad.is_floating_point():
        raise TypeError(f"a gradient must be a floating tensor, got {type(grad).__name__} {grad!r}")
    return (grad.coalesce().values() if grad.is_sparse else grad).detach().to(torch.float32)


def _counts(g: torch.Tensor, scale: float, fmt: Format, name: str) -> UnderflowCounts:
    finite = torch.isfinite(g)
    magnitude = g.abs()
    nonzero = finite & (g != 0)
    stored = quantize(g * scale, fmt)  # the product overflowing fp32 counts as overflow too
    stored_zero = stored == 0
    flushed = nonzero & stored_zero
    overflow = nonzero & torch.isinf(stored)
    subnormal = nonzero & ~stored_zero & (stored.abs() < fmt.min_normal)
    zero = magnitude.new_zeros(())
    inf = magnitude.new_full((), math.inf)
    stats = torch.stack(
        [
            nonzero.sum().float(),
            flushed.sum().float(),
            subnormal.sum().float(),
            overflow.sum().float(),
            (~finite).sum().float(),
            torch.where(nonzero, magnitude, zero).amax() if g.numel() else zero,
            torch.where(nonzero, magnitude, inf).amin() if g.numel() else inf,
        ]
    ).tolist()
    nonzero_n, flushed_n, subnormal_n, overflow_n, nonfinite_n = (int(v) for v in stats[:5])
    return UnderflowCounts(
        name, g.numel(), nonzero_n, flushed_n, subnormal_n, overflow_n, nonfinite_n, *stats[5:]
    )


def _named_grads(
    grads: nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
) -> list[tuple[str, torch.Tensor]]:
    if isinstance(grads, nn.Module):
        named = list(grads.named_parameters())
        if not named:
            raise ValueError(
                f"model {type(grads).__name__} has no parameters, so it has no gradients to count"
            )
        with_grad = [(n, p.grad) for n, p in named if p.grad is not None]
        if not with_grad:
            raise RuntimeError(
                f"no parameter of {type(grads).__name__} has a gradient yet; call backward() "
                "before underflow_report(model, ...)"
            )
        return with_grad
    items = list(grads.items()) if isinstance(grads, Mapping) else list(grads)
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
            raise TypeError(
                f"expected (name, gradient tensor) pairs, got {item!r}; pass a model, a dict "
                "{name: grad} or an iterable of (name, grad)"
            )
    return items


def underflow_report(
    grads: nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    scale: float,
    fmt: FormatLike = "fp16",
    *,
    scaled: bool = False,
) -> UnderflowReport:
    """Per-parameter and total underflow/overflow of gradients stored in ``fmt`` at ``scale``.

    Args:
        grads: a model (the ``.grad`` of its parameters), a dict or iterable of
            ``(name, gradient)`` pairs.
        scale: the loss scale (e.g. ``scaler.get_scale()``).
        fmt: the storage format of the scaled gradients (default fp16).
        scaled: the gradients still carry the scale (before ``unscale_``); they are divided by
            it first (exactly, for the power-of-two scales of dynamic scaling).

    Returns:
        An :class:`UnderflowReport`.

    Raises:
        ValueError: ``scale`` is not positive and finite; a model without parameters.
        RuntimeError: a model none of whose parameters has a gradient yet.
        TypeError: ``grads`` is not one of the accepted forms.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> model.weight.grad = torch.tensor([[2.0**-30, 1.0]])
        >>> model.bias.grad = torch.tensor([0.5])
        >>> report = underflow_report(model, scale=2.0**16)
        >>> report.total.flushed, report.total.overflow, report.largest_safe_scale
        (0, 1, 32768.0)
    """
    fmt = resolve_format(fmt)
    scale = check_scale(scale)
    if not isinstance(scaled, bool):
        raise TypeError(f"scaled must be a bool, got {type(scaled).__name__} {scaled!r}")
    per_param = []
    for name, grad in _named_grads(grads):
        unscaled = _as_fp32(grad)
        if scaled:
            unscaled = unscaled / scale
        per_param.append(_counts(unscaled, scale, fmt, name))
    absmax = max((c.absmax for c in per_param), default=0.0)
    total = UnderflowCounts(
        "total",
        sum(c.numel for c in per_param),
        sum(c.nonzero for c in per_param),
        sum(c.flushed for c in per_param),
        sum(c.subnormal for c in per_param),
        sum(c.overflow for c in per_param),
        sum(c.nonfinite for c in per_param),
        absmax,
        min((c.absmin for c in per_param), default=math.inf),
    )
    return UnderflowReport(
        fmt.name, scale, tuple(per_param), total, largest_safe_scale(absmax, fmt)
    )


def exponent_histogram(
    grads: Iterable[torch.Tensor], low: int = -40, high: int = 16
) -> tuple[list[int], list[int]]:
    """How many finite non-zero gradient elements fall in each binade ``[2**e, 2**(e+1))``.

    Elements below ``2**low`` are counted in the ``low`` bin and those above ``2**high`` in the
    ``high`` bin, so nothing is dropped. This is the histogram ``mixprec compare`` plots against
    the fp16 limits (``2**-24`` smallest subnormal, ``2**-14`` smallest normal, 65504 max).

    Args:
        grads: gradient tensors (unscaled).
        low: the lowest exponent bin.
        high: the highest exponent bin (> low).

    Returns:
        ``(exponents, counts)``, both of length ``high - low + 1``.

    Example:
        >>> exps, counts = exponent_histogram([torch.tensor([0.75, 3.0, 0.0])], low=-2, high=2)
        >>> list(zip(exps, counts))
        [(-2, 0), (-1, 1), (0, 0), (1, 1), (2, 0)]
    """
    if not (isinstance(low, int) and isinstance(high, int)) or low >= high:
        raise ValueError(f"need integers low < high, got low={low!r}, high={high!r}")
    counts = torch.zeros(high - low + 1, dtype=torch.int64)
    for grad in grads:
        g = grad.detach().float().reshape(-1)
        g = g[torch.isfinite(g) & (g != 0)]
        _, exponent = torch.frexp(g)  # |g| = m * 2**exponent with m in [0.5, 1)
        binade = (exponent.to(torch.int64) - 1).clamp(low, high) - low
        counts += torch.bincount(binade.cpu(), minlength=high - low + 1)
    return list(range(low, high + 1)), counts.tolist()
