"""Loss-scale update rules as pure functions.

Design note: a loss scaler is a state machine with three numbers of state (the scale, the count of
clean steps since the last growth or overflow, and the overflows still tolerated before backing
off) and one input per iteration (were the gradients non-finite?). Each strategy here is a pure
function ``(state, found_inf) -> new state``, so the rule can be driven through long random
sequences in a test, checked against a reference and reasoned about on paper, while
:class:`mixprec.scaling.GradScaler` only stores the state and calls the rule.

The same function accepts plain Python numbers (tests, planning tools) and 0-dim tensors (the
scaler). On tensors it never leaves the device: both outcomes are computed and selected with
``torch.where``. The cost: about a dozen tiny kernels per update with torch's settings (twenty
with hysteresis) where ``torch._amp_update_scale_`` launches one fused kernel, some 0.05-0.15 ms
on a CPU. Next to a real step this is noise: on a 12.6M-parameter model the whole scaler
iteration times the same as torch's (``benchmarks/bench_scaler.py``).

The scale is a float32 number, as in ``torch.amp.GradScaler``: products are formed in double
precision and rounded once to float32, exactly as torch's kernel does, so the Python-number path
and the tensor path agree bit for bit with each other and with torch.

Two deliberate differences from ``torch._amp_update_scale_``, both only reachable by sequences in
which torch misbehaves:

* the scale never drops below :data:`SCALE_FLOOR` (or ``min_scale``, which may not be lower).
  Torch's scale keeps halving: after 143 overflows in a row from 2**16 it is subnormal, after
  144 it is 2**-128, whose reciprocal, the factor that unscales the gradients, is ``inf`` in
  float32; the next clean step then multiplies finite gradients by ``inf`` and writes
  ``-inf``/NaN into the weights (after 166 the scale is 0). The smallest float32 with a finite
  reciprocal is the subnormal 2**-128 + 2**-149 (about 2.94e-39); the floor is set higher, at the
  smallest *normal* float32, 2**-126: its reciprocal 2**126 is finite and exact, and every scale
  at or above it keeps all 24 significant bits, so a product with ``backoff_factor`` stays as
  exact as torch's. The subnormals in between would unscale with a rounded factor.
  What happens when the gradients overflow at the floor is the scaler's choice
  (``on_min_scale``): skip the step and warn, or raise.
* growth happens when the clean-step count *reaches or passes* ``growth_interval``; torch tests
  for equality, so lowering the interval below the current count with ``set_growth_interval``
  stops growth until the next overflow.
"""

from __future__ import annotations

import array
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from mixprec.scaling.errors import ScalerValueError

__all__ = [
    "FP32_MAX",
    "SCALE_FLOOR",
    "DynamicScaling",
    "ScaleState",
    "Strategy",
    "dynamic_update",
    "initial_state",
    "no_scaling_update",
    "overflow_at_minimum",
    "static_update",
    "to_float32",
    "update_scale",
]

Value = float | int | bool | torch.Tensor
"""A Python number or a 0-dim tensor; the rules accept either and return the same kind."""

Strategy = Literal["dynamic", "static", "none"]
STRATEGIES: tuple[Strategy, ...] = ("dynamic", "static", "none")

FP32_MAX = float(torch.finfo(torch.float32).max)
SCALE_FLOOR = 2.0**-126
"""The lowest loss scale: the smallest normal float32, whose reciprocal (2**126) is finite.

Every scale, ``init_scale``, ``min_scale`` and ``max_scale`` must be at least this; see the module
note for why the floor is here and not at the smallest positive float32."""

_INT32_MAX = 2**31 - 1


def to_float32(x: float) -> float:
    """Round a Python float to the nearest float32 (ties to even), keeping overflow as ``inf``.

    Args:
        x: Any Python float.

    Returns:
        The float32 value nearest to ``x``, as a Python float.

    Example:
        >>> to_float32(0.1)
        0.10000000149011612
    """
    return array.array("f", [x])[0]


