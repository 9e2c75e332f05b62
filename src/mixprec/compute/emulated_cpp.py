"""The emulated GEMMs' eager fast path in C++: one call per GEMM (or convolution) each way.

Design note: on a small model an emulated GEMM's cost is its count of small ops, not its
arithmetic (profile in ``benchmarks/bench_emulation.py``). ``_emulate.cpp`` runs the widenings,
the fp32 GEMM (or convolution) and the rounding of each emulated op — the same ATen ops in the
same order as :mod:`mixprec.compute.emulated`'s Python functions, so the same bits — in one call
from Python, forward and backward; the backward lays each gradient out as torch's fp32 backward
does. Where autograd records the call, :func:`gemm_node` and :func:`conv_node` make forward and
backward one C++ autograd node (no Python on either side: about 30 us less per linear layer and
step than a Python ``autograd.Function``); in a double backward that node's backward records its
ATen ops like any other, while :func:`gemm_backward` and :func:`conv_backward` (the Python
``Function``'s) step aside for the differentiable Python backward.

(Not done: folding autocast's casts of the weight and bias into the same autograd node. It saved
no measurable time on digits on an Intel Xeon, but 0.07-0.09 of the fp32 step on an AMD EPYC
(bench notes); it would drop the ``ToCopyBackward0`` weight copy that tools read, change what
activation checkpointing's recomputation must save, and make a double backward add the weight's
two second-order contributions in fp32 where autocast adds them in 16 bits.)

Only :mod:`mixprec.compute.emulated` calls these, on plain eager tensors
(``_eager.plain_eager``); each returns None where it does not apply (no C++ compiler, another
device, batched operands, a double backward), and the caller takes the Python path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "conv",
    "conv_backward",
    "conv_node",
    "engine",
    "gemm",
    "gemm_backward",
    "gemm_node",
]

_ENGINE: list[Any] = []  # the built ops, once built (emulate_build imports scaled: imported late)


def engine(device_type: str = "cpu") -> Any:
    """``torch.ops.mixprec_emulate`` for CPU tensors (built on first call), else None."""
    if device_type != "cpu":
        return None
    if _ENGINE:
        return _ENGINE[0]
    from mixprec.compute.emulate_build import emulate_engine

    ops = emulate_engine()
    if ops is not None:
        _ENGINE.append(ops)
    return ops


def _backward_engine(device_type: str) -> Any:
    """The engine for a backward, or None in a double backward (``create_graph=True``): the C++
    ops record no autograd, so the Python backward (which does) runs there."""
    return None if torch.is_grad_enabled() else engine(device_type)


def gemm(
    bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, beta: float, alpha: float
) -> torch.Tensor | None:
    """``addmm(bias, a, b)`` (``mm`` without a bias) in fp32 on 16-bit 2-D operands, rounded
    once to ``a.dtype``; None where the kernel does not apply."""
    ops = engine(a.device.type)
    return None if ops is None else ops.gemm16(bias, a, b, beta, alpha)


def gemm_node(
    bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, beta: float, alpha: float
) -> torch.Tensor | None:
    """:func:`gemm` as one C++ autograd node whose backward is :func:`gemm_backward`'s ATen ops
    (recorded by autograd in a double backward); None where the kernel does not apply."""
    ops = engine(a.device.type)
    return None if ops is None else ops.gemm16_autograd(bias, a, b, beta, alpha)


def gemm_backward(
    grad: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    beta: float,
    alpha: float,
    want: Sequence[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None:
    """The gradients (bias, a, b) of :func:`gemm` that ``want`` asks for (None for the others),
    each rounded to its operand's dtype; None where the kernel does not apply."""
    if a.dim() != 2 or grad.dim() != 2:
        return None
    ops = _backward_engine(a.device.type)
    if ops is None:
        return None
    want_bias = bias is not None and want[0]
    found = iter(ops.gemm16_backward(grad, bias, a, b, beta, alpha, want_bias, want[1], want[2]))
    return tuple(next(found) if w else None for w in (want_bias, want[1], want[2]))  # type: ignore[return-value]


def conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *geometry: Any
) -> torch.Tensor | None:
    """``aten.convolution`` in fp32 on 16-bit operands, rounded once to ``x.dtype``; None where
    the kernel does not apply. ``geometry``: stride, padding, dilation, transposed,
    output_padding, groups."""
    ops = engine(x.device.type)
    return None if ops is None else ops.conv16(x, weight, bias, *geometry)


def conv_node(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *geometry: Any
) -> torch.Tensor | None:
    """:func:`conv` as one C++ autograd node whose backward is :func:`conv_backward`'s ATen ops
    (recorded by autograd in a double backward); None where the kernel does not apply."""
    ops = engine(x.device.type)
    return None if ops is None else ops.conv16_autograd(x, weight, bias, *geometry)


def conv_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias_sizes: list[int] | None,
    bias_dtype: torch.dtype | None,
    geometry: Sequence[Any],
    want: Sequence[bool],
) -> tuple[torch.Tensor | None, ...] | None:
    """The gradients (x, weight, bias) of :func:`conv` that ``want`` asks for, each rounded to
    its operand's dtype; None where the kernel does not apply."""
    ops = _backward_engine(x.device.type)
    if ops is None:
        return None
    mask = (want[0], want[1], bias_sizes is not None and want[2])
    found = iter(ops.conv16_backward(grad, x, weight, bias_sizes, *geometry, *mask, bias_dtype))
    return tuple(next(found) if w else None for w in mask)
