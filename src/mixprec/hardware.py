"""What the device can do, and the precision that follows from it, with the reason in words.

Design note: probing is split from deciding. :func:`probe` reads facts (CUDA compute capability,
CPU flags, a short measured GEMM throughput per dtype) into a frozen :class:`HardwareReport`;
:func:`recommend` is a pure function of such a report, and so is :func:`choose_backend` when it is
given one (without one it probes the device first), so every branch, CUDA ones included, is
testable on a machine without that hardware by building the report by hand.
Policies never probe: :func:`auto_policy` is where a device's hardware becomes a policy, and
:func:`choose_backend` resolves an autocast ``backend="auto"`` once, when a region is built.

Tensor-core formats on CUDA: fp16 from compute capability 7.0, bf16 and tf32 from 8.0, fp8 from
8.9, block-scaled fp4 (NVFP4, MXFP4 on ``torch._scaled_mm``) from 10.0. On CPUs: bf16 with
AVX512-BF16 or AMX-BF16, fp16 with AMX-FP16 only: with AVX512-FP16 alone torch's CPU fp16 GEMM
runs at fp32's speed and its fp16 convolution at half of it (Xeon with AMX-BF16 and AVX512-FP16,
torch 2.13, 1 thread: 256x256 mm 0.20 ms fp16, 0.19 fp32, 0.05 bf16; a small conv2d 0.42 ms
fp16, 0.19 fp32), so ``auto`` emulates fp16 there (the cnn task's fp16-mixed step: 6x fp32
native, about 1.4x emulated).
"""

from __future__ import annotations

import functools
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch

from mixprec.formats import resolve_format

if TYPE_CHECKING:
    from mixprec.policy import Policy

__all__ = [
    "FP4_NATIVE_CAPABILITY",
    "AutoChoice",
    "HardwareReport",
    "auto_policy",
    "choose_backend",
    "choose_fp4_backend",
    "choose_fp8_backend",
    "measure_gemm",
    "probe",
    "recommend",
]

_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16", "amx_fp16")
_GEMM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class HardwareReport:
    """Facts about one device.

    Args:
        device: the device, e.g. ``"cpu"`` or ``"cuda:0"``.
        kind: ``"cpu"``, ``"cuda"``, ``"mps"`` or another torch device type.
        name: the processor's or GPU's name.
        compute_capability: CUDA (major, minor), else None.
        cpu_flags: the CPU flags relevant to 16-bit compute that are present.
        tensor_core_formats: formats with hardware GEMM support (``"fp16"``, ``"bf16"``, ...).
        gemm_gflops: measured GEMM throughput per format name (empty when not measured).
    """

    device: str
    kind: str
    name: str
    compute_capability: tuple[int, int] | None = None
    cpu_flags: frozenset[str] = frozenset()
    tensor_core_formats: frozenset[str] = frozenset()
    gemm_gflops: Mapping[str, float] = field(default_factory=dict)

    def has_fast_gemm(self, fmt: str | torch.dtype) -> bool:
        """Whether GEMMs in ``fmt`` run on dedicated hardware here."""
        return resolve_format(fmt).name in self.tensor_core_formats

    def describe(self) -> dict[str, object]:
        """A JSON-serialisable dict of the report."""
        return {
            "device": self.device,
            "kind": self.kind,
            "name": self.name,
            "compute_capability": self.compute_capability,
            "cpu_flags": sorted(self.cpu_flags),
            "tensor_core_formats": sorted(self.tensor_core_formats),
            "gemm_gflops": dict(self.gemm_gflops),
        }


@dataclass(frozen=True)
class AutoChoice:
    """What ``"auto"`` resolves to: a policy, the autocast backend, and why."""

    policy: Policy
    backend: str
    reason: str

    def __str__(self) -> str:
        return f"{self.policy} (backend {self.backend}): {self.reason}"


