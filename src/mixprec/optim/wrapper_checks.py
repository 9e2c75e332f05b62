"""The wrapped optimizer's checks of what users hand it, and the loss-scale inverse.

Pure functions: each takes a value and returns it (normalized) or raises with the bad value and
the valid choices; the state-dict checks raise before anything loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "check_chunk_numel",
    "check_fused",
    "check_max_grad_norm",
    "check_shapes",
    "check_state_dict",
    "inverse_scale",
]


def inverse_scale(grad_scale: torch.Tensor | float | None) -> torch.Tensor | float | None:
    """``1 / grad_scale`` computed as torch.amp.GradScaler does (reciprocal in fp64, then fp32)."""
    if grad_scale is None:
        return None
    if isinstance(grad_scale, torch.Tensor):
        return grad_scale.double().reciprocal().float()
    return float(1.0 / grad_scale)


def check_max_grad_norm(max_grad_norm: object) -> float | None:
    """``max_grad_norm`` as a float (None: no clipping).

    Raises:
        TypeError: not a number.
        ValueError: not positive.
    """
    if max_grad_norm is None:
        return None
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
        raise TypeError(
            f"max_grad_norm must be a number or None, got {type(max_grad_norm).__name__} "
            f"{max_grad_norm!r}"
        )
    if not max_grad_norm > 0:
        raise ValueError(
            f"max_grad_norm must be positive (or None for no clipping), got {max_grad_norm!r}"
        )
    return float(max_grad_norm)


def check_fused(value: Any) -> Any:
    """``value`` if it is ``"auto"`` or ``"off"``.

    Raises:
        ValueError: anything else.
    """
    if value not in ("auto", "off"):
        raise ValueError(
            f"fused must be 'auto' (one-pass updates where they apply) or 'off' (always "
            f"step through the inner optimizer), got {value!r}"
        )
    return value


def check_chunk_numel(value: object) -> int | None:
    """``value`` if it is a positive int or None.

    Raises:
        TypeError: not an int.
        ValueError: not positive.
    """
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(
            f"chunk_numel must be a positive int or None, got {type(value).__name__} {value!r}"
        )
    if value is not None and value < 1:
        raise ValueError(
            f"chunk_numel must be a positive int (elements per chunk) or None (one call for "
            f"all parameters), got {value!r}"
        )
    return value


def check_state_dict(name: str, kind: str, state_dict: object) -> None:
    """Raise unless ``state_dict`` is a wrapper state dict of ``kind`` (by the class ``name``).

    Raises:
        TypeError: not a mapping.
        ValueError: missing entries, or saved by another kind of wrapper.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"{name}.load_state_dict expects a dict from {name}.state_dict(), got "
            f"{type(state_dict).__name__} {state_dict!r}"
        )
    missing = [k for k in ("wrapper", "shapes", "optimizer") if k not in state_dict]
    if missing:
        raise ValueError(
            f"not a {name} state dict: missing {missing!r} (keys present: "
            f"{sorted(state_dict)!r}); save it with {name}.state_dict()"
        )
    if state_dict["wrapper"] != kind:
        raise ValueError(
            f"state dict was saved by a {state_dict['wrapper']!r} wrapper, this is "
            f"{kind!r}; load it into the same kind of wrapper"
        )


def check_shapes(shapes: list[list[list[int]]], param_groups: list[dict[str, Any]]) -> None:
    """Raise unless the saved parameter ``shapes`` are those of ``param_groups``.

    Raises:
        ValueError: other group sizes or another shape.
    """
    here = [[list(p.shape) for p in g["params"]] for g in param_groups]
    if [len(g) for g in shapes] != [len(g) for g in here]:
        raise ValueError(
            f"state dict has param groups of sizes {[len(g) for g in shapes]!r}, this "
            f"optimizer {[len(g) for g in here]!r}; it comes from a different model or "
            "grouping, nothing was loaded"
        )
    for group_index, (saved_group, group) in enumerate(zip(shapes, here, strict=True)):
        for index, (saved, shape) in enumerate(zip(saved_group, group, strict=True)):
            if list(saved) != shape:
                raise ValueError(
                    f"parameter {index} of group {group_index} has shape {tuple(saved)!r} in "
                    f"the state dict but {tuple(shape)!r} here; the state dict comes from a "
                    "different model, nothing was loaded"
                )
