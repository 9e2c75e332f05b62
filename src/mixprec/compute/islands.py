"""FP32 islands: modules that run in fp32 (or another compute format) inside an autocast region.

Design note: a policy's per-module rules say which modules keep a different compute format
(normalisation layers and losses in fp32 by default). They are applied with module hooks, never by
patching ``forward``: a forward pre-hook widens the module's 16-bit floating inputs and sets
torch's autocast state for the module (disabled for fp32, or the rule's 16-bit dtype), and a
forward hook registered with ``always_call=True`` restores it even when ``forward`` raises, then
casts the outputs to the rule's output format. The enclosing region's backend and op table stay in
force inside (an island of a region forced to ``backend="emulated"`` is emulated too). Outside an
autocast region the hooks do nothing. ``handle.remove()`` takes every hook away again.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mixprec.policy import ModuleRule, Policy, cast_floating

__all__ = ["DEFAULT_ISLAND_RULES", "IslandHandle", "cast_outputs", "fp32_islands"]

DEFAULT_ISLAND_RULES: tuple[ModuleRule, ...] = (
    ModuleRule("*Norm*", Policy(), kind="class"),
    ModuleRule("*Loss", Policy(), kind="class"),
)
"""Normalisation layers (LayerNorm, BatchNorm*, GroupNorm, RMSNorm, ...) and losses in fp32."""

_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")
_NARROWER = (torch.float16, torch.bfloat16)  # what an island widens; fp64 inputs stay as they are
_AUTOCAST = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class IslandHandle:
    """The hooks :func:`fp32_islands` registered; ``remove()`` or leaving a ``with`` undoes them."""

    modules: dict[str, Policy] = field(default_factory=dict)
    _handles: list[RemovableHandle] = field(default_factory=list, repr=False)

    def remove(self) -> None:
        """Remove every hook; the modules behave as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> IslandHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)


def cast_outputs(output: Any, dtype: torch.dtype) -> Any:
    """``output``'s floating tensors in ``dtype``, except a ``"loss"`` entry (a Hugging Face
    ``ModelOutput``'s), which is never narrowed: a scalar costs nothing in fp32, and a bf16 loss
    is logged in steps of 2^-7 of its size (3.125, 3.14...). None when ``output`` is None (the
    forward hook's "leave the output as it is")."""
    if output is None:
        return None
    cast = cast_floating(output, dtype, _AUTOCAST)
    if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        loss = output["loss"]
        if loss.is_floating_point() and loss.dtype.itemsize > dtype.itemsize:
            try:
                cast["loss"] = loss
            except TypeError:  # a read-only mapping: left as cast
                pass
    return cast


def _active_device_type() -> str | None:
    for device_type in _AUTOCAST_DEVICE_TYPES:
        if torch.is_autocast_enabled(device_type):
            return device_type
    return None


class _IslandHooks:
    """The pre-hook and post-hook that run one module under ``policy`` (picklable: a prepared
    model saved with ``torch.save(model)`` loads with its islands working).

    They change torch's autocast state (enabled, dtype) for the module's duration, which is what
    eager kernels, activation checkpointing and ``torch.compile`` (which traces the hooks into its
    graph without a break) all read; the enclosing region's backend and op table stay in force.
    """

    def __init__(self, policy: Policy, name: str = "") -> None:
        self.policy = policy
        self.name = name
        self.low = policy.compute.dtype if policy.compute.bits <= 16 else None
        self._saved: list[tuple[str, bool, torch.dtype] | None] = []  # a stack: modules re-enter

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_saved"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._saved = []

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        device_type = _active_device_type()
        if device_type is None:
            self._saved.append(None)
            return None
        if self.low is None:
            _check_fp32_params(module, self.name)
        self._saved.append((device_type, True, torch.get_autocast_dtype(device_type)))
        if self.low is None:
            torch.set_autocast_enabled(device_type, False)
        else:
            torch.set_autocast_dtype(device_type, self.low)
        widen_to = torch.float32 if self.low is None else self.low
        if kwargs:
            kwargs = cast_floating(kwargs, widen_to, _NARROWER)
        return cast_floating(args, widen_to, _NARROWER), kwargs

    def post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not self._saved:  # the pre-hook raised before it saved anything
            return None
        state = self._saved.pop()
        if state is None:
            return None
        device_type, enabled, dtype = state
        torch.set_autocast_enabled(device_type, enabled)
        torch.set_autocast_dtype(device_type, dtype)
        if output is None:
            return None
        return cast_floating(output, self.policy.output.dtype, _AUTOCAST)


def _check_fp32_params(module: nn.Module, name: str) -> None:
    """Refuse to run an FP32 island whose own parameters are 16-bit.

    Its inputs are widened to fp32, and a 16-bit weight would then fail deep inside the kernel
    ("mixed dtype"): the model was cast after the policy stored the island in fp32.
    """
    for key, param in module._parameters.items():  # named_parameters' generator costs ~5 us
        if param is not None and param.dtype in _NARROWER:
            raise RuntimeError(
                f"module {name!r} ({type(module).__name__}) is an FP32 island (computed in fp32 "
                f"by the policy), but its {key} is {param.dtype}: the model was cast after the "
                "policy was applied (model.to(torch.bfloat16), model.half()). Don't cast a "
                "prepared model: let the policy choose the formats, e.g. "
                "MixedPrecision('bf16-pure') for 16-bit parameters with fp32 norms"
            )


def fp32_islands(
    model: nn.Module,
    policy: Policy | str | None = None,
    *,
    defaults: bool = True,
) -> IslandHandle:
    """Make modules named by ``policy``'s rules (and the default rules) run in their own precision.

    A rule whose policy computes in fp32 makes the module an FP32 island: inside an autocast
    region its 16-bit inputs are widened, autocast is off inside it, and its outputs are cast to
    the rule's output format (fp32 for an ``"fp32"`` rule). A rule with a 16-bit compute format
    runs the module under autocast with that dtype instead.

    Args:
        model: the model whose submodules get hooks.
        policy: a :class:`~mixprec.policy.Policy` (or its string) whose rules are tried first.
        defaults: also apply :data:`DEFAULT_ISLAND_RULES` (norms and losses in fp32).

    Returns:
        An :class:`IslandHandle` naming the affected modules; ``remove()`` undoes everything.

    Example:
        >>> from mixprec.compute import autocast
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        >>> with fp32_islands(model) as islands, autocast("cpu", backend="emulated"):
        ...     out = model(torch.randn(2, 4))
        >>> list(islands), out.dtype
        (['1'], torch.float32)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fp32_islands needs an nn.Module, got {type(model).__name__} {model!r}")
    rules: list[ModuleRule] = list(Policy.parse(policy).rules) if policy is not None else []
    if defaults:
        rules.extend(DEFAULT_ISLAND_RULES)
    handle = IslandHandle()
    for name, module in model.named_modules():
        rule_policy = _first_match(rules, name, module)
        if rule_policy is None:
            continue
        hooks = _IslandHooks(rule_policy, name)
        handle._handles.append(module.register_forward_pre_hook(hooks.pre_hook, with_kwargs=True))
        handle._handles.append(module.register_forward_hook(hooks.post_hook, always_call=True))
        handle.modules[name] = rule_policy
    return handle


def _first_match(rules: Iterable[ModuleRule], name: str, module: nn.Module) -> Policy | None:
    for rule in rules:
        if rule.matches(name, module):
            return rule.policy
    return None
