"""GradScaler: a drop-in for ``torch.amp.GradScaler`` that holds state and calls the pure rules.

The per-iteration protocol is torch's: ``scale`` the loss, ``backward``, optionally ``unscale_``
(or :meth:`GradScaler.clip_grad_norm_`), ``step`` every optimizer, ``update`` once. The rule
that moves the scale lives in :mod:`mixprec.scaling.rules`; gradient plumbing in ``_grads``,
clipping in :mod:`mixprec.scaling.clip`, the distributed hook in :mod:`mixprec.scaling.agreement`;
torch's field names, getters and setters in ``_torch_fields``; one decision for several optimizers
and the end of an iteration (``decide_together_``, ``step_and_update``) in ``_together``.

Design note: the class subclasses ``torch.amp.GradScaler``, so ``isinstance`` checks in user and
library code hold, and torch's private fields (``_scale``, ``_growth_tracker``,
``_per_optimizer_states``, ``_init_scale``, ``_growth_factor``...) are properties over mixprec's
state that read (and write) what torch's scaler would hold at the same point: the same tensors,
the same per-optimizer records. torch's ``__init__`` is not called (it would keep a second copy
of the settings); every public method is mixprec's, and torch's private helpers
(``_unscale_grads_``, ``_found_inf_per_device``...) work unchanged on these fields.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable
from typing import Any, TypeVar

import torch
from torch.amp.grad_scaler import OptState

from mixprec.scaling import _checks
from mixprec.scaling._checks import OnMinScale
from mixprec.scaling._grads import check_unscalable, group_grads, unscale_and_check_
from mixprec.scaling._iteration import Iteration, Record, found_inf_of, set_found_inf
from mixprec.scaling._state import ScalerState
from mixprec.scaling._together import Together
from mixprec.scaling._torch_fields import TorchFields
from mixprec.scaling.agreement import (
    ProcessGroupArg,
    agree_found_inf_,
    agreement_groups,
    check_process_group,
)
from mixprec.scaling.clip import check_clip_args, clip_coefficient, unscale_and_clip_
from mixprec.scaling.errors import (
    LossScaleAtMinimumError,
    ScalerCallOrderError,
    ScalerInputError,
    ScalerValueError,
)
from mixprec.scaling.rules import STRATEGIES, DynamicScaling, Strategy

__all__ = ["GradScaler", "LossScaleAtMinimumError"]

_T = TypeVar("_T")


class GradScaler(TorchFields, Together, torch.amp.GradScaler):
    """Loss scaling for fp16 training; a drop-in for ``torch.amp.GradScaler``.

    Default construction behaves as ``torch.amp.GradScaler``: the same scale, growth tracker and
    skipped iterations for any sequence of overflows. Everything beyond torch is keyword-only
    and opt-in: the ``"static"`` and ``"none"`` strategies, DeepSpeed-style hysteresis, scale
    bounds, a distributed found-inf agreement; plus, always available, whether a step was
    skipped (:meth:`step_skipped`), step counters and an unscale-folded
    :meth:`clip_grad_norm_`. It is a ``torch.amp.GradScaler`` (a subclass) and its errors are
    catchable as the types torch raises for the same mistake (see :mod:`mixprec.scaling.errors`).

    Off is a mode, not a branch: ``enabled=False`` turns every method into a pass-through
    (``step`` just calls ``optimizer.step()``), and ``strategy="none"`` keeps the scale at 1
    but still skips steps whose gradients are not finite, which suits bf16 and fp32.

    Args:
        device: Device type of the scale, ``"cuda"`` (default, as torch) or ``"cpu"``...
        init_scale: The initial scale (``"none"``: ignored, the scale is 1).
        growth_factor: Multiplies the scale after ``growth_interval`` clean steps; > 1.
        backoff_factor: Multiplies the scale after an overflow; in (0, 1).
        growth_interval: Clean steps in a row before the scale grows; >= 1.
        enabled: False makes the scaler a pass-through with the same interface.
        strategy: ``"dynamic"`` (torch's), ``"static"`` (the scale never changes) or ``"none"``.
        hysteresis: Overflows needed before backing off (DeepSpeed uses 2); 1 is torch's.
        consecutive_hysteresis: Refill the tolerance on every clean step, not only on growth.
        min_scale: Never back off below this (None: 2**-126, the smallest normal float32,
            whose reciprocal is finite; see :data:`~mixprec.scaling.rules.SCALE_FLOOR`).
        max_scale: Never grow above this (None: no cap; apex uses 2**24).
        on_min_scale: When the gradients overflow at the minimum scale: ``"continue"`` skips
            the step and warns (``RuntimeWarning``), ``"raise"`` skips it and raises
            :class:`LossScaleAtMinimumError`. Either way the check reads the scale back only
            once it may have reached the minimum, so ordinary updates stay free of host syncs.
        process_group: ``"auto"`` (default): reduce each optimizer's found-inf flag with
            ``all_reduce(MAX)`` only where ranks can disagree and are known to step together:
            over the DDP group of parameters registered by ``mixprec.distributed.ddp`` and over
            the device mesh of DTensor (FSDP2) parameters; local otherwise, so a scaler used
            on one rank never waits (see :mod:`mixprec.scaling.agreement`). ``"world"`` or
            a ``ProcessGroup``: always agree over it whenever ``torch.distributed`` is
            initialised (a single process is unaffected). None: each rank decides alone, as
            torch's scaler does.

    Raises:
        ValueError: For out-of-range values (a growth factor <= 1, a backoff factor outside
            (0, 1), an interval < 1, a non-finite scale or one below 2**-126, hysteresis < 1,
            min_scale > max_scale, an unknown strategy or device). Bad factors are also
            ``AssertionError`` and a bad device also ``RuntimeError``, as in torch.
        TypeError: For arguments of the wrong type.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> scaler = GradScaler("cpu", hysteresis=2, min_scale=1.0)
        >>> scaler.scale(model(torch.randn(3, 4)).sum()).backward()
        >>> _ = scaler.step(opt)
        >>> scaler.update()
        >>> scaler.step_skipped(opt), scaler.total_steps, scaler.skipped_steps
        (False, 1, 0)
    """

    def __init__(
        self,
        device: str | torch.device = "cuda",
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
        *,
        strategy: Strategy = "dynamic",
        hysteresis: int = 1,
        consecutive_hysteresis: bool = False,
        min_scale: float | None = None,
        max_scale: float | None = None,
        on_min_scale: OnMinScale = "continue",
        process_group: ProcessGroupArg = "auto",
    ) -> None:
        self._device = _checks.check_device(device)
        self._enabled = _checks.check_enabled(enabled)
        _checks.check_choice("strategy", strategy, STRATEGIES)
        _checks.check_choice("on_min_scale", on_min_scale, _checks.ON_MIN_SCALE)
        check_process_group(process_group)
        rule = DynamicScaling(
            growth_factor, backoff_factor, growth_interval, hysteresis,
            consecutive_hysteresis, min_scale, max_scale,
        )  # fmt: skip
        scale = _checks.check_scale(init_scale, "init_scale")
        if strategy == "dynamic":
            _checks.check_in_bounds(scale, rule)
        else:
            _checks.warn_ignored_rule_arguments(strategy, rule)
        if self._device == "cuda" and self._enabled and not torch.cuda.is_available():
            warnings.warn(
                "mixprec.GradScaler is enabled for device 'cuda', but CUDA is not available; "
                "disabling it. Pass device='cpu' to scale on the CPU.",
                stacklevel=2,
            )
            self._enabled = False
        self._state = ScalerState(scale, rule, strategy, on_min_scale)
        self._process_group = process_group
        self._iteration = Iteration()

    # -- scaling ---------------------------------------------------------------------------

    def scale(self, outputs: _T) -> _T:
        """Multiply a tensor, or nested lists/tuples of tensors, by the scale.

        Args:
            outputs: A tensor (usually the loss) or an iterable of tensors.

        Returns:
            The scaled outputs, in the same structure. Unchanged when the scaler is disabled
            or the strategy is ``"none"``.

        Raises:
            TypeError: If ``outputs`` holds something other than tensors (also a
                ``ValueError``, as torch raises).
        """
        if not self._enabled:
            return outputs
        multiply = self._state.scales
        if isinstance(outputs, torch.Tensor):  # the loss: what apply() below does to a tensor
            scale = self._state.materialize(outputs.device)
            if not multiply:
                return outputs
            return outputs * scale.to(outputs.device, non_blocking=True)  # type: ignore[return-value]
        copies: dict[torch.device, torch.Tensor] = {}

        def apply(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                scale = self._state.materialize(value.device)
                if not multiply:
                    return value
                if value.device not in copies:
                    copies[value.device] = scale.to(value.device, non_blocking=True)
                return value * copies[value.device]
            if isinstance(value, (list, tuple)):
                return type(value)(apply(v) for v in value)
            if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
                return map(apply, value)
            raise ScalerInputError(
                "scale() takes a tensor or an iterable of tensors (e.g. the loss), got "
                f"{value!r} of type {type(value).__name__}."
            )

        return apply(outputs)  # type: ignore[no-any-return]

    def _started(self, method: str) -> torch.Tensor:
        scale = self._state.scale
        if scale is None:
            raise ScalerCallOrderError(
                f"{method} was called before scale(): no loss was scaled in this run. Call "
                "scaler.scale(loss).backward() before unscale_/step/update."
            )
        return scale

    def _new_flag(self, scale: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float32, device=scale.device)

    def _inv_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """The factor that unscales gradients held at ``scale`` (1 with strategy ``"none"``)."""
        # The reciprocal in float64, as torch does: float32 division may be inexact.
        return scale.double().reciprocal().float()

    @staticmethod
    def _unscales_in_step(optimizer: torch.optim.Optimizer) -> bool:
        # torch's flag for optimizers that unscale inside their step (fused=True, mixprec's
        # master-weight wrappers). Read as torch.amp.GradScaler.step reads it.
        return bool(getattr(optimizer, "_step_supports_amp_scaling", False))

    def _record_found_inf(
        self, record: Record, found_inf: torch.Tensor, optimizer: torch.optim.Optimizer
    ) -> torch.Tensor:
        """Record the optimizer's check (combined with an earlier one, agreed over the ranks);
        returns the flag recorded."""
        if record["found_inf_per_device"]:
            # a clip after unscale_: either check may have seen inf/NaN
            found_inf = torch.maximum(found_inf, found_inf_of(record))  # type: ignore[arg-type]
        params = (p for group in optimizer.param_groups for p in group["params"])
        groups = agreement_groups(params, self._process_group)
        found_inf = agree_found_inf_(found_inf, groups)
        set_found_inf(record, found_inf)
        record["stage"] = OptState.UNSCALED
        return found_inf

    # -- unscale, clip, step ---------------------------------------------------------------

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the optimizer's gradients by the scale in place and check them for inf/NaN.

        Optional, for inspecting or modifying gradients before :meth:`step`; at most once per
        optimizer per iteration. No host synchronisation.

        Args:
            optimizer: The optimizer whose parameters' gradients are unscaled.

        Raises:
            RuntimeError: If called before :meth:`scale`, twice, or after :meth:`step`
                (:class:`~mixprec.scaling.errors.ScalerCallOrderError`).
            ValueError: If the gradients are fp16 (see the message for the fix).
        """
        if not self._enabled:
            return
        scale = self._started("unscale_()")
        record = self._iteration.begin_unscale(optimizer, "unscale_()")
        self._unscale(optimizer, record, scale)

    def _unscale(
        self, optimizer: torch.optim.Optimizer, record: Record, scale: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`unscale_` after its call-order checks; returns the flag recorded."""
        grads = group_grads(optimizer)
        if self._state.scales:
            check_unscalable(optimizer, grads)
        # the inverse of the loss scale: remembered on a CPU (see ScalerState.inverse)
        found_inf = unscale_and_check_(grads, self._state.inverse(scale), self._new_flag(scale))
        return self._record_found_inf(record, found_inf, optimizer)

    def clip_grad_norm_(
        self, optimizer: torch.optim.Optimizer, max_norm: float, norm_type: float = 2.0
    ) -> torch.Tensor:
        """Unscale and clip the optimizer's gradients to a global norm in one write pass.

        Replaces ``scaler.unscale_(opt); torch.nn.utils.clip_grad_norm_(params, max_norm)``:
        the norm is measured on the gradients as they are (scaled, or already unscaled by
        :meth:`unscale_`) and divided by the scale they are held at; then one rule applies:

        * optimizers that unscale inside their step (``_step_supports_amp_scaling``: torch's
          ``fused=True`` ones, ``mixprec.optim.MasterWeightOptimizer``) keep their gradients
          untouched: the clip coefficient is folded into the scale :meth:`step` hands them
          (``grad_scale / clip_coef``), so clipping only reads, and 16-bit gradients are fine;
        * the others are multiplied once by ``clip_coef / grad_scale``, which unscales and
          clips (see :mod:`mixprec.scaling.clip`).

        When disabled, it is plain ``clip_grad_norm_``.

        Args:
            optimizer: The optimizer whose gradients are clipped.
            max_norm: The largest allowed norm of the unscaled gradients.
            norm_type: The p of the p-norm (``math.inf``: max-norm).

        Returns:
            The norm of the unscaled gradients before clipping (non-finite on overflow, in
            which case :meth:`step` skips).

        Raises:
            RuntimeError: If called before :meth:`scale` or after :meth:`step`.
            ValueError: For a bad ``max_norm``/``norm_type`` or fp16 gradients.

        Example:
            >>> # scaler.scale(loss).backward()
            >>> # norm = scaler.clip_grad_norm_(opt, max_norm=1.0)
            >>> # scaler.step(opt); scaler.update()
        """
        max_norm, norm_type = check_clip_args(max_norm, norm_type)
        if not self._enabled:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
        scale = self._started("clip_grad_norm_()")
        record = self._iteration.record(optimizer)
        # The scale the gradients are held at: the loss scale, 1 after unscale_, or the scale
        # a previous folded clip left for the step.
        if record["stage"] is OptState.UNSCALED:
            unit = torch.ones_like(scale)
            held_at = self._iteration.folded_scales.get(id(optimizer), unit)
        else:
            record = self._iteration.begin_unscale(optimizer, "clip_grad_norm_()")
            held_at = scale
        grads = group_grads(optimizer)
        found_inf = self._new_flag(scale)
        inv_scale = self._inv_scale(held_at)
        if self._unscales_in_step(optimizer):
            norm, clip_coef = clip_coefficient(grads, inv_scale, max_norm, norm_type, found_inf)
            self._iteration.folded_scales[id(optimizer)] = held_at / clip_coef
        else:
            if held_at is scale and self._state.scales:
                check_unscalable(optimizer, grads)
            norm = unscale_and_clip_(grads, inv_scale, max_norm, norm_type, found_inf)
        self._record_found_inf(record, found_inf, optimizer)
        return norm

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Unscale (unless done), then run ``optimizer.step(*args, **kwargs)`` unless non-finite.

        Optimizers that declare ``_step_supports_amp_scaling`` unscale themselves, as with
        torch's scaler. If their ``step`` takes a ``grad_scaler`` argument, it is called with
        ``grad_scaler=self`` (with torch's ``FutureWarning``) and must unscale and skip on its
        own (e.g. ``grad_scaler.unscale_(self)``, then read
        ``grad_scaler._found_inf_per_device(self)``). Otherwise (torch's ``fused=True`` Adam,
        AdamW, SGD) it receives the scale and found-inf flag as ``optimizer.grad_scale`` and
        ``optimizer.found_inf`` and unscales and skips inside its kernel, without a host sync.

        Args:
            optimizer: The optimizer to step.
            *args: Forwarded to ``optimizer.step``.
            **kwargs: Forwarded to ``optimizer.step`` (a ``closure`` is not supported).

        Returns:
            What ``optimizer.step`` returned, or None if the step was skipped.

        Raises:
            RuntimeError: If called before :meth:`scale`, twice before :meth:`update`, or with
                a closure.
        """
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise ScalerCallOrderError(
                "step() got closure=...: closures are not supported while scaling, because the "
                "loss they recompute is not scaled. Compute the loss outside the optimizer."
            )
        scale = self._started("step()")
        record = self._iteration.begin_step(optimizer)
        if self._unscales_in_step(optimizer):
            if "grad_scaler" in inspect.signature(optimizer.step).parameters:
                warnings.warn(
                    "GradScaler is going to stop passing itself as a keyword argument to the "
                    "passed optimizer. In the near future GradScaler registers `grad_scale: "
                    "Tensor` and `found_inf: Tensor` to the passed optimizer and let the "
                    "optimizer use them directly.",
                    FutureWarning,
                    stacklevel=2,
                )  # torch's words, so filters written for torch's warning match it
                step: Any = optimizer.step  # its signature takes grad_scaler (checked above)
                retval = step(*args, **kwargs, grad_scaler=self)
            else:
                retval = self._fused_step(optimizer, record, scale, args, kwargs)
            record["stage"] = OptState.STEPPED
            return retval
        if record["stage"] is OptState.READY:
            self.unscale_(optimizer)
        found_inf = found_inf_of(record)
        if found_inf is None:
            raise ScalerCallOrderError(
                "No inf checks were recorded for this optimizer: its stage was changed by hand "
                "(scaler._per_optimizer_states). Let unscale_/step manage it."
            )
        retval = None
        if not found_inf.item():
            retval = optimizer.step(*args, **kwargs)
        record["stage"] = OptState.STEPPED
        return retval

    def _fused_step(
        self,
        optimizer: torch.optim.Optimizer,
        record: Record,
        scale: torch.Tensor,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        grad_scale: torch.Tensor | None
        folded = self._iteration.folded_scales.get(id(optimizer))
        if folded is not None:  # clip_grad_norm_ folded its factor into the scale
            grad_scale = folded * getattr(optimizer, "grad_scale", 1)
        elif record["stage"] is OptState.READY:
            # Check only; the optimizer's kernel divides by grad_scale itself.
            found_inf = unscale_and_check_(
                group_grads(optimizer), torch.ones_like(scale), self._new_flag(scale)
            )
            self._record_found_inf(record, found_inf, optimizer)
            grad_scale = None
            if self._state.scales:
                grad_scale = scale * getattr(optimizer, "grad_scale", 1)
        else:  # unscaled in place by unscale_
            grad_scale = getattr(optimizer, "grad_scale", None)
        optimizer.grad_scale = grad_scale  # type: ignore[attr-defined]
        optimizer.found_inf = found_inf_of(record)  # type: ignore[attr-defined]
        try:
            return optimizer.step(*args, **kwargs)
        finally:
            del optimizer.grad_scale  # type: ignore[attr-defined]
            del optimizer.found_inf  # type: ignore[attr-defined]

    # -- update ----------------------------------------------------------------------------

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        """Move the scale by the strategy's rule, once per iteration after all steps.

        Args:
            new_scale: Set the scale to this instead of applying the rule (a float or a
                1-element tensor; copied).

        Raises:
            RuntimeError: If no optimizer was stepped or unscaled since the last update
                (including calling ``update()`` twice), or before :meth:`scale` (also an
                ``AssertionError``, as torch raises).
            ValueError: For a ``new_scale`` that is not finite or below 2**-126, or with the
                ``"none"`` strategy.
            LossScaleAtMinimumError: With ``on_min_scale="raise"``, when the gradients
                overflowed at the minimum scale.
        """
        if not self._enabled:
            return
        self._started("update()")
        found_inf = self._iteration.found_inf()
        if new_scale is None and found_inf is None:
            raise ScalerCallOrderError(
                "update() found no inf/NaN checks since the last update(): call "
                "scaler.step(optimizer) (or unscale_) before update(), and update() only "
                "once per iteration."
            )
        if new_scale is not None:
            self._state.set_scale(self._check_new_scale(new_scale))
            if found_inf is not None:
                self._state.count(found_inf)
        elif found_inf is not None:
            try:
                self._state.apply_rule(found_inf)  # counts the iteration, even if it raises
            finally:
                self._iteration.close(found_inf)
            return
        self._iteration.close(found_inf)

    def _check_new_scale(self, new_scale: object) -> float:
        if not self._state.scales:
            raise ValueError(
                f"update(new_scale={new_scale!r}) with strategy='none': the scale is fixed at "
                "1. Use strategy='static' or 'dynamic' to set a scale."
            )
        if isinstance(new_scale, torch.Tensor):
            if new_scale.numel() != 1 or new_scale.requires_grad:
                raise ScalerValueError(
                    f"new_scale must be a float or a 1-element tensor without grad, got a "
                    f"tensor of shape {tuple(new_scale.shape)} (requires_grad="
                    f"{new_scale.requires_grad})."
                )
            new_scale = new_scale.item()
        value = _checks.check_scale(new_scale, "new_scale")
        if self._state.strategy == "dynamic":
            _checks.check_in_bounds(value, self._state.rule, "new_scale")
        return value

    # -- skips and counters ----------------------------------------------------------------

    def step_skipped(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Whether the most recent step was skipped because gradients were not finite.

        Args:
            optimizer: Ask about this optimizer's most recent :meth:`step`. None: the most
                recent iteration: the steps taken since the last :meth:`update` if any, else
                the iteration that :meth:`update` closed (skipped if any check saw inf/NaN).

        Returns:
            True if skipped. Always False when disabled or before the first step.

        Example:
            >>> # scaler.step(opt); scaler.update()
            >>> # if not scaler.step_skipped(opt):
            >>> #     lr_scheduler.step()
        """
        if not self._enabled:
            return False
        return self._iteration.step_skipped(optimizer)

    @property
    def total_steps(self) -> int:
        """Iterations closed by :meth:`update` since training began (restored by load)."""
        return self._state.total_steps

    @property
    def skipped_steps(self) -> int:
        """Of :attr:`total_steps`, those whose gradients were not finite (a host sync)."""
        return int(self._state.value("skipped_steps"))

    @property
    def strategy(self) -> Strategy:
        """``"dynamic"``, ``"static"`` or ``"none"``."""
        return self._state.strategy

    @property
    def scales_loss(self) -> bool:
        """Whether losses are multiplied by a scale: False when disabled and under the
        ``"none"`` strategy (bf16, fp32), whose scale is always 1. Callers read this instead of
        comparing the strategy.

        Example:
            >>> GradScaler("cpu").scales_loss, GradScaler("cpu", strategy="none").scales_loss
            (True, False)
        """
        return self._enabled and self._state.scales

    @property
    def rule(self) -> DynamicScaling:
        """The parameters of the dynamic rule."""
        return self._state.rule

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit for bit; plain Python values only.

        Holds torch's five keys (``scale``, ``growth_factor``, ``backoff_factor``,
        ``growth_interval``, ``_growth_tracker``, so ``torch.amp.GradScaler`` can load it)
        plus ``format_version``, the strategy, hysteresis and bounds settings, the hysteresis
        state and the step counters. Empty when disabled, as torch. Save after :meth:`update`.

        Example:
            >>> scaler = GradScaler("cpu")
            >>> GradScaler("cpu").load_state_dict(scaler.state_dict())
        """
        if not self._enabled:
            return {}
        return self._state.to_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by this class or by ``torch.amp.GradScaler``.

        Settings saved in the dict replace the constructor's, as in torch. A torch dict keeps
        this scaler's strategy, hysteresis and bounds, and starts the counters at 0. Nothing
        changes if the dict is rejected. A no-op when disabled.

        Args:
            state_dict: The dict returned by ``state_dict()``.

        Raises:
            TypeError: If ``state_dict`` is not a mapping.
            ValueError: If it is empty (also a ``RuntimeError``, as torch raises), foreign,
                from a newer format or holds bad values.
        """
        if not self._enabled:
            return
        self._state.load(state_dict)
