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

Autocast's casts of fp32 parameters are folded into the layer's node where the C++ autocast
kernels (and :mod:`mixprec.compute.kernels`' Python shortcuts, so that a checkpoint's
recomputation saves what the forward saved) take a ``linear`` on a 2-D input (or a contiguous 3-D
one, flattened as torch's linear flattens it) or a ``conv1d/2d/3d`` with a leaf fp32 weight
(:func:`linear`, :func:`convolution`, ``_emulate_fold.cpp``). On a small model each cast costs
more than its arithmetic: torch.autocast's graph rounds each weight and bias to 16 bits with its
own node forward and widens their gradients with another backward, and the GEMM node saves the
16-bit weight copy. The folded node rounds the parameters into fp32 storage inside, saves the fp32
weight itself (no copy: activation memory as under torch.autocast, less memory in all) and rounds
its gradients in place: the same values, bit for bit, 0.05-0.09 of an fp32 step less on the
digits MLP and 2 bytes per weight less kept for backward (bench notes). What it changes, on
purpose:

- the graph holds no ``ToCopyBackward0`` for the parameters (tools that look for autocast's
  weight copies find the parameter itself saved, which they leave out already);
- an in-place change of a weight between forward and backward is refused where fp32 training
  refuses it (autograd checks the saved parameter), where torch.autocast's saved copy hides it;
- a double backward (``create_graph=True``) adds a weight's two second-order contributions in
  fp32 at the weight, where torch.autocast adds them in 16 bits at its copy: rounded to 16 bits,
  the sum is autocast's.

Other inputs (4-D, or 3-D and not contiguous), 16-bit parameters and weights computed in the
forward (whose fp32 value the node would keep alive) take torch's casts and :func:`gemm_node`.

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
    "convolution",
    "engine",
    "gemm",
    "gemm_backward",
    "gemm_node",
    "linear",
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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``linear`` of a 2-D 16-bit ``x`` with an fp32 ``weight`` (and ``bias``) that autocast
    would cast to ``x.dtype``, the casts inside the GEMM (one autograd node where autograd
    records, saving ``x`` and the fp32 weight itself); None where it does not apply (another
    layout or dtype, no kernel): the caller casts the parameters and takes :func:`gemm_node`."""
    if x.dim() != 2 or weight.dim() != 2 or not _fp32_params(weight, bias, contiguous=True):
        return None
    return _folded("linear16", x, weight, bias)


def convolution(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor | None:
    """``conv1d``/``conv2d``/``conv3d`` of a batched 16-bit ``x`` with an fp32 ``weight`` (and
    ``bias``, contiguous or channels-last) cast inside the node, as :func:`linear`; None where
    it does not apply."""
    if not _fp32_params(weight, bias, contiguous=False):
        return None
    return _folded("convolution16", x, weight, bias, stride, padding, dilation, groups)


def _folded(
    op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *geometry: Any
) -> torch.Tensor | None:
    """The engine's ``op`` on the layer's operands, as its autograd node (``<op>_autograd``)
    where autograd records the call; None without the engine."""
    ops = engine(x.device.type)
    if ops is None:
        return None
    if torch.is_grad_enabled() and torch._C._any_requires_grad(x, weight, bias):
        op += "_autograd"
    return getattr(ops, op)(x, weight, bias, *geometry)  # type: ignore[no-any-return]


def _fp32_params(weight: torch.Tensor, bias: torch.Tensor | None, contiguous: bool) -> bool:
    """``_emulate_fold.cpp``'s ``fp32_params``: fp32 CPU parameters, contiguous (or, where
    ``contiguous`` is False, channels-last), the weight a leaf (not computed in the forward,
    whose fp32 value the node would keep alive where autocast keeps a 16-bit copy)."""
    if not weight.is_leaf:
        return False
    for t in (weight,) if bias is None else (weight, bias):
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.layout != torch.strided:
            return False
        if not t.is_contiguous() and (
            contiguous
            or not (
                t.is_contiguous(memory_format=torch.channels_last)
                or t.is_contiguous(memory_format=torch.channels_last_3d)
            )
        ):
            return False
    return True


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
