"""4-bit training recipes (NVFP4, MXFP4) as data, and the random Hadamard transform they use.

Design note: a 4-bit recipe runs the three GEMMs of a linear layer (``output = x @ w.T``,
``grad_input = g @ w``, ``grad_weight = g.T @ x``) on operands quantized to a block-scaled 4-bit
format of :mod:`mixprec.blockscaled`, each operand in blocks along the dimension its GEMM sums
over, as the FP8 recipes of :mod:`mixprec.recipes` do. NVIDIA's NVFP4 training recipe (the
NVFP4 pretraining paper, Transformer Engine's ``NVFP4BlockScaling``) adds three stabilisers, each
an option here that can be switched off to see what it buys:

============================  ================================================================
option (nvfp4 default)        what it does
============================  ================================================================
``weight_blocks=16x16``       weights quantized in 16x16 tiles, so ``w`` and ``w.T`` quantize
                              alike and the forward and input-gradient GEMMs use one quantized
                              weight (``1x16``: 16-element blocks along each GEMM's contraction,
                              the weight quantized twice)
``rht=true``                  a 16x16 random Hadamard transform (a Hadamard matrix times random
                              signs, orthogonal) applied to both operands of the weight-gradient
                              GEMM along the token dimension it sums over: ``(Rᵀg)ᵀ(Rᵀx) = gᵀx``
                              exactly, but outliers are spread over 16 tokens before quantizing
``sr_grad=true``              stochastic rounding of the output gradient's elements (the operand
                              of both gradient GEMMs), round to nearest everywhere else
============================  ================================================================

``amax_reduce=true`` (off by default) is for data-parallel training: NVFP4's tensor scale of an
activation or a gradient comes from its amax over all ranks (an ``all_reduce(MAX)`` over the
default process group, as the FP8 recipes' option), so 2 ranks quantize as one process on the
whole batch does, as long as each rank's tokens are whole blocks and ``sr_grad`` is off (the
random draws differ). Weights are the same on every rank; MX formats have no tensor scale, so
for ``mxfp4`` it changes nothing (its blocks along the batch are fixed-length, as mxfp8's).

``mxfp4`` (OCP MX: 32-element blocks, E8M0 scales, torchao's floor rule, no tensor scale) takes the
same options with defaults ``rht=false, sr_grad=false, weight_blocks=1x32`` — plain MXFP4 as
torchao's prototype runs it; ``mxfp4(rht=true,sr_grad=true,weight_blocks=32x32)`` adds the
stabilisers. A recipe's string form is its name with the options that differ from its defaults,
``"nvfp4:rht=false"``; in a policy it is written ``compute=nvfp4(rht=false)``.

The token dimension of the weight-gradient GEMM is padded with zero rows to whole blocks (zeros
change neither a block's amax nor the sum); the other contraction dimensions are a layer's
``in_features`` and ``out_features``, which must be multiples of the block (see
:meth:`Fp4Recipe.required_multiple`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import ClassVar

import torch
import torch.nn.functional as F

from mixprec.blockscaled_build import hadamard_rows
from mixprec.formats import MXFP4, NVFP4, BlockFormat
from mixprec.recipes import RECIPE_NAMES, Fp8Recipe

__all__ = [
    "ALL_RECIPE_NAMES",
    "FP4_RECIPES",
    "FP4_RECIPE_NAMES",
    "RHT_SIZE",
    "Fp4Recipe",
    "hadamard",
    "parse_recipe",
    "random_hadamard",
    "rht",
    "rht_padded",
]

FP4_RECIPE_NAMES: tuple[str, ...] = ("nvfp4", "mxfp4")
"""The 4-bit recipes (``compute=nvfp4``, ``compute=mxfp4`` in a policy)."""
ALL_RECIPE_NAMES: tuple[str, ...] = RECIPE_NAMES + FP4_RECIPE_NAMES
"""Every low-precision GEMM recipe: the FP8 ones of :data:`mixprec.recipes.RECIPE_NAMES`, then
the 4-bit ones."""
RHT_SIZE = 16
"""The random Hadamard transform's size (Transformer Engine's)."""
_RHT_SEED = 0x5EED  # one fixed sign pattern, as TE uses one: the transform is a constant
_WEIGHT_BLOCKS = {"nvfp4": ("16x16", "1x16"), "mxfp4": ("1x32", "32x32")}
_DEFAULTS = {
    "nvfp4": {"rht": True, "sr_grad": True, "weight_blocks": "16x16", "amax_reduce": False},
    "mxfp4": {"rht": False, "sr_grad": False, "weight_blocks": "1x32", "amax_reduce": False},
}
_OPTIONS = ("rht", "sr_grad", "weight_blocks", "amax_reduce")
_FLAGS = ("rht", "sr_grad", "amax_reduce")


@dataclass(frozen=True)
class Fp4Recipe:
    """How a linear layer's three GEMMs run in a 4-bit block-scaled format (see the module).

    Args:
        name: ``"nvfp4"`` or ``"mxfp4"``.
        rht: random Hadamard transform on the weight-gradient GEMM's operands; None: the
            recipe's default.
        sr_grad: stochastic rounding of the output gradient; None: the recipe's default.
        weight_blocks: ``"16x16"``/``"1x16"`` (nvfp4), ``"1x32"``/``"32x32"`` (mxfp4); None:
            the recipe's default.
        amax_reduce: NVFP4's tensor scales of activations and gradients from their amax over
            all data-parallel ranks (see the module); None: off.

    Raises:
        ValueError: an unknown name or weight block shape, with the valid ones.
        TypeError: ``rht``, ``sr_grad`` or ``amax_reduce`` is not a bool.

    Example:
        >>> Fp4Recipe.parse("nvfp4:rht=false")
        Fp4Recipe(name='nvfp4', rht=False, sr_grad=True, weight_blocks='16x16', amax_reduce=False)
        >>> str(Fp4Recipe("mxfp4", sr_grad=True))
        'mxfp4:sr_grad=true'
    """

    name: str
    rht: bool | None = None
    sr_grad: bool | None = None
    weight_blocks: str | None = None
    amax_reduce: bool | None = None

    scaling: ClassVar[str] = "dynamic"  # read by code that handles every recipe: no history
    high_precision: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        if self.name not in FP4_RECIPE_NAMES:
            raise ValueError(
                f"unknown 4-bit recipe {self.name!r}; valid recipes: "
                f"{', '.join(map(repr, FP4_RECIPE_NAMES))}"
            )
        for key, default in _DEFAULTS[self.name].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, default)
        for key in _FLAGS:
            if not isinstance(getattr(self, key), bool):
                raise TypeError(f"Fp4Recipe.{key} must be a bool, got {getattr(self, key)!r}")
        valid = _WEIGHT_BLOCKS[self.name]
        if self.weight_blocks not in valid:
            raise ValueError(
                f"unknown weight_blocks {self.weight_blocks!r} for recipe {self.name!r}; valid: "
                f"{', '.join(map(repr, valid))}"
            )

    @property
    def format(self) -> BlockFormat:
        """The block-scaled format every operand is quantized to."""
        return NVFP4 if self.name == "nvfp4" else MXFP4

    @property
    def granularity(self) -> str:
        """The recipe's name (what FP8 recipes call their block rule)."""
        return self.name

    @property
    def block(self) -> int:
        """Block length along a GEMM's contraction: 16 (nvfp4) or 32 (mxfp4)."""
        return self.format.block_size

    @property
    def weight_tile(self) -> int | None:
        """The side of the square weight tiles, or None for 1-D blocks."""
        rows, _, cols = str(self.weight_blocks).partition("x")
        return int(cols) if rows == cols else None

    def required_multiple(self) -> tuple[int, int]:
        """What ``(out_features, in_features)`` must be multiples of: each is the contraction of
        one GEMM (``in_features`` of the forward, ``out_features`` of the input gradient)."""
        return self.block, self.block

    def options(self) -> tuple[str, ...]:
        """The string options (``<recipe>:key=value``)."""
        return _OPTIONS

    @classmethod
    def parse(cls, spec: str | Fp4Recipe) -> Fp4Recipe:
        """A recipe from ``name[:key=value,...]`` (keys ``rht``, ``sr_grad``, ``weight_blocks``,
        ``amax_reduce``).

        Raises:
            ValueError: an unknown recipe, option or value, naming the valid ones.
            TypeError: ``spec`` is neither a string nor an ``Fp4Recipe``.
        """
        if isinstance(spec, Fp4Recipe):
            return spec
        if not isinstance(spec, str):
            raise TypeError(
                f"a 4-bit recipe is a name such as 'nvfp4' or an Fp4Recipe, got "
                f"{type(spec).__name__} {spec!r}"
            )
        return _parse(spec.strip())

    def __str__(self) -> str:
        items = [
            f"{f.name}={_show(getattr(self, f.name))}"
            for f in fields(self)
            if f.name != "name" and getattr(self, f.name) != _DEFAULTS[self.name][f.name]
        ]
        return self.name + (":" + ",".join(items) if items else "")


