"""Moved: the FP8 advice is a diagnostic and lives in :mod:`mixprec.diagnostics.fp8_advice`.

This module keeps the old import path working (it imports the diagnostics layer on use only).
"""

from mixprec.diagnostics.fp8_advice import (
    DEFAULT_THRESHOLD_DB,
    Fp8Advice,
    Fp8OperandCounts,
    LayerSnr,
    advise_fp8,
    fp8_flush_report,
    fp8_layer_snr,
)

__all__ = [
    "DEFAULT_THRESHOLD_DB",
    "Fp8Advice",
    "Fp8OperandCounts",
    "LayerSnr",
    "advise_fp8",
    "fp8_flush_report",
    "fp8_layer_snr",
]
