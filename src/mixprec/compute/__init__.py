"""Compute precision: autocast with native and emulated backends, op tables, FP32 islands."""

from mixprec.compute.autocast import AutocastDeviceError, Backend, autocast, current_region
from mixprec.compute.emulated import emulated_linear, emulated_matmul
from mixprec.compute.islands import DEFAULT_ISLAND_RULES, IslandHandle, fp32_islands
from mixprec.compute.ops import GEMM_OPS, OpTable, op_table

__all__ = [
    "DEFAULT_ISLAND_RULES",
    "GEMM_OPS",
    "AutocastDeviceError",
    "Backend",
    "IslandHandle",
    "OpTable",
    "autocast",
    "current_region",
    "emulated_linear",
    "emulated_matmul",
    "fp32_islands",
    "op_table",
]
