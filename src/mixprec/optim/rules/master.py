"""The master-weight rule: an fp32 master per 16-bit parameter, rounded to nearest after each step.

The masters hold the weights between steps, so widening is only the gradients' (into chunk
scratch, or into kept whole-model buffers with ``keep_grad_buffers``); the write-back rounds the
masters into the parameters. One-pass kernel mode ``"nearest"`` (it writes the master too).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mixprec.optim.remainder import join_master
from mixprec.optim.rules.base import UpdateRule, check_saved_buffers, unscale_in_place
from mixprec.optim.rules.compressed import saved_ties
from mixprec.optim.shards import local, wrap_like

__all__ = ["Master"]


class Master(UpdateRule):
    """FP32 master weights.

    Args:
        keep_grad_buffers: keep an fp32 gradient buffer per master between steps instead of the
            chunk-sized scratch (the one-pass kernel, which needs neither, is then not used).

    Raises:
        TypeError: ``keep_grad_buffers`` is not a bool.
    """

    name = "master"
    kind = "master"

    def __init__(self, keep_grad_buffers: bool = False) -> None:
        if not isinstance(keep_grad_buffers, bool):
            raise TypeError(
                f"keep_grad_buffers must be True or False, got "
                f"{type(keep_grad_buffers).__name__} {keep_grad_buffers!r}"
            )
        self.keep_grad_buffers = keep_grad_buffers
        self.one_pass_mode = None if keep_grad_buffers else "nearest"
        self.one_pass_decline = "keep_grad_buffers=True steps through kept fp32 gradient buffers"
        self.grad_buffers: dict[torch.Tensor, torch.Tensor] = {}

    def make_shadow(self, param: torch.Tensor) -> torch.Tensor:
        master = param.detach().to(torch.float32, copy=True)
        return nn.Parameter(master, requires_grad=param.requires_grad)

    def copy_grads(
        self, params: list[torch.Tensor], inv_scale: torch.Tensor | float | None
    ) -> None:
        shadows = self.wrapper.shadows
        copied = [p for p in params if shadows[p] is not p]
        own = [p.grad for p in params if shadows[p] is p and p.grad is not None]
        masters = [shadows[p] for p in copied]
        grads = self._grad_buffers_for(masters)  # local shards of DTensor masters
        if grads:
            torch._foreach_copy_(grads, [local(p.grad) for p in copied if p.grad is not None])
        unscale_in_place(grads + own, inv_scale)
        for master, grad in zip(masters, grads, strict=True):
            master.grad = wrap_like(grad, master)

    def write_back(self, stepped: list[torch.Tensor], loaded: list[torch.Tensor]) -> None:
        self.write_trial_point(stepped)  # fp32 -> 16 bits: round to nearest even
        shadows = self.wrapper.shadows
        for p in loaded:
            if shadows[p] is not p:
                shadows[p].grad = None  # the fp32 gradient is only visible inside step()

    def _grad_buffers_for(self, masters: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self.keep_grad_buffers:
            wrapper = self.wrapper
            return wrapper.scratch.like(
                "grads", [local(m) for m in masters], wrapper.scratch_limit()
            )
        for master in masters:
            if master not in self.grad_buffers:
                self.grad_buffers[master] = torch.empty_like(local(master))
        return [self.grad_buffers[m] for m in masters]

    def refresh(self, params: list[torch.Tensor], trusted: bool) -> None:
        # A master whose rounding is the parameter still holds it (a load of the same weights,
        # the model half of a checkpoint): keep its fp32 digits. Otherwise start from the value.
        shadows = self.wrapper.shadows
        for p in params:
            master, value = local(shadows[p]), local(p)
            if not torch.equal(master.to(value.dtype), value):
                master.copy_(value)

    # -- state dict and memory -------------------------------------------------------------

    def _pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shadows = self.wrapper.shadows
        return [(p, shadows[p]) for p in self.wrapper.mirror.params()]

    def extra_state(self) -> dict[str, Any]:
        return {"masters": [m.detach().clone() if m is not p else None for p, m in self._pairs()]}

    def check_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        owned = [(p, None if m is p else m) for p, m in self._pairs()]
        if "masters" not in state_dict and "remainders" in state_dict:
            self._check_remainders(state_dict, owned)  # compressed masters, rebuilt on load
            return
        check_saved_buffers(
            state_dict.get("masters"), owned, "master", lambda _: torch.float32,
            "MasterWeightOptimizer",
        )  # fmt: skip

    @staticmethod
    def _check_remainders(
        state_dict: Mapping[str, Any], owned: list[tuple[torch.Tensor, torch.Tensor | None]]
    ) -> None:
        dtype = {16: torch.int16, 8: torch.int8}.get(state_dict.get("remainder_bits"))  # type: ignore[arg-type]
        if dtype is None:
            raise ValueError(
                f"the state dict's remainder_bits {state_dict.get('remainder_bits')!r} is not 16 "
                "or 8"
            )
        for p, own in owned:
            if own is not None and p.dtype != torch.bfloat16:
                raise ValueError(
                    f"the state dict holds compressed masters, which only bf16 parameters have; "
                    f"got a {p.dtype} parameter of shape {tuple(p.shape)!r}"
                )
        saver = "MasterWeightOptimizer"
        check_saved_buffers(state_dict["remainders"], owned, "remainder", lambda _: dtype, saver)
        saved_ties(state_dict, len(owned))

    def load_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        masters = state_dict.get("masters")
        if masters is None:  # compressed: the remainders beside the weights as they are now
            ties = saved_ties(state_dict, len(self._pairs()))
            masters = [
                None if r is None else join_master(local(p), r, t)
                for (p, _), r, t in zip(self._pairs(), state_dict["remainders"], ties,
                                        strict=True)
            ]  # fmt: skip
        with torch.no_grad():
            for saved, (param, master) in zip(masters, self._pairs(), strict=True):
                if saved is not None:
                    master.copy_(saved)
                    param.copy_(master)

    def memory_parts(self) -> dict[str, list[torch.Tensor]]:
        return {"grads": list(self.grad_buffers.values())}

    def __repr__(self) -> str:
        return f"Master(keep_grad_buffers={self.keep_grad_buffers})"