def tensor_core_formats(
    kind: str, compute_capability: tuple[int, int] | None, cpu_flags: frozenset[str]
) -> frozenset[str]:
    """The formats with hardware GEMM support for a device kind, capability and CPU flags."""
    formats: set[str] = set()
    if kind == "cuda" and compute_capability is not None:
        if compute_capability >= (7, 0):
            formats.add("fp16")
        if compute_capability >= (8, 0):
            formats |= {"bf16", "tf32"}
        if compute_capability >= (8, 9):
            formats |= {"fp8_e4m3", "fp8_e5m2"}
    elif kind == "cpu":
        if cpu_flags & {"avx512_bf16", "amx_bf16"}:
            formats.add("bf16")
        if "amx_fp16" in cpu_flags:  # AVX512-FP16 alone: no faster than fp32 (module note)
            formats.add("fp16")
    elif kind == "mps":
        formats.add("fp16")
    return frozenset(formats)


def _read_cpu() -> tuple[str, frozenset[str]]:
    name = platform.processor() or platform.machine()
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    else:  # not Linux: torch knows at least the vector ISA it dispatches to
        capability = torch.backends.cpu.get_cpu_capability().lower()
        flags = {"avx2"} if "avx2" in capability else set()
        if "avx512" in capability:
            flags |= {"avx2", "avx512f"}
    return name, frozenset(f for f in _CPU_FLAGS if f in flags)


def measure_gemm(device: str | torch.device, size: int = 256, repeats: int = 2) -> dict[str, float]:
    """Measure square-GEMM throughput (GFLOP/s) per 16-bit and 32-bit dtype on ``device``.

    Kept short (well under a second on a CPU whose bf16 GEMM is slow): ``size`` 256 on CPUs.
    """
    device = torch.device(device)
    results: dict[str, float] = {}
    for name, dtype in _GEMM_DTYPES.items():
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        a @ b  # warm-up
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        _synchronize(device)
        seconds = (time.perf_counter() - start) / repeats
        results[name] = round(2 * size**3 / seconds / 1e9, 2)
    return results


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.lru_cache(maxsize=16)
def _probe(device: str, measure: bool) -> HardwareReport:
    dev = torch.device(device)
    kind = dev.type
    capability = None
    flags: frozenset[str] = frozenset()
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"cannot probe {device!r}: CUDA is not available on this machine "
                "(probe 'cpu' instead)"
            )
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        capability = torch.cuda.get_device_capability(index)
        device = f"cuda:{index}"
    elif kind == "cpu":
        name, flags = _read_cpu()
    else:
        name = kind
    gflops = measure_gemm(device, size=2048 if kind == "cuda" else 256) if measure else {}
    return HardwareReport(
        device=device,
        kind=kind,
        name=name,
        compute_capability=capability,
        cpu_flags=flags,
        tensor_core_formats=tensor_core_formats(kind, capability, flags),
        gemm_gflops=MappingProxyType(gflops),
    )


