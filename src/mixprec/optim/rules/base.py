"""What an update rule is: the part of a wrapped step that differs between modes.

A rule knows, for the 16-bit parameters of a :class:`~mixprec.optim.wrapper.WrappedOptimizer`,

* how to make the *shadow* the inner optimizer steps (:meth:`UpdateRule.make_shadow`),
* how to widen for the inner step: weights (:meth:`UpdateRule.widen`) and unscaled fp32
  gradients (:meth:`UpdateRule.copy_grads`),
* how to write the result back into the 16-bit parameters (:meth:`UpdateRule.write_back`),
* which mode of the one-pass kernel does all of that at once (:attr:`UpdateRule.one_pass_mode`),
* how to take on weights that were changed from outside since its last write
  (:meth:`UpdateRule.refresh`: ``model.load_state_dict`` after wrapping),
* its extra state-dict entries and its memory parts.

The wrapper owns the step skeleton and calls these; a rule reads the wrapper's shadows, scratch
and inner optimizer through the public attributes of the wrapper it is bound to.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from mixprec.optim.shards import local

if TYPE_CHECKING:
    from mixprec.optim.wrapper import WrappedOptimizer

__all__ = ["UpdateRule", "check_saved_buffers", "unscale_in_place"]

Entry = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]


def unscale_in_place(grads: list[torch.Tensor], inv_scale: torch.Tensor | float | None) -> None:
    """Multiply ``grads`` (their local shards) by ``inv_scale`` where one is given."""
    if grads and inv_scale is not None:
        torch._foreach_mul_([local(g) for g in grads], inv_scale)


def check_saved_buffers(
    saved: object,
    pairs: list[tuple[torch.Tensor, torch.Tensor | None]],
    what: str,
    dtype_of: Callable[[torch.Tensor], torch.dtype],
    saver: str,
) -> None:
    """Check a saved list of per-parameter buffers against ``pairs`` of (parameter, own buffer).

    Where the wrapper keeps a buffer for a parameter the saved entry must be a tensor of
    ``dtype_of(parameter)``; where it keeps none (an fp32 parameter) the entry must be None.

    Raises:
        ValueError: a missing or mis-sized list, a 16-bit/fp32 mismatch, a wrong dtype.
    """
    if not isinstance(saved, list) or len(saved) != len(pairs):
        raise ValueError(
            f"state dict has no list of {len(pairs)} {what}s (got {type(saved).__name__}); "
            f"save it with {saver}.state_dict()"
        )
    for index, (buffer, (param, own)) in enumerate(zip(saved, pairs, strict=True)):
        if (buffer is None) != (own is None):
            raise ValueError(
                f"parameter {index} is {param.dtype} here but was "
                f"{'float32 or complex' if buffer is None else 'a 16-bit parameter'} when saved; "
                "cast the model by the same policy before loading"
            )
        if buffer is not None and (
            not isinstance(buffer, torch.Tensor) or buffer.dtype != dtype_of(param)
        ):
            raise ValueError(
                f"{what} {index} in the state dict is not a {dtype_of(param)} tensor: "
                f"{type(buffer).__name__}"
            )


class UpdateRule:
    """Base of the update rules; see the module docstring for the parts.

    Attributes:
        name: the rule's name in messages (``"master"``...).
        kind: the ``"wrapper"`` entry of the state dict (what a saved state must match).
        one_pass_mode: the one-pass kernel's mode for this rule (``"nearest"``, ``"stochastic"``,
            ``"kahan"``), or None where the kernel cannot do it (:attr:`one_pass_decline` says
            why).
    """

    name = "rule"
    kind = "wrapped"
    one_pass_mode: str | None = None
    one_pass_decline = "no one-pass mode"
    wrapper: WrappedOptimizer

    def bind(self, wrapper: WrappedOptimizer) -> None:
        """Attach the rule to the wrapper whose step it serves (once, at wrap time)."""
        self.wrapper = wrapper

    def own(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The parameters of ``params`` with a shadow of their own (16-bit ones)."""
        shadows = self.wrapper.shadows
        return [p for p in params if shadows[p] is not p]

    # -- the step ------------------------------------------------------------------------------

    def make_shadow(self, param: torch.Tensor) -> torch.Tensor:
        """The tensor the inner optimizer steps for the 16-bit ``param``."""
        raise NotImplementedError

    def widen(self, params: list[torch.Tensor]) -> None:
        """Make the shadows of ``params`` hold the fp32 weights the inner optimizer is to step."""

    def copy_grads(
        self, params: list[torch.Tensor], inv_scale: torch.Tensor | float | None
    ) -> None:
        """Give the shadows of ``params`` (all with gradients) their unscaled fp32 gradients."""
        raise NotImplementedError

    def write_back(self, stepped: list[torch.Tensor], loaded: list[torch.Tensor]) -> None:
        """Write the shadows of ``stepped`` into them; free what the step held for ``loaded``.

        ``stepped`` is a subset of ``loaded`` (the parameters given to :meth:`widen`), and empty
        when the inner step raised.
        """
        raise NotImplementedError

    def write_trial_point(self, params: list[torch.Tensor]) -> None:
        """Round the shadows of ``params`` to nearest into them: the point a closure sees."""
        own = self.own(params)
        if own:
            shadows = self.wrapper.shadows
            torch._foreach_copy_([local(p) for p in own], [local(shadows[p]) for p in own])

    def one_pass_entry(self, param: torch.Tensor) -> Entry:
        """``(param, shadow, compensation, stream offset)`` for the one-pass kernel."""
        return (param, self.wrapper.shadows[param], None, 0)

    def before_one_pass(self, params: list[torch.Tensor]) -> None:
        """Ready what the kernel reads for ``params`` (offered to it in one call)."""

    def after_one_pass(self, done: list[torch.Tensor], offered: list[torch.Tensor]) -> None:
        """After the kernel updated ``done`` (of the ``offered``): keep what it wrote, free
        what :meth:`before_one_pass` made (the rest goes through the inner optimizer)."""

    def one_pass_key(self) -> tuple[int, int]:
        """The counter key of this step's stochastic rounding (unused by the other modes)."""
        return (0, 0)

    def round_state(
        self, x: torch.Tensor, dtype: torch.dtype, param: torch.Tensor, name: str
    ) -> torch.Tensor:
        """Round an fp32 optimizer state of ``param`` into ``dtype`` (to nearest here)."""
        return x.to(dtype)

    def after_step(self) -> None:
        """Called once after every step that was not skipped (and did not raise)."""

    def refresh(self, params: list[torch.Tensor], trusted: bool) -> None:
        """Take on the values of 16-bit ``params`` that changed since the rule last wrote them
        (``model.load_state_dict`` after wrapping). ``trusted``: a state dict was loaded since,
        whose buffers belong with the weights as they are now."""

    # -- state dict and memory -------------------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        """Entries this rule adds to the wrapper's state dict."""
        return {}

    def check_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        """Raise ValueError unless :meth:`load_extra_state` can load ``state_dict``."""

    def load_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        """Load this rule's entries of a checked state dict."""

    def memory_parts(self) -> dict[str, list[torch.Tensor]]:
        """Tensors this rule keeps, by part of :func:`mixprec.optim.memory_report` (master,
        grads, compensation)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
