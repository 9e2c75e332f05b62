"""mixprec: mixed precision training for PyTorch.

Number formats and exact rounding (:mod:`mixprec.formats`, :func:`quantize`), precision policies
(:class:`Policy`), autocast with native and emulated backends (:func:`autocast`,
:func:`fp32_islands`, :func:`op_table`), the hardware probe (:mod:`mixprec.hardware`), and the
``mixprec`` command.

Example:
    >>> import torch, mixprec
    >>> mixprec.quantize(torch.tensor([1.0 + 2.0**-9]), "bf16").tolist()
    [1.0]
    >>> str(mixprec.Policy.parse("bf16-mixed"))
    'params=fp32,compute=bf16,output=fp32'
"""

from mixprec import formats, hardware, optim
from mixprec.compute import autocast, fp32_islands, op_table
from mixprec.diagnostics import (
    Advice,
    MetricsWriter,
    NonFiniteTracer,
    UnderflowReport,
    advise,
    compare_layers,
    explain,
    underflow_report,
)
from mixprec.formats import FORMATS, Format, resolve_format
from mixprec.optim import (
    KahanOptimizer,
    MasterWeightOptimizer,
    MemoryReport,
    StochasticRoundingOptimizer,
    cast_module,
    memory_report,
)
from mixprec.policy import PRESETS, ModuleRule, Policy
from mixprec.quantize import quantize
from mixprec.scaling import GradScaler, LossScaleAtMinimumError
from mixprec.session import MixedPrecision
from mixprec.session.step_report import StepReport

__version__ = "0.1.0"

__all__ = [
    "FORMATS",
    "PRESETS",
    "Advice",
    "Format",
    "GradScaler",
    "KahanOptimizer",
    "LossScaleAtMinimumError",
    "MasterWeightOptimizer",
    "MemoryReport",
    "MetricsWriter",
    "MixedPrecision",
    "ModuleRule",
    "NonFiniteTracer",
    "Policy",
    "StepReport",
    "StochasticRoundingOptimizer",
    "UnderflowReport",
    "__version__",
    "advise",
    "autocast",
    "cast_module",
    "compare_layers",
    "explain",
    "formats",
    "fp32_islands",
    "hardware",
    "memory_report",
    "op_table",
    "optim",
    "quantize",
    "resolve_format",
    "underflow_report",
]
