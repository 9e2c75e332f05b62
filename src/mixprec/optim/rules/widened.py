"""The shared part of the rules without masters: fp32 scratch shadows that exist only in ``step``.

Each 16-bit parameter's shadow is an fp32 leaf the inner optimizer keys its state on, holding no
memory between steps. For a step the weights are widened into chunk scratch (plus what the rule
adds, Kahan's compensation), the gradients are widened and unscaled likewise, and afterwards the
rule rounds the result back (:meth:`WidenedRule.round_into`) and the shadows are emptied again.
"""

from __future__ import annotations

import torch
from torch import nn

from mixprec.optim.rules.base import UpdateRule, unscale_in_place
from mixprec.optim.shards import empty_of_kind, local, set_tensor, wrap_like

__all__ = ["WidenedRule"]


class WidenedRule(UpdateRule):
    """Base of :class:`Nearest`, :class:`Stochastic` and :class:`Kahan`: widen, step, round."""

    def make_shadow(self, param: torch.Tensor) -> torch.Tensor:
        # An fp32 leaf the inner optimizer keys its state on; its data exists only inside step().
        return nn.Parameter(empty_of_kind(param), requires_grad=param.requires_grad)

    def widen(self, params: list[torch.Tensor]) -> None:
        wrapper = self.wrapper
        widened = self.own(params)
        shards = [local(p) for p in widened]
        weights = wrapper.scratch.like("weights", shards, wrapper.scratch_limit())
        if widened:
            torch._foreach_copy_(weights, shards)
            self.add_compensation(widened, weights)
        for p, weight in zip(widened, weights, strict=True):
            set_tensor(wrapper.shadows[p], wrap_like(weight, p))

    def copy_grads(
        self, params: list[torch.Tensor], inv_scale: torch.Tensor | float | None
    ) -> None:
        wrapper = self.wrapper
        shadows = wrapper.shadows
        widened = [p for p in params if shadows[p] is not p]
        own = [p.grad for p in params if shadows[p] is p and p.grad is not None]
        grads = wrapper.scratch.like("grads", [local(p) for p in widened], wrapper.scratch_limit())
        if widened:
            torch._foreach_copy_(grads, [local(p.grad) for p in widened if p.grad is not None])
        unscale_in_place(grads + own, inv_scale)
        for p, grad in zip(widened, grads, strict=True):
            shadows[p].grad = wrap_like(grad, p)

    def write_back(self, stepped: list[torch.Tensor], loaded: list[torch.Tensor]) -> None:
        shadows = self.wrapper.shadows
        rounded = self.own(stepped)
        self.round_into(rounded, [local(shadows[p]) for p in rounded])
        for p in self.own(loaded):
            shadow = shadows[p]
            shadow.grad = None
            set_tensor(shadow, empty_of_kind(p))

    def add_compensation(self, params: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
        """Add to the widened ``weights`` of ``params`` what the rule keeps beside them."""

    def round_into(self, params: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
        """Round the stepped fp32 ``weights`` (local, may be overwritten) into ``params``."""
        raise NotImplementedError
