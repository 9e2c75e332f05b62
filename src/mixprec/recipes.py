"""FP8 training recipes as data, and the scales they prescribe, as pure functions.

Design note: an FP8 GEMM multiplies two operands that were each divided into *blocks*, every block
multiplied by its own fp32 scale so that its largest magnitude lands near the top of the fp8 range,
and cast (saturating) to fp8. Every recipe in use is one choice of block shape per operand:

========================  =============================  =====================================
recipe                    activations and gradients      weights
========================  =============================  =====================================
tensorwise                the whole tensor               the whole tensor
rowwise                   one row along the contraction  one row along the contraction
blockwise (DeepSeek-V3)   1 x 128 along the contraction  128 x 128
mxfp8 (OCP MX)            1 x 32 along the contraction   1 x 32 along the contraction
========================  =============================  =====================================

so one blocked quantizer (:func:`mixprec.scaled.quantize_blocks`) serves all of them, and a
recipe is a frozen dataclass (:class:`Fp8Recipe`) naming the formats per operand, the block rule,
how a scale is chosen (dynamic from the block's amax, or *delayed* from an amax history with a
margin; rounded down to a power of two or not; E8M0 for MX) and which GEMMs stay in high
precision. "Along the contraction" means along the dimension the GEMM sums over, so an operand
used by two GEMMs (the input in the forward and in the weight gradient) is quantized twice, once
per GEMM, as torchao and the hardware kernels do.

The scale convention is torchao's: ``data = fp8(clamp(x * scale, -max, max))`` and the
dequantized value is ``data / scale``. The dynamic scale is ``max / max(amax, 1e-12)`` computed in
float64 and rounded to fp32 once; those exact steps are what makes the emulated GEMM bit-identical
to ``torchao.float8`` (see ``tests/fp8``). Rounding a scale down to a power of two clears its
mantissa bits (exact, where ``exp2(floor(log2(s)))`` can round up at the edge of a binade).

Non-finite inputs: a NaN in a block makes its amax and scale NaN, and ±inf makes the scale 0, so
the whole block dequantizes to NaN. That is deliberate: the GEMM output it feeds is non-finite
anyway, and a NaN is what overflow diagnostics look for. A block of zeros has amax 0 and a finite
scale, and stays zero.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Literal, get_args

import torch

from mixprec.formats import FP8_E4M3, FP8_E5M2, Format, FormatLike, resolve_format

__all__ = [
    "EPS",
    "GEMMS",
    "RECIPES",
    "RECIPE_NAMES",
    "Fp8Recipe",
    "Granularity",
    "block_shape",
    "delayed_scale",
    "dynamic_scale",
    "e8m0_scale",
    "round_down_to_power_of_two",
]

Granularity = Literal["tensorwise", "rowwise", "blockwise", "mxfp8"]
Scaling = Literal["dynamic", "delayed"]
Gemm = Literal["output", "grad_input", "grad_weight"]
Role = Literal["input", "weight", "grad_output"]
_GRANULARITIES: tuple[str, ...] = get_args(Granularity)
_SCALINGS: tuple[str, ...] = get_args(Scaling)
GEMMS: tuple[str, ...] = get_args(Gemm)
"""The three GEMMs of a linear layer: ``output = x @ w.T``, ``grad_input = g @ w``,
``grad_weight = g.T @ x``."""

EPS = 1e-12
"""The smallest amax a dynamic scale divides by (torchao's ``EPS``): a zero block keeps a finite
scale."""
_E8M0_MIN, _E8M0_MAX = -127, 127
_FP8_FORMATS = (FP8_E4M3, FP8_E5M2)
RECIPE_NAMES: tuple[str, ...] = (
    "tensorwise",
    "tensorwise_delayed",
    "rowwise",
    "rowwise_with_gw_hp",
    "blockwise",
    "mxfp8",
)
"""The names of :data:`RECIPES`, the one table of recipe names (``compute=fp8:<name>``)."""
_BLOCKED = ("blockwise", "mxfp8")  # the granularities whose blocks have a length to choose
_DEFAULT_HISTORY, _DEFAULT_MARGIN, _DEFAULT_BLOCK = 16, 0, 128


@dataclass(frozen=True)
class Fp8Recipe:
    """How a linear layer's three GEMMs are run in FP8: formats, blocks, scales.

    Args:
        name: the recipe's name in :data:`RECIPES` (its string form starts with it).
        granularity: ``"tensorwise"``, ``"rowwise"``, ``"blockwise"`` or ``"mxfp8"`` (see the
            module's table).
        input_format: fp8 format of the activations (``x``).
        weight_format: fp8 format of the weights.
        grad_format: fp8 format of the output gradient.
        scaling: ``"dynamic"`` (each scale from the block's current amax) or ``"delayed"`` (from
            the largest amax of the last ``history`` steps; tensorwise only).
        history: amax history length of delayed scaling, at least 1.
        margin: delayed scaling divides its scale by ``2**margin`` (headroom for growth).
        power_of_two: round every scale down to a power of two (exact dequantization; MX scales
            are powers of two by definition).
        block: block length of ``blockwise`` (weights ``block x block``) and ``mxfp8``.
        high_precision: GEMMs that run on the high-precision operands instead (e.g.
            ``{"grad_weight"}``: fp32 accumulation of the un-quantized inputs, one rounding).
        weight_for_grad_input: granularity of the weight operand in the ``grad_input`` GEMM when it
            differs from ``granularity`` (torchao's ``rowwise_with_gw_hp`` scales it tensorwise).
        amax_reduce: take every dynamic (and recorded) amax of an activation or gradient over
            all data-parallel ranks (an ``all_reduce(MAX)`` over the default process group), so
            the scales of 2 ranks are those of one process on the whole batch. Only amaxes of
            blocks that span the batch dimension are reduced (tensorwise ones, and the
            weight-gradient GEMM's blocks along the batch); weights are the same on every rank.
            Without a process group it changes nothing. Every rank must run the same layers
            (one without rows calls them with its empty batch). Option string
            ``amax_reduce=true``.

    Raises:
        ValueError: a name not in :data:`RECIPE_NAMES` (customize a named recipe with
            ``dataclasses.replace`` or its string options instead: the name is what the GEMM
            custom op is told), an unknown granularity or scaling, a non-fp8 format, delayed
            scaling with a history below 1 or with a granularity other than tensorwise, a bad
            block or GEMM name, or a field that does not apply (``history``/``margin`` without
            delayed scaling, ``block`` outside blockwise and MX).

    Example:
        >>> Fp8Recipe.parse("tensorwise:scaling=delayed,history=8").history
        8
        >>> str(Fp8Recipe.parse("rowwise"))
        'rowwise'
        >>> Fp8Recipe.parse(str(RECIPES["mxfp8"])) == RECIPES["mxfp8"]
        True
    """

    name: str
    granularity: Granularity = "tensorwise"
    input_format: Format = FP8_E4M3
    weight_format: Format = FP8_E4M3
    grad_format: Format = FP8_E5M2
    scaling: Scaling = "dynamic"
    history: int = _DEFAULT_HISTORY
    margin: int = _DEFAULT_MARGIN
    power_of_two: bool = False
    block: int = _DEFAULT_BLOCK
    high_precision: frozenset[str] = field(default=frozenset())
    weight_for_grad_input: Granularity | None = None
    amax_reduce: bool = False

    def __post_init__(self) -> None:
        if self.name not in RECIPE_NAMES:
            raise ValueError(
                f"unknown fp8 recipe name {self.name!r}; valid names: "
                f"{', '.join(map(repr, RECIPE_NAMES))}. To customize one, start from it: "
                f"dataclasses.replace(RECIPES['tensorwise'], margin=1) or "
                f"'tensorwise:scaling=delayed,margin=1'"
            )
        _choice("granularity", self.granularity, _GRANULARITIES)
        _choice("scaling", self.scaling, _SCALINGS)
        if self.weight_for_grad_input is not None:
            _choice("weight_for_grad_input", self.weight_for_grad_input, _GRANULARITIES)
        for name in ("input_format", "weight_format", "grad_format"):
            fmt = resolve_format(getattr(self, name))
            if fmt not in _FP8_FORMATS:
                raise ValueError(
                    f"Fp8Recipe.{name} must be an fp8 format, got {fmt.name!r}; valid formats: "
                    f"{', '.join(repr(f.name) for f in _FP8_FORMATS)}"
                )
            object.__setattr__(self, name, fmt)
        for name in ("history", "margin", "block"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Fp8Recipe.{name} must be an int, got {value!r}")
        if not isinstance(self.amax_reduce, bool):
            raise TypeError(f"Fp8Recipe.amax_reduce must be a bool, got {self.amax_reduce!r}")
        if self.history < 1:
            raise ValueError(
                f"delayed scaling needs an amax history of at least 1 step, got "
                f"history={self.history!r}; pass history=1 (the last step's amax) or more"
            )
        if self.margin < 0:
            raise ValueError(f"Fp8Recipe.margin must be >= 0, got {self.margin!r}")
        if self.block < 1:
            raise ValueError(f"Fp8Recipe.block must be >= 1, got {self.block!r}")
        if self.scaling == "delayed" and self.granularity != "tensorwise":
            raise ValueError(
                f"delayed scaling keeps one amax history per tensor, so it needs "
                f"granularity='tensorwise', got {self.granularity!r}; use scaling='dynamic' "
                f"with {self.granularity!r}"
            )
        self._check_fields_apply()
        if self.granularity == "mxfp8":  # E8M0 scales are powers of two by definition
            object.__setattr__(self, "power_of_two", True)
        hp = frozenset(self.high_precision)
        for gemm in hp:
            _choice("high_precision GEMM", gemm, GEMMS)
        object.__setattr__(self, "high_precision", hp)

    def _check_fields_apply(self) -> None:
        """Refuse a field set away from its default where the recipe never reads it."""
        if self.scaling != "delayed":
            for name, default in (("history", _DEFAULT_HISTORY), ("margin", _DEFAULT_MARGIN)):
                if getattr(self, name) != default:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} applies to delayed scaling only, and "
                        f"recipe {self.name!r} scales dynamically; add scaling='delayed' "
                        f"(tensorwise), or drop {name}"
                    )
        if self.granularity not in _BLOCKED and self.block != _DEFAULT_BLOCK:
            raise ValueError(
                f"block={self.block!r} applies to 'blockwise' and 'mxfp8' only; recipe "
                f"{self.name!r} is {self.granularity!r}: drop block"
            )

    def options(self) -> tuple[str, ...]:
        """The string options (``<recipe>:key=value``) that change what this recipe does."""
        keys = ["scaling", "pow2", "hp", "input", "weight", "grad", "granularity", "w_gi"]
        keys.append("amax_reduce")
        if self.scaling == "delayed":
            keys[1:1] = ["history", "margin"]
        if self.granularity in _BLOCKED:
            keys.insert(1, "block")
        if self.granularity == "mxfp8":
            keys.remove("pow2")
        return tuple(keys)

    @property
    def scale_format(self) -> str:
        """``"e8m0"`` for MX (power-of-two scales stored as an 8-bit exponent), else ``"fp32"``."""
        return "e8m0" if self.granularity == "mxfp8" else "fp32"

    def format_of(self, role: Role) -> Format:
        """The fp8 format of ``role`` (``"input"``, ``"weight"`` or ``"grad_output"``)."""
        return {"input": self.input_format, "weight": self.weight_format}.get(
            role, self.grad_format
        )

    def required_multiple(self) -> tuple[int, int]:
        """What ``(out_features, in_features)`` must be multiples of for this recipe's blocks.

        Hardware kernels for blockwise and MX scaling need whole blocks along a weight's two
        dimensions; tensorwise and rowwise fit every shape.
        """
        if self.granularity in ("blockwise", "mxfp8"):
            return self.block, self.block
        return 1, 1

    # -- strings ----------------------------------------------------------------------------

    @classmethod
    def parse(cls, spec: str | Fp8Recipe) -> Fp8Recipe:
        """A recipe from its string form: a name from :data:`RECIPES`, then ``:key=value,...``.

        Keys: ``scaling``, ``history``, ``margin``, ``pow2`` and ``amax_reduce``
        (``true``/``false``), ``block``,
        ``hp`` (GEMM names joined by ``+``, or ``none``), ``input``/``weight``/``grad`` (formats).

        Raises:
            ValueError: unknown recipe name, key or value, with the valid choices.
            TypeError: ``spec`` is neither a string nor a recipe.

        Example:
            >>> Fp8Recipe.parse("rowwise:hp=grad_weight").high_precision
            frozenset({'grad_weight'})
        """
        if isinstance(spec, Fp8Recipe):
            return spec
        if not isinstance(spec, str):
            raise TypeError(
                f"an fp8 recipe is a name such as 'rowwise' or an Fp8Recipe, got "
                f"{type(spec).__name__} {spec!r}"
            )
        return _parse(spec.strip())

    def __str__(self) -> str:
        base = RECIPES[self.name]
        items = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(base, f.name)
            if f.name == "name" or mine == theirs:
                continue
            items.append(f"{_KEY_OF_FIELD[f.name]}={_show_value(mine)}")
        return self.name + (":" + ",".join(items) if items else "")


def _choice(what: str, value: object, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid choices: {', '.join(map(repr, valid))}")


_FIELD_OF_KEY = {
    "scaling": "scaling",
    "history": "history",
    "margin": "margin",
    "pow2": "power_of_two",
    "block": "block",
    "hp": "high_precision",
    "input": "input_format",
    "weight": "weight_format",
    "grad": "grad_format",
    "granularity": "granularity",
    "w_gi": "weight_for_grad_input",
    "amax_reduce": "amax_reduce",
}
_KEY_OF_FIELD = {v: k for k, v in _FIELD_OF_KEY.items()}


def _show_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, frozenset):
        return "+".join(g for g in GEMMS if g in value) or "none"
    return str(value)


@functools.lru_cache(maxsize=256)
def _parse(spec: str) -> Fp8Recipe:
    name, _, options = spec.partition(":")
    name = name.strip().lower().replace("-", "_")
    if name not in RECIPES:
        raise ValueError(
            f"unknown fp8 recipe {name!r}; valid recipes: {', '.join(map(repr, RECIPES))} "
            "(options after a colon, e.g. 'tensorwise:scaling=delayed,history=16,margin=0')"
        )
    values: dict[str, object] = {}
    keys: list[str] = []
    for item in filter(None, (s.strip() for s in options.split(","))):
        key, sep, raw = (s.strip() for s in item.partition("="))
        if not sep or key not in _FIELD_OF_KEY:
            raise ValueError(
                f"malformed fp8 recipe option {item!r} in {spec!r}; valid keys: "
                f"{', '.join(_FIELD_OF_KEY)} as key=value"
            )
        values[_FIELD_OF_KEY[key]] = _parse_value(_FIELD_OF_KEY[key], raw, spec)
        keys.append(key)
    if not values:
        return RECIPES[name]
    # Scaling and granularity decide which other options apply: set them first, then check.
    shape = {k: v for k, v in values.items() if k in ("scaling", "granularity")}
    target = replace(RECIPES[name], **shape) if shape else RECIPES[name]  # type: ignore[arg-type]
    for key in keys:
        if key not in target.options() and not _is_default(target, key, values):
            raise ValueError(
                f"option {key!r} does not apply to recipe {name!r} in {spec!r}: "
                f"{_why_not(target, key)}; options it takes: {', '.join(target.options())}"
            )
    return replace(RECIPES[name], **values)  # type: ignore[arg-type]


def _is_default(recipe: Fp8Recipe, key: str, values: Mapping[str, object]) -> bool:
    """``mxfp8:pow2=true`` restates what MX scales are: accepted, as it changes nothing."""
    field_name = _FIELD_OF_KEY[key]
    return key == "pow2" and values[field_name] == getattr(recipe, field_name)


def _why_not(recipe: Fp8Recipe, key: str) -> str:
    if key in ("history", "margin"):
        return "it scales dynamically and keeps no amax history (add scaling=delayed)"
    if key == "block":
        whole = "tensors" if recipe.granularity == "tensorwise" else "rows"
        return f"{recipe.granularity} scales whole {whole}, not blocks"
    return "its E8M0 scales are powers of two by definition"


def _parse_value(name: str, raw: str, spec: str) -> object:
    if name in ("history", "margin", "block"):
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} in {spec!r} is not an integer") from None
    if name in ("power_of_two", "amax_reduce"):
        if raw.lower() not in ("true", "false"):
            key = _KEY_OF_FIELD[name]
            raise ValueError(f"{key}={raw!r} in {spec!r}: valid values are 'true' and 'false'")
        return raw.lower() == "true"
    if name == "high_precision":
        return frozenset() if raw == "none" else frozenset(raw.split("+"))
    if name.endswith("_format"):
        return resolve_format(raw)
    return raw


RECIPES: Mapping[str, Fp8Recipe] = MappingProxyType(
    {
        r.name: r
        for r in (
            Fp8Recipe("tensorwise"),
            Fp8Recipe("tensorwise_delayed", scaling="delayed", history=16, margin=0),
            Fp8Recipe("rowwise", "rowwise", grad_format=FP8_E4M3, power_of_two=True),
            Fp8Recipe(
                "rowwise_with_gw_hp",
                "rowwise",
                grad_format=FP8_E4M3,
                power_of_two=True,
                high_precision=frozenset({"grad_weight"}),
                weight_for_grad_input="tensorwise",
            ),
            Fp8Recipe("blockwise", "blockwise", grad_format=FP8_E4M3, block=128),
            Fp8Recipe("mxfp8", "mxfp8", grad_format=FP8_E4M3, block=32, power_of_two=True),
        )
    }
)
"""The named recipes. ``tensorwise`` (torchao's default: e4m3 forward, e5m2 gradients, dynamic),
``tensorwise_delayed`` (TransformerEngine-style amax history 16, margin 0), ``rowwise`` and
``rowwise_with_gw_hp`` (torchao's: e4m3 everywhere, power-of-two scales; the latter keeps the
weight-gradient GEMM in high precision), ``blockwise`` (DeepSeek-V3: 1x128 activation tiles,
128x128 weight blocks, e4m3) and ``mxfp8`` (OCP MX: 32-element blocks, E8M0 scales, e4m3)."""


# -- scales -------------------------------------------------------------------------------------


def dynamic_scale(amax: torch.Tensor, fmt: FormatLike, power_of_two: bool = False) -> torch.Tensor:
    """``fmt.max / max(amax, 1e-12)``, computed in float64 and rounded to fp32 once.

    Args:
        amax: the largest magnitude of each block (any shape).
        fmt: the fp8 format the block is cast to.
        power_of_two: round the scale down to a power of two.

    Returns:
        The fp32 scales, ``amax``'s shape. NaN amax gives NaN, inf gives 0.

    Example:
        >>> dynamic_scale(torch.tensor([448.0, 2.0]), "e4m3").tolist()
        [1.0, 224.0]
        >>> bool(torch.isfinite(dynamic_scale(torch.tensor(0.0), "e4m3")))  # a block of zeros
        True
    """
    fmt = resolve_format(fmt)
    scale = (fmt.max / torch.clamp(amax.to(torch.float64), min=EPS)).to(torch.float32)
    return round_down_to_power_of_two(scale) if power_of_two else scale


def round_down_to_power_of_two(scale: torch.Tensor) -> torch.Tensor:
    """The largest power of two ``<= scale`` for positive normal fp32 ``scale``; 0, inf and NaN
    stay as they are.

    Clearing the mantissa bits is exact; ``exp2(floor(log2(s)))`` can round up at a binade's edge.

    Example:
        >>> round_down_to_power_of_two(torch.tensor([3.0, 0.75, 4.0])).tolist()
        [2.0, 0.5, 4.0]
    """
    bits = scale.contiguous().view(torch.int32) & -(1 << 23)
    return torch.where(torch.isnan(scale), scale, bits.view(torch.float32))


def e8m0_scale(amax: torch.Tensor, fmt: FormatLike) -> torch.Tensor:
    """The OCP MX scale of a block: ``2**-(floor(log2(amax)) - emax)``, as a multiplier.

    The shared exponent ``floor(log2(amax)) - emax`` (``emax`` the element format's largest
    exponent: 8 for e4m3, 15 for e5m2) is clamped to E8M0's range [-127, 127]; an all-zero block
    takes -127. A non-finite amax gives NaN (E8M0's NaN code). The result is an exact power of two
    in fp32, the reciprocal of the scale the MX format stores.

    Example:
        >>> e8m0_scale(torch.tensor([1.0, 448.0, 0.0]), "e4m3").log2().tolist()
        [8.0, 0.0, 127.0]
    """
    fmt = resolve_format(fmt)
    _, exponent = torch.frexp(amax.to(torch.float32))  # amax = m * 2**e, m in [0.5, 1)
    shared = torch.where(amax > 0, exponent - 1 - fmt.max_exponent, _E8M0_MIN)
    shared = shared.clamp(_E8M0_MIN, _E8M0_MAX)
    scale = torch.exp2(-shared.to(torch.float32))  # exact: an integer power of two
    return torch.where(torch.isfinite(amax), scale, torch.full_like(scale, float("nan")))


def delayed_scale(
    history: torch.Tensor, current_amax: torch.Tensor, fmt: FormatLike, margin: int = 0
) -> torch.Tensor:
    """The delayed scale: from the largest amax of the last steps, with ``2**margin`` headroom.

    Before any step was recorded (a history of zeros) the current amax stands in, so the first
    step is scaled dynamically instead of saturating everything.

    Args:
        history: the recorded amaxes of past steps (1-D).
        current_amax: this step's amax (0-D).
        fmt: the fp8 format.
        margin: the scale is divided by ``2**margin``.

    Example:
        >>> delayed_scale(torch.tensor([2.0, 4.0]), torch.tensor(100.0), "e4m3", 1).item()
        56.0
    """
    past = history.max()
    amax = torch.where(past > 0, past, current_amax)
    return dynamic_scale(amax, fmt) * 2.0**-margin


def block_shape(
    recipe: Fp8Recipe, role: Role, shape: tuple[int, int], contraction_dim: int, gemm: Gemm
) -> tuple[int, int]:
    """The block shape of one GEMM operand under ``recipe``.

    Args:
        recipe: the recipe.
        role: ``"input"``, ``"weight"`` or ``"grad_output"``.
        shape: the operand's 2-D shape.
        contraction_dim: which of its dims the GEMM sums over (0 or 1).
        gemm: the GEMM (``"output"``, ``"grad_input"``, ``"grad_weight"``).

    Example:
        >>> block_shape(RECIPES["rowwise"], "input", (8, 64), 1, "output")
        (1, 64)
        >>> block_shape(RECIPES["blockwise"], "weight", (256, 512), 1, "output")
        (128, 128)
    """
    granularity = recipe.granularity
    if role == "weight" and gemm == "grad_input" and recipe.weight_for_grad_input is not None:
        granularity = recipe.weight_for_grad_input
    if granularity == "tensorwise":
        return shape
    if granularity == "blockwise" and role == "weight":
        return recipe.block, recipe.block
    length = shape[contraction_dim] if granularity == "rowwise" else recipe.block
    return (1, length) if contraction_dim == 1 else (length, 1)
