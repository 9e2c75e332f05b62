"""The param-group mirror: the wrapper's (outer) groups of model parameters and the inner
optimizer's groups of shadows, kept in step.

Design note: users, LR schedulers and ``GradScaler`` see the outer groups (the model's own 16-bit
parameters); the inner optimizer steps the inner groups (one shadow per parameter: an fp32
master, an fp32 scratch leaf, or the parameter itself where it is fp32 or complex). Settings flow
outer to inner at every step (:meth:`GroupMirror.sync`), so a scheduler built on the wrapper drives
the inner optimizer. Groups added later come in either way: through the wrapper's
``add_param_group`` (:meth:`GroupMirror.add`), or added to the inner optimizer after wrapping
(:meth:`GroupMirror.take_inner_groups`, called at every entry point). A parameter listed twice
in one group keeps one shadow, listed twice in the inner group as well, so the inner optimizer
steps it twice as torch steps such a parameter (:attr:`GroupMirror.repeated` lists them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from mixprec.optim.plan import SIXTEEN_BIT

__all__ = ["GroupMirror", "StateView", "hyperparameters"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SUPPORTED_NAMES = "float16, bfloat16, float32 and complex"


def hyperparameters(group: Mapping[str, Any]) -> dict[str, Any]:
    """A param group's settings without its ``params`` list."""
    return {k: v for k, v in group.items() if k != "params"}


class GroupMirror:
    """Outer param groups (model parameters) mirrored by the inner optimizer's (shadows).

    Args:
        name: the wrapper's class name, for messages.
        outer: the wrapper's ``param_groups`` list (held, not copied).
        inner: the inner optimizer.
        make_shadow: builds the shadow of a 16-bit parameter.

    Attributes:
        shadows: parameter -> the tensor the inner optimizer steps for it.
        repeated: the parameters listed more than once in their group.
    """

    def __init__(
        self,
        name: str,
        outer: list[dict[str, Any]],
        inner: torch.optim.Optimizer,
        make_shadow: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.name = name
        self.outer = outer
        self.inner = inner
        self.make_shadow = make_shadow
        self.shadows: dict[torch.Tensor, torch.Tensor] = {}
        self.repeated: set[torch.Tensor] = set()

    def check_group(self, params: list[torch.Tensor]) -> None:
        """Raise unless ``params`` can form a group: one device, supported dtypes."""
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(
                f"{self.name}: one param group mixes devices {sorted(map(str, devices))!r}, which "
                "is not supported; put the parameters of each device in their own group or "
                "optimizer"
            )
        for p in params:
            if p.dtype not in _SUPPORTED_DTYPES and not p.is_complex():
                raise TypeError(
                    f"{self.name} handles {_SUPPORTED_NAMES} parameters, got one of dtype "
                    f"{p.dtype!r} and shape {tuple(p.shape)!r}; cast the model by policy first "
                    "(mixprec.optim.cast_module)"
                )

    def adopt(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The shadows of ``params`` (one group), made where missing, in order."""
        seen: set[torch.Tensor] = set()
        shadows = []
        for p in params:
            if p in seen:
                self.repeated.add(p)
            seen.add(p)
            shadow = self.shadows.get(p)
            if shadow is None:
                shadow = self.make_shadow(p) if p.dtype in SIXTEEN_BIT else p
                self.shadows[p] = shadow
            shadows.append(shadow)
        return shadows

    def adopt_existing(self) -> None:
        """Move the inner groups onto the shadows of the outer groups' parameters (at wrap)."""
        for outer_group, inner_group in zip(self.outer, self.inner.param_groups, strict=True):
            # In place: some optimizers keep the list itself (LBFGS's `_params`).
            inner_group["params"][:] = self.adopt(outer_group["params"])

    def add(self, group: dict[str, Any]) -> None:
        """Give the inner optimizer a group over the shadows of ``group`` (the outer group just
        added, last in ``outer``); on failure the outer group is removed again."""
        try:
            self.check_group(group["params"])
            shadows = self.adopt(group["params"])
            self.inner.add_param_group({**hyperparameters(group), "params": shadows})
        except Exception:
            self.outer.pop()
            for p in group["params"]:
                self.shadows.pop(p, None)
            raise

    def take_inner_groups(self) -> None:
        """Take on the param groups added to the inner optimizer since it was wrapped.

        Their parameters are the model's, so they get shadows in the inner group (in place) and a
        matching outer group with the same settings, as ``add_param_group`` would have made.

        Raises:
            ValueError: the inner optimizer lost groups, or a new group holds a parameter the
                wrapper already steps (that group is removed from the inner optimizer again).
            TypeError: a new group holds a parameter of an unsupported dtype (removed again).
        """
        inner_groups = self.inner.param_groups
        if len(inner_groups) < len(self.outer):
            raise ValueError(
                f"the inner {type(self.inner).__name__} has {len(inner_groups)} param groups "
                f"but {self.name} {len(self.outer)}; remove nothing from the inner optimizer "
                "after wrapping it"
            )
        while len(inner_groups) > len(self.outer):
            group = inner_groups[len(self.outer)]
            params = list(group["params"])
            try:
                if any(p in self.shadows for p in params):
                    raise ValueError(
                        f"a param group added to the inner {type(self.inner).__name__} holds "
                        f"parameters that {self.name} already steps; the group was removed "
                        "again: give each parameter to one group only"
                    )
                self.check_group(params)
            except (TypeError, ValueError):
                inner_groups.pop(len(self.outer))
                raise
            self.outer.append({**hyperparameters(group), "params": params})
            group["params"][:] = self.adopt(params)

    def sync(self) -> None:
        """Copy the outer groups' settings into the inner groups."""
        for outer, inner in zip(self.outer, self.inner.param_groups, strict=True):
            for key, value in outer.items():
                if key != "params":
                    inner[key] = value

    def sync_back(self) -> None:
        """Copy the inner groups' settings into the outer groups (after a state-dict load)."""
        for outer, inner in zip(self.outer, self.inner.param_groups, strict=True):
            outer.update(hyperparameters(inner))

    def params(self) -> list[torch.Tensor]:
        """The outer groups' parameters in order, as listed (a repeated one as often)."""
        return [p for group in self.outer for p in group["params"]]

    def unique_params(self) -> list[torch.Tensor]:
        """:meth:`params` with each parameter once, at its first place."""
        params = self.params()
        return list(dict.fromkeys(params)) if self.repeated else params


class StateView(Mapping[torch.Tensor, Any]):
    """``wrapper.state[param]``: the inner optimizer's state of that parameter's shadow."""

    def __init__(self, mirror: GroupMirror) -> None:
        self._mirror = mirror

    def __getitem__(self, param: torch.Tensor) -> Any:
        return self._mirror.inner.state[self._mirror.shadows[param]]

    def __iter__(self) -> Iterator[torch.Tensor]:
        inner_state = self._mirror.inner.state
        return (p for p, s in self._mirror.shadows.items() if s in inner_state)

    def __len__(self) -> int:
        return sum(1 for _ in self)
