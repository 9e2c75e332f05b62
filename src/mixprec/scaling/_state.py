"""The scaler's numbers: scale, counters and settings, their device tensors and checkpoints.

Until the first ``scale()`` the state is Python numbers (torch creates its tensors lazily on the
loss's device too); afterwards it lives in 0-dim tensors updated in place without host sync.

Whether the gradients overflowed at the floor (the minimum scale) needs the scale on the host.
To keep ``update()`` free of host syncs in the ordinary case, the state also tracks a Python
lower bound of the scale: the rule can lower the scale by at most ``backoff_factor`` per
update, so while that bound stays above the floor no overflow can be at the floor and nothing
is read back. Only once the bound reaches the floor is the scale read (one sync per update,
until the scale is seen to be clear of the floor again).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from mixprec.scaling import _checks
from mixprec.scaling._checks import OnMinScale
from mixprec.scaling.errors import LossScaleAtMinimumError
from mixprec.scaling.rules import (
    DynamicScaling,
    ScaleState,
    Strategy,
    overflow_at_minimum,
    to_float32,
    update_scale,
)

__all__ = ["LossScaleAtMinimumError", "ScalerState"]

_TENSORS = ("scale", "growth_tracker", "hysteresis_left", "skipped_steps")
_DTYPES = (torch.float32, torch.int32, torch.int32, torch.int64)


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
        self._low = float(self._init["scale"])  # a lower bound of the scale; see the module note
        self._inverse: tuple[float, torch.Tensor] | None = None  # see inverse()

    @property
    def scales(self) -> bool:
        """Whether this strategy multiplies losses by a scale (not ``"none"``)."""
        return self.strategy != "none"

    def materialize(self, device: torch.device) -> torch.Tensor:
        """Create the tensors on ``device`` if not yet done; return the scale tensor."""
        if not self._tensors:
            self._tensors = {
                name: torch.full((), self._init[name], dtype=dtype, device=device)
                for name, dtype in zip(_TENSORS, _DTYPES, strict=True)
            }
            self._low = float(self._init["scale"])
        return self._tensors["scale"]

    def tensor(self, name: str) -> torch.Tensor | None:
        """The device tensor of a state number, None before the first ``scale()``."""
        return self._tensors.get(name)

    def assign(self, name: str, tensor: object) -> None:
        """Replace a state tensor, as code written for torch does with ``scaler._scale = t``.

        None returns the whole state to its lazy form (Python numbers), keeping the values.
        """
        if tensor is None:
            self._init = {key: self.value(key) for key in _TENSORS}
            self._tensors = {}
            return
        if not isinstance(tensor, torch.Tensor) or tensor.numel() != 1:
            raise TypeError(
                f"scaler._{name} must be a 1-element tensor or None, got {tensor!r}; set the "
                "scale with scaler.update(new_scale=...) instead."
            )
        self.materialize(tensor.device)
        self._tensors[name] = tensor
        if name == "scale":
            self._low = 0.0  # unknown: read it back at the next update

    def initial(self, name: str) -> float | int:
        """The value a state tensor starts from (torch's ``_init_scale``, ...)."""
        return self._init[name]

    def set_init(self, name: str, value: float | int) -> None:
        """Set the value a state tensor starts from (torch's ``_init_scale``, ...)."""
        self._init[name] = value
        if name == "scale" and not self._tensors:
            self._low = float(value)

    @property
    def scale(self) -> torch.Tensor | None:
        """The scale tensor, None before the first ``scale()``."""
        return self._tensors.get("scale")

    def value(self, name: str) -> Any:
        """A state number as a Python value (a host sync when the state is on an accelerator)."""
        tensor = self._tensors.get(name)
        return self._init[name] if tensor is None else tensor.item()

    def inverse(self, scale: torch.Tensor) -> torch.Tensor:
        """``1 / scale`` as a float32 tensor, the reciprocal taken in float64 as torch does
        (float32 division may be inexact).

        A 0-dim float32 scale on the CPU is read (no device sync there) and the inverse of the
        last value is reused while the value is the same: three small ops fewer per unscale,
        the same bits. Elsewhere reading the scale would sync, so it is computed every time.
        (``unscale_`` uses it, whose step reads its found-inf flag anyway; the fused path and
        the clip read nothing back.) Without loss scaling (strategy ``"none"``) the gradients
        were never multiplied, so the factor is 1, whatever the scale tensor holds.
        """
        if not self.scales:  # the gradients were never multiplied: the factor is 1, kept
            memo = self._inverse
            if memo is None or memo[0] != 1.0 or memo[1].device != scale.device:
                memo = self._inverse = (1.0, torch.ones((), device=scale.device))
            return memo[1]
        if scale.device.type != "cpu" or scale.dim() or scale.dtype != torch.float32:
            return scale.double().reciprocal().float()
        value = scale.item()
        memo = self._inverse
        # value == 0.0 is also -0.0 (whose inverse is -inf); a NaN never equals: no reuse
        if memo is None or memo[0] != value or value == 0.0 or scale.requires_grad:
            memo = (value, scale.double().reciprocal().float())
            self._inverse = memo
        return memo[1]

    def apply_rule(self, found_inf: torch.Tensor, skipped: bool | None = None) -> None:
        """Move the state by the strategy's rule in place and count the iteration.

        An overflow at the floor (see :func:`~mixprec.scaling.rules.overflow_at_minimum`) warns
        with ``on_min_scale="continue"`` and raises :class:`LossScaleAtMinimumError` with
        ``"raise"``, in both cases after the iteration was counted and the rule applied.
        ``skipped``: ``found_inf`` as already read on the host, if it was (see :meth:`count`).
        """
        tensors = self._tensors
        rule = self.rule
        if self.strategy == "none":  # no_scaling_update's new state, written in one op
            tensors["scale"].fill_(1.0)
            self.count(found_inf, skipped)
            return
        if self._torch_rule_applies(found_inf):
            # One kernel instead of the rule's ~15 small ops (a fixed cost of every fp16 step).
            # Where the tracker is past the interval (a loaded or assigned state), the rule
            # grows (or backs off) and restarts it; clamped to interval - 1, torch's kernel
            # does the same.
            tracker = tensors["growth_tracker"].clamp_(max=rule.growth_interval - 1)
            torch._amp_update_scale_(
                tensors["scale"], tracker, found_inf,
                rule.growth_factor, rule.backoff_factor, rule.growth_interval,
            )  # fmt: skip
            self.count(found_inf, skipped)
            self._low = max(rule.floor, to_float32(self._low * rule.backoff_factor))
            return
        state = ScaleState(tensors["scale"], tensors["growth_tracker"], tensors["hysteresis_left"])
        check = self.strategy == "dynamic" and self._low <= rule.floor
        at_minimum = overflow_at_minimum(state, found_inf, rule) if check else None
        new = update_scale(self.strategy, state, found_inf, rule)
        for current, value in zip(state, new, strict=True):
            if value is not current:
                # Internal invariant: a tensor state yields tensors.
                assert isinstance(current, torch.Tensor) and isinstance(value, torch.Tensor)
                current.copy_(value)
        self.count(found_inf, skipped)
        if self.strategy != "dynamic":
            return
        if at_minimum is None:
            self._low = max(rule.floor, to_float32(self._low * rule.backoff_factor))
            return
        assert isinstance(at_minimum, torch.Tensor)  # internal invariant: the state is tensors
        hit, self._low = torch.stack([at_minimum.float(), tensors["scale"]]).tolist()
        if hit:
            self._at_minimum()

    def _torch_rule_applies(self, found_inf: torch.Tensor) -> bool:
        """Whether ``torch._amp_update_scale_`` computes exactly what the dynamic rule does.

        It does for the default rule (no hysteresis, no ``max_scale``) while the scale's lower
        bound keeps a back-off clear of the floor (no clamp, no overflow at the minimum), on
        the kernel's dtypes, and while the tracker cannot overflow int32 in the rule's ``+ 1``.
        """
        rule = self.rule
        if self.strategy != "dynamic" or rule.hysteresis != 1 or rule.max_scale is not None:
            return False
        if to_float32(self._low * rule.backoff_factor) < rule.floor:
            return False
        scale, tracker = self._tensors["scale"], self._tensors["growth_tracker"]
        return (
            scale.dtype == found_inf.dtype == torch.float32
            and tracker.dtype == torch.int32
            and scale.device == tracker.device == found_inf.device
            and scale.dim() == tracker.dim() == found_inf.dim() == 0
            and 1 <= rule.growth_interval < 2**31 - 1
        )

    def _at_minimum(self) -> None:
        message = (
            f"Gradients overflowed (inf/NaN) with the loss scale already at its minimum, "
            f"{self._low!r} (min_scale={self.rule.min_scale!r}); the step was skipped. A "
            "smaller scale will not help: the non-finite values likely come from the forward "
            "pass or the data. Check the loss for inf/NaN, lower the learning rate or compute "
            "in bf16."
        )
        if self.on_min_scale == "raise":
            raise LossScaleAtMinimumError(
                message + " Pass on_min_scale='continue' to keep skipping such steps."
            )
        warnings.warn(
            message + " Pass on_min_scale='raise' to stop here instead.", RuntimeWarning,
            stacklevel=4,
        )  # fmt: skip

    def count(self, found_inf: torch.Tensor, skipped: bool | None = None) -> None:
        """Count one iteration, skipped if ``found_inf`` is non-zero.

        ``skipped``: ``bool(found_inf)``, when the caller already read it; the counter then
        moves without the two tensor ops of the comparison (none at all on a clean step).
        """
        self.total_steps += 1
        if skipped is None:
            self._tensors["skipped_steps"].add_(found_inf != 0)
        elif skipped:
            self._tensors["skipped_steps"].add_(1)

    def set_scale(self, value: float) -> None:
        self._tensors["scale"].fill_(value)
        self._low = value

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
            "scale": fields["scale"] if self.scales else 1.0,
            "growth_tracker": fields["growth_tracker"],
            "hysteresis_left": fields["hysteresis_left"],
            "skipped_steps": fields["skipped_steps"],
        }
        for name, tensor in self._tensors.items():
            tensor.fill_(self._init[name])
        self._low = float(self._init["scale"])

    def __getstate__(self) -> dict[str, Any]:
        # Pickle Python numbers; the copy re-creates its tensors on the next scale(), as torch.
        state = self.__dict__.copy()
        state["_init"] = {name: self.value(name) for name in _TENSORS}
        state["_tensors"] = {}
        state["_low"] = float(state["_init"]["scale"])
        state["_inverse"] = None
        return state
