"""The Kahan rule: round to nearest and carry what rounding lost in a 16-bit buffer.

Each 16-bit parameter gets a 16-bit compensation buffer; the inner optimizer steps
``param + compensation`` in fp32, the result is rounded to nearest into the parameter and the
remainder into the buffer (Kahan's compensated summation). One-pass kernel mode ``"kahan"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mixprec.optim.rules.base import Entry, check_saved_buffers
from mixprec.optim.rules.widened import WidenedRule
from mixprec.optim.shards import local

__all__ = ["Kahan"]


class Kahan(WidenedRule):
    """Kahan-compensated 16-bit weights (2 bytes per parameter of compensation)."""

    name = "kahan"
    kind = "kahan"
    one_pass_mode = "kahan"

    def __init__(self) -> None:
        self.compensation: dict[torch.Tensor, torch.Tensor] = {}

    def make_shadow(self, param: torch.Tensor) -> torch.Tensor:
        self.compensation[param] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return super().make_shadow(param)

    def one_pass_entry(self, param: torch.Tensor) -> Entry:
        return (param, self.wrapper.shadows[param], self.compensation.get(param), 0)

    def add_compensation(self, params: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
        # Widened into scratch first: ops mixing fp32 and 16-bit operands allocate an fp32 copy
        # of the 16-bit one at every call (the same exact widening, and the same fp32 sums).
        wrapper = self.wrapper
        compensation = [local(self.compensation[p]) for p in params]
        widened = wrapper.scratch.like("widened", compensation, wrapper.scratch_limit())
        torch._foreach_copy_(widened, compensation)
        torch._foreach_add_(weights, widened)

    def round_into(self, params: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
        if not params:
            return
        wrapper = self.wrapper
        shards = [local(p) for p in params]
        torch._foreach_copy_(shards, weights)  # round to nearest even
        # weights - params is exact in fp32; then the remainder is rounded into the buffer.
        widened = wrapper.scratch.like("widened", shards, wrapper.scratch_limit())
        torch._foreach_copy_(widened, shards)
        torch._foreach_sub_(weights, widened)
        torch._foreach_copy_([local(self.compensation[p]) for p in params], weights)

    def refresh(self, params: list[torch.Tensor], trusted: bool) -> None:
        # New weights: what rounding lost belongs to the old ones. After a state-dict load the
        # loaded buffers belong with the weights loaded beside them (a checkpoint's two halves).
        if not trusted:
            for p in params:
                self.compensation[p].zero_()

    # -- state dict and memory -------------------------------------------------------------

    def _pairs(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return [(p, self.compensation.get(p)) for p in self.wrapper.mirror.params()]

    def extra_state(self) -> dict[str, Any]:
        return {"compensation": [None if c is None else c.clone() for _, c in self._pairs()]}

    def check_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        check_saved_buffers(
            state_dict.get("compensation"), self._pairs(), "compensation buffer",
            lambda param: param.dtype, "KahanOptimizer",
        )  # fmt: skip

    def load_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        with torch.no_grad():
            for buffer, (_, own) in zip(state_dict["compensation"], self._pairs(), strict=True):
                if buffer is not None and own is not None:
                    own.copy_(buffer)

    def memory_parts(self) -> dict[str, list[torch.Tensor]]:
        return {"compensation": list(self.compensation.values())}
