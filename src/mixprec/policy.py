"""Precision policies: what format each thing is in, as data.

Design note: a :class:`Policy` is a frozen dataclass with a string form that parses back to an equal
object, so a policy can live in a config file, a command line or a checkpoint and mean the same
thing everywhere. Missing fields cascade (params default to fp32, compute follows params, output
follows compute, master weights and gradient reduction follow params), which keeps strings short:
``"compute=bf16"`` is torch.amp's bf16 autocast. Per-module exceptions are rules, tried in
order, that map a module-name glob or a module class to another policy. Nothing here probes
hardware or reads the environment: ``"auto"`` is resolved elsewhere, from the device, with a stated
reason.

String grammar::

    policy := base (";" rule)*
    base   := preset | format | key "=" format ("," key "=" format)*
    rule   := ["name:" | "class:"] glob "->" base

Keys: ``params``/``param``/``p``, ``compute``/``c``, ``output``/``o``, ``master``/``m`` (the format
of the optimizer's copy of the weights; equal to params means no separate copy),
``reduce``/``r`` (the format gradients are all-reduced in) and ``state``/``s`` (the optimizer's
states: :data:`~mixprec.formats.STATE_FORMATS`; a rule setting only ``state`` keeps the rest of
the base, ``bf16-lean; class:Embedding -> state=fp32``; other rules are whole policies).

FP8: ``compute=fp8:<recipe>`` (``compute=fp8`` for ``tensorwise``) runs the GEMMs of linear layers
in FP8 under a recipe of :mod:`mixprec.recipes` (the data layer beside this one) and everything
else in bf16, so it sets ``compute`` to bf16 and ``fp8`` to the recipe's string; options go in
parentheses, ``compute=fp8:tensorwise(scaling=delayed,history=8)``. A rule such as
``lm_head -> bf16-mixed`` keeps a layer out of FP8, so an FP8 plan is a policy. An fp8 format as
``compute``, ``output`` or ``master`` is refused: FP8 compute needs a recipe (scales), and nothing
stores outputs or masters in fp8.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from mixprec._policy_checks import (
    check_compute_not_wider,
    check_fp8,
    check_module_args,
    check_no_bare_fp8,
    format_field,
    resolve_format_shown,
    shown,
)
from mixprec.formats import (
    BF16,
    FP16,
    FP32,
    Format,
    FormatLike,
    resolve_format,
    resolve_state_format,
)
from mixprec.fp4_recipes import FP4_RECIPE_NAMES
from mixprec.recipes import RECIPE_NAMES

__all__ = ["FP8_RECIPE_NAMES", "PRESETS", "ModuleRule", "Policy", "cast_floating"]

_T = TypeVar("_T")
_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "params": "param",
        "param": "param",
        "p": "param",
        "compute": "compute",
        "c": "compute",
        "output": "output",
        "o": "output",
        "master": "master",
        "m": "master",
        "reduce": "reduce",
        "r": "reduce",
        "state": "state",
        "s": "state",
    }
)
_VALID_KEYS = "params (p), compute (c), output (o), master (m), reduce (r), state (s)"
_RULE_KINDS = ("name", "class")
FP8_RECIPE_NAMES: tuple[str, ...] = RECIPE_NAMES
"""The FP8 recipes ``compute=fp8:<name>`` accepts: :data:`mixprec.recipes.RECIPE_NAMES`."""


@dataclass(frozen=True)
class ModuleRule:
    """A per-module exception: modules matching ``pattern`` use ``policy`` instead.

    Args:
        pattern: a glob (``fnmatch``, case-sensitive). With ``kind="name"`` it is matched against
            the module's dotted name and every dotted suffix of it, so ``"lm_head"`` matches
            ``"model.lm_head"`` and ``"*norm*"`` matches ``"blocks.3.norm1"``. With ``kind="class"``
            it is matched against the class names in the module's MRO, so ``"*Norm*"`` matches
            ``LayerNorm``, ``BatchNorm2d`` and their subclasses.
        policy: the policy those modules use (it may not carry rules of its own).
        kind: ``"name"`` or ``"class"``.

    Example:
        >>> rule = ModuleRule("*Norm*", Policy.parse("fp32"), kind="class")
        >>> rule.matches("blocks.0.ln", nn.LayerNorm)
        True
    """

    pattern: str
    policy: Policy
    kind: Literal["name", "class"] = "name"

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern.strip():
            raise ValueError(f"a module rule needs a non-empty pattern, got {shown(self.pattern)}")
        if any(c in self.pattern for c in ";,=") or "->" in self.pattern or ":" in self.pattern:
            raise ValueError(
                f"module rule pattern {shown(self.pattern)} may not contain ';', ',', '=', ':' "
                "or '->'"
            )
        object.__setattr__(self, "pattern", self.pattern.strip())
        if self.kind not in _RULE_KINDS:
            raise ValueError(
                f"unknown module rule kind {shown(self.kind)}; valid kinds: "
                f"{', '.join(_RULE_KINDS)}"
            )
        if isinstance(self.policy, str):
            object.__setattr__(self, "policy", Policy.parse(self.policy))
        if not isinstance(self.policy, Policy):
            raise TypeError(
                f"a module rule's policy must be a Policy or a policy string, "
                f"got {type(self.policy).__name__} {shown(self.policy)}"
            )
        if self.policy.rules:
            raise ValueError(
                f"the policy of rule {shown(self.pattern)} carries rules of its own "
                f"({shown(str(self.policy))}); "
                "rules do not nest: list every rule on the top-level policy"
            )

    def matches(self, name: str, module: nn.Module | type | str | None = None) -> bool:
        """Whether a module called ``name`` of class ``module`` falls under this rule.

        Args:
            name: the module's dotted name as in ``model.named_modules()``.
            module: the module, its class, or its class name (needed for ``kind="class"``).

        Raises:
            TypeError: ``name`` is not a string, or ``module`` is none of the above.
        """
        check_module_args("ModuleRule.matches", name, module)
        if self.kind == "name":
            parts = name.split(".")
            return any(
                fnmatch.fnmatchcase(".".join(parts[i:]), self.pattern) for i in range(len(parts))
            )
        return any(fnmatch.fnmatchcase(cls_name, self.pattern) for cls_name in _class_names(module))

    def __str__(self) -> str:
        prefix = "class:" if self.kind == "class" else ""
        return f"{prefix}{self.pattern} -> {self.policy}"


def _class_names(module: nn.Module | type | str | None) -> list[str]:
    if module is None:
        return []
    if isinstance(module, str):
        return [module]
    cls = module if isinstance(module, type) else type(module)
    return [c.__name__ for c in cls.__mro__]


@dataclass(frozen=True)
class Policy:
    """What precision each thing is in: parameters, compute, outputs, master weights, reductions.

    Formats may be given as names or dtypes and are stored as :class:`~mixprec.formats.Format`;
    ``None`` cascades: params fp32, compute follows params, output follows compute, master and
    reduce follow params.

    Args:
        param: format parameters are stored in.
        compute: format matmuls and convolutions run in.
        output: format a module's outputs are cast to.
        master: format of the optimizer's copy of the weights (equal to ``param``: no copy).
        reduce: format gradients are reduced in across processes.
        rules: per-module exceptions, first match wins.
        fp8: the FP8 recipe of linear layers' GEMMs: a name in :data:`FP8_RECIPE_NAMES`, a
            recipe string with options (``"tensorwise:scaling=delayed,history=8"``; written
            ``compute=fp8:tensorwise(scaling=delayed,history=8)`` in a policy string) or an
            :class:`~mixprec.recipes.Fp8Recipe`; stored as the recipe's canonical string. None:
            no FP8. Requires bf16 compute, the format of everything else.
        state: the optimizer's per-element states between steps, in
            :data:`~mixprec.formats.STATE_FORMATS` (``"fp32"``; fp16 as ``state_dtype`` allows).

    Raises:
        ValueError: an unknown format, or 16-bit (or fp8) params with fp32/tf32 compute: nothing
            would widen the stored weights for the fp32 math, so the first forward would fail.
        TypeError: a field of the wrong type.

    Example:
        >>> p = Policy.parse("params=fp32,compute=bf16,output=fp32")
        >>> p == Policy.parse("bf16-mixed") == Policy(compute="bf16", output="fp32")
        True
        >>> str(Policy.parse("bf16; *norm* -> fp32"))
        'params=bf16,compute=bf16,output=bf16; *norm* -> params=fp32,compute=fp32,output=fp32'
        >>> Policy.parse("bf16; *norm* -> fp32").for_module("blocks.3.norm1").compute.name
        'fp32'
    """

    param: Format = FP32
    compute: Format = None  # type: ignore[assignment]  # None cascades; always a Format after init
    output: Format = None  # type: ignore[assignment]
    master: Format = None  # type: ignore[assignment]
    reduce: Format = None  # type: ignore[assignment]
    rules: tuple[ModuleRule, ...] = field(default=())
    fp8: str | None = None
    state: str = "fp32"

    def __post_init__(self) -> None:
        # Normalising a frozen instance while it is being built; it never changes afterwards.
        param = format_field("param", self.param if self.param is not None else FP32)
        compute = format_field("compute", _or(self.compute, param))
        object.__setattr__(self, "param", param)
        object.__setattr__(self, "compute", compute)
        check_no_bare_fp8(param, compute, self.output, self.master)  # before they cascade
        object.__setattr__(self, "output", format_field("output", _or(self.output, compute)))
        object.__setattr__(self, "master", format_field("master", _or(self.master, param)))
        object.__setattr__(self, "reduce", format_field("reduce", _or(self.reduce, param)))
        check_compute_not_wider(param, compute)
        object.__setattr__(self, "fp8", check_fp8(self.fp8, compute))
        object.__setattr__(self, "state", format_field("state", self.state, resolve_state_format))
        if not isinstance(self.rules, (tuple, list)):
            raise TypeError(
                f"rules must be a tuple of ModuleRule, got {type(self.rules).__name__} "
                f"{shown(self.rules)}"
            )
        for rule in self.rules:
            if not isinstance(rule, ModuleRule):
                raise TypeError(f"rules must hold ModuleRule objects, got {shown(rule)}")
        object.__setattr__(self, "rules", tuple(self.rules))

    # -- strings ----------------------------------------------------------------------------

    @classmethod
    def parse(cls, spec: str | Policy) -> Policy:
        """Build a policy from its string form, a preset name, or a bare format.

        Args:
            spec: e.g. ``"bf16-mixed"``, ``"bf16"`` (everything bf16), ``"p=fp32,c=fp16"``,
                ``"bf16-pure; class:*Norm* -> fp32"``. A ``Policy`` is returned unchanged.

        Raises:
            ValueError: unknown preset, format or key; a repeated key; a malformed rule; 16-bit
                params with fp32 compute (messages echo a couple of hundred characters at most).
            TypeError: ``spec`` is not a string or a Policy.
        """
        if isinstance(spec, Policy):
            return spec
        if not isinstance(spec, str):
            raise TypeError(
                f"a policy is given as a string or a Policy, got {type(spec).__name__} "
                f"{shown(spec)}"
            )
        base, *rule_specs = spec.split(";")
        policy = _parse_base(base, spec)
        rules = tuple(_parse_rule(r, spec, policy) for r in rule_specs)
        # A preset's own rules (nvfp4-mixed's head) stay, after the user's: the first match wins.
        return replace(policy, rules=rules + policy.rules) if rules else policy

    def __str__(self) -> str:
        compute: object = self.compute
        if self.fp8 is not None:
            name, _, options = self.fp8.partition(":")
            kind = "" if name in FP4_RECIPE_NAMES else "fp8:"  # 4-bit recipes: compute=nvfp4
            compute = f"{kind}{name}({options})" if options else f"{kind}{name}"
        parts = [f"params={self.param},compute={compute},output={self.output}"]
        if self.master != self.param:
            parts[0] += f",master={self.master}"
        if self.reduce != self.param:
            parts[0] += f",reduce={self.reduce}"
        if self.state != "fp32":
            parts[0] += f",state={self.state}"
        parts.extend(str(rule) for rule in self.rules)
        return "; ".join(parts)

    # -- module rules -----------------------------------------------------------------------

    def for_module(self, name: str, module: nn.Module | type | str | None = None) -> Policy:
        """The policy that applies to the module called ``name`` (of class ``module``).

        The first rule that matches wins; without a match this policy applies. The result carries
        no rules.

        Args:
            name: dotted module name, e.g. ``"blocks.3.ln1"``.
            module: the module instance, its class, or its class name (for class rules).

        Example:
            >>> p = Policy.parse("bf16-pure; class:LayerNorm -> fp32; lm_head -> fp32")
            >>> p.for_module("blocks.3.ln1", nn.LayerNorm).param.name
            'fp32'
            >>> p.for_module("blocks.3.mlp", nn.Linear).param.name
            'bf16'

        Raises:
            TypeError: ``name`` is not a string, or ``module`` is not a module, class, class name
                or None.
        """
        check_module_args("Policy.for_module", name, module)
        for rule in self.rules:
            if rule.matches(name, module):
                return rule.policy
        return replace(self, rules=()) if self.rules else self

    def with_rules(self, *rules: ModuleRule | str) -> Policy:
        """A copy with ``rules`` appended (strings such as ``"*norm* -> fp32"`` are parsed).

        Raises:
            TypeError: a rule is neither a :class:`ModuleRule` nor a string.
            ValueError: a malformed rule string.

        Example:
            >>> str(Policy.parse("bf16").with_rules("*norm* -> fp32").rules[0])
            '*norm* -> params=fp32,compute=fp32,output=fp32'
        """
        for rule in rules:
            if not isinstance(rule, (ModuleRule, str)):
                raise TypeError(
                    f"with_rules takes ModuleRule objects or rule strings such as "
                    f"'*norm* -> fp32' or 'class:LayerNorm -> fp32', got {type(rule).__name__} "
                    f"{shown(rule)}"
                )
        parsed = tuple(r if isinstance(r, ModuleRule) else _parse_rule(r, r, self) for r in rules)
        return replace(self, rules=self.rules + parsed)

    # -- casting ----------------------------------------------------------------------------

    def cast_to_param(self, tree: _T) -> _T:
        """Cast floating tensors in a nested list/tuple/dict to the param format's dtype.

        Integer, bool and complex tensors and non-tensor leaves are returned as they are. tf32 is
        stored in fp32, so casting to tf32 is a cast to float32 (the values are not rounded).
        """
        return cast_floating(tree, self.param.dtype)

    def cast_to_compute(self, tree: _T) -> _T:
        """Cast floating tensors in ``tree`` to the compute format's dtype (see cast_to_param)."""
        return cast_floating(tree, self.compute.dtype)

    def cast_to_output(self, tree: _T) -> _T:
        """Cast floating tensors in ``tree`` to the output format's dtype (see cast_to_param)."""
        return cast_floating(tree, self.output.dtype)


