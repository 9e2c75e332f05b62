"""Applying FP8 to a model: swap ``nn.Linear`` for :class:`Fp8Linear`, as a policy says.

Design note: the swap replaces each chosen ``nn.Linear`` by an :class:`Fp8Linear`, a subclass
holding the *same* parameter objects, so ``state_dict`` keys, optimizers built before the swap,
weight tying and ``isinstance(m, nn.Linear)`` checks all keep working (torchao's
``convert_to_float8_training`` does the same). The alternatives cost more: a forward hook cannot
replace a module's computation without running it first, and patching ``forward`` is
monkeypatching. The price of a swap is that it happens once, before ``torch.compile`` or anything
that must see the new modules.

Which layers: a :class:`~mixprec.policy.Policy` — one grammar for precision —, e.g.
``"params=fp32,compute=fp8:rowwise,output=fp32; lm_head -> bf16-mixed"``: each ``nn.Linear`` takes
the recipe of the policy's rule for it, none where the rule has no ``fp8``. A bare recipe
(``"rowwise"``, ``"blockwise:block=64"`` or an :class:`~mixprec.recipes.Fp8Recipe`), optionally
followed by rules (``"rowwise; lm_head -> bf16"``), is shorthand for ``compute=fp8:<recipe>`` with
fp32 weights and outputs; torchao's ``module_filter_fn(module, fqn) -> bool`` narrows the choice
further. Subclasses of ``nn.Linear`` are not swapped (they may compute something else, or their
owner may use their weight directly, as ``nn.MultiheadAttention`` does with ``out_proj``): they are
listed in :attr:`Fp8Conversion.skipped` with a warning. A layer whose shape does not fit the
recipe's blocks (blockwise and MX need whole 128 or 32 blocks along both weight dims) is left in
high precision with a warning (``on_mismatch="fallback"``), or refused (``"error"``).

4-bit recipes (``compute=nvfp4``, ``compute=mxfp4``, or the shorthand ``"nvfp4; lm_head -> bf16"``)
go the same way to :class:`~mixprec.compute.fp4_linear.Fp4Linear`; their blocks need
``in_features`` and ``out_features`` multiples of 16 (nvfp4) or 32 (mxfp4).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

from torch import nn

from mixprec.compute.fp4_linear import Fp4Linear
from mixprec.compute.fp8_linear import BACKENDS, Fp8Backend, Fp8Linear
from mixprec.formats import BF16, FP32
from mixprec.fp4_recipes import ALL_RECIPE_NAMES, Fp4Recipe, parse_recipe
from mixprec.policy import PRESETS, Policy
from mixprec.recipes import Fp8Recipe

__all__ = ["Fp8Conversion", "Fp8Plan", "OnMismatch", "apply_fp8_policy", "convert_to_fp8"]

OnMismatch = Literal["fallback", "error"]
_ON_MISMATCH: tuple[str, ...] = get_args(OnMismatch)
_HIGH = ("bf16", "high")  # the shorthand's rule targets: the layer keeps high-precision GEMMs
ModuleFilter = Callable[[nn.Module, str], bool]


@dataclass
class Fp8Conversion:
    """What :func:`convert_to_fp8` did: the model, and each linear layer's fate by name.

    ``skipped`` maps the ``nn.Linear`` subclasses the policy would have put in FP8 to why they
    were left as they are.
    """

    model: nn.Module
    converted: list[str] = field(default_factory=list)
    fallbacks: dict[str, str] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def convert_to_fp8(
    model: nn.Module,
    policy: str | Policy | Fp8Recipe | Fp8Plan = "tensorwise",
    *,
    module_filter_fn: ModuleFilter | None = None,
    module_filter: ModuleFilter | None = None,
    on_mismatch: OnMismatch = "fallback",
    backend: Fp8Backend = "auto",
) -> Fp8Conversion:
    """Swap the ``nn.Linear`` modules ``policy`` puts in FP8 for :class:`Fp8Linear`, in place.

    The new modules hold the same parameters, so ``state_dict`` keys and existing optimizers are
    unchanged. Call it before ``torch.compile`` and before building a mixed-precision session's
    optimizer wrapper.

    Args:
        model: the model (a bare ``nn.Linear`` is returned converted in ``.model``).
        policy: a :class:`~mixprec.policy.Policy` or policy string with ``compute=fp8:<recipe>``
            (rules without fp8 keep layers out), or a recipe as shorthand, optionally with rules:
            ``"rowwise; lm_head -> bf16"``.
        module_filter_fn: ``(module, fqn) -> bool``, torchao's convention; layers for which it
            is False stay as they are.
        module_filter: the same, under its earlier name.
        on_mismatch: a layer whose shape does not fit the recipe's blocks: ``"fallback"`` keeps
            it in high precision with a warning, ``"error"`` refuses.
        backend: ``"auto"``, ``"emulated"`` or ``"native"``.

    Returns:
        An :class:`Fp8Conversion`.

    Raises:
        ValueError: an unknown recipe, policy, mismatch setting or backend; a layer that does not
            fit with ``on_mismatch="error"``.

    Example:
        >>> import torch
        >>> with torch.random.fork_rng():  # examples leave the global generator as it was
        ...     net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> with warnings.catch_warnings(record=True):  # layer '2' (10 x 64) stays high precision
        ...     done = convert_to_fp8(net, "mxfp8", on_mismatch="fallback")
        >>> done.converted, list(done.fallbacks)
        (['0'], ['2'])
    """
    _check_settings(on_mismatch, backend)
    if module_filter_fn is not None and module_filter is not None:
        raise ValueError("pass module_filter_fn or module_filter (its earlier name), not both")
    keep = module_filter_fn or module_filter
    pol, shorthand = _resolve(policy)

    def recipe_for(name: str, mod: nn.Linear) -> Fp8Recipe | Fp4Recipe | None:
        if keep is not None and not keep(mod, name):
            return None
        chosen = pol.for_module(name, mod).fp8
        return None if chosen is None else parse_recipe(chosen)

    def exclusion(name: str) -> str:
        if shorthand is not None:
            return f"'{shorthand}; {name or '*'} -> bf16'"
        return f"a rule '{name or '*'} -> bf16-mixed'"

    return _convert(model, recipe_for, on_mismatch, backend, exclusion)


def apply_fp8_policy(
    model: nn.Module,
    policy: Policy | str,
    *,
    on_mismatch: OnMismatch = "fallback",
    backend: Fp8Backend = "auto",
) -> Fp8Conversion:
    """:func:`convert_to_fp8` for a :class:`~mixprec.policy.Policy` (what a mixed-precision
    session calls in ``prepare`` for a ``compute=fp8:<recipe>`` policy).

    Example:
        >>> import torch
        >>> with torch.random.fork_rng():
        ...     net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> done = apply_fp8_policy(net, "params=fp32,compute=fp8:rowwise,output=fp32; 2 -> bf16")
        >>> done.converted, done.excluded
        (['0'], ['2'])
    """
    return convert_to_fp8(model, Policy.parse(policy), on_mismatch=on_mismatch, backend=backend)


def _resolve(spec: object) -> tuple[Policy, str | None]:
    """``(the policy, the recipe shorthand's text or None)``."""
    if isinstance(spec, Fp8Plan):
        return spec.to_policy(), str(spec)
    if isinstance(spec, (Fp8Recipe, Fp4Recipe)):
        return _recipe_policy(spec, ()), str(spec)
    if isinstance(spec, Policy):
        return spec, None
    if not isinstance(spec, str):
        raise TypeError(
            f"convert_to_fp8 takes a policy (e.g. 'compute=fp8:rowwise; lm_head -> bf16-mixed'), "
            f"a recipe or a recipe string, got {type(spec).__name__} {spec!r}"
        )
    head, *rules = spec.split(";")
    name = head.partition(":")[0].strip().lower().replace("-", "_")
    if name not in ALL_RECIPE_NAMES and ("=" in head or head.strip().lower() in PRESETS):
        return Policy.parse(spec), None
    try:
        recipe = parse_recipe(head)
    except ValueError as err:
        raise ValueError(
            f"{err}; or pass a policy, e.g. 'params=fp32,compute=fp8:rowwise,output=fp32'"
        ) from None
    return _recipe_policy(recipe, rules), spec.strip()


def _recipe_policy(recipe: Fp8Recipe | Fp4Recipe, rules: list[str] | tuple[str, ...]) -> Policy:
    """The policy a recipe shorthand means: fp32 weights and outputs, the recipe's GEMMs in FP8,
    ``<glob> -> bf16`` rules keeping layers in bf16 compute (their fp32 weights untouched)."""
    policy = Policy(param=FP32, compute=BF16, output=FP32, fp8=str(recipe))
    parsed = []
    for rule in rules:
        pattern, arrow, target = (s.strip() for s in rule.partition("->"))
        parsed.append(f"{pattern} -> bf16-mixed" if arrow and target in _HIGH else rule)
    return policy.with_rules(*parsed) if parsed else policy


@dataclass(frozen=True)
class Fp8Plan:
    """Deprecated: an FP8 plan is a :class:`~mixprec.policy.Policy` now
    (``"compute=fp8:rowwise; lm_head -> bf16-mixed"``), and :func:`convert_to_fp8` takes the
    recipe shorthand ``"rowwise; lm_head -> bf16"`` directly. Kept so existing code runs; it warns
    and converts through :meth:`to_policy`.
    """

    recipe: Fp8Recipe
    keep_high_precision: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        warnings.warn(
            "Fp8Plan is deprecated: pass a policy such as "
            f"'params=fp32,compute=fp8:{self.recipe.name},output=fp32; lm_head -> bf16-mixed' "
            f"(or the recipe string {str(self)!r}) to convert_to_fp8",
            DeprecationWarning,
            stacklevel=3,
        )

    @classmethod
    def parse(cls, spec: str | Fp8Recipe | Fp8Plan) -> Fp8Plan:
        """A plan from ``"<recipe>[; <name glob> -> bf16]*"``.

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
            if not arrow or not pattern or target not in _HIGH:
                raise ValueError(
                    f"malformed fp8 rule {rule.strip()!r} in {spec!r}; write '<name glob> -> bf16' "
                    "(that layer keeps its high-precision GEMMs), e.g. 'lm_head -> bf16'"
                )
            globs.append(pattern)
        return cls(Fp8Recipe.parse(head), tuple(globs))

    def to_policy(self) -> Policy:
        """The policy this plan means (rules ``<glob> -> bf16-mixed``)."""
        return _recipe_policy(self.recipe, [f"{g} -> bf16" for g in self.keep_high_precision])

    def keeps_high_precision(self, name: str) -> bool:
        """Whether the module called ``name`` stays out of FP8 (the policy's rules decide)."""
        return self.to_policy().for_module(name).fp8 is None

    def __str__(self) -> str:
        return "; ".join([str(self.recipe), *(f"{g} -> bf16" for g in self.keep_high_precision)])


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
    recipe_for: Callable[[str, nn.Linear], Fp8Recipe | Fp4Recipe | None],
    on_mismatch: OnMismatch,
    backend: Fp8Backend,
    exclusion: Callable[[str], str],
) -> Fp8Conversion:
    result = Fp8Conversion(model)
    linears = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and not isinstance(mod, Fp8Linear)
    ]
    swaps: list[tuple[str, Fp8Linear]] = []
    for name, mod in linears:
        recipe = recipe_for(name, mod)
        if recipe is None:
            result.excluded.append(name)
            continue
        if type(mod) is not nn.Linear:  # a subclass may compute something else
            result.skipped[name] = (
                f"{type(mod).__name__} is a subclass of nn.Linear, which may compute something "
                "else or be used through its weight alone"
            )
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
            warnings.warn(f"fp8: layer {name!r} stays in high precision: {misfit}", stacklevel=4)
            continue
        if isinstance(recipe, Fp4Recipe):
            new: Fp8Linear = Fp4Linear.from_linear(mod, recipe, backend)
        else:
            new = Fp8Linear.from_linear(mod, recipe, backend)
        swaps.append((name, new))
    # Every layer is decided (a refusal above leaves the model as it was) before one is swapped.
    for name, new in swaps:
        if name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
        else:
            result.model = new
        result.converted.append(name)
    _warn_about_what_stays(
        result, bool(linears) or any(isinstance(m, Fp8Linear) for m in model.modules())
    )
    return result


