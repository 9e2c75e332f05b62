"""Per-iteration bookkeeping: each optimizer's stage and found-inf flag, and the call-order rules.

Within one iteration an optimizer goes READY -> (UNSCALED) -> STEPPED; ``update()`` closes the
iteration. The rules and their errors are torch's; the flags of the closed iteration are kept so
users can ask afterwards whether a step was skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch


class Stage(Enum):
    READY = 0
    UNSCALED = 1
    STEPPED = 2


@dataclass
class OptimizerRecord:
    stage: Stage = Stage.READY
    found_inf: torch.Tensor | None = None  # agreed across ranks; 1: non-finite gradients
    grad_scale: torch.Tensor | None = None  # set by a folded clip: what a fused step divides by


class Iteration:
    """The records of the open iteration and the step flags of the last closed one."""

    def __init__(self) -> None:
        self.records: dict[int, OptimizerRecord] = {}
        self._closed_steps: dict[int, torch.Tensor] = {}
        self._closed_found_inf: torch.Tensor | None = None

    def record(self, optimizer: torch.optim.Optimizer) -> OptimizerRecord:
        return self.records.setdefault(id(optimizer), OptimizerRecord())

    def begin_unscale(self, optimizer: torch.optim.Optimizer, method: str) -> OptimizerRecord:
        """The record of an optimizer about to be unscaled; raises if that breaks the rules."""
        record = self.record(optimizer)
        if record.stage is Stage.UNSCALED:
            raise RuntimeError(
                f"{method} was called twice for this optimizer in one iteration; gradients "
                "would be unscaled twice. Call unscale_ (or clip_grad_norm_) at most once "
                "per optimizer between update() calls."
            )
        if record.stage is Stage.STEPPED:
            raise RuntimeError(
                f"{method} was called after step() for this optimizer; unscale or clip "
                "before scaler.step(optimizer), then call scaler.update()."
            )
        return record

    def begin_step(self, optimizer: torch.optim.Optimizer) -> OptimizerRecord:
        record = self.record(optimizer)
        if record.stage is Stage.STEPPED:
            raise RuntimeError(
                "step() was called twice for this optimizer in one iteration; call "
                "scaler.update() after stepping all optimizers, before the next step()."
            )
        return record

    def found_inf(self) -> torch.Tensor | None:
        """All flags of the open iteration combined (1 if any is set); None if none."""
        flags = [r.found_inf for r in self.records.values() if r.found_inf is not None]
        if not flags:
            return None
        return flags[0] if len(flags) == 1 else torch.stack(flags).amax()

    def _stepped(self) -> dict[int, torch.Tensor]:
        return {
            key: r.found_inf
            for key, r in self.records.items()
            if r.stage is Stage.STEPPED and r.found_inf is not None
        }

    def close(self, found_inf: torch.Tensor | None) -> None:
        if found_inf is not None:
            self._closed_found_inf = found_inf
            self._closed_steps = self._stepped()
        self.records = {}

    def step_skipped(self, optimizer: torch.optim.Optimizer | None) -> bool:
        """See :meth:`mixprec.scaling.GradScaler.step_skipped`."""
        stepped = self._stepped()
        if optimizer is not None:
            flag = stepped.get(id(optimizer), self._closed_steps.get(id(optimizer)))
            return flag is not None and bool(flag.item())
        if stepped:
            return any(bool(flag.item()) for flag in stepped.values())
        closed = self._closed_found_inf
        return closed is not None and bool(closed.item())

    def __getstate__(self) -> dict[str, object]:
        if self.records:
            raise RuntimeError(
                "A GradScaler can only be pickled between iterations (before scale() or after "
                "update()); save scaler.state_dict() at that point instead."
            )
        return {"records": {}, "_closed_steps": {}, "_closed_found_inf": None}
