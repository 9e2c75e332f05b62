"""Diagnostics: where inf/NaN came from, what underflows, per-layer error, a precision advisor.

* :class:`NonFiniteTracer` names the first module whose output (forward) or gradient (backward)
  went inf/NaN (or above a format's max); :func:`nonfinite_grads` names the parameters with
  non-finite gradients after the fact, for a skipped step.
* :func:`underflow_report` counts the gradient elements a loss scale flushes, leaves subnormal or
  overflows in fp16, and gives the largest safe scale.
* :func:`compare_layers` compares a policy against fp32 module by module (SNR in dB) and proposes
  fp32 islands where the error starts.
* :func:`advise` combines the hardware probe, activation ranges, underflow and the comparison
  into a policy string with reasons.
* :func:`explain` shows, per module, the format and bytes of its weights, compute, saved
  activations, gradients and master copy, with the casts and where loss scaling applies.
* :class:`MetricsWriter` appends per-step metrics to ``metrics.jsonl`` (and TensorBoard).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(2, 1)
    >>> model.weight.grad = torch.tensor([[2.0**-30, 1.0]])
    >>> model.bias.grad = torch.tensor([float("nan")])
    >>> nonfinite_grads(model)
    ['bias']
"""

from mixprec.diagnostics.advisor import Advice, advise
from mixprec.diagnostics.explainer import Explanation, ModuleExplanation, explain
from mixprec.diagnostics.finite import nonfinite_grads, tensor_range
from mixprec.diagnostics.fp8_advice import Fp8Advice, LayerSnr, advise_fp8, fp8_layer_snr
from mixprec.diagnostics.layerwise import (
    Capture,
    LayerComparison,
    LayerReport,
    capture,
    compare_layers,
    snr_db,
)
from mixprec.diagnostics.metrics import STEP_KEYS, MetricsWriter, read_metrics
from mixprec.diagnostics.tracer import NonFiniteEvent, NonFiniteTracer
from mixprec.diagnostics.underflow import (
    UnderflowCounts,
    UnderflowReport,
    exponent_histogram,
    gradient_counts,
    largest_safe_scale,
    underflow_report,
)

__all__ = [
    "STEP_KEYS",
    "Advice",
    "Capture",
    "Explanation",
    "Fp8Advice",
    "LayerComparison",
    "LayerReport",
    "LayerSnr",
    "MetricsWriter",
    "ModuleExplanation",
    "NonFiniteEvent",
    "NonFiniteTracer",
    "UnderflowCounts",
    "UnderflowReport",
    "advise",
    "advise_fp8",
    "capture",
    "compare_layers",
    "explain",
    "exponent_histogram",
    "fp8_layer_snr",
    "gradient_counts",
    "largest_safe_scale",
    "nonfinite_grads",
    "read_metrics",
    "snr_db",
    "tensor_range",
    "underflow_report",
]
