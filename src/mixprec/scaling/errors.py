"""The scaler's error types: mixprec's kinds, catchable as the types torch's scaler raises.

Design note: mixprec raises ``ValueError`` for bad values, ``TypeError`` for bad types and
``RuntimeError`` for a wrong call order. ``torch.amp.GradScaler`` is less regular: a call before
``scale()`` or an ``update()`` with nothing checked is an ``AssertionError``, a bad growth or
backoff factor too, an empty state dict a ``RuntimeError`` and a non-tensor passed to
``scale()`` a ``ValueError``. Code written against torch catches torch's types, so each mixprec
error that has a torch counterpart derives from both: ``except AssertionError`` in a torch loop
still catches it, and so does ``except RuntimeError`` written against mixprec's documentation.
"""

from __future__ import annotations

__all__ = [
    "LossScaleAtMinimumError",
    "ScalerCallOrderError",
    "ScalerInputError",
    "ScalerStateError",
    "ScalerValueError",
]


class ScalerCallOrderError(RuntimeError, AssertionError):
    """A scaler method was called out of order (torch raises RuntimeError or AssertionError)."""


class ScalerValueError(ValueError, AssertionError):
    """A bad factor or ``new_scale`` (torch asserts on these)."""


class ScalerInputError(TypeError, ValueError):
    """``scale()`` got something other than tensors (torch raises ValueError)."""


class ScalerStateError(ValueError, RuntimeError):
    """A state dict or device that cannot be used (torch raises RuntimeError)."""


class LossScaleAtMinimumError(RuntimeError):
    """The gradients overflowed at the minimum loss scale (with ``on_min_scale="raise"``)."""
