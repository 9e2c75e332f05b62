"""Validation of the scaler's arguments and state dicts: every error names the value and the fix."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch

from mixprec.scaling.errors import ScalerStateError
from mixprec.scaling.rules import (
    FP32_MAX,
    SCALE_FLOOR,
    STRATEGIES,
    DynamicScaling,
    Strategy,
    to_float32,
)

OnMinScale = Literal["continue", "raise"]
ON_MIN_SCALE: tuple[OnMinScale, ...] = ("continue", "raise")

FORMAT_VERSION = 1
TORCH_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
MIXPREC_KEYS = (
    "format_version",
    "strategy",
    "hysteresis",
    "consecutive_hysteresis",
    "min_scale",
    "max_scale",
    "on_min_scale",
    "_hysteresis_left",
    "total_steps",
    "skipped_steps",
)


def check_device(device: object) -> str:
    """Return the device type (``"cuda"``, ``"cpu"``...) of a device string or ``torch.device``."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(
            f"device must be a device type string such as 'cuda' or 'cpu', got {device!r} of "
            f"type {type(device).__name__}."
        )
    try:
        return torch.device(device).type
    except RuntimeError as err:
        raise ScalerStateError(
            f"device must be a device type such as 'cuda' or 'cpu', got {device!r}; pass the "
            "type of the device the loss lives on (loss.device.type)."
        ) from err


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices!r}, got {value!r}.")


