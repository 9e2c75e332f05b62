"""Compute precision: autocast with native and emulated backends, op tables, FP32 islands, FP8
and 4-bit (NVFP4, MXFP4) linear layers."""

import importlib

from mixprec.compute.autocast import AutocastDeviceError, Backend, autocast, current_region
from mixprec.compute.emulated import emulated_linear, emulated_matmul
from mixprec.compute.fp4_linear import Fp4Linear, fp4_backend, fp4_linear
from mixprec.compute.fp8_convert import Fp8Conversion, Fp8Plan, apply_fp8_policy, convert_to_fp8
from mixprec.compute.fp8_linear import Fp8Linear, fp8_backend, fp8_linear
from mixprec.compute.islands import DEFAULT_ISLAND_RULES, IslandHandle, fp32_islands
from mixprec.compute.ops import GEMM_OPS, OpTable, op_table
from mixprec.fp4_recipes import FP4_RECIPES, Fp4Recipe
from mixprec.recipes import RECIPES, Fp8Recipe

_MOVED_TO_DIAGNOSTICS = ("Fp8Advice", "LayerSnr", "advise_fp8", "fp8_layer_snr")


def __getattr__(name: str) -> object:
    """The FP8 advice moved to :mod:`mixprec.diagnostics.fp8_advice` (a layer above this one);
    its old names here resolve on first use, so importing compute never imports diagnostics."""
    if name in _MOVED_TO_DIAGNOSTICS:
        return getattr(importlib.import_module("mixprec.diagnostics.fp8_advice"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_ISLAND_RULES",
    "FP4_RECIPES",
    "GEMM_OPS",
    "RECIPES",
    "AutocastDeviceError",
    "Backend",
    "Fp4Linear",
    "Fp4Recipe",
    "Fp8Advice",
    "Fp8Conversion",
    "Fp8Linear",
    "Fp8Plan",
    "Fp8Recipe",
    "IslandHandle",
    "LayerSnr",
    "OpTable",
    "advise_fp8",
    "apply_fp8_policy",
    "autocast",
    "convert_to_fp8",
    "current_region",
    "emulated_linear",
    "emulated_matmul",
    "fp4_backend",
    "fp4_linear",
    "fp8_backend",
    "fp8_layer_snr",
    "fp8_linear",
    "fp32_islands",
    "op_table",
]