def cast_floating(
    tree: Any, dtype: torch.dtype, sources: Collection[torch.dtype] | None = None
) -> Any:
    """Cast every floating tensor in nested lists/tuples/namedtuples/dicts (rebuilt with their
    own types) to ``dtype``; other leaves pass through untouched.

    Args:
        tree: a tensor or nested containers of them.
        dtype: the target dtype.
        sources: if given, only tensors of these dtypes are cast (e.g. only 16-bit ones).
    """
    if isinstance(tree, torch.Tensor):
        wanted = tree.is_floating_point() and (sources is None or tree.dtype in sources)
        return tree.to(dtype) if wanted else tree
    if isinstance(tree, Mapping):
        return type(tree)({k: cast_floating(v, dtype, sources) for k, v in tree.items()})  # type: ignore[call-arg]
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # namedtuple
        return type(tree)(*(cast_floating(v, dtype, sources) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(cast_floating(v, dtype, sources) for v in tree)
    return tree


def _or(value: FormatLike | None, default: Format) -> FormatLike:
    return default if value is None else value


def _parse_base(text: str, whole: str) -> Policy:
    text = text.strip()
    if not text:
        raise ValueError(
            f"empty policy in {shown(whole)}; write a preset ({_presets()}) or key=format"
        )
    if text.endswith(")") and "=" not in text.partition("(")[0]:
        return _preset_with_options(text, whole)  # nvfp4-mixed(rht=false)
    if "=" not in text:
        preset = PRESETS.get(text.lower())
        if preset is not None:
            return preset
        if text.lower() == "auto":
            raise ValueError(
                "'auto' is not a fixed policy: it is chosen from the hardware when a run starts; "
                f"here pass a preset ({_presets()}), a format, or key=format pairs"
            )
        try:
            fmt = resolve_format(text)
        except ValueError:
            raise ValueError(
                f"unknown precision {shown(text)} in {shown(whole)}; valid presets: "
                f"{_presets()}; valid formats: fp32, tf32, fp16, bf16, fp8_e4m3, fp8_e5m2; or "
                f"key=format pairs with keys {_VALID_KEYS}"
            ) from None
        return _built(whole, param=fmt, compute=fmt, output=fmt)
    values: dict[str, Any] = {}
    for item in _split_items(text):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not key or not value:
            raise ValueError(
                f"malformed item {shown(item.strip())} in policy {shown(whole)}; write "
                "key=format, e.g. 'params=fp32,compute=bf16'"
            )
        if key.lower() not in _KEYS:
            raise ValueError(
                f"unknown policy key {shown(key)} in {shown(whole)}; valid keys: {_VALID_KEYS}"
            )
        canonical = _KEYS[key.lower()]
        if canonical in values:
            raise ValueError(f"policy key {key!r} is given twice in {shown(whole)}")
        kind, colon, recipe = value.partition(":")
        if canonical == "compute" and kind.strip().lower() == "fp8":
            values["fp8"] = _recipe_text(recipe) if colon else "tensorwise"
            if values["fp8"].partition(":")[0] in FP4_RECIPE_NAMES:
                raise ValueError(
                    f"{recipe.strip()!r} is a 4-bit recipe, not an fp8 one; write "
                    f"'compute={recipe.strip()}' (in policy {shown(whole)})"
                )
            values["compute"] = BF16
            continue
        if canonical == "compute" and value.partition("(")[0].strip().lower() in FP4_RECIPE_NAMES:
            values["fp8"] = _recipe_text(value)  # a 4-bit recipe: compute=nvfp4(rht=false)
            values["compute"] = BF16
            continue
        if canonical == "state":  # a storage format name, checked by Policy
            values["state"] = value
            continue
        try:
            values[canonical] = resolve_format_shown(value)
        except ValueError as err:
            raise ValueError(f"{err} (in policy {shown(whole)}, key {key!r})") from None
    return _built(whole, **values)


def _split_items(text: str) -> list[str]:
    """``text`` split at the commas outside parentheses: a recipe's options
    (``compute=fp8:tensorwise(scaling=delayed,history=8)``) stay in their item."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


def _recipe_text(text: str) -> str:
    """``name(options)`` (the policy's spelling) as the recipe string ``name:options``."""
    text = text.strip().lower()
    name, paren, rest = text.partition("(")
    if paren and rest.endswith(")"):
        return f"{name.strip()}:{rest[:-1]}"
    return text


def _preset_with_options(text: str, whole: str) -> Policy:
    """``nvfp4-mixed(rht=false)``: a preset whose recipe takes options (an ablation, say)."""
    name, _, options = text[:-1].partition("(")
    preset = PRESETS.get(name.strip().lower())
    if preset is None or preset.fp8 is None:
        with_recipe = ", ".join(k for k, v in PRESETS.items() if v.fp8 is not None)
        raise ValueError(
            f"unknown precision {shown(text)} in {shown(whole)}: options in parentheses go to "
            f"a preset with a low-precision recipe ({with_recipe}), e.g. 'nvfp4-mixed(rht=false)'"
        )
    recipe = ",".join(filter(None, (preset.fp8.partition(":")[2], options.strip())))
    try:
        return replace(preset, fp8=f"{preset.fp8.partition(':')[0]}:{recipe}")
    except ValueError as err:
        raise ValueError(f"{err} (in policy {shown(whole)})") from None


def _built(whole: str, **fields: Any) -> Policy:
    """``Policy(**fields)``, a refused combination reported with the text it came from."""
    try:
        return Policy(**fields)
    except ValueError as err:
        raise ValueError(f"{err} (in policy {shown(whole)})") from None


def _parse_rule(text: str, whole: str, base: Policy) -> ModuleRule:
    target, arrow, policy_text = text.partition("->")
    target = target.strip()
    if not arrow or not target or not policy_text.strip():
        raise ValueError(
            f"malformed module rule {shown(text.strip())} in {shown(whole)}; write "
            "'<name glob> -> <policy>' or 'class:<class glob> -> <policy>', e.g. '*norm* -> fp32'"
        )
    kind, colon, pattern = target.partition(":")
    if not colon:
        kind, pattern = "name", target
    if kind.strip() not in _RULE_KINDS:
        raise ValueError(
            f"unknown module rule kind {shown(kind.strip())} in {shown(whole)}; valid kinds: "
            f"{', '.join(_RULE_KINDS)} (e.g. 'class:LayerNorm -> fp32')"
        )
    policy = _parse_base(policy_text, whole)
    keys = {_KEYS.get(i.partition("=")[0].strip().lower()) for i in _split_items(policy_text)}
    if keys == {"state"} and "=" in policy_text:  # only the state format: the rest is the base's
        policy = replace(base, rules=(), state=policy.state)
    return ModuleRule(pattern.strip(), policy, kind=kind.strip())  # type: ignore[arg-type]


def _presets() -> str:
    return ", ".join(PRESETS)


_HEAD = (ModuleRule("*head", Policy(param=FP32, compute=BF16, output=FP32)),)
"""The 4-bit presets' rule: the output layer (``lm_head``, ``head``) keeps bf16 GEMMs, as
NVIDIA's NVFP4 recipe keeps its last layers in high precision."""

PRESETS: Mapping[str, Policy] = MappingProxyType(
    {
        "fp32": Policy(),
        "bf16-mixed": Policy(param=FP32, compute=BF16, output=FP32),
        "fp16-mixed": Policy(param=FP32, compute=FP16, output=FP32),
        "bf16-pure": Policy(param=BF16, compute=BF16, output=BF16),
        "bf16-lean": Policy(param=BF16, compute=BF16, output=BF16, state="int8"),
        "fp8-mixed": Policy(param=FP32, compute=BF16, output=FP32, fp8="tensorwise"),
        "nvfp4-mixed": Policy(param=FP32, compute=BF16, output=FP32, fp8="nvfp4", rules=_HEAD),
        "mxfp4-mixed": Policy(param=FP32, compute=BF16, output=FP32, fp8="mxfp4", rules=_HEAD),
    }
)
"""The named policies. ``*-mixed``: fp32 weights, 16-bit compute, fp32 outputs (torch.amp's recipe);
``bf16-pure``: everything in bf16, no master copy (pair with stochastic rounding); ``bf16-lean``:
``bf16-pure`` with the optimizer's states in block-wise int8 (the session's default update for
it is stochastic rounding); ``fp8-mixed``:
linear layers' GEMMs in FP8 with tensorwise dynamic scaling (e4m3 forward, e5m2 gradients), bf16
elsewhere, fp32 weights (``compute=fp8:rowwise`` and the other recipes of
:data:`mixprec.recipes.RECIPES` by policy string). ``nvfp4-mixed`` and ``mxfp4-mixed``: the 4-bit
recipes of :mod:`mixprec.fp4_recipes` (``compute=nvfp4``, ``compute=mxfp4``) with the output layer
(``*head``) in bf16; NVIDIA also keeps the last few blocks in bf16, which depends on the model: add
rules (``nvfp4-mixed; blocks.11.* -> bf16-mixed``) or ask ``advise_fp8(model, batch, loss_fn,
"nvfp4")``. Options go in parentheses: ``nvfp4-mixed(rht=false)`` is the preset without RHT."""
