"""Applying FP8 to a model: swap ``nn.Linear`` for :class:`Fp8Linear`, by a plan or a policy.

Design note: the swap replaces each chosen ``nn.Linear`` by an :class:`Fp8Linear`, a subclass
holding the *same* parameter objects, so ``state_dict`` keys, optimizers built before the swap,
weight tying and ``isinstance(m, nn.Linear)`` checks all keep working (torchao's
``convert_to_float8_training`` does the same). The alternatives cost more: a forward hook cannot
replace a module's computation without running it first, and patching ``forward`` is
monkeypatching. The price of a swap is that it happens once, before ``torch.compile`` or anything
that must see the new modules. Delayed scaling adds one state_dict key per layer
(``fp8_amax_history``).

Which layers: a plan (:class:`Fp8Plan`, ``"rowwise; lm_head -> bf16"``), a ``module_filter`` as
torchao's, or a :class:`~mixprec.policy.Policy` with ``compute=fp8:<recipe>`` and rules
(:func:`apply_fp8_policy`). A layer whose shape does not fit the recipe's blocks (blockwise and MX
need whole 128 or 32 blocks along both weight dims) is left in high precision with a warning
(``on_mismatch="fallback"``), or refused (``"error"``); :class:`Fp8Conversion` lists what was
converted and what was not, and why.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

from torch import nn

from mixprec.compute.fp8_linear import BACKENDS, Fp8Backend, Fp8Linear
from mixprec.policy import Policy
from mixprec.recipes import Fp8Recipe

__all__ = ["Fp8Conversion", "Fp8Plan", "OnMismatch", "apply_fp8_policy", "convert_to_fp8"]

OnMismatch = Literal["fallback", "error"]
_ON_MISMATCH: tuple[str, ...] = get_args(OnMismatch)


@dataclass(frozen=True)
class Fp8Plan:
    """A recipe plus the layers that stay in high precision, with a string form that round-trips:
    ``"<recipe>[; <name glob> -> bf16]*"`` (globs match a module's dotted name or any dotted
    suffix of it, as policy rules do).

    Example:
        >>> text = "rowwise; lm_head -> bf16; blocks.0.* -> bf16"
        >>> plan = Fp8Plan.parse(text)
        >>> plan.keeps_high_precision("model.lm_head"), str(plan) == text
        (True, True)
    """

    recipe: Fp8Recipe
    keep_high_precision: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str | Fp8Recipe | Fp8Plan) -> Fp8Plan:
        """A plan from its string form (a bare recipe name is a plan without exceptions).

        Raises:
            ValueError: an unknown recipe, or a rule that is not ``'<glob> -> bf16'``.
        """
        if isinstance(spec, Fp8Plan):
            return spec
        if isinstance(spec, Fp8Recipe):
            return cls(spec)
        if not isinstance(spec, str):
            raise TypeError(
                f"an fp8 plan is a string such as 'rowwise; lm_head -> bf16', got {spec!r}"
            )
        head, *rules = spec.split(";")
        globs = []
        for rule in rules:
            pattern, arrow, target = (s.strip() for s in rule.partition("->"))
            if not arrow or not pattern or target not in ("bf16", "high"):
                raise ValueError(
                    f"malformed fp8 rule {rule.strip()!r} in {spec!r}; write '<name glob> -> bf16' "
                    "(that layer keeps its high-precision GEMMs), e.g. 'lm_head -> bf16'"
                )
            globs.append(pattern)
        return cls(Fp8Recipe.parse(head), tuple(globs))

    def keeps_high_precision(self, name: str) -> bool:
        """Whether the module called ``name`` matches one of the plan's rules."""
        parts = name.split(".")
        suffixes = [".".join(parts[i:]) for i in range(len(parts))]
        return any(fnmatch.fnmatchcase(s, g) for g in self.keep_high_precision for s in suffixes)

    def __str__(self) -> str:
        return "; ".join([str(self.recipe), *(f"{g} -> bf16" for g in self.keep_high_precision)])


@dataclass
class Fp8Conversion:
    """What :func:`convert_to_fp8` did: the model, and each linear layer's fate by name."""

    model: nn.Module
    converted: list[str] = field(default_factory=list)
    fallbacks: dict[str, str] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)