def probe(device: str | torch.device | None = None, *, measure: bool = True) -> HardwareReport:
    """Report what ``device`` can do (cached per device).

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... (default: cuda if available, else cpu).
        measure: also time a short GEMM per dtype (well under a second).

    Raises:
        RuntimeError: a CUDA device was asked for on a machine without CUDA.

    Example:
        >>> report = probe("cpu", measure=False)
        >>> report.kind
        'cpu'
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return _probe(str(torch.device(device)), measure)


def auto_policy(device: str | torch.device | None = None) -> AutoChoice:
    """Choose a policy for ``device`` from its hardware, with the backend and the reason.

    Probes ``device`` (see :func:`probe`, measured once and cached) and applies
    :func:`recommend`; ``MixedPrecision("auto")`` calls this.

    Example:
        >>> from mixprec.policy import PRESETS
        >>> choice = auto_policy("cpu")
        >>> choice.policy in PRESETS.values() and choice.backend in ("native", "emulated")
        True
    """
    return recommend(probe(device))


def _units(report: HardwareReport, fmt: str) -> str:
    """What runs ``fmt`` GEMMs on the device, in words (tensor cores, AMX tiles, AVX512 ...)."""
    if report.kind == "cuda":
        return "tensor cores"
    if report.kind == "cpu":
        fmt_flags = {"bf16": ("amx_bf16", "avx512_bf16"), "fp16": ("amx_fp16", "avx512_fp16")}
        present = [f for f in fmt_flags.get(fmt, ()) if f in report.cpu_flags]
        if present:
            return " and ".join(f.upper().replace("_", "-", 1) for f in present) + " instructions"
    return f"{fmt} GEMM units"


def recommend(report: HardwareReport) -> AutoChoice:
    """The policy and backend ``"auto"`` resolves to on the device ``report`` describes.

    A pure function of the report: bf16-mixed where bf16 GEMMs are in hardware (no loss scaling
    needed); fp16-mixed with loss scaling where only fp16 is; elsewhere bf16-mixed on the emulated
    backend, which keeps fp32 GEMM speed while giving bf16 numerics and activation memory.
    """
    from mixprec.policy import PRESETS

    where = _where(report)
    if report.has_fast_gemm("bf16"):
        return AutoChoice(
            PRESETS["bf16-mixed"],
            "native",
            f"bf16-mixed on {where}: its {_units(report, 'bf16')} run bf16 GEMMs, and bf16 has "
            "fp32's range, so it needs no loss scaling",
        )
    if report.has_fast_gemm("fp16"):
        return AutoChoice(
            PRESETS["fp16-mixed"],
            "native",
            f"fp16-mixed on {where}: its {_units(report, 'fp16')} run fp16 GEMMs but not bf16; "
            "fp16 needs dynamic loss scaling",
        )
    measured = ""
    if "bf16" in report.gemm_gflops and "fp32" in report.gemm_gflops:
        measured = (
            f" (measured GEMM: bf16 {report.gemm_gflops['bf16']:g} GFLOP/s vs fp32 "
            f"{report.gemm_gflops['fp32']:g})"
        )
    return AutoChoice(
        PRESETS["bf16-mixed"],
        "emulated",
        f"fp32 compute with emulated bf16 on {where}: no 16-bit GEMM units{measured}, so GEMMs run "
        "in fp32 and round to bf16 — bf16 numerics and activation memory at fp32 speed",
    )


def _where(report: HardwareReport) -> str:
    if report.kind == "cuda":
        major, minor = report.compute_capability or (0, 0)
        return f"{report.name} (sm_{major}{minor})"
    if report.kind == "cpu":
        isa = ", ".join(sorted(report.cpu_flags)).upper() or "no AVX2"
        return f"this CPU ({report.name}; {isa})"
    return report.name


def choose_backend(
    device_type: str, dtype: torch.dtype, requested: str, report: HardwareReport | None = None
) -> tuple[str, str]:
    """Resolve an autocast backend request to ``"native"`` or ``"emulated"``, with the reason.

    Raises:
        ValueError: ``"native"`` was requested for a dtype the device's autocast cannot run.
    """
    fmt = resolve_format(dtype).name
    if requested == "emulated":
        return "emulated", "requested"
    if requested == "native":
        if device_type == "cuda" and dtype == torch.bfloat16 and torch.cuda.is_available():
            if not torch.cuda.is_bf16_supported():
                raise ValueError(
                    f"backend='native' with dtype {dtype} is not supported on this GPU (bf16 needs "
                    "compute capability 8.0); use dtype=torch.float16 or backend='emulated'"
                )
        return "native", "requested"
    if report is None and (
        device_type not in ("cpu", "cuda")
        or (device_type == "cuda" and not torch.cuda.is_available())
    ):
        return "native", f"no probe for device type {device_type!r}: torch.autocast decides"
    report = report if report is not None else probe(device_type, measure=False)
    if report.has_fast_gemm(fmt):
        return "native", f"{_where(report)} runs {fmt} GEMMs on {_units(report, fmt)}"
    return "emulated", f"{_where(report)} has no {fmt} GEMM units: fp32 GEMMs rounded to {fmt}"


_FP8_NATIVE_GRANULARITIES = ("tensorwise", "rowwise")  # the recipes torch._scaled_mm runs


def choose_fp8_backend(
    requested: str, device: str | torch.device, granularity: str
) -> tuple[str, str]:
    """Resolve an FP8 GEMM backend request to ``"native"`` (``torch._scaled_mm``) or
    ``"emulated"``, with the reason.

    Native FP8 GEMMs need a CUDA device with FP8 tensor cores (compute capability 8.9+: Ada,
    Hopper, Blackwell) and a tensorwise or rowwise recipe; everything else is emulated.

    Raises:
        ValueError: ``"native"`` where it cannot run.

    Example:
        >>> choose_fp8_backend("auto", "cpu", "tensorwise")[0]
        'emulated'
    """
    device = torch.device(device)
    if requested == "emulated":
        return "emulated", "requested"
    reason = _fp8_native_missing(device, granularity)
    if reason is None:
        return "native", f"{device} has FP8 tensor cores and {granularity} runs on _scaled_mm"
    if requested == "native":
        raise ValueError(
            f"fp8 backend 'native' cannot run here: {reason}; use backend='emulated' (the same "
            "numerics, on fp32 kernels) or 'auto'"
        )
    return "emulated", reason


def _fp8_native_missing(device: torch.device, granularity: str) -> str | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"device {str(device)!r} is not a CUDA GPU with FP8 tensor cores"
    report = probe(device, measure=False)  # cached per device
    if not report.has_fast_gemm("fp8_e4m3") or not hasattr(torch, "_scaled_mm"):
        return (
            f"CUDA compute capability {report.compute_capability} has no FP8 tensor cores "
            "(8.9+ needed)"
        )
    if granularity not in _FP8_NATIVE_GRANULARITIES:
        return f"{granularity!r} scaling has no _scaled_mm kernel here"
    return None


FP4_NATIVE_CAPABILITY = (10, 0)
"""The CUDA compute capability from which block-scaled fp4 GEMMs run on tensor cores."""


def choose_fp4_backend(requested: str, device: str | torch.device) -> tuple[str, str]:
    """Resolve a 4-bit (NVFP4, MXFP4) GEMM backend request to ``"native"`` (block-scaled
    ``torch._scaled_mm``) or ``"emulated"``, with the reason.

    Native 4-bit GEMMs need a CUDA device of compute capability 10.0+ (Blackwell) and a torch
    with ``float4_e2m1fn_x2``; everything else is emulated.

    Raises:
        ValueError: ``"native"`` where it cannot run (the message names the device and its
            compute capability).

    Example:
        >>> choose_fp4_backend("auto", "cpu")[0]
        'emulated'
    """
    device = torch.device(device)
    if requested == "emulated":
        return "emulated", "requested"
    reason = _fp4_native_missing(device)
    if reason is None:
        return "native", f"{device} has block-scaled FP4 tensor cores: GEMMs run on _scaled_mm"
    if requested == "native":
        raise ValueError(
            f"fp4 backend 'native' cannot run here: {reason}; use backend='emulated' (the same "
            "numerics, on fp32 kernels) or 'auto'"
        )
    return "emulated", reason


def _fp4_native_missing(device: torch.device) -> str | None:
    major, minor = FP4_NATIVE_CAPABILITY
    needed = f"compute capability {major}.{minor}+ (Blackwell) needed"
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"device {str(device)!r} is not a CUDA GPU with FP4 tensor cores ({needed})"
    report = probe(device, measure=False)  # cached per device
    capability = report.compute_capability or (0, 0)
    if capability < FP4_NATIVE_CAPABILITY:
        return (
            f"{report.name} ({str(device)!r}) has CUDA compute capability "
            f"{capability[0]}.{capability[1]}, without block-scaled FP4 tensor cores ({needed})"
        )
    if not hasattr(torch, "float4_e2m1fn_x2") or not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no float4_e2m1fn_x2 / _scaled_mm (2.8+ needed)"
    return None
