"""Emulated 16-bit GEMMs as ``torch.library`` custom ops: tensor-core numerics at fp32 speed.

Design note: a tensor core multiplies 16-bit inputs, accumulates in fp32 and rounds the result to
16 bits once. Products of two bf16 (or fp16) values are exact in fp32, so running the fp32 kernel
on the 16-bit inputs widened to fp32 and rounding its result reproduces that, up to the order of
the fp32 additions. On a CPU without AVX512-BF16/AMX, torch's native bf16 GEMM is ~100x slower
than fp32 (fp16 is slow on every CPU); this path costs two casts on top of the fp32 GEMM.

Each primitive GEMM of aten (``mm``, ``bmm``, ``addmm``, ``baddbmm``, ``addbmm``,
``convolution``, CPU flash attention) has a custom op here, ``mixprec::<name>``, with a fake
kernel (so ``torch.compile`` traces it as one opaque node whose output is 16-bit: inductor can
neither drop nor move the rounding) and a registered backward. Composite ops (``linear``,
``matmul``, ``einsum``, ``conv2d``, ...) need no op of their own: they decompose into these
primitives in the dispatcher, as they do on a GPU. The ops save their *16-bit* inputs, so
activation memory is that of real 16-bit training, and each gradient is one fp32 GEMM on widened
16-bit values rounded once to the input's dtype: fp16 overflow to inf and underflow to zero happen
in that rounding, exactly where hardware produces them. (The eager C++ nodes of
:mod:`mixprec.compute.emulated_cpp` that cast fp32 parameters themselves save the parameter in
place of its 16-bit copy: the same activations, the same values.)

``_addmm_activation`` (a GEMM with a GELU or ReLU after it) follows torch's own CPU kernel, the
reference torch's autocast tests compare with: the GEMM rounded to 16 bits, then the activation of
that 16-bit value (erf GELU) rounded again; bit for bit torch's native result.

Every fp32 kernel here runs with torch's autocast excluded: a custom op may be called inside an
autocast region (eagerly, or from a compiled graph), and autocast would otherwise lower the fp32
GEMM that *is* the emulation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch._C import DispatchKey, DispatchKeySet

from mixprec.compute import emulated_cpp
from mixprec.compute._eager import EagerOp

__all__ = ["EAGER_GEMMS", "EMULATED_OPS", "emulated_linear", "emulated_matmul", "no_autocast"]

_NO_AUTOCAST = DispatchKeySet(DispatchKey.AutocastCPU) | DispatchKeySet(DispatchKey.AutocastCUDA)
for _key in ("AutocastXPU", "AutocastMPS"):
    if hasattr(DispatchKey, _key):
        _NO_AUTOCAST = _NO_AUTOCAST | DispatchKeySet(getattr(DispatchKey, _key))


def no_autocast() -> Any:
    """A guard under which no autocast kernel runs (torch's own or mixprec's), on any device."""
    return torch._C._ExcludeDispatchKeyGuard(_NO_AUTOCAST)


def _wide(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


@torch.library.custom_op("mixprec::round_to", mutates_args=())
def _round_to_op(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype``, as an opaque node: inductor cannot fuse it away."""
    return x.to(dtype, copy=True)


