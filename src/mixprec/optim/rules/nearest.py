"""The round-to-nearest rule: the plain 16-bit update, stepped in fp32 scratch.

What a torch optimizer does on 16-bit parameters, but with the arithmetic in fp32 (as torch's
foreach kernels do internally) and the wrapper's skeleton around it: loss-scale protocol, skip,
clipping, chunks. It stalls once updates fall below half an ulp (the reason the other rules
exist); it is the reference those rules are measured against. No one-pass kernel mode: the
kernel's nearest mode writes an fp32 master, which this rule does not keep.
"""

from __future__ import annotations

import torch

from mixprec.optim.rules.widened import WidenedRule
from mixprec.optim.shards import local

__all__ = ["Nearest"]


class Nearest(WidenedRule):
    """Round the stepped fp32 weights to nearest (even) into the 16-bit parameters."""

    name = "nearest"
    kind = "nearest"
    one_pass_decline = "the kernel's nearest mode needs an fp32 master"

    def round_into(self, params: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
        if params:
            torch._foreach_copy_([local(p) for p in params], weights)