class ScaleState(NamedTuple):
    """The state a loss-scale rule updates.

    Fields hold Python numbers or 0-dim tensors (float32 scale, int32 counters).

    Attributes:
        scale: The current loss scale.
        growth_tracker: Clean steps since the last growth or overflow (torch's ``_growth_tracker``).
        hysteresis_left: Overflows still tolerated before the next back-off (1: back off at once).
    """

    scale: Value
    growth_tracker: Value
    hysteresis_left: Value


def _check_factor(name: str, value: object, low: float, high: float, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r} of type {type(value).__name__}.")
    if not (math.isfinite(value) and low < value < high):
        raise ScalerValueError(f"{name} must be {fix}, got {value!r}.")


def _check_count(name: str, value: object, low: int, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}.")
    if not low <= value <= _INT32_MAX:
        raise ValueError(f"{name} must be an int in [{low}, 2**31 - 1] ({meaning}), got {value!r}.")


def _check_bound(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a positive float or None, got {value!r} of type "
            f"{type(value).__name__}."
        )
    if not (math.isfinite(value) and SCALE_FLOOR <= to_float32(float(value)) <= FP32_MAX):
        raise ValueError(
            f"{name} must be None or a finite positive float32 number between 2**-126 "
            f"(SCALE_FLOOR, the smallest scale whose reciprocal stays exact and finite) and "
            f"{FP32_MAX:.4g}, got {value!r}."
        )


@dataclass(frozen=True)
class DynamicScaling:
    """Parameters of the dynamic loss-scale rule; validated on construction.

    The defaults are ``torch.amp.GradScaler``'s. ``hysteresis``, ``consecutive_hysteresis`` and
    ``min_scale`` follow DeepSpeed's ``DynamicLossScaler`` (``hysteresis``/``delayed_shift``);
    ``max_scale`` caps growth as apex does.

    Attributes:
        growth_factor: Multiplies the scale after ``growth_interval`` clean steps; > 1.
        backoff_factor: Multiplies the scale when an overflow is not tolerated; in (0, 1).
        growth_interval: Clean steps in a row needed to grow; >= 1.
        hysteresis: Overflows needed to back off (1 backs off on every overflow, as torch does).
            An overflow that is tolerated still skips the step and resets the clean-step count.
        consecutive_hysteresis: Refill the tolerance on every clean step instead of only when
            the scale grows, so only overflows in a row count.
        min_scale: The scale never backs off below this (None: :data:`SCALE_FLOOR`, 2**-126).
        max_scale: The scale never grows above this (None: the largest finite float32).

    Example:
        >>> rule = DynamicScaling(growth_interval=2, hysteresis=2)
        >>> state = initial_state(1024.0, rule)
        >>> dynamic_update(state, True, rule)  # tolerated: scale kept, tolerance used up
        ScaleState(scale=1024.0, growth_tracker=0, hysteresis_left=1)
    """

    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    hysteresis: int = 1
    consecutive_hysteresis: bool = False
    min_scale: float | None = None
    max_scale: float | None = None

    def __post_init__(self) -> None:
        _check_factor(
            "growth_factor", self.growth_factor, 1.0, math.inf, "a finite float > 1.0, e.g. 2.0"
        )
        _check_factor(
            "backoff_factor", self.backoff_factor, 0.0, 1.0, "a float in (0, 1), e.g. 0.5"
        )
        _check_count("growth_interval", self.growth_interval, 1, "clean steps before growing")
        _check_count("hysteresis", self.hysteresis, 1, "1 backs off on every overflow")
        if not isinstance(self.consecutive_hysteresis, bool):
            raise TypeError(
                f"consecutive_hysteresis must be a bool, got {self.consecutive_hysteresis!r}."
            )
        _check_bound("min_scale", self.min_scale)
        _check_bound("max_scale", self.max_scale)
        if self.min_scale is not None and self.max_scale is not None:
            if self.min_scale > self.max_scale:
                raise ValueError(
                    f"min_scale={self.min_scale!r} is larger than max_scale={self.max_scale!r}; "
                    "pass min_scale <= max_scale (or None for no bound)."
                )

    @property
    def floor(self) -> float:
        """The lowest scale the rule can produce."""
        return SCALE_FLOOR if self.min_scale is None else to_float32(float(self.min_scale))


