"""Moved: the FP8 advice is a diagnostic and lives in :mod:`mixprec.diagnostics.fp8_advice`.

This module keeps the old import path working. The names resolve on first use (PEP 562), so the
compute layer does not import the diagnostics layer above it when it is loaded.
"""

import importlib
from typing import Any

_MOVED = (
    "DEFAULT_THRESHOLD_DB",
    "Fp8Advice",
    "Fp8OperandCounts",
    "LayerSnr",
    "advise_fp8",
    "fp8_flush_report",
    "fp8_layer_snr",
)


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module("mixprec.diagnostics.fp8_advice"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(_MOVED)
