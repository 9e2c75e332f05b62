"""The wrapped optimizer: a torch Optimizer in front of another one, owning the step skeleton.

Design note: a :class:`WrappedOptimizer` shows its users the model's own (16-bit) parameters in
``param_groups`` and lets the wrapped ("inner") optimizer step a *shadow* per parameter. What the
shadow is and how the result gets back into the parameter is the **update rule**'s
(:mod:`mixprec.optim.rules`: ``Master``, ``Stochastic``, ``Kahan``, ``Nearest``); how the inner
optimizer's states are stored between steps is the **state storage**'s
(:mod:`mixprec.optim.states`); the groups are kept in step by the **group mirror**
(:mod:`mixprec.optim.groups`); chunking and the one-pass kernel are the **stepping plan**
(:mod:`mixprec.optim.plan`); what the rule last wrote is in :mod:`mixprec.optim.written`.
This class owns only the skeleton around them:

* loss scaling by torch's own protocol: ``_step_supports_amp_scaling`` makes
  ``torch.amp.GradScaler.step`` set ``grad_scale`` and ``found_inf`` on the wrapper; the unscale
  is folded into the gradient copy and an overflow skips the whole step;
* clipping by ``max_grad_norm`` through :func:`mixprec.scaling.clip.clip_grad_norm_`;
* closures: the inner optimizer gets one that first writes the shadows it is trying into the
  model (rounded to nearest), then evaluates the user's closure and widens its gradients, so
  optimizers that evaluate several trial points per step (LBFGS) see the model at each of them;
* weights changed from outside between steps (``model.load_state_dict`` after wrapping): seen by
  the parameters' version counters, handed to the rule to take on (:meth:`UpdateRule.refresh`);
* the state dict: the inner optimizer's plus the rule's entries, checked before anything loads.

Parameters that are already fp32 are their own shadow (the wrapper is the identity for them), and
so are complex ones: like torch's autocast, the wrappers leave non-real tensors as they are.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from mixprec.optim import plan
from mixprec.optim.fused import FusedMode, order_states, step_fused
from mixprec.optim.groups import GroupMirror, StateView, hyperparameters
from mixprec.optim.plain_state import import_plain
from mixprec.optim.rules.base import UpdateRule
from mixprec.optim.scratch import Scratch
from mixprec.optim.states import Fp32States, StateStorage
from mixprec.optim.wrapper_checks import (
    check_chunk_numel,
    check_fused,
    check_max_grad_norm,
    check_shapes,
    check_state_dict,
    inverse_scale,
)
from mixprec.optim.written import WriteRecord
from mixprec.scaling.clip import clip_grad_norm_

__all__ = ["WrappedOptimizer", "inverse_scale"]


class WrappedOptimizer(torch.optim.Optimizer):
    """Step ``optimizer`` on shadows of the model's 16-bit parameters, by an update rule.

    Args:
        optimizer: a ``torch.optim.Optimizer`` over the model's parameters, not stepped yet.
        rule: the update rule (:mod:`mixprec.optim.rules`), not bound to another wrapper.
        max_grad_norm: clip the fp32 gradients to this total norm inside ``step`` (None: no
            clipping); ``last_grad_norm`` holds the norm.
        storage: how the inner optimizer's states are stored (default fp32, as torch makes them).

    Attributes:
        chunk_numel: the most 16-bit elements one call of the inner optimizer steps on CPUs
            (default ``plan.CPU_CHUNK_NUMEL``, 2**21); None steps everything in one call.
            Results do not depend on it (see :mod:`mixprec.optim.plan`); the kept workspace does.
        fused: ``"auto"`` (default) updates the parameters of SGD, Adam and AdamW in one pass per
            parameter where :mod:`mixprec.optim.plan` allows; ``"off"`` always steps through the
            inner optimizer. ``last_step_fused`` counts the parameters the last step updated in
            one pass.
        last_step_skipped: whether the last step was skipped for a non-finite gradient.

    Raises:
        TypeError: ``optimizer`` is not a torch optimizer or is already wrapped; a parameter of
            an unsupported dtype; ``rule`` is not an update rule.
        ValueError: a param group mixes devices; ``max_grad_norm`` is not positive.
        RuntimeError: the optimizer has already stepped (it holds state).
    """

    # torch.amp.GradScaler.step hands such optimizers `grad_scale` and `found_inf` attributes.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        rule: UpdateRule,
        max_grad_norm: float | None = None,
        storage: StateStorage | None = None,
    ) -> None:
        name = type(self).__name__
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"{name} wraps a torch.optim.Optimizer, got {type(optimizer).__name__} "
                f"{optimizer!r}; build the optimizer first, e.g. "
                f"{name}(torch.optim.AdamW(model.parameters(), lr=1e-3))"
            )
        if isinstance(optimizer, WrappedOptimizer):
            raise TypeError(
                f"{name} got an optimizer that is already wrapped ({type(optimizer).__name__}); "
                "wrap the plain torch optimizer once"
            )
        if not isinstance(rule, UpdateRule):
            raise TypeError(
                f"rule must be an update rule (mixprec.optim.rules: Master(), Stochastic(), "
                f"Kahan(), Nearest()), got {type(rule).__name__} {rule!r}"
            )
        if len(optimizer.state) > 0:
            raise RuntimeError(
                f"{name} must wrap the optimizer before its first step, but "
                f"{type(optimizer).__name__} already holds state for {len(optimizer.state)} "
                "parameters; create the wrapper right after the optimizer"
            )
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        self.optimizer = optimizer
        self.rule = rule
        self.storage = Fp32States() if storage is None else storage
        self._fused: FusedMode = "auto"
        self._chunk_numel: int | None = plan.CPU_CHUNK_NUMEL
        self._scratch = Scratch()
        self._active_limit: int | None = None
        self.last_step_skipped = False
        self.last_step_fused = 0
        self.last_grad_norm: torch.Tensor | None = None
        self._written = WriteRecord()
        self.mirror = GroupMirror(name, [], optimizer, rule.make_shadow)
        for group in optimizer.param_groups:
            self.mirror.check_group(group["params"])
        rule.bind(self)
        self._adopting = True  # super().__init__ calls add_param_group for the existing groups
        outer = [
            {**hyperparameters(g), "params": list(g["params"])} for g in optimizer.param_groups
        ]
        super().__init__(outer, optimizer.defaults)
        self._adopting = False
        self.mirror.outer = self.param_groups
        self.mirror.adopt_existing()
        self._shadows = self.mirror.shadows  # the name the tests and older callers know
        self.state = StateView(self.mirror)  # type: ignore[assignment]
        self._record_versions()
        if not self.storage.own_shadows and not any(
            p.dtype in plan.SIXTEEN_BIT for p in self.mirror.params()
        ):
            warnings.warn(
                f"{name}: every parameter is already float32 (or complex, which is left as it "
                "is), so the wrapper is the identity (no copies, same steps as the plain "
                "optimizer); cast the model to 16 bits first (mixprec.optim.cast_module) or "
                "drop the wrapper",
                stacklevel=3,
            )

    # -- settings -----------------------------------------------------------------------------

    @property
    def fused(self) -> FusedMode:
        """``"auto"`` (default): one-pass updates wherever they apply; ``"off"``: always step
        through the inner optimizer."""
        return self._fused

    @fused.setter
    def fused(self, value: FusedMode) -> None:
        self._fused = check_fused(value)

    @property
    def chunk_numel(self) -> int | None:
        """The most 16-bit elements one call of the inner optimizer steps on CPUs (None: all)."""
        return self._chunk_numel

    @chunk_numel.setter
    def chunk_numel(self, value: int | None) -> None:
        self._chunk_numel = check_chunk_numel(value)

    @property
    def shadows(self) -> dict[torch.Tensor, torch.Tensor]:
        """Parameter -> the tensor the inner optimizer steps for it."""
        return self.mirror.shadows

    @property
    def scratch(self) -> Scratch:
        """The step's reusable fp32 scratch."""
        return self._scratch

    def scratch_limit(self) -> int | None:
        """The largest scratch buffer to keep between steps: the chunk size while chunking."""
        return self._active_limit

    # -- param groups ---------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of model parameters, as ``torch.optim.Optimizer.add_param_group`` does.

        The inner optimizer gets a matching group over the new parameters' shadows, with the same
        settings (missing ones are filled from the inner optimizer's defaults).
        """
        if self._adopting:
            super().add_param_group(param_group)
            return
        self.mirror.take_inner_groups()
        super().add_param_group(param_group)
        self.mirror.add(self.param_groups[-1])
        self._record_versions(only_new=True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the model parameters' gradients, as ``torch.optim.Optimizer.zero_grad`` does.

        Raises:
            TypeError: ``set_to_none`` is not a bool.
        """
        if not isinstance(set_to_none, bool):
            raise TypeError(
                f"set_to_none must be True or False, got {type(set_to_none).__name__} "
                f"{set_to_none!r}"
            )
        self._take_inner_groups()
        super().zero_grad(set_to_none)

    def _take_inner_groups(self) -> None:
        before = len(self.mirror.shadows)
        self.mirror.take_inner_groups()
        if len(self.mirror.shadows) != before:
            self._record_versions(only_new=True)

    def _with_grads(self) -> list[torch.Tensor]:
        params = [p for p in self.mirror.unique_params() if p.grad is not None]
        for p in params:
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError(
                    f"{type(self).__name__} does not support sparse gradients (got one for a "
                    f"parameter of shape {tuple(p.shape)!r}); use a dense embedding gradient"
                )
        return params

    # -- weights changed from outside -----------------------------------------------------------

    def _record_versions(self, only_new: bool = False) -> None:
        """Note the version counters of the 16-bit parameters as the rule left them
        (``only_new``: of those just adopted); see :mod:`mixprec.optim.written`."""
        own = [p for p, s in self.mirror.shadows.items() if s is not p]
        if only_new:
            self._written.note_new(own)
        else:
            self._written.note(own)

    def _refresh_changed(self) -> None:
        changed = self._written.changed()
        if changed:
            self.rule.refresh(changed, self._written.trusted)
        self._written.trusted = False

    # -- step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Step the inner optimizer on the shadows and write the result into the parameters.

        With a ``GradScaler``, ``scaler.step(optimizer)`` sets ``grad_scale`` (gradients are divided
        by it while they are copied) and ``found_inf`` (non-zero: the step is skipped and nothing
        changes; ``last_step_skipped`` says so).

        With a ``closure`` the inner optimizer gets one too, and may call it as often as it likes
        (LBFGS does, at each trial point): every call first writes the point the inner optimizer
        is trying into the model's parameters (rounded to nearest), then evaluates ``closure``
        and copies the gradients into the shadows. The step's final weights are written by the
        rule. If ``closure`` raises, the parameters stay at the last point it was evaluated at, as
        a plain torch optimizer leaves them.

        Args:
            closure: re-evaluates the model and returns the loss, as for torch optimizers.

        Returns:
            What the inner optimizer's step returns (the closure's loss), or None.
        """
        self._take_inner_groups()
        # torch.amp.GradScaler's protocol: attributes set just for this call, absent otherwise.
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf.item()):
            self.last_step_skipped = True
            if closure is None:
                return None
            with torch.enable_grad():
                return closure()
        self.last_step_skipped = False
        self.mirror.sync()
        self._refresh_changed()
        inv_scale = inverse_scale(getattr(self, "grad_scale", None))
        try:
            if closure is None:
                self._step_planned(self._with_grads(), inv_scale)
                loss = None
            else:
                loss = self._step_closure(closure, inv_scale)
        finally:
            self._record_versions()
        self.rule.after_step()
        return loss

    @torch.no_grad()
    def step_parameters(self, params: list[torch.Tensor]) -> None:
        """Step only ``params`` (those with a gradient): one part of a step that comes in parts,
        as the step inside backward makes it (one parameter per post-accumulate-grad hook).

        The parts give the bits of one :meth:`step` for the optimizers whose update of a
        parameter reads only that parameter (``plan.SEPARABLE_OPTIMIZERS``). No loss scale, no
        clipping, no closure. End the step with :meth:`step` once no parameter has a gradient
        left: it steps nothing then, and closes the step (the rule's step counter, and what LR
        schedulers check).
        """
        self._take_inner_groups()
        self.mirror.sync()  # hyperparameters set since (LR schedulers) reach the inner optimizer
        self._refresh_changed()
        try:
            self._step_planned([p for p in params if p.grad is not None], None)
        finally:
            self._record_versions()

    def _step_closure(
        self, closure: Callable[[], Any], inv_scale: torch.Tensor | float | None
    ) -> Any:
        shadows = self.mirror.shadows
        loaded = self.mirror.unique_params()  # a closure may give any parameter a gradient
        self._load(loaded)

        def evaluate() -> Any:  # the inner optimizer may call it with grad mode on
            with torch.no_grad():
                self.rule.write_trial_point(loaded)
            with torch.enable_grad():
                loss = closure()
            with torch.no_grad():
                for p in loaded:
                    if shadows[p] is not p:
                        shadows[p].grad = None  # a gradient from an earlier call is stale
                self._load_grads(self._with_grads(), inv_scale)
            return loss

        stepped: list[torch.Tensor] = []
        try:
            loss = self.optimizer.step(evaluate)
            stepped = self._with_grads()
        finally:
            self._unload(stepped, loaded)
        return loss

    def _step_planned(
        self, params: list[torch.Tensor], inv_scale: torch.Tensor | float | None
    ) -> None:
        """Step ``params`` (all with gradients) in the chunks of the stepping plan, each offered
        to the one-pass kernel first (:mod:`mixprec.optim.plan`)."""
        clipping = self.max_grad_norm is not None
        self._active_limit = plan.chunk_limit(self.optimizer, params, self.chunk_numel, clipping)
        self.last_step_fused = 0
        one_pass = (
            plan.one_pass_refusal(self.optimizer, self.fused, clipping, self.rule, self.storage)
            is None
        )
        shadows = self.mirror.shadows

        def step_chunk(chunk: list[torch.Tensor]) -> None:
            states = len(self.optimizer.state)
            if one_pass:
                chunk = self._step_one_pass(chunk, inv_scale)
            if chunk:
                self._load(chunk)
                self._load_grads(chunk, inv_scale)
                self.optimizer.step()
                self._unload(chunk, chunk)
            if self.last_step_fused and len(self.optimizer.state) != states:
                order_states(self.optimizer)  # new states in parameter order, as one step makes

        try:
            runs = plan.chunks(params, self._active_limit, counted=self.storage.own_shadows)
            plan.run_in_chunks(runs, lambda p: shadows[p] is p, step_chunk)
        finally:
            self._active_limit = None

    def _step_one_pass(
        self, params: list[torch.Tensor], inv_scale: torch.Tensor | float | None
    ) -> list[torch.Tensor]:
        """Update what the one-pass kernel can; return the rest (in order) for the reference path.
        A parameter listed twice in its group is left to the inner optimizer, which steps it as
        torch steps such a parameter."""
        repeated = self.mirror.repeated
        rule = self.rule
        offered = [p for p in params if p not in repeated]
        mode = rule.one_pass_mode
        assert mode is not None  # the plan checked it
        rule.before_one_pass(offered)  # a rule whose kernel input exists only in the step
        rest: set[torch.Tensor] = set(offered)
        try:
            entries = [rule.one_pass_entry(p) for p in offered]
            rest = set(
                step_fused(
                    self.optimizer,
                    entries,
                    inv_scale,
                    mode,  # type: ignore[arg-type]  # a rule's one-pass mode (plan checks it)
                    rule.one_pass_key(),
                    self.storage,  # type: ignore[arg-type]
                )
            )
        finally:
            rule.after_one_pass([p for p in offered if p not in rest], offered)
        left = [p for p in params if p in rest or p in repeated]
        self.last_step_fused += len(params) - len(left)
        return left

    def _storage_entries(
        self, params: list[torch.Tensor]
    ) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        inner_state = self.optimizer.state
        every = self.storage.own_shadows  # fp32 parameters' states too (PerParameterStates)
        return [
            (p, inner_state.get(s, {}))
            for p in params
            if (s := self.mirror.shadows[p]) is not p or every
        ]

    def _load(self, params: list[torch.Tensor]) -> None:
        """Widen ``params``' weights and states for the inner step."""
        self.rule.widen(params)
        self.storage.decode(self._storage_entries(params))

    def _unload(self, stepped: list[torch.Tensor], loaded: list[torch.Tensor]) -> None:
        """Store the states of ``loaded`` and write the weights of ``stepped`` back."""
        self.storage.encode(self._storage_entries(loaded), self.rule.round_state)
        self.rule.write_back(stepped, loaded)

    def _load_grads(
        self, params: list[torch.Tensor], inv_scale: torch.Tensor | float | None
    ) -> None:
        """Give the shadows of ``params`` their (unscaled, clipped) fp32 gradients."""
        self.rule.copy_grads(params, inv_scale)
        if self.max_grad_norm is not None:
            shadows = [self.mirror.shadows[p] for p in params]
            self.last_grad_norm = clip_grad_norm_(shadows, self.max_grad_norm)

    # -- state dict ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's state dict plus what the rule adds (masters, buffers...).

        Everything in it is a tensor, number, string, list or dict, so it saves with
        ``torch.save`` and loads with ``torch.load(weights_only=True)``.
        """
        self._take_inner_groups()
        self.mirror.sync()
        return {
            "wrapper": self.rule.kind,
            "shapes": [[list(p.shape) for p in g["params"]] for g in self.param_groups],
            "optimizer": self.optimizer.state_dict(),
            **self.rule.extra_state(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Restore a state dict from :meth:`state_dict`; all is checked before anything loads.

        Raises:
            TypeError: ``state_dict`` is not a mapping.
            ValueError: it comes from another kind of wrapper or a model of another shape, or is
                missing entries.
        """
        if isinstance(state_dict, Mapping):  # a state exported in a plain optimizer's layout
            state_dict = import_plain(state_dict)
        check_state_dict(type(self).__name__, self.rule.kind, state_dict)
        self._take_inner_groups()
        check_shapes(state_dict["shapes"], self.param_groups)
        self.rule.check_extra_state(state_dict)
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.mirror.sync_back()
        self.rule.load_extra_state(state_dict)
        self._record_versions()
        self._written.trusted = True  # the loaded buffers belong with the weights loaded beside

    # -- memory accounting (used by mixprec.optim.memory) ----------------------------------------

    def memory_parts(self) -> dict[str, list[torch.Tensor]]:
        """The tensors this wrapper owns, by part: ``master``, ``optimizer_state``,
        ``compensation``, ``grads`` (shadow gradients that are alive, kept buffers),
        ``workspace`` (kept scratch buffers)."""
        self._take_inner_groups()
        own = [s for p, s in self.mirror.shadows.items() if s is not p]
        parts: dict[str, list[torch.Tensor]] = {
            "master": [s for s in own if s.numel() > 0],
            "grads": [s.grad for s in own if s.grad is not None],
            "optimizer_state": self.storage.state_tensors(self.optimizer),
            "compensation": [],
            "workspace": self._scratch.tensors(),
        }
        for part, tensors in self.rule.memory_parts().items():
            parts[part] = parts[part] + tensors
        return parts

    _tensors_by_part = memory_parts  # the older name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"