def initial_state(scale: float, rule: DynamicScaling | None = None) -> ScaleState:
    """The state before the first update: no clean steps counted, full overflow tolerance.

    Args:
        scale: The initial scale.
        rule: The dynamic rule whose ``hysteresis`` fills the tolerance (None: 1).

    Returns:
        A :class:`ScaleState` of Python numbers, the scale rounded to float32.
    """
    hysteresis = 1 if rule is None else rule.hysteresis
    return ScaleState(to_float32(float(scale)), 0, hysteresis)


# Helpers that act on Python numbers and 0-dim tensors alike: tensors stay on their device.


def _is_set(found_inf: Value) -> Value:
    # Non-zero means found, as in torch's kernel (a NaN flag counts too).
    return found_inf != 0 if isinstance(found_inf, torch.Tensor) else bool(found_inf != 0)


def _and(a: Value, b: Value) -> Value:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.logical_and(a, b)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.logical_and(torch.as_tensor(a), torch.as_tensor(b))
    return bool(a) and bool(b)


def _or(a: Value, b: Value) -> Value:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.logical_or(a, b)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.logical_or(torch.as_tensor(a), torch.as_tensor(b))
    return bool(a) or bool(b)


def _not(a: Value) -> Value:
    return torch.logical_not(a) if isinstance(a, torch.Tensor) else not a


def _where(cond: Value, a: Value, b: Value) -> Value:
    if isinstance(cond, torch.Tensor):
        return torch.where(cond, a, b)  # type: ignore[arg-type]
    return a if cond else b


def _widen(scale: Value) -> Value:
    return scale.double() if isinstance(scale, torch.Tensor) else float(scale)


def _mul_f32(wide_scale: Value, factor: float) -> Value:
    # Double-precision product rounded once to float32, as torch._amp_update_scale_ does.
    if isinstance(wide_scale, torch.Tensor):
        return (wide_scale * factor).float()
    return to_float32(wide_scale * factor)


def _isfinite(x: Value) -> Value:
    return torch.isfinite(x) if isinstance(x, torch.Tensor) else math.isfinite(x)


def _clamp(x: Value, low: float | None, high: float | None) -> Value:
    if isinstance(x, torch.Tensor):
        return torch.clamp(x, min=low, max=high)
    if low is not None:
        x = max(x, to_float32(low))
    if high is not None:
        x = min(x, to_float32(high))
    return x