def check_scale(value: object, name: str = "scale") -> float:
    """Validate a loss scale; return it rounded to float32.

    The argument order is the one of ``mixprec.diagnostics``' check of the same name.

    Raises:
        TypeError: If ``value`` is not a real number.
        ValueError: If it is not finite, below :data:`~mixprec.scaling.rules.SCALE_FLOOR` or
            beyond float32.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r} of type {type(value).__name__}.")
    try:
        as_float = float(value)
    except OverflowError:  # an int beyond any float
        as_float = math.inf
    rounded = to_float32(as_float) if math.isfinite(as_float) else math.inf
    if not (0.0 < rounded <= FP32_MAX):
        raise ValueError(
            f"{name} must be a finite float > 0 that float32 can hold (at most {FP32_MAX:.4g}), "
            f"e.g. 2.0**16; got {value!r}."
        )
    if rounded < SCALE_FLOOR:
        raise ValueError(
            f"{name} must be at least 2**-126 ({SCALE_FLOOR!r}, the smallest normal float32), "
            f"got {value!r}: below it the reciprocal that unscales the gradients is inexact, "
            "and below 2.94e-39 it is inf, which writes inf into the weights. Pass a larger "
            "scale, e.g. 1.0."
        )
    return rounded


def check_in_bounds(scale: float, rule: DynamicScaling, name: str = "init_scale") -> None:
    low, high = rule.min_scale, rule.max_scale
    if (low is not None and scale < low) or (high is not None and scale > high):
        raise ValueError(
            f"{name}={scale!r} lies outside [min_scale, max_scale] = [{low!r}, {high!r}]; "
            "pass a scale within the bounds or widen them."
        )


def check_enabled(enabled: object) -> bool:
    if not isinstance(enabled, (bool, int)):
        raise TypeError(
            f"enabled must be a bool, got {enabled!r} of type {type(enabled).__name__}."
        )
    return bool(enabled)


def _int_field(state: Mapping[str, Any], key: str, low: int, high: int) -> int:
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(
            f"state_dict[{key!r}] must be an int in [{low}, {high}], got {value!r}; the state "
            "dict is corrupt or was not saved by a GradScaler."
        )
    return value


def parse_state_dict(
    state: object, current_rule: DynamicScaling, current_strategy: Strategy
) -> dict[str, Any]:
    """Check a scaler state dict and return the fields to load; nothing is loaded on error.

    Accepts dicts saved by :class:`mixprec.scaling.GradScaler` (``format_version`` 1) and by
    ``torch.amp.GradScaler``; the latter keep the current hysteresis and bounds.
    """
    if not isinstance(state, Mapping):
        raise TypeError(
            f"state_dict must be a dict returned by GradScaler.state_dict(), got "
            f"{type(state).__name__}."
        )
    if len(state) == 0:
        raise ScalerStateError(
            "The state dict is empty, as saved by a disabled GradScaler (enabled=False); load it "
            "into a disabled scaler, or pass a state dict saved by an enabled scaler."
        )
    keys = set(state)
    missing = [k for k in TORCH_KEYS if k not in keys]
    if missing:
        raise ValueError(
            f"This is not a GradScaler state dict: keys {missing!r} are missing (got keys "
            f"{sorted(map(str, keys))!r}). Pass the dict returned by GradScaler.state_dict() "
            "(mixprec's or torch.amp's)."
        )
    version = state.get("format_version")
    expected = set(TORCH_KEYS) if version is None else set(TORCH_KEYS) | set(MIXPREC_KEYS)
    if version is not None and version != FORMAT_VERSION:
        raise ValueError(
            f"state_dict['format_version'] is {version!r} but this mixprec reads version "
            f"{FORMAT_VERSION}; load it with the mixprec version that saved it."
        )
    unknown = sorted(map(str, keys - expected))
    absent = sorted(expected - keys)
    if unknown or absent:
        raise ValueError(
            f"The GradScaler state dict has unknown keys {unknown!r} and lacks keys {absent!r}; "
            "it was not saved by a compatible GradScaler."
        )
    try:
        scale = check_scale(state["scale"], "state_dict['scale']")
        if version is None:
            rule = DynamicScaling(
                growth_factor=state["growth_factor"],
                backoff_factor=state["backoff_factor"],
                growth_interval=state["growth_interval"],
                hysteresis=current_rule.hysteresis,
                consecutive_hysteresis=current_rule.consecutive_hysteresis,
                min_scale=current_rule.min_scale,
                max_scale=current_rule.max_scale,
            )
        else:
            rule = DynamicScaling(
                growth_factor=state["growth_factor"],
                backoff_factor=state["backoff_factor"],
                growth_interval=state["growth_interval"],
                hysteresis=state["hysteresis"],
                consecutive_hysteresis=state["consecutive_hysteresis"],
                min_scale=state["min_scale"],
                max_scale=state["max_scale"],
            )
    except (TypeError, ValueError) as err:
        raise ValueError(f"The GradScaler state dict holds a bad value: {err}") from err
    fields: dict[str, Any] = {
        "scale": scale,
        "rule": rule,
        "growth_tracker": _int_field(state, "_growth_tracker", 0, 2**31 - 1),
        "strategy": current_strategy,
        "on_min_scale": None,
        "hysteresis_left": rule.hysteresis,
        "total_steps": 0,
        "skipped_steps": 0,
    }
    if version is not None:
        check_choice("state_dict['strategy']", state["strategy"], STRATEGIES)
        check_choice("state_dict['on_min_scale']", state["on_min_scale"], ON_MIN_SCALE)
        fields["strategy"] = state["strategy"]
        fields["on_min_scale"] = state["on_min_scale"]
        fields["hysteresis_left"] = _int_field(state, "_hysteresis_left", 1, rule.hysteresis)
        fields["total_steps"] = _int_field(state, "total_steps", 0, 2**63 - 1)
        fields["skipped_steps"] = _int_field(state, "skipped_steps", 0, fields["total_steps"])
    if fields["strategy"] == "dynamic":
        check_in_bounds(scale, rule, "state_dict['scale']")
    return fields


def warn_ignored_rule_arguments(strategy: str, rule: DynamicScaling) -> None:
    """Warn about dynamic-rule arguments a fixed strategy accepts but never uses.

    A warning, not a refusal: torch's ``GradScaler`` signature takes these arguments, so a loop
    that passes its usual ones and switches the strategy keeps running, but is told.
    """
    default = DynamicScaling()
    names = (
        "growth_factor", "backoff_factor", "growth_interval", "hysteresis",
        "consecutive_hysteresis", "min_scale", "max_scale",
    )  # fmt: skip
    given = [
        f"{name}={getattr(rule, name)!r}"
        for name in names
        if getattr(rule, name) != getattr(default, name)
    ]
    if given:
        what = "keeps the scale at init_scale" if strategy == "static" else "does not scale"
        warnings.warn(
            f"strategy={strategy!r} {what}: {', '.join(given)} apply only to "
            f"strategy='dynamic' and are ignored; drop them, or use strategy='dynamic'",
            UserWarning,
            stacklevel=3,
        )
