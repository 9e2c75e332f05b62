"""Per-iteration bookkeeping: each optimizer's stage and found-inf flag, and the call-order rules.

Within one iteration an optimizer goes READY -> (UNSCALED) -> STEPPED; ``update()`` closes the
iteration. The records are kept in ``torch.amp.GradScaler``'s own layout (its
``_per_optimizer_states``: ``id(optimizer) -> {"stage": OptState, "found_inf_per_device":
{device: flag}}``), so code that reads torch's private fields, and torch's own helper methods
such as ``_found_inf_per_device``, see the same thing here. mixprec keeps one flag per
optimizer, already combined over devices and ranks, on the scale's device. The rules and their
errors are torch's; the flags of the closed iteration are kept so users can ask afterwards
whether a step was skipped.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch.amp.grad_scaler import OptState, _refresh_per_optimizer_state

from mixprec.scaling.errors import ScalerCallOrderError

Record = dict[str, Any]
"""One optimizer's entry: ``{"stage": OptState, "found_inf_per_device": {device: flag}}``."""


def new_records() -> defaultdict[int, Record]:
    """An empty ``_per_optimizer_states``, as torch creates it."""
    return defaultdict(_refresh_per_optimizer_state)


def found_inf_of(record: Record) -> torch.Tensor | None:
    """The optimizer's flag (non-zero: non-finite gradients), None if it was not checked yet."""
    flags = list(record["found_inf_per_device"].values())
    if not flags:
        return None
    if len(flags) == 1:
        return flags[0]
    device = flags[0].device
    return torch.stack([f.to(device) for f in flags]).amax()


def one_flag_on(records: list[Record], device: torch.device) -> bool:
    """Whether ``records`` are one record holding one flag, on ``device``."""
    if len(records) != 1 or len(flags := records[0]["found_inf_per_device"]) != 1:
        return False
    return next(iter(flags.values())).device == device


def set_found_inf(record: Record, found_inf: torch.Tensor) -> None:
    record["found_inf_per_device"] = {found_inf.device: found_inf}


class Iteration:
    """The records of the open iteration and the step flags of the last closed one."""

    def __init__(self) -> None:
        self.records: defaultdict[int, Record] = new_records()
        self.folded_scales: dict[int, torch.Tensor] = {}  # set by a clip folded into a fused step
        self._closed_steps: dict[int, torch.Tensor] = {}
        self._closed_found_inf: torch.Tensor | None = None

    def record(self, optimizer: torch.optim.Optimizer) -> Record:
        return self.records[id(optimizer)]

    def begin_unscale(self, optimizer: torch.optim.Optimizer, method: str) -> Record:
        """The record of an optimizer about to be unscaled; raises if that breaks the rules."""
        record = self.record(optimizer)
        if record["stage"] is OptState.UNSCALED:
            raise ScalerCallOrderError(
                f"{method} was called twice for this optimizer in one iteration; gradients "
                "would be unscaled twice. Call unscale_ (or clip_grad_norm_) at most once "
                "per optimizer between update() calls."
            )
        if record["stage"] is OptState.STEPPED:
            raise ScalerCallOrderError(
                f"{method} was called after step() for this optimizer; unscale or clip "
                "before scaler.step(optimizer), then call scaler.update()."
            )
        return record

    def begin_step(self, optimizer: torch.optim.Optimizer) -> Record:
        record = self.record(optimizer)
        if record["stage"] is OptState.STEPPED:
            raise ScalerCallOrderError(
                "step() was called twice for this optimizer in one iteration; call "
                "scaler.update() after stepping all optimizers, before the next step()."
            )
        return record

    def found_inf(self) -> torch.Tensor | None:
        """All flags of the open iteration combined (1 if any is set); None if none."""
        flags = [f for r in self.records.values() if (f := found_inf_of(r)) is not None]
        if not flags:
            return None
        return flags[0] if len(flags) == 1 else torch.stack(flags).amax()

    def _stepped(self) -> dict[int, torch.Tensor]:
        return {
            key: flag
            for key, r in self.records.items()
            if r["stage"] is OptState.STEPPED and (flag := found_inf_of(r)) is not None
        }

    def close(
        self, found_inf: torch.Tensor | None, stepped: dict[int, torch.Tensor] | None = None
    ) -> None:
        """End the iteration with its combined flag; ``stepped``: the stepped optimizers' flags
        by ``id`` (default: those the records say stepped)."""
        if found_inf is not None:
            self._closed_found_inf = found_inf
            self._closed_steps = self._stepped() if stepped is None else stepped
        self.records = new_records()
        self.folded_scales = {}

    def close_stepped(self, optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
        """What :meth:`close` leaves after ``optimizer`` alone was checked (``found_inf``) and
        stepped, its record written or not."""
        self.close(found_inf, {id(optimizer): found_inf})

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
            raise ScalerCallOrderError(
                "A GradScaler can only be pickled between iterations (before scale() or after "
                "update()); save scaler.state_dict() at that point instead."
            )
        return {
            "records": new_records(),
            "folded_scales": {},
            "_closed_steps": {},
            "_closed_found_inf": None,
        }