def dynamic_update(state: ScaleState, found_inf: Value, rule: DynamicScaling) -> ScaleState:
    """One iteration of dynamic loss scaling.

    On an overflow the clean-step count restarts; if the tolerance is used up
    (``hysteresis_left <= 1``) the scale is multiplied by ``backoff_factor`` (not below the
    floor), otherwise one unit of tolerance is spent and the scale kept. On a clean step the
    count grows; when it reaches ``growth_interval`` the scale is multiplied by ``growth_factor``
    (kept if the product is not a finite float32, capped at ``max_scale``), the count restarts
    and the tolerance is refilled. With ``consecutive_hysteresis`` every clean step refills it.

    With the default rule (``hysteresis=1``, no bounds) this is ``torch._amp_update_scale_``.

    Args:
        state: The current state (Python numbers or 0-dim tensors).
        found_inf: Non-zero if this iteration's gradients held an inf or NaN.
        rule: The rule's parameters.

    Returns:
        The new state, of the same kind as ``state``.

    Example:
        >>> rule = DynamicScaling(growth_interval=1)
        >>> dynamic_update(ScaleState(8.0, 0, 1), 0, rule).scale
        16.0
        >>> dynamic_update(ScaleState(8.0, 0, 1), 1, rule).scale
        4.0
    """
    scale, tracker, left = state
    found = _is_set(found_inf)
    clean = _not(found)

    wide = _widen(scale)
    lowered = _clamp(_mul_f32(wide, rule.backoff_factor), rule.floor, None)
    # With hysteresis 1 (torch's rule) the tolerance never changes: skip its kernels.
    tolerant = rule.hysteresis > 1
    back_off = _and(found, left <= 1) if tolerant else found

    raised = _mul_f32(wide, rule.growth_factor)
    raised = _where(_isfinite(raised), raised, scale)
    if rule.max_scale is not None:
        raised = _clamp(raised, None, rule.max_scale)
    counted = tracker + 1
    grow = _and(clean, counted >= rule.growth_interval)

    new_scale = _where(back_off, lowered, _where(grow, raised, scale))
    new_tracker = _where(_or(found, grow), 0, counted)
    if not tolerant:
        return ScaleState(new_scale, new_tracker, left)
    refill = _or(grow, clean) if rule.consecutive_hysteresis else grow
    spent = _where(_and(found, left > 1), left - 1, left)
    new_left = _where(refill, rule.hysteresis, spent)
    return ScaleState(new_scale, new_tracker, new_left)


def overflow_at_minimum(state: ScaleState, found_inf: Value, rule: DynamicScaling) -> Value:
    """Whether this update would need to back off below the floor (a run that cannot recover).

    True when the gradients overflowed, no tolerance is left and the scale is already at the
    floor: DeepSpeed's condition for ``raise_error_at_min_scale``.

    Args:
        state: The state before the update.
        found_inf: Non-zero if this iteration's gradients held an inf or NaN.
        rule: The rule's parameters.

    Returns:
        A bool, or a 0-dim bool tensor when ``state`` holds tensors.
    """
    at_floor = state.scale <= rule.floor
    return _and(_and(_is_set(found_inf), state.hysteresis_left <= 1), at_floor)


def static_update(state: ScaleState, found_inf: Value) -> ScaleState:
    """Static loss scaling: the state never changes; overflowing steps are still skipped.

    Args:
        state: The current state.
        found_inf: Ignored by the rule (the scaler uses it to skip the step).

    Returns:
        ``state`` itself.
    """
    del found_inf
    return state


def no_scaling_update(state: ScaleState, found_inf: Value) -> ScaleState:
    """No loss scaling (bf16, fp32): the scale is 1 and stays 1.

    Args:
        state: The current state.
        found_inf: Ignored by the rule (the scaler may still skip non-finite steps).

    Returns:
        ``state`` with a scale of exactly 1.
    """
    del found_inf
    scale = state.scale
    one = torch.ones_like(scale) if isinstance(scale, torch.Tensor) else 1.0
    return state._replace(scale=one)


def update_scale(
    strategy: Strategy, state: ScaleState, found_inf: Value, rule: DynamicScaling
) -> ScaleState:
    """Apply the rule of ``strategy`` (``"dynamic"``, ``"static"`` or ``"none"``).

    Args:
        strategy: Which rule to apply.
        state: The current state.
        found_inf: Non-zero if this iteration's gradients held an inf or NaN.
        rule: Parameters of the dynamic rule (unused by the others).

    Returns:
        The new state.

    Raises:
        ValueError: If ``strategy`` is not one of the three.
    """
    if strategy == "dynamic":
        return dynamic_update(state, found_inf, rule)
    if strategy == "static":
        return static_update(state, found_inf)
    if strategy == "none":
        return no_scaling_update(state, found_inf)
    raise ValueError(f"strategy must be one of {STRATEGIES!r}, got {strategy!r}.")
