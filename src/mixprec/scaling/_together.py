"""The end of an iteration over several optimizers: one skip-or-step decision for all of them.

torch's scaler decides per optimizer; a session that steps several optimizers of one model needs
one decision for all (:meth:`Together.decide_together_`), and ends every iteration the same way:
decide, :meth:`~mixprec.scaling.GradScaler.step` each, :meth:`~mixprec.scaling.GradScaler.update`
(:meth:`Together.step_and_update`).

Design note: ``step_and_update`` is that sequence, with a shortcut for its common case (one
optimizer that unscales in place and was not unscaled or clipped by hand in this iteration):
there ``decide_together_`` and ``step`` run the same one found-inf check, and ``update`` and
``step_skipped`` read back the same one flag, so the shortcut checks once, reads the flag once on
the host and writes the records ``step`` and ``update`` would write. The state afterwards is the
same, bit for bit (``tests/scaling/test_scaling_together.py`` runs both ways side by side); what
it saves is Python calls and small tensor ops, the fixed cost of a small model's step. Where the
gradients need none of ``unscale_``'s grouping (dense, real, one dtype and device, no ranks to
agree with: ``Together._plain_grads``), no record is written until the end, where the closed
iteration is what the records would have left.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch.amp.grad_scaler import OptState

from mixprec._dist import initialized
from mixprec.scaling._grads import group_grads, unscale_and_check_
from mixprec.scaling._iteration import Iteration, Record, found_inf_of, one_flag_on, set_found_inf
from mixprec.scaling._state import ScalerState

__all__ = ["Together"]


class Together:
    """Mixin of :class:`~mixprec.scaling.GradScaler`: deciding and stepping optimizers together."""

    _state: ScalerState
    _iteration: Iteration
    _enabled: bool
    _process_group: Any

    if TYPE_CHECKING:  # GradScaler's methods, used here

        def _started(self, method: str) -> torch.Tensor: ...
        def _new_flag(self, scale: torch.Tensor) -> torch.Tensor: ...
        @staticmethod
        def _unscales_in_step(optimizer: torch.optim.Optimizer) -> bool: ...
        def _record_found_inf(
            self, record: Record, found_inf: torch.Tensor, optimizer: torch.optim.Optimizer
        ) -> torch.Tensor: ...
        def _unscale(
            self, optimizer: torch.optim.Optimizer, record: Record, scale: torch.Tensor
        ) -> torch.Tensor: ...
        def unscale_(self, optimizer: torch.optim.Optimizer) -> None: ...
        def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any: ...
        def update(self, new_scale: float | torch.Tensor | None = None) -> None: ...
        def step_skipped(self, optimizer: torch.optim.Optimizer | None = None) -> bool: ...

    def decide_together_(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Take one skip-or-step decision for ``optimizers`` before any of them steps.

        torch's scaler decides per optimizer: an inf in one optimizer's gradients skips that
        optimizer alone, and the others update their half of the model. Called between the
        clips and the first :meth:`step` of an iteration, this checks every optimizer not yet
        checked (unscaling in place those that do not unscale inside their step; the others
        keep their gradients and get the scale at :meth:`step`) and gives each the combined
        flag, so a non-finite gradient anywhere skips every one of them.

        Raises:
            RuntimeError: If called before :meth:`scale` or after one of them stepped.
            ValueError: If an optimizer that unscales in place has fp16 gradients.
        """
        if not self._enabled:
            return
        scale = self._started("step()")
        optimizers = list(optimizers)
        for optimizer in optimizers:
            record = self._iteration.begin_step(optimizer)  # refuses one that already stepped
            if record["stage"] is not OptState.READY:
                continue
            if not self._unscales_in_step(optimizer):
                self.unscale_(optimizer)
                continue
            found_inf = unscale_and_check_(
                group_grads(optimizer), torch.ones_like(scale), self._new_flag(scale)
            )
            self._record_found_inf(record, found_inf, optimizer)
            if self._state.scales:  # step hands it the scale (see _fused_step)
                self._iteration.folded_scales[id(optimizer)] = scale
        records = [self._iteration.record(optimizer) for optimizer in optimizers]
        flags = [flag for record in records if (flag := found_inf_of(record)) is not None]
        if not flags:
            return
        if one_flag_on(records, scale.device):
            return  # already the combined flag
        combined = torch.stack([flag.to(scale.device) for flag in flags]).amax()
        for record in records:
            set_found_inf(record, combined)

    def step_and_update(self, *optimizers: torch.optim.Optimizer) -> bool:
        """End the iteration: one decision for ``optimizers``, :meth:`step` each, :meth:`update`.

        The same as :meth:`decide_together_` on them, :meth:`step` for each, then
        :meth:`update` (what ``MixedPrecision.step`` does), bit for bit, in fewer calls. For
        the common case, one optimizer that does not unscale inside its step and was not
        unscaled or clipped in this iteration, its one found-inf check (:meth:`unscale_`) is
        read once, for the decision, the counters and the answer; the records are written as
        :meth:`step` and :meth:`update` write them.

        Returns:
            True if they stepped, False if the step was skipped (non-finite gradients).

        Raises:
            ValueError: no optimizer; see :meth:`decide_together_`, :meth:`step`,
                :meth:`update`.
        """
        if not optimizers:
            raise ValueError("step_and_update needs at least one optimizer")
        (optimizer, *others) = optimizers
        if others or not self._enabled or self._iteration.records:
            return self._step_and_update_each(optimizers)
        if self._unscales_in_step(optimizer):
            return self._step_and_update_each(optimizers)
        scale = self._started("step()")
        # the check decide_together_ runs (unscale_'s), read once for all that follows
        grads = self._plain_grads(optimizer, scale.device)
        if grads is None:  # unscale_'s grouping, its record written as it goes
            record = self._iteration.record(optimizer)  # READY: nothing was open
            found_inf = self._unscale(optimizer, record, scale)
        else:  # the same check on one list; no record until the iteration closes
            found_inf = self._new_flag(scale)
            if grads:
                inverse = self._state.inverse(scale)
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inverse)
        skipped = bool(found_inf.item())
        if not skipped:
            try:
                optimizer.step()
            except BaseException:
                if grads is not None:  # the record as step() leaves it: unscaled and flagged
                    record = self._iteration.record(optimizer)
                    set_found_inf(record, found_inf)
                    record["stage"] = OptState.UNSCALED
                raise
        try:  # update(): the open iteration's one flag is this one
            self._state.apply_rule(found_inf, skipped)
        finally:
            self._iteration.close_stepped(optimizer, found_inf)
        return not skipped

    def _plain_grads(
        self, optimizer: torch.optim.Optimizer, device: torch.device
    ) -> list[torch.Tensor] | None:
        """The optimizer's gradients as one list where they need none of ``unscale_``'s
        handling: dense, real, of one dtype, on the scale's device, not fp16 under loss scaling
        (which ``unscale_`` refuses), and no ranks to agree with; None otherwise."""
        if self._process_group is not None and initialized():
            return None
        scaling = self._state.scales
        grads: list[torch.Tensor] = []
        dtype = None
        for group in optimizer.param_groups:
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if dtype is None:
                    dtype = grad.dtype
                    if scaling and dtype == torch.float16:
                        return None
                if grad.dtype != dtype or grad.device != device:
                    return None
                if grad.is_sparse or grad.is_complex():
                    return None
                grads.append(grad)
        return grads

    def _step_and_update_each(self, optimizers: tuple[torch.optim.Optimizer, ...]) -> bool:
        self.decide_together_(optimizers)
        for optimizer in optimizers:
            self.step(optimizer)
        self.update()
        return not self.step_skipped()
