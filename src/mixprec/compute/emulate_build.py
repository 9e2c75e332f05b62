"""The C++ kernels of emulated GEMMs (``_emulate.cpp``): one-pass fake quantization, and the
16-bit GEMMs' eager fast path (:mod:`mixprec.compute.emulated_cpp`).

Design note: an emulated FP8 (or block-scaled) GEMM multiplies the dequantized values of its
operands in fp32. Through torch ops each operand takes six passes (widen, scale, clamp, cast to
fp8, widen the bit patterns, decode through a table); CPUs have no vectorized fp8 cast, so two of
those cost more than the GEMM's own memory traffic. The kernel does all of it in one pass per
operand (:func:`fake_quantize`), bit for bit the values of
``dequantize(quantize_blocks(x, ...))``. It is built on first use with the machine's C++
compiler, by the same mechanism and flags as the optimizer kernels (:mod:`mixprec._cpp`: cached
under ``~/.cache/torch_extensions`` by a digest of source, flags, CPU and torch), and loaded as
``torch.ops.mixprec_emulate``. Where it cannot be built,
callers take the torch-ops path (same values; a warning says so once). :mod:`mixprec.scaled`
sits below ``compute`` too: importing this module hands it the kernel
(:func:`mixprec.scaled.use_kernels`). The same library holds the emulated 16-bit ``mm``,
``addmm`` and ``convolution`` as one call (and one autograd node) each way, which
:mod:`mixprec.compute.emulated_cpp` uses.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from mixprec import _cpp, scaled
from mixprec.formats import Format

__all__ = ["SCALE_RULES", "emulate_engine", "fake_quantize", "fake_quantize_dynamic"]

_SOURCES = [
    Path(__file__).with_name(name)
    for name in ("_emulate.cpp", "_emulate_fold.cpp", "_emulate_autocast.cpp", "_emulate_fp8.cpp")
]


def emulate_engine() -> Any | None:
    """``torch.ops.mixprec_emulate``, built on first call; None where it cannot be built."""
    return _BUILD.get()


_BUILD = _cpp.LazyBuild(
    functools.partial(_cpp.library, "mixprec_emulate", _SOURCES, "install_autocast"),
    "mixprec: the C++ kernels of emulated GEMMs (16-bit and FP8)",
    "emulated GEMMs take the torch-ops path (same results, slower). Install a C++ compiler and "
    "ninja to get it",
)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], fmt: Format
) -> torch.Tensor | None:
    """``round(clamp(x * scale)) / scale`` blockwise in fp32 in one pass, or None where the
    kernel does not apply (no kernel, not a CPU tensor, a format wider than 8 bits).

    Args:
        x: a 2-D fp32, bf16 or fp16 operand.
        scale: one fp32 scale, or one per ``block`` (shaped as :attr:`Scaled.scale`).
        block: ``(br, bc)``, partial blocks at the ends.
        fmt: the format rounded to (its grid and its largest finite value).
    """
    if x.device.type != "cpu" or x.dtype not in _DTYPES or fmt.bits > 8:
        return None
    ops = emulate_engine()
    if ops is None:
        return None
    return ops.fake_quantize(  # type: ignore[no-any-return]
        x.contiguous(),
        scale.float().contiguous(),
        block[0],
        block[1],
        fmt.max,
        fmt.mantissa_bits,
        fmt.min_exponent,
    )


def fake_quantize_dynamic(
    x: torch.Tensor, block: tuple[int, int], fmt: Format, rule: str
) -> torch.Tensor | None:
    """:func:`fake_quantize` with each block's scale from its own amax by ``rule``
    (``"dynamic"``, ``"pow2"`` or ``"e8m0"``, as :func:`mixprec.scaled.quantize_blocks`), all in
    one kernel call: for small operands the per-op cost of the scale's several torch ops is
    most of the time. None where the kernel does not apply."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES or fmt.bits > 8:
        return None
    ops = emulate_engine()
    if ops is None:
        return None
    return ops.fake_quantize_dynamic(  # type: ignore[no-any-return]
        x.contiguous(),
        block[0],
        block[1],
        fmt.max,
        fmt.mantissa_bits,
        fmt.min_exponent,
        SCALE_RULES[rule],
        fmt.max_exponent,
    )


SCALE_RULES = {"dynamic": 0, "pow2": 1, "e8m0": 2}
"""The kernel's code for each scale rule of :func:`mixprec.scaled.quantize_blocks`."""
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

scaled.use_kernels(fake_quantize, fake_quantize_dynamic)
