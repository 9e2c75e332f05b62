"""torch.amp.GradScaler's private fields as properties over mixprec's scaler state.

Code written for ``torch.amp.GradScaler`` reads (and sometimes writes) its private fields:
``_scale`` and ``_growth_tracker`` (0-dim tensors, None until the first ``scale()``),
``_init_scale``/``_init_growth_tracker`` (what they start from), the three settings, and
``_per_optimizer_states``; torch's own helper methods, inherited by
:class:`mixprec.scaling.GradScaler`, use them too. Each property here reads and writes
mixprec's state, so the values are those torch's scaler holds at the same point of the same
run, and there is one copy of every number.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from mixprec.scaling import _checks
from mixprec.scaling._iteration import Iteration, new_records
from mixprec.scaling._state import ScalerState

__all__ = ["TorchFields"]


class TorchFields:
    """Mixin: torch's field names, getters and setters over ``self._state`` and
    ``self._iteration``."""

    _state: ScalerState
    _iteration: Iteration
    _enabled: bool
    _process_group: object

    def _get_scale_async(self) -> torch.Tensor | None:
        return self._state.scale

    def get_scale(self) -> float:
        """The current scale as a Python float (1.0 when disabled); a host sync."""
        if not self._enabled:
            return 1.0
        return float(self._state.value("scale"))

    def get_growth_factor(self) -> float:
        """The factor the scale grows by."""
        return self._state.rule.growth_factor

    def set_growth_factor(self, new_factor: float) -> None:
        """Set the growth factor (> 1)."""
        self._growth_factor = new_factor

    def get_backoff_factor(self) -> float:
        """The factor the scale backs off by."""
        return self._state.rule.backoff_factor

    def set_backoff_factor(self, new_factor: float) -> None:
        """Set the backoff factor (in (0, 1))."""
        self._backoff_factor = new_factor

    def get_growth_interval(self) -> int:
        """Clean steps in a row before the scale grows."""
        return self._state.rule.growth_interval

    def set_growth_interval(self, new_interval: int) -> None:
        """Set the growth interval (>= 1)."""
        self._growth_interval = new_interval

    @property
    def _scale(self) -> torch.Tensor | None:
        return self._state.tensor("scale")

    @_scale.setter
    def _scale(self, value: torch.Tensor | None) -> None:
        self._state.assign("scale", value)

    @property
    def _growth_tracker(self) -> torch.Tensor | None:
        return self._state.tensor("growth_tracker")

    @_growth_tracker.setter
    def _growth_tracker(self, value: torch.Tensor | None) -> None:
        self._state.assign("growth_tracker", value)

    @property
    def _init_scale(self) -> float:
        return float(self._state.initial("scale"))

    @_init_scale.setter
    def _init_scale(self, value: float) -> None:
        self._state.set_init("scale", _checks.check_scale(value, "_init_scale"))

    @property
    def _init_growth_tracker(self) -> int:
        return int(self._state.initial("growth_tracker"))

    @_init_growth_tracker.setter
    def _init_growth_tracker(self, value: int) -> None:
        self._state.set_init("growth_tracker", int(value))

    @property
    def _growth_factor(self) -> float:
        return self._state.rule.growth_factor

    @_growth_factor.setter
    def _growth_factor(self, value: float) -> None:
        self._state.rule = replace(self._state.rule, growth_factor=value)

    @property
    def _backoff_factor(self) -> float:
        return self._state.rule.backoff_factor

    @_backoff_factor.setter
    def _backoff_factor(self, value: float) -> None:
        self._state.rule = replace(self._state.rule, backoff_factor=value)

    @property
    def _growth_interval(self) -> int:
        return self._state.rule.growth_interval

    @_growth_interval.setter
    def _growth_interval(self, value: int) -> None:
        self._state.rule = replace(self._state.rule, growth_interval=value)

    @property
    def _per_optimizer_states(self) -> dict[int, dict[str, Any]]:
        return self._iteration.records

    @_per_optimizer_states.setter
    def _per_optimizer_states(self, value: dict[int, dict[str, Any]]) -> None:
        records = new_records()  # keep torch's defaultdict, whatever mapping is assigned
        records.update(value)
        self._iteration.records = records

    def is_enabled(self) -> bool:
        """Whether the scaler is enabled (False: every method is a pass-through)."""
        return self._enabled

    def __getstate__(self) -> dict[str, Any]:
        if self._process_group not in (None, "auto", "world"):
            raise TypeError(
                "A GradScaler holding a ProcessGroup cannot be pickled; pickle "
                "scaler.state_dict() and pass the group to the new scaler."
            )
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