_round_to_op.register_fake(lambda x, dtype: x.to(dtype, copy=True))


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A backward's 16-bit rounding, kept under ``torch.compile``.

    A custom op's forward is one opaque node, but its registered backward is traced into the
    compiled graph, where inductor fuses ``x.to(fp16)`` with the widening that follows (the
    cast's backward) and keeps the fp32 value: an fp16 gradient overflow eager produces (inf)
    came out finite compiled. Compiled, the rounding is an opaque op; eager, a plain cast.
    """
    if x.dtype == dtype:
        return x
    if torch.compiler.is_compiling():
        return torch.ops.mixprec.round_to(x, dtype)
    return x.to(dtype)


def _unbroadcast(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return _round(grad.sum_to_size(like.shape), like.dtype)


# -- mm / bmm ---------------------------------------------------------------------------------


@torch.library.custom_op("mixprec::mm", mutates_args=())
def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    with no_autocast():
        return torch.mm(a.float(), b.float()).to(a.dtype)


@torch.library.custom_op("mixprec::bmm", mutates_args=())
def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    with no_autocast():
        return torch.bmm(a.float(), b.float()).to(a.dtype)


def _column_major(t: torch.Tensor) -> bool:
    """torch's test for a column-major matrix (``mm_mat1_backward``/``mm_mat2_backward``)."""
    return t.dim() == 2 and t.stride(0) == 1 and t.stride(1) == t.size(0)


def _grad_a(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``g @ b.T`` in fp32, laid out as torch's fp32 backward lays it out: column-major for a
    column-major ``a``, so the gradient needs no transposing copy on its way to ``a``."""
    if _column_major(a):
        return (b.float() @ g.mT).mT
    return g @ b.float().mT


def _grad_b(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a.T @ g`` in fp32, laid out as torch's fp32 backward lays it out: a linear layer's
    ``weight.t()`` is column-major, so its gradient reaches the weight (and its ``.grad``, which
    autograd keeps in the parameter's layout) without a transposing copy."""
    if _column_major(b):
        return (g.mT @ a.float()).mT
    return a.float().mT @ g


def _save_all(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(*(t for t in inputs if isinstance(t, torch.Tensor)))


def _mm_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    a, b = ctx.saved_tensors
    with no_autocast():
        g = grad.float()
        ga = _round(_grad_a(g, a, b), a.dtype) if ctx.needs_input_grad[0] else None
        gb = _round(_grad_b(g, a, b), b.dtype) if ctx.needs_input_grad[1] else None
    return ga, gb


# -- addmm / baddbmm / addbmm -----------------------------------------------------------------


@torch.library.custom_op("mixprec::addmm", mutates_args=())
def _addmm(
    bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float, alpha: float
) -> torch.Tensor:
    with no_autocast():
        return torch.addmm(bias.float(), a.float(), b.float(), beta=beta, alpha=alpha).to(a.dtype)


@torch.library.custom_op("mixprec::baddbmm", mutates_args=())
def _baddbmm(
    bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float, alpha: float
) -> torch.Tensor:
    with no_autocast():
        out = torch.baddbmm(bias.float(), a.float(), b.float(), beta=beta, alpha=alpha)
        return out.to(a.dtype)


@torch.library.custom_op("mixprec::addbmm", mutates_args=())
def _addbmm(
    bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float, alpha: float
) -> torch.Tensor:
    with no_autocast():
        return torch.addbmm(bias.float(), a.float(), b.float(), beta=beta, alpha=alpha).to(a.dtype)


def _save_addmm(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    bias, a, b, beta, alpha = inputs
    ctx.save_for_backward(bias, a, b)
    ctx.beta, ctx.alpha = beta, alpha


def _addmm_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``beta * bias + alpha * (a @ b)`` (batched, or summed over batches)."""
    bias, a, b = ctx.saved_tensors
    want = ctx.needs_input_grad
    with no_autocast():
        g = grad.float()
        g_bias = _unbroadcast(g if ctx.beta == 1 else g * ctx.beta, bias) if want[0] else None
        if a.dim() == 3 and g.dim() == 2:  # addbmm: the batch products were summed
            g = g.expand(a.shape[0], *g.shape)
        if ctx.alpha != 1:
            g = g * ctx.alpha
        ga = _round(_grad_a(g, a, b), a.dtype) if want[1] else None
        gb = _round(_grad_b(g, a, b), b.dtype) if want[2] else None
    return g_bias, ga, gb, None, None


@torch.library.custom_op("mixprec::addmm_activation", mutates_args=())
def _addmm_activation(
    bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float, alpha: float, use_gelu: bool
) -> torch.Tensor:
    """``act(beta * bias + alpha * a @ b)`` as torch's own CPU kernel computes it: the GEMM in
    fp32, rounded once to 16 bits, then torch's own 16-bit activation (erf GELU or ReLU) of that
    value. Bit for bit torch's native 16-bit result (its ``test_autocast_torch_16``) on every CPU:
    torch's 16-bit GELU is not the fp32 GELU rounded on all of them."""
    with no_autocast():
        z = _preactivation(bias, a, b, beta, alpha)
        return F.gelu(z) if use_gelu else torch.relu(z)


def _preactivation(
    bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float, alpha: float
) -> torch.Tensor:
    """``beta * bias + alpha * a @ b`` in fp32, rounded once to the 16-bit dtype of ``a``."""
    return _round(torch.addmm(bias.float(), a.float(), b.float(), beta=beta, alpha=alpha), a.dtype)


def _save_addmm_activation(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    bias, a, b, ctx.beta, ctx.alpha, ctx.use_gelu = inputs
    ctx.save_for_backward(bias, a, b)


def _addmm_activation_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    bias, a, b = ctx.saved_tensors
    with no_autocast():  # the 16-bit pre-activation the forward applied the activation to
        z = _preactivation(bias, a, b, ctx.beta, ctx.alpha)
        g = grad.to(z.dtype)  # torch's own 16-bit activation backward, as for its forward
        g = (torch.ops.aten.gelu_backward(g, z) if ctx.use_gelu else g * (z > 0)).float()
        want = ctx.needs_input_grad
        g_bias = _unbroadcast(g * ctx.beta, bias) if want[0] else None
        ga = _round(g @ b.float().mT * ctx.alpha, a.dtype) if want[1] else None
        gb = _round(a.float().mT @ g * ctx.alpha, b.dtype) if want[2] else None
    return g_bias, ga, gb, None, None, None


@torch.library.custom_op("mixprec::conv_tbc", mutates_args=())
def _conv_tbc(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pad: int) -> torch.Tensor:
    """The time-batch-channel convolution with its taps summed in fp32 and one rounding."""
    with no_autocast():
        return torch.conv_tbc(x.float(), weight.float(), bias.float(), pad).to(x.dtype)


def _save_conv_tbc(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, weight, bias, ctx.pad = inputs
    ctx.save_for_backward(x, weight, bias)


def _conv_tbc_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight, bias = ctx.saved_tensors
    with no_autocast():
        gx, gw, gb = torch.ops.aten.conv_tbc_backward.default(
            grad.float(), x.float(), weight.float(), bias.float(), ctx.pad
        )
    return _round(gx, x.dtype), _round(gw, weight.dtype), _round(gb, bias.dtype), None


# -- convolution ------------------------------------------------------------------------------


@torch.library.custom_op("mixprec::convolution", mutates_args=())
def _convolution(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
) -> torch.Tensor:
    with no_autocast():
        out = torch.ops.aten.convolution.default(
            x.float(), weight.float(), _wide(bias), stride, padding, dilation, transposed,
            output_padding, groups,
        )  # fmt: skip
        return out.to(x.dtype)


def _save_convolution(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, weight, bias, *ctx.geometry = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_sizes = None if bias is None else list(bias.shape)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _convolution_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight = ctx.saved_tensors
    want = ctx.needs_input_grad
    mask = [want[0], want[1], ctx.bias_sizes is not None and want[2]]
    with no_autocast():
        gx, gw, gb = torch.ops.aten.convolution_backward.default(
            grad.float(), x.float(), weight.float(), ctx.bias_sizes, *ctx.geometry, mask
        )
    return (
        _round(gx, x.dtype) if mask[0] else None,
        _round(gw, weight.dtype) if mask[1] else None,
        _round(gb, ctx.bias_dtype) if mask[2] else None,
        *([None] * 6),
    )


# -- flash attention (CPU) --------------------------------------------------------------------


@torch.library.custom_op("mixprec::flash_attention_cpu", mutates_args=())
def _flash_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float,
    is_causal: bool,
    attn_mask: torch.Tensor | None,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    with no_autocast():
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(
            q.float(), k.float(), v.float(), dropout_p, is_causal,
            attn_mask=_wide(attn_mask), scale=scale,
        )  # fmt: skip
        return out.to(q.dtype), lse


def _save_flash(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    q, k, v, ctx.dropout_p, ctx.is_causal, mask, ctx.scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, out, lse)


def _flash_backward(
    ctx: Any, grad: torch.Tensor, grad_lse: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    q, k, v, mask, out, lse = ctx.saved_tensors
    with no_autocast():
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
            grad.float(), q.float(), k.float(), v.float(), out.float(), lse, ctx.dropout_p,
            ctx.is_causal, attn_mask=_wide(mask), scale=ctx.scale,
        )  # fmt: skip
    return _round(gq, q.dtype), _round(gk, k.dtype), _round(gv, v.dtype), None, None, None, None


# The fake kernels are the real ones: they are shape-polymorphic tensor code, run on fake tensors.
for _op in (
    _mm, _bmm, _addmm, _baddbmm, _addbmm, _addmm_activation, _conv_tbc, _convolution, _flash_cpu
):  # fmt: skip
    _op.register_fake(_op._init_fn)  # type: ignore[attr-defined]
_AUTOGRAD: list[tuple[Any, Any, Any]] = [
    (_mm, _save_all, _mm_backward),
    (_addmm, _save_addmm, _addmm_backward),
    (_bmm, _save_all, _mm_backward),
    (_baddbmm, _save_addmm, _addmm_backward),
    (_addbmm, _save_addmm, _addmm_backward),
    (_addmm_activation, _save_addmm_activation, _addmm_activation_backward),
    (_conv_tbc, _save_conv_tbc, _conv_tbc_backward),
    (_convolution, _save_convolution, _convolution_backward),
    (_flash_cpu, _save_flash, _flash_backward),
]
for _op, _setup, _backward in _AUTOGRAD:
    _op.register_autograd(_backward, setup_context=_setup)


def _eager_gemm(
    bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, beta: float, alpha: float
) -> torch.Tensor:
    """``_addmm`` (``_mm`` without a bias) on the eager fast path: one C++ call where it can."""
    out = emulated_cpp.gemm(bias, a, b, beta, alpha)
    if out is not None:
        return out
    if bias is None:
        return _mm._init_fn(a, b)  # type: ignore[attr-defined, no-any-return]
    return _addmm._init_fn(bias, a, b, beta, alpha)  # type: ignore[attr-defined, no-any-return]


def _eager_mm_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    a, b = ctx.saved_tensors
    want = (False, *ctx.needs_input_grad)
    found = emulated_cpp.gemm_backward(grad, None, a, b, 1.0, 1.0, want)
    return _mm_backward(ctx, grad) if found is None else found[1:]


def _eager_addmm_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    bias, a, b = ctx.saved_tensors
    found = emulated_cpp.gemm_backward(grad, bias, a, b, ctx.beta, ctx.alpha, ctx.needs_input_grad)
    return _addmm_backward(ctx, grad) if found is None else (*found, None, None)


def _eager_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *geometry: Any
) -> Any:
    """``_convolution`` on the eager fast path: one C++ call where it can."""
    out = emulated_cpp.conv(x, weight, bias, *geometry)
    if out is None:
        return _convolution._init_fn(x, weight, bias, *geometry)  # type: ignore[attr-defined]
    return out


def _eager_conv_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight = ctx.saved_tensors
    found = emulated_cpp.conv_backward(
        grad, x, weight, ctx.bias_sizes, ctx.bias_dtype, ctx.geometry, ctx.needs_input_grad
    )
    return _convolution_backward(ctx, grad) if found is None else (*found, *([None] * 6))


# Eager calls on plain tensors skip torch.library's per-call machinery (see mixprec.compute._eager);
# mm, addmm and convolution (linear and conv layers) run as one C++ call each way.
_OTHERS = (row for row in _AUTOGRAD[2:] if row[0] is not _convolution)
_eager_bmm, _eager_baddbmm, _eager_addbmm, _eager_addmm_activation, _eager_conv_tbc, \
    _eager_flash_cpu = (EagerOp(*row) for row in _OTHERS)  # fmt: skip
_eager_convolution = EagerOp(
    _convolution,
    _save_convolution,
    _eager_conv_backward,
    impl=_eager_conv,
    autograd_impl=emulated_cpp.conv_node,
)
_eager_mm = EagerOp(
    _mm,
    _save_all,
    _eager_mm_backward,
    impl=lambda a, b: _eager_gemm(None, a, b, 1.0, 1.0),
    autograd_impl=lambda a, b: emulated_cpp.gemm_node(None, a, b, 1.0, 1.0),
)
_eager_addmm = EagerOp(
    _addmm,
    _save_addmm,
    _eager_addmm_backward,
    impl=_eager_gemm,
    autograd_impl=emulated_cpp.gemm_node,
)


def _scalar(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def _call_addmm(op: Any, bias: Any, a: Any, b: Any, *, beta: Any = 1, alpha: Any = 1) -> Any:
    return op(bias, a, b, _scalar(beta), _scalar(alpha))


def _call_flash(
    q: Any,
    k: Any,
    v: Any,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    attn_mask: Any = None,
    scale: float | None = None,
) -> Any:
    return _eager_flash_cpu(q, k, v, dropout_p, is_causal, attn_mask, scale)


EMULATED_OPS: dict[str, Any] = {
    "mm": _eager_mm,
    "bmm": _eager_bmm,
    "addmm": lambda *a, **k: _call_addmm(_eager_addmm, *a, **k),
    "baddbmm": lambda *a, **k: _call_addmm(_eager_baddbmm, *a, **k),
    "addbmm": lambda *a, **k: _call_addmm(_eager_addbmm, *a, **k),
    "_addmm_activation": lambda bias, a, b, *, beta=1, alpha=1, use_gelu=False: (
        _eager_addmm_activation(bias, a, b, _scalar(beta), _scalar(alpha), use_gelu)
    ),
    "conv_tbc": lambda x, weight, bias, pad=0: _eager_conv_tbc(x, weight, bias, pad),
    "convolution": _eager_convolution,
    "_scaled_dot_product_flash_attention_for_cpu": _call_flash,
}
"""aten primitive (overload name) -> its emulated version, called with aten's arguments on
16-bit tensors of one dtype."""

EAGER_GEMMS: dict[str, EagerOp] = {
    "mm": _eager_mm,
    "addmm": _eager_addmm,
    "convolution": _eager_convolution,
}
"""The emulated ops of linear and conv layers, for kernels that decompose those layers themselves
(on plain eager tensors: :meth:`EagerOp.call_plain`)."""


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
    flat = x.reshape(-1, x.shape[-1])
    if bias is None:
        out = _eager_mm(flat, weight.t())
    else:
        out = _eager_addmm(bias, flat, weight.t(), 1.0, 1.0)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def emulated_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul`` on 16-bit tensors (both at least 2-D) with fp32 accumulation.

    Example:
        >>> a, b = torch.randn(2, 3, 4).half(), torch.randn(4, 5).half()
        >>> torch.equal(emulated_matmul(a, b), (a.float() @ b.float()).half())
        True
    """
    if a.dim() < 2 or b.dim() < 2:
        raise ValueError(
            f"emulated_matmul needs tensors of at least 2 dimensions, got shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}; use torch.matmul inside an emulated region"
        )
    if b.dim() == 2:  # folded into one GEMM, as torch.matmul does: one rounding per gradient
        return _eager_mm(a.reshape(-1, a.shape[-1]), b).reshape(*a.shape[:-1], b.shape[-1])
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a3 = a.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
    b3 = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    return _eager_bmm(a3, b3).reshape(*batch, a.shape[-2], b.shape[-1])
