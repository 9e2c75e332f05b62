"""mixprec: mixed precision training for PyTorch.

Start with :class:`MixedPrecision`: one object applies a precision policy to a model, its
optimizers and its training loop, with the same five lines for every precision (fp32, bf16,
fp16, fp8, pure bf16 with stochastic rounding or fp32 masters).

Below it, each layer is usable on its own: number formats and exact rounding
(:mod:`mixprec.formats`, :func:`quantize`), precision policies (:class:`Policy`), a
``torch.amp``-compatible :class:`GradScaler` and :func:`autocast` (native and emulated backends),
optimizer wrappers (:mod:`mixprec.optim`), diagnostics (:func:`advise`, :func:`explain`...), the
hardware probe (:mod:`mixprec.hardware`), and the ``mixprec`` command.

Example:
    >>> import torch, mixprec
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    >>> mp = mixprec.MixedPrecision("bf16-pure", device="cpu", backend="emulated")
    >>> model, optimizer = mp.prepare(model, optimizer)
    >>> mp.backward(model(torch.randn(4, 8)).float().pow(2).mean())
    >>> mp.step(optimizer).stepped
    True
    >>> mixprec.quantize(torch.tensor([1.0 + 2.0**-9]), "bf16").tolist()
    [1.0]
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
