"""Whether an optimizer's parameters are still the prepared model's, checked every step cheaply.

Design note: :meth:`MixedPrecision.step` refuses an optimizer whose parameters the model no
longer holds (sharding or a swapped layer after ``prepare``). Walking ``model.parameters()`` for
that was a fixed cost of every step (tens of microseconds on a small model). This keeps what the
walk found: every slot on the way from the model to a parameter (``parent._modules[name]``,
``module._parameters[name]``). While each slot still holds the same object, the model still
holds every parameter it held, so an optimizer whose parameters were all among them passes
without a walk. Anything else (a slot changed, a parameter not seen, a module class that
overrides how torch walks modules) goes to the full check, exactly as before.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["OwnedParams"]

# The methods model.parameters() goes through: a class overriding one may walk differently.
_WALK = ("parameters", "named_parameters", "_named_members", "named_modules", "modules")
_PLAIN = {name: getattr(nn.Module, name) for name in _WALK}


class OwnedParams:
    """The prepared model's parameters, as last walked, and the slots that held them."""

    def __init__(self) -> None:
        self._model: nn.Module | None = None
        self._slots: list[tuple[nn.Module, str, str, object]] = []
        self._ids: frozenset[int] = frozenset()

    def holds_all(self, model: nn.Module, params: Iterable[torch.Tensor]) -> bool:
        """True when ``model`` is known to hold all of ``params``; False: walk it to know."""
        if self._model is not model or not self._intact():
            self._snapshot(model)
        return self._ids.issuperset(map(id, params))

    def _intact(self) -> bool:
        for module, attr, name, obj in self._slots:  # a loop: cheaper than all() over a genexpr
            if getattr(module, attr).get(name) is not obj:
                return False
        return True

    def _snapshot(self, model: nn.Module) -> None:
        self._model, self._slots, self._ids = model, [], frozenset()
        slots: list[tuple[nn.Module, str, str, object]] = []
        ids: set[int] = set()
        seen, stack = {id(model)}, [model]
        while stack:
            module = stack.pop()
            if any(getattr(type(module), name) is not _PLAIN[name] for name in _WALK):
                return  # nothing known: every step walks the model
            for name, param in module._parameters.items():
                if param is not None:
                    slots.append((module, "_parameters", name, param))
                    ids.add(id(param))
            for name, child in module._modules.items():
                if child is not None:
                    slots.append((module, "_modules", name, child))
                    if id(child) not in seen:
                        seen.add(id(child))
                        stack.append(child)
        if ids == {id(p) for p in model.parameters()}:
            self._slots, self._ids = slots, frozenset(ids)
