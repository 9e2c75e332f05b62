"""The scaler's numbers: scale, counters and settings, their device tensors and checkpoints.

Until the first ``scale()`` the state is Python numbers (torch creates its tensors lazily on the
loss's device too); afterwards it lives in 0-dim tensors updated in place without host sync.
"""

from __future__ import annotations

from typing import Any

import torch

from mixprec.scaling import _checks
from mixprec.scaling._checks import OnMinScale
from mixprec.scaling.rules import (
    DynamicScaling,
    ScaleState,
    Strategy,
    overflow_at_minimum,
    update_scale,
)

_TENSORS = ("scale", "growth_tracker", "hysteresis_left", "skipped_steps")
_DTYPES = (torch.float32, torch.int32, torch.int32, torch.int64)


class LossScaleAtMinimumError(RuntimeError):
    """The gradients overflowed at the minimum loss scale (with ``on_min_scale="raise"``)."""


class ScalerState:
    """Scale, growth tracker, hysteresis left and step counters, plus the rule's settings."""

    def __init__(
        self, scale: float, rule: DynamicScaling, strategy: Strategy, on_min_scale: OnMinScale
    ) -> None:
        self.rule = rule
        self.strategy: Strategy = strategy
        self.on_min_scale: OnMinScale = on_min_scale
        self.total_steps = 0
        self._init: dict[str, float | int] = {
            "scale": 1.0 if strategy == "none" else scale,
            "growth_tracker": 0,
            "hysteresis_left": rule.hysteresis,
            "skipped_steps": 0,
        }
        self._tensors: dict[str, torch.Tensor] = {}

    def materialize(self, device: torch.device) -> torch.Tensor:
        """Create the tensors on ``device`` if not yet done; return the scale tensor."""
        if not self._tensors:
            self._tensors = {
                name: torch.full((), self._init[name], dtype=dtype, device=device)
                for name, dtype in zip(_TENSORS, _DTYPES, strict=True)
            }
        return self._tensors["scale"]

    @property
    def scale(self) -> torch.Tensor | None:
        """The scale tensor, None before the first ``scale()``."""
        return self._tensors.get("scale")

    def value(self, name: str) -> Any:
        """A state number as a Python value (a host sync when the state is on an accelerator)."""
        tensor = self._tensors.get(name)
        return self._init[name] if tensor is None else tensor.item()

    def apply_rule(self, found_inf: torch.Tensor) -> None:
        """Move the state by the strategy's rule in place and count the iteration."""
        tensors = self._tensors
        state = ScaleState(tensors["scale"], tensors["growth_tracker"], tensors["hysteresis_left"])
        if self.strategy == "dynamic" and self.on_min_scale == "raise":
            if bool(overflow_at_minimum(state, found_inf, self.rule)):
                self.count(found_inf)
                raise LossScaleAtMinimumError(
                    f"Gradients overflowed (inf/NaN) with the loss scale already at its "
                    f"minimum, {self.value('scale')!r} (min_scale={self.rule.min_scale!r}); the "
                    "step was skipped. A smaller scale will not help: the non-finite values "
                    "likely come from the forward pass or the data. Check the loss for inf/NaN, "
                    "lower the learning rate, compute in bf16, or pass on_min_scale='continue' "
                    "to keep skipping such steps."
                )
        new = update_scale(self.strategy, state, found_inf, self.rule)
        for current, value in zip(state, new, strict=True):
            if value is not current:
                # Internal invariant: a tensor state yields tensors.
                assert isinstance(current, torch.Tensor) and isinstance(value, torch.Tensor)
                current.copy_(value)
        self.count(found_inf)

    def count(self, found_inf: torch.Tensor) -> None:
        """Count one iteration, skipped if ``found_inf`` is non-zero."""
        self.total_steps += 1
        self._tensors["skipped_steps"].add_(found_inf != 0)

    def set_scale(self, value: float) -> None:
        self._tensors["scale"].fill_(value)

    def to_dict(self) -> dict[str, Any]:
        """The state dict: torch's five keys first, then mixprec's."""
        rule = self.rule
        return {
            "scale": float(self.value("scale")),
            "growth_factor": rule.growth_factor,
            "backoff_factor": rule.backoff_factor,
            "growth_interval": rule.growth_interval,
            "_growth_tracker": int(self.value("growth_tracker")),
            "format_version": _checks.FORMAT_VERSION,
            "strategy": self.strategy,
            "hysteresis": rule.hysteresis,
            "consecutive_hysteresis": rule.consecutive_hysteresis,
            "min_scale": rule.min_scale,
            "max_scale": rule.max_scale,
            "on_min_scale": self.on_min_scale,
            "_hysteresis_left": int(self.value("hysteresis_left")),
            "total_steps": self.total_steps,
            "skipped_steps": int(self.value("skipped_steps")),
        }

    def load(self, state_dict: object) -> None:
        """Load a state dict after checking all of it; nothing changes if it is rejected."""
        fields = _checks.parse_state_dict(state_dict, self.rule, self.strategy)
        self.rule = fields["rule"]
        self.strategy = fields["strategy"]
        if fields["on_min_scale"] is not None:
            self.on_min_scale = fields["on_min_scale"]
        self.total_steps = fields["total_steps"]
        self._init = {
            "scale": 1.0 if self.strategy == "none" else fields["scale"],
            "growth_tracker": fields["growth_tracker"],
            "hysteresis_left": fields["hysteresis_left"],
            "skipped_steps": fields["skipped_steps"],
        }
        for name, tensor in self._tensors.items():
            tensor.fill_(self._init[name])

    def __getstate__(self) -> dict[str, Any]:
        # Pickle Python numbers; the copy re-creates its tensors on the next scale(), as torch.
        state = self.__dict__.copy()
        state["_init"] = {name: self.value(name) for name in _TENSORS}
        state["_tensors"] = {}
        return state