def convert_to_fp8(
    model: nn.Module,
    plan: str | Fp8Recipe | Fp8Plan = "tensorwise",
    *,
    module_filter: Callable[[nn.Module, str], bool] | None = None,
    on_mismatch: OnMismatch = "fallback",
    backend: Fp8Backend = "auto",
) -> Fp8Conversion:
    """Swap the ``nn.Linear`` modules of ``model`` for :class:`Fp8Linear`, in place.

    The new modules hold the same parameters, so ``state_dict`` keys (plus ``fp8_amax_history``
    for delayed scaling) and existing optimizers are unchanged. Call it before ``torch.compile``
    and before building a mixed-precision session's optimizer wrapper.

    Args:
        model: the model (a bare ``nn.Linear`` is returned converted in ``.model``).
        plan: a recipe, or a plan string such as ``"rowwise; lm_head -> bf16"``.
        module_filter: ``(module, name) -> bool``; layers for which it is False stay as they are
            (torchao's ``module_filter_fn``).
        on_mismatch: a layer whose shape does not fit the recipe's blocks: ``"fallback"`` keeps
            it in high precision with a warning, ``"error"`` refuses.
        backend: ``"auto"``, ``"emulated"`` or ``"native"``.

    Returns:
        An :class:`Fp8Conversion`.

    Raises:
        ValueError: an unknown recipe, mismatch setting or backend; a layer that does not fit
            with ``on_mismatch="error"``.

    Example:
        >>> import torch
        >>> with torch.random.fork_rng():  # examples leave the global generator as it was
        ...     net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> with warnings.catch_warnings(record=True):  # layer '2' (10 x 64) stays high precision
        ...     done = convert_to_fp8(net, "mxfp8", on_mismatch="fallback")
        >>> done.converted, list(done.fallbacks)
        (['0'], ['2'])
    """
    p = Fp8Plan.parse(plan)
    _check_settings(on_mismatch, backend)

    def recipe_for(name: str, mod: nn.Linear) -> Fp8Recipe | None:
        if p.keeps_high_precision(name) or (module_filter and not module_filter(mod, name)):
            return None
        return p.recipe

    def exclusion(name: str) -> str:
        return f"'{p}; {name or '*'} -> bf16'"

    return _convert(model, recipe_for, on_mismatch, backend, exclusion)


def apply_fp8_policy(
    model: nn.Module,
    policy: Policy | str,
    *,
    on_mismatch: OnMismatch = "fallback",
    backend: Fp8Backend = "auto",
) -> Fp8Conversion:
    """Convert the linear layers a :class:`~mixprec.policy.Policy` puts in FP8 (in place).

    Each ``nn.Linear`` named ``name`` is converted with the recipe of
    ``policy.for_module(name, module).fp8``; a layer whose rule has no fp8 recipe (e.g.
    ``lm_head -> bf16-mixed``) stays as it is. What a mixed-precision session calls in ``prepare``
    for a ``compute=fp8:<recipe>`` policy, before it wraps the optimizer.

    Example:
        >>> import torch
        >>> with torch.random.fork_rng():
        ...     net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> done = apply_fp8_policy(net, "params=fp32,compute=fp8:rowwise,output=fp32; 2 -> bf16")
        >>> done.converted, done.excluded
        (['0'], ['2'])
    """
    pol = Policy.parse(policy)
    _check_settings(on_mismatch, backend)

    def recipe_for(name: str, mod: nn.Linear) -> Fp8Recipe | None:
        recipe = pol.for_module(name, mod).fp8
        return None if recipe is None else Fp8Recipe.parse(recipe)

    def exclusion(name: str) -> str:
        return f"a rule '{name or '*'} -> bf16-mixed'"

    return _convert(model, recipe_for, on_mismatch, backend, exclusion)


def _check_settings(on_mismatch: object, backend: object) -> None:
    if on_mismatch not in _ON_MISMATCH:
        raise ValueError(
            f"unknown on_mismatch {on_mismatch!r}; valid choices: "
            f"{', '.join(map(repr, _ON_MISMATCH))}"
        )
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown fp8 backend {backend!r}; valid backends: {', '.join(map(repr, BACKENDS))}"
        )


def _convert(
    model: nn.Module,
    recipe_for: Callable[[str, nn.Linear], Fp8Recipe | None],
    on_mismatch: OnMismatch,
    backend: Fp8Backend,
    exclusion: Callable[[str], str],
) -> Fp8Conversion:
    result = Fp8Conversion(model)
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if type(mod) is nn.Linear  # exactly nn.Linear: subclasses may compute something else
    ]
    for name, mod in targets:
        recipe = recipe_for(name, mod)
        if recipe is None:
            result.excluded.append(name)
            continue
        misfit = _misfit(mod, recipe)
        if misfit:
            if on_mismatch == "error":
                raise ValueError(
                    f"layer {name!r} ({mod.out_features}x{mod.in_features}) does not fit recipe "
                    f"{str(recipe)!r}: {misfit}; pass on_mismatch='fallback' to keep it in "
                    f"high precision, or exclude it: {exclusion(name)}"
                )
            result.fallbacks[name] = misfit
            warnings.warn(f"fp8: layer {name!r} stays in high precision: {misfit}", stacklevel=3)
            continue
        new = Fp8Linear.from_linear(mod, recipe, backend)
        if name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
        else:
            result.model = new
        result.converted.append(name)
    return result


def _misfit(linear: nn.Linear, recipe: Fp8Recipe) -> str | None:
    rows, cols = recipe.required_multiple()
    if linear.out_features % rows or linear.in_features % cols:
        return (
            f"{recipe.granularity} needs out_features and in_features divisible by "
            f"{recipe.block}, got {linear.out_features} and {linear.in_features}"
        )
    return None
