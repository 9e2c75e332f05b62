"""The policy's ``state`` field in a session: each parameter's optimizer states in the format of
its module's rule.

Design note: the wrappers of :mod:`mixprec.optim` take one ``state=`` each; a policy gives one
per module (``bf16-lean; class:Embedding -> state=fp32``). The session resolves it to a mapping
parameter -> format (:func:`state_formats`: the rule of the module that holds the parameter
directly, by the policy the user declared, without the default FP32 islands: a norm layer's
compute is kept in fp32 by mixprec, its states are the user's choice) and hands it to the
wrapper, which stores each parameter's states in its own format
(:class:`~mixprec.optim.per_param_states.PerParameterStates`).

Where the update itself needs no wrapper (fp32 parameters, or the plain 16-bit update of
``update="nearest"``), compressed states still need someone to decode and encode them around the
inner step: :func:`states_only` wraps the optimizer with the round-to-nearest rule
(:class:`~mixprec.optim.rules.Nearest`), which is the identity on fp32 parameters and does the
16-bit update in fp32 arithmetic rounded once (torch's foreach kernels round the same way).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mixprec.optim.quantized_states import attach_storage, check_elementwise, make_storage
from mixprec.optim.rules import Nearest
from mixprec.optim.wrapper import WrappedOptimizer
from mixprec.policy import Policy
from mixprec.session.setup import declared_policy

__all__ = [
    "check_state_formats",
    "formats_for",
    "optimizer_formats",
    "state_formats",
    "states_only",
]


def state_formats(model: nn.Module | None, policy: Policy) -> dict[torch.Tensor, str]:
    """Parameter -> the ``state`` format of the module that holds it (a parameter shared by
    several modules takes its first holder's); without a model, nothing."""
    formats: dict[torch.Tensor, str] = {}
    if model is None:
        return formats
    for name, module in model.named_modules():
        fmt = policy.for_module(name, module).state
        for param in module.parameters(recurse=False):
            formats.setdefault(param, fmt)
    return formats


def optimizer_formats(
    optimizer: torch.optim.Optimizer, formats: dict[torch.Tensor, str], default: str
) -> dict[torch.Tensor, str] | None:
    """The formats of ``optimizer``'s parameters (``default`` for those the model does not
    name), or None where every one is fp32 (nothing to store differently)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    chosen = {p: formats.get(p, default) for p in params}
    return chosen if any(fmt != "fp32" for fmt in chosen.values()) else None


def formats_for(
    optimizer: torch.optim.Optimizer,
    model: nn.Module | None,
    policy: Policy,
    fp32_attributes: Sequence[str] = (),
) -> dict[torch.Tensor, Any] | None:
    """:func:`optimizer_formats` of ``optimizer`` under ``policy``'s rules for ``model``'s
    modules, with the modules ``model`` declares fp32 by ``fp32_attributes``
    (:func:`~mixprec.session.setup.declared_policy`) (None: all fp32)."""
    if model is not None and fp32_attributes:
        policy = declared_policy(policy, model, fp32_attributes)
    return optimizer_formats(optimizer, state_formats(model, policy), policy.state)


def check_state_formats(
    optimizers: Sequence[torch.optim.Optimizer], model: nn.Module, policy: Policy
) -> None:
    """Refuse, before anything changes, compressed states for an optimizer whose states are not
    per element (LBFGS, Adafactor, SparseAdam).

    Raises:
        ValueError: naming the policy, the optimizer and what works.
    """
    for optimizer in optimizers:
        chosen = formats_for(optimizer, model, policy)
        if chosen is None:
            continue
        state = sorted(set(chosen.values()) - {"fp32"})[0]
        try:
            check_elementwise(optimizer, state)
        except ValueError as err:
            raise ValueError(
                f"policy {str(policy)!r} stores optimizer states as {state}: {err}; or give "
                f"{type(optimizer).__name__}'s modules a rule '-> state=fp32'"
            ) from None


def states_only(
    optimizer: torch.optim.Optimizer, formats: dict[torch.Tensor, str]
) -> WrappedOptimizer:
    """``optimizer`` wrapped only to store its states in ``formats`` (the round-to-nearest rule:
    the identity on fp32 parameters)."""
    storage = make_storage(optimizer, formats)
    wrapper = WrappedOptimizer(optimizer, Nearest(), storage=storage)
    attach_storage(wrapper.storage, wrapper.optimizer)
    return wrapper
