"""The FP8 recipes and their scaled quantization, re-exported from :mod:`mixprec.recipes` and
:mod:`mixprec.scaled`.

They are pure data and math, so they live in the data layer beside :mod:`mixprec.quantize`,
below the layers that use them (the policy names recipes; :mod:`mixprec.compute.fp8_linear`
runs them). This module keeps the old import path working.
"""

from mixprec.recipes import (
    EPS,
    GEMMS,
    RECIPES,
    Fp8Recipe,
    Granularity,
    block_shape,
    delayed_scale,
    dynamic_scale,
    e8m0_scale,
    round_down_to_power_of_two,
)
from mixprec.scaled import (
    Scaled,
    dequantize,
    fp8_quantize,
    quantize_blocks,
    quantize_with_scale,
)

__all__ = [
    "EPS",
    "GEMMS",
    "RECIPES",
    "Fp8Recipe",
    "Granularity",
    "Scaled",
    "block_shape",
    "delayed_scale",
    "dequantize",
    "dynamic_scale",
    "e8m0_scale",
    "fp8_quantize",
    "quantize_blocks",
    "quantize_with_scale",
    "round_down_to_power_of_two",
]