def _show(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@functools.lru_cache(maxsize=64)
def _parse(spec: str) -> Fp4Recipe:
    name, _, options = spec.partition(":")
    name = name.strip().lower()
    if name not in FP4_RECIPE_NAMES:
        raise ValueError(
            f"unknown 4-bit recipe {name!r}; valid recipes: "
            f"{', '.join(map(repr, FP4_RECIPE_NAMES))}"
        )
    values: dict[str, object] = {}
    for item in filter(None, (s.strip() for s in options.split(","))):
        key, sep, raw = (s.strip().lower() for s in item.partition("="))
        if not sep or key not in _OPTIONS:
            raise ValueError(
                f"unknown 4-bit recipe option {item!r} in {spec!r}; valid options of {name!r}: "
                f"rht=true|false, sr_grad=true|false, weight_blocks="
                f"{'|'.join(_WEIGHT_BLOCKS[name])}, amax_reduce=true|false"
            )
        if key in values:
            raise ValueError(f"4-bit recipe option {key!r} is given twice in {spec!r}")
        if key == "weight_blocks":
            values[key] = raw
        elif raw in ("true", "false"):
            values[key] = raw == "true"
        else:
            raise ValueError(f"{key}={raw!r} in {spec!r}: valid values are 'true' and 'false'")
    return Fp4Recipe(name, **values)  # type: ignore[arg-type]


FP4_RECIPES: Mapping[str, Fp4Recipe] = MappingProxyType(
    {name: Fp4Recipe(name) for name in FP4_RECIPE_NAMES}
)
"""The named 4-bit recipes with their default options."""


def parse_recipe(spec: str | Fp8Recipe | Fp4Recipe) -> Fp8Recipe | Fp4Recipe:
    """Any low-precision GEMM recipe from its string: 4-bit names give an :class:`Fp4Recipe`,
    the rest :meth:`Fp8Recipe.parse <mixprec.recipes.Fp8Recipe.parse>`.

    Example:
        >>> type(parse_recipe("nvfp4")).__name__, type(parse_recipe("rowwise")).__name__
        ('Fp4Recipe', 'Fp8Recipe')
    """
    if isinstance(spec, (Fp8Recipe, Fp4Recipe)):
        return spec
    if isinstance(spec, str) and spec.partition(":")[0].strip().lower() in FP4_RECIPE_NAMES:
        return Fp4Recipe.parse(spec)
    return Fp8Recipe.parse(spec)


# -- the random Hadamard transform --------------------------------------------------------------


def hadamard(n: int) -> torch.Tensor:
    """The ``n x n`` Sylvester Hadamard matrix of ±1 (``n`` a power of two), fp32.

    Example:
        >>> hadamard(2).tolist()
        [[1.0, 1.0], [1.0, -1.0]]
    """
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power of two, got n={n!r}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=8)
def _random_hadamard_cpu(n: int, seed: int) -> torch.Tensor:
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return hadamard(n) * signs.float() / n**0.5


