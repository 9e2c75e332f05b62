"""The checks behind :class:`mixprec.Policy`: each field's format, FP8/FP4 formats where a
recipe belongs, a compute format no wider than the params, and module arguments. Pure functions
that raise with the offending value (cut short) and the valid choices; :mod:`mixprec.policy` calls
them from ``Policy.__post_init__`` and its parser.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mixprec.formats import (
    BF16,
    FP4_E2M1,
    FP8_E4M3,
    FP8_E5M2,
    Format,
    FormatLike,
    resolve_format,
)
from mixprec.fp4_recipes import ALL_RECIPE_NAMES, FP4_RECIPE_NAMES, Fp4Recipe, parse_recipe
from mixprec.recipes import RECIPE_NAMES, Fp8Recipe

ECHO_LIMIT = 100  # characters of user input an error message repeats, per mention


def shown(value: object) -> str:
    """``repr(value)`` cut to :data:`ECHO_LIMIT` characters: messages repeat the offending
    input, but a megabyte of policy text must not become a megabyte of message."""
    text = repr(value)
    if len(text) <= ECHO_LIMIT:
        return text
    return f"{text[:ECHO_LIMIT]}... ({len(text)} characters in all)"


def resolve_format_shown(value: FormatLike) -> Format:
    """``resolve_format``, with the offending value cut short in its error message."""
    try:
        return resolve_format(value)
    except (ValueError, TypeError) as err:
        raise type(err)(str(err).replace(repr(value), shown(value))) from None


def check_module_args(where: str, name: object, module: object) -> None:
    if not isinstance(name, str):
        raise TypeError(
            f"{where} expects the module's dotted name as a str (as in model.named_modules(), "
            f"e.g. 'blocks.3.ln1'), got {type(name).__name__} {shown(name)}"
        )
    if module is not None and not isinstance(module, (nn.Module, type, str)):
        raise TypeError(
            f"{where}: module must be an nn.Module, a module class, a class name or None, got "
            f"{type(module).__name__} {shown(module)}"
        )


def check_compute_not_wider(param: Format, compute: Format) -> None:
    """Refuse 16-bit (or fp8) params with fp32/tf32 compute: no autocast region would widen
    the weights, so the first forward would fail on mixed dtypes. What people mean by it exists:
    fp32 weights with 16-bit compute (``*-mixed``), or fp32 modules by a rule."""
    if compute.dtype == torch.float32 and param.dtype != torch.float32:
        raise ValueError(
            f"params={param} with compute={compute} is not supported: {compute} compute runs "
            f"without an autocast region, so nothing would widen the {param} weights at each use "
            f"and the first forward would fail on mixed dtypes. For fp32 weights and {param} "
            f"compute write 'params=fp32,compute={param}'; for everything in {param}, "
            f"'params={param}'; to keep chosen modules in fp32, add a rule, e.g. "
            f"'{param}; *norm* -> fp32'"
        )


def check_no_bare_fp8(param: Format, compute: Format, output: object, master: object) -> None:
    """Refuse an fp8 format as compute, output or master (as given, before the defaults
    cascade): nothing would apply it.

    A bare fp8 compute format has no scales (torch's autocast ignores it and runs fp32), outputs
    and master weights have no fp8 storage path. FP8 compute is a recipe: ``compute=fp8:<name>``.
    (fp8 params and gradient reduction are refused where they would be used, with their own
    reasons.)
    """
    for name, value in (("compute", compute), ("output", output), ("master", master)):
        fmt = None if value is None else format_field(name, value)  # type: ignore[arg-type]
        if fmt == param and fmt != FP4_E2M1:
            # Everything in fp8 (``"fp8_e4m3"``): the params are the problem, refused where
            # they are cast with their own reason; a master equal to them is no separate copy.
            continue
        if fmt == FP4_E2M1:
            raise ValueError(
                f"{name}={fmt} is not applied by anything: 4-bit compute needs a recipe's block "
                f"scales, written 'compute=nvfp4' or 'compute=mxfp4' (4-bit recipes: "
                f"{', '.join(map(repr, FP4_RECIPE_NAMES))}; presets 'nvfp4-mixed', "
                f"'mxfp4-mixed'); outputs and master weights are kept in fp32, bf16 or fp16"
            )
        if fmt in (FP8_E4M3, FP8_E5M2):
            raise ValueError(
                f"{name}={fmt} is not applied by anything: fp8 compute needs a recipe's scales, "
                f"written 'compute=fp8:<recipe>' (recipes: {', '.join(map(repr, RECIPE_NAMES))}, "
                f"e.g. 'params=fp32,compute=fp8:rowwise,output=fp32'); outputs and master "
                f"weights are kept in fp32, bf16 or fp16"
            )


def check_fp8(recipe: object, compute: Format) -> str | None:
    """The canonical string of the fp8 recipe (a name, or a name with options), or None."""
    if recipe is None:
        return None
    if isinstance(recipe, (Fp8Recipe, Fp4Recipe)):
        recipe = str(recipe)
    name = recipe.partition(":")[0] if isinstance(recipe, str) else recipe
    if name not in ALL_RECIPE_NAMES:
        raise ValueError(
            f"unknown fp8 recipe {shown(name)}; valid recipes: {', '.join(RECIPE_NAMES)} "
            f"(e.g. 'compute=fp8:rowwise'); 4-bit recipes: {', '.join(FP4_RECIPE_NAMES)} "
            f"(e.g. 'compute=nvfp4')"
        )
    canonical = str(parse_recipe(recipe))  # type: ignore[arg-type]  # options checked
    if compute != BF16:
        spelled = f"compute={name}" if name in FP4_RECIPE_NAMES else f"compute=fp8:{recipe}"
        raise ValueError(
            f"{name} compute runs everything but the linear layers' GEMMs in bf16, so it needs "
            f"compute=bf16, got compute={compute}; write '{spelled}' (or drop the recipe)"
        )
    return canonical


def format_field(name: str, value: Any, resolve: Any = None) -> Any:
    try:
        return (resolve or resolve_format_shown)(value)
    except (ValueError, TypeError) as err:
        raise type(err)(f"Policy.{name}: {err}") from None