def _warn_about_what_stays(result: Fp8Conversion, has_linear: bool) -> None:
    if result.skipped:
        listed = "; ".join(
            f"{name!r} ({why.split(' is ')[0]})" for name, why in result.skipped.items()
        )
        warnings.warn(
            f"fp8: {len(result.skipped)} nn.Linear subclass(es) stay in high precision: {listed}. "
            "Only exact nn.Linear modules are swapped for Fp8Linear: a subclass may compute "
            "something else, or its owner may use its weight directly (nn.MultiheadAttention's "
            "out_proj); they are listed in Fp8Conversion.skipped",
            stacklevel=4,
        )
    if not has_linear:
        warnings.warn(
            f"fp8: the model ({type(result.model).__name__}) has no nn.Linear layer, so nothing "
            "runs in FP8 (FP8 applies to linear layers' GEMMs only); the rest computes in bf16",
            stacklevel=4,
        )


def _misfit(linear: nn.Linear, recipe: Fp8Recipe | Fp4Recipe) -> str | None:
    rows, cols = recipe.required_multiple()
    if linear.out_features % rows or linear.in_features % cols:
        return (
            f"{recipe.granularity} needs out_features and in_features divisible by "
            f"{recipe.block}, got {linear.out_features} and {linear.in_features}"
        )
    return None
