"""Emulated 16-bit GEMMs: tensor-core numerics at fp32 speed on CPUs without 16-bit units.

Design note: a tensor core multiplies 16-bit inputs, accumulates in fp32 and rounds the result to
16 bits once. Products of two bf16 (or fp16) values are exact in fp32, so running the fp32 kernel
on the 16-bit inputs widened to fp32 and rounding its result reproduces that, up to the order of
the fp32 additions. On a CPU without AVX512-BF16/AMX, torch's native bf16 GEMM is ~100x slower
than fp32; this path costs two casts on top of the fp32 GEMM.

The autograd functions below save the *16-bit* inputs, so activation memory is that of real 16-bit
training, and their backward runs the same way: the 16-bit gradient is widened, the fp32 GEMMs
produce the input gradients, and those are rounded to 16 bits. fp16 overflow to inf and underflow to
zero happen in that final rounding, exactly where hardware would produce them. Linear and matmul
have hand-written backward passes (one GEMM per gradient, as in fp32); the other GEMM-class ops
(convolutions, attention, addmm, ...) recompute their fp32 forward inside the backward, trading one
extra forward for not saving fp32 copies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["emulated_call", "emulated_linear", "emulated_matmul"]


def _widen(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32)


def _widen_floating(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32) if t.is_floating_point() else t  # masks and indices stay as they are


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return F.linear(x.float(), w.float(), _widen(b)).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        with torch._C.DisableTorchFunction():
            g = grad.float()
            grad_x = grad_w = grad_b = None
            if ctx.needs_input_grad[0]:
                grad_x = (g @ w.float()).to(x.dtype)
            if ctx.needs_input_grad[1]:
                g2 = g.reshape(-1, g.shape[-1])
                grad_w = (g2.t() @ x.reshape(-1, x.shape[-1]).float()).to(w.dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = g.reshape(-1, g.shape[-1]).sum(0).to(x.dtype)
        return grad_x, grad_w, grad_b


class _Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return torch.matmul(a.float(), b.float()).to(a.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a, b = ctx.saved_tensors
        with torch._C.DisableTorchFunction():
            g = grad.float()
            grad_a = grad_b = None
            if ctx.needs_input_grad[0]:
                grad_a = (g @ b.float().mT).sum_to_size(a.shape).to(a.dtype)
            if ctx.needs_input_grad[1]:
                grad_b = (a.float().mT @ g).sum_to_size(b.shape).to(b.dtype)
        return grad_a, grad_b


class _Recompute(torch.autograd.Function):
    """Any op on 16-bit tensors: fp32 forward rounded once; backward recomputes in fp32."""

    @staticmethod
    def forward(
        ctx: Any, fn: Callable[..., torch.Tensor], dtype: torch.dtype, *tensors: torch.Tensor
    ) -> torch.Tensor:
        ctx.fn = fn
        ctx.save_for_backward(*tensors)
        return fn(*(_widen_floating(t) for t in tensors)).to(dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors
        wanted = ctx.needs_input_grad[2:]
        with torch._C.DisableTorchFunction(), torch.enable_grad():
            widened = [
                _widen_floating(t).requires_grad_(w and t.is_floating_point())
                for t, w in zip(saved, wanted, strict=True)
            ]
            out = ctx.fn(*widened)
            inputs = [t for t in widened if t.requires_grad]
            grads = iter(torch.autograd.grad(out, inputs, grad.float(), allow_unused=True))
            result: list[torch.Tensor | None] = [None, None]
            for wide, original in zip(widened, saved, strict=True):
                g = next(grads) if wide.requires_grad else None
                result.append(None if g is None else g.to(original.dtype))
        return tuple(result)


def emulated_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear`` on 16-bit tensors with fp32 accumulation and one rounding of the result.

    All tensors must already be in the same 16-bit dtype; the result has that dtype and equals
    ``F.linear(x.float(), weight.float(), bias.float()).to(dtype)`` bit for bit.

    Example:
        >>> x, w = torch.randn(4, 8).bfloat16(), torch.randn(3, 8).bfloat16()
        >>> torch.equal(emulated_linear(x, w), (x.float() @ w.float().t()).bfloat16())
        True
    """
    return _Linear.apply(x, weight, bias)


def emulated_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul`` on 16-bit tensors (both at least 2-D) with fp32 accumulation."""
    return _Matmul.apply(a, b)


def emulated_call(
    fn: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any],
    dtype: torch.dtype,
) -> Any:
    """Run ``fn(*args, **kwargs)`` as a 16-bit GEMM-class op would run on hardware.

    Floating tensor arguments must already be 16-bit (``dtype``); the op runs in fp32 on their
    widened values and its result is rounded to ``dtype``. Linear and matmul use dedicated autograd
    functions; anything else goes through a generic one that recomputes in its backward.
    """
    name = getattr(fn, "__name__", "")
    if name == "linear" and not kwargs and 2 <= len(args) <= 3:
        return emulated_linear(*args)
    if name in ("matmul", "__matmul__") and not kwargs and len(args) == 2:
        a, b = args
        if a.dim() >= 2 and b.dim() >= 2:
            return emulated_matmul(a, b)
    if name == "__rmatmul__" and not kwargs and len(args) == 2 and min(a.dim() for a in args) >= 2:
        return emulated_matmul(args[1], args[0])
    return _recompute(fn, args, kwargs, dtype)


def _recompute(
    fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], dtype: torch.dtype
) -> Any:
    positions: list[tuple[bool, int | str]] = []
    tensors: list[torch.Tensor] = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            positions.append((True, i))
            tensors.append(a)
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            positions.append((False, k))
            tensors.append(v)

    def call(*widened: torch.Tensor) -> torch.Tensor:
        new_args = list(args)
        new_kwargs = dict(kwargs)
        for (is_positional, where), t in zip(positions, widened, strict=True):
            if is_positional:
                new_args[where] = t  # type: ignore[index]
            else:
                new_kwargs[where] = t  # type: ignore[index]
        return fn(*new_args, **new_kwargs)

    return _Recompute.apply(call, dtype, *tensors)
