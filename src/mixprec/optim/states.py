"""How the inner optimizer's per-element states are stored between steps: the state storage.

Design note: the update rule (:mod:`mixprec.optim.rules`) says how the *weights* are kept and
written; the storage, a second small object beside it, says how the *optimizer's states* (Adam's
moments, SGD's momentum) are kept. Around each inner step the wrapper has the storage
:meth:`~StateStorage.decode` the states of the parameters it is about to step into the fp32
tensors the torch optimizer expects, and :meth:`~StateStorage.encode` them back afterwards,
chunk by chunk, so at most one chunk's states are ever fp32 at once. The stored (compressed)
form is what sits in ``inner.state`` between steps, so the inner optimizer's own state dict,
checkpoints and ``memory_report`` hold exactly it. Rounding into a narrower form is the rule's
(stochastic under stochastic rounding, to nearest otherwise), so the storage asks the rule.

Today: :class:`Fp32States` (what torch makes; the one-pass kernels step it in place) and
:class:`Float16States` (``state_dtype=torch.bfloat16`` or ``float16``). Block-quantized int8 and
fp8 storages fit the same two calls: their encoded form may hold several tensors per state (codes
and block scales) under keys of their own in the parameter's state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Float16States", "Fp32States", "StateStorage", "elementwise_keys", "storage_for"]

# (fp32 state, dtype, parameter, state name) -> the stored tensor
Rounder = Callable[[torch.Tensor, torch.dtype, torch.Tensor, str], torch.Tensor]


def elementwise_keys(state: dict[str, Any], param: torch.Tensor) -> list[str]:
    """The per-element states of ``param`` (floating tensors of its shape; not the step counter)."""
    return [
        key
        for key, value in state.items()
        if key != "step"
        and isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and value.shape == param.shape
    ]


class StateStorage:
    """The optimizer's states as torch makes them (fp32): decode and encode do nothing.

    Attributes:
        name: how the states are stored, for messages (``"fp32"``).
        one_pass: whether the one-pass kernels may step states stored this way in place.
        own_shadows: whether it also stores the states of parameters that are their own shadow
            (fp32 ones); the wrapper hands it only the 16-bit parameters' states otherwise.
    """

    name = "fp32"
    one_pass = True
    own_shadows = False

    def decode(self, entries: list[tuple[torch.Tensor, dict[str, Any]]]) -> None:
        """Make the states of ``entries`` (parameter, its inner state dict) fp32 for a step."""

    def encode(self, entries: list[tuple[torch.Tensor, dict[str, Any]]], rounder: Rounder) -> None:
        """Store the states of ``entries`` in this storage's form after a step."""

    def state_tensors(self, inner: torch.optim.Optimizer) -> list[torch.Tensor]:
        """The tensors the stored states take (for memory accounting)."""
        return [t for s in inner.state.values() for t in s.values() if isinstance(t, torch.Tensor)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Fp32States(StateStorage):
    """States in fp32, as the torch optimizer makes them (the default)."""


class Float16States(StateStorage):
    """Per-element states in a 16-bit dtype between steps, rounded by the update rule.

    Args:
        dtype: ``torch.bfloat16`` or ``torch.float16``.
    """

    one_pass = False

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.name = str(dtype).removeprefix("torch.")

    def decode(self, entries: list[tuple[torch.Tensor, dict[str, Any]]]) -> None:
        for param, state in entries:
            for key in elementwise_keys(state, param):
                state[key] = state[key].float()

    def encode(self, entries: list[tuple[torch.Tensor, dict[str, Any]]], rounder: Rounder) -> None:
        for param, state in entries:
            for key in elementwise_keys(state, param):
                state[key] = rounder(state[key].float(), self.dtype, param, key)

    def __repr__(self) -> str:
        return f"Float16States({self.dtype})"


def storage_for(state_dtype: object) -> StateStorage:
    """The storage of the ``state_dtype`` option (None or ``torch.float32``: fp32).

    Raises:
        TypeError: ``state_dtype`` is not a torch.dtype or None.
        ValueError: a dtype other than bf16, fp16 or fp32.
    """
    if state_dtype is not None and not isinstance(state_dtype, torch.dtype):
        raise TypeError(
            f"state_dtype must be a torch.dtype or None, got {type(state_dtype).__name__} "
            f"{state_dtype!r}"
        )
    if state_dtype is None or state_dtype == torch.float32:
        return Fp32States()
    if state_dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"state_dtype must be torch.bfloat16, torch.float16, torch.float32 or None, "
            f"got {state_dtype!r}"
        )
    return Float16States(state_dtype)