def random_hadamard(n: int = RHT_SIZE, device: torch.device | str = "cpu") -> torch.Tensor:
    """``H · diag(s) / sqrt(n)``: orthogonal, with one fixed pattern of random signs ``s``.

    Example:
        >>> r = random_hadamard(16)
        >>> bool(torch.allclose(r @ r.T, torch.eye(16), atol=1e-6))
        True
    """
    return _random_hadamard_cpu(n, _RHT_SEED).to(device)


def rht(t: torch.Tensor) -> torch.Tensor:
    """``Rᵀ`` applied to each group of :data:`RHT_SIZE` rows of a 2-D fp32 ``t``.

    For two operands ``g`` (tokens x N) and ``x`` (tokens x K) of a GEMM that sums over the tokens,
    ``rht(g).T @ rht(x) == g.T @ x`` up to fp32 rounding, as ``R`` is orthogonal.

    Its bits do not depend on a BLAS: output row ``16g + i`` is the sum over ``k = 0..15``, in
    that order and starting from 0, of ``R[k, i] * t[16g + k]``, each addition rounded to fp32
    (the order in which MKL's matmul sums it too). ``R``'s entries are ``±1/4``, so the products
    of 16-bit values are exact; :func:`rht_padded`'s one-pass kernel gives the same bits.

    Raises:
        ValueError: the row count is not a multiple of :data:`RHT_SIZE` (pad with zero rows).

    Example:
        >>> g, x = torch.randn(32, 3), torch.randn(32, 5)
        >>> bool(torch.allclose(rht(g).T @ rht(x), g.T @ x, atol=1e-5))
        True
    """
    rows, cols = t.shape
    if rows % RHT_SIZE:
        raise ValueError(
            f"the random Hadamard transform works on groups of {RHT_SIZE} rows, got {rows}; "
            f"pad with zero rows"
        )
    r = random_hadamard(RHT_SIZE, t.device).reshape(RHT_SIZE, RHT_SIZE, 1)
    groups = t.float().reshape(rows // RHT_SIZE, RHT_SIZE, 1, cols)  # [group, k, 1, column]
    out = torch.zeros(rows // RHT_SIZE, RHT_SIZE, cols, device=t.device)
    for k in range(RHT_SIZE):  # the product, then the addition: two roundings, as documented
        out.add_(groups[:, k] * r[k])
    return out.reshape(rows, cols).to(t.dtype)  # summed in fp32 (a 16-bit t: rounded once)


def rht_padded(t: torch.Tensor, multiple: int = RHT_SIZE) -> torch.Tensor:
    """``rht`` of ``t`` (2-D) widened to fp32 with zero rows appended up to a multiple of
    ``multiple`` (itself a multiple of :data:`RHT_SIZE`): the weight-gradient GEMM's operand.

    The same bits as ``rht(F.pad(t.float(), (0, 0, 0, extra)))``; on a CPU bf16 or fp16 ``t``
    whose column count is a multiple of 16, one pass of a C++ kernel
    (:func:`mixprec.blockscaled_build.hadamard_rows`) instead of a widened copy, a padded copy
    and the transform's 16 passes.

    Raises:
        ValueError: ``multiple`` is not a positive multiple of :data:`RHT_SIZE`.

    Example:
        >>> t = torch.randn(20, 16, dtype=torch.bfloat16)
        >>> torch.equal(rht_padded(t), rht(torch.cat([t.float(), torch.zeros(12, 16)])))
        True
    """
    if multiple < 1 or multiple % RHT_SIZE:
        raise ValueError(
            f"rht_padded pads to whole groups of {RHT_SIZE} rows, got multiple={multiple!r}; "
            f"use a multiple of {RHT_SIZE}"
        )
    rows = t.shape[0]
    rows_out = rows + -rows % multiple
    fused = hadamard_rows(t, random_hadamard(RHT_SIZE, t.device), rows_out)
    if fused is not None:
        return fused
    wide = t.float()
    return rht(F.pad(wide, (0, 0, 0, rows_out - rows)) if rows_out > rows else wide)
