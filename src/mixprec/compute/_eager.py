"""Eager calls of mixprec's custom ops without torch.library's per-call Python machinery.

Design note: an emulated GEMM is a ``torch.library`` custom op so that ``torch.compile``, fake
tensors, dispatch modes and tensor subclasses see one opaque op. A plain eager call pays for that
in Python: the op's wrapper, the dispatcher's trip into a generated autograd kernel, a redispatch
and the backend wrapper cost about 40 us per call, more than the small GEMMs of a small model
(digits, cnn) take. Where nobody can observe the op — plain tensors, no dispatch or function
mode, no functorch transform, not tracing — :class:`EagerOp` runs the op's own function under a
plain ``autograd.Function`` whose forward and backward are the op's registered ones: the same
kernels on the same values, so the results are bit-identical; anywhere else it calls the op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["EagerOp", "plain_eager"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain_eager(args: tuple[Any, ...]) -> bool:
    """Whether a call on ``args`` is unobservable as an op: eager, plain tensors, no modes."""
    if torch.compiler.is_compiling():  # first: dynamo traces this function (Fp8Linear.forward)
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    return all(type(a) in _PLAIN for a in args if isinstance(a, torch.Tensor))


class EagerOp:
    """A custom op called through :func:`plain_eager`'s fast path where it may be.

    Args:
        op: the ``torch.library`` custom op (its function is ``op._init_fn``).
        setup_context: the op's registered ``setup_context(ctx, inputs, output)``, or None for
            an op without autograd (its backward GEMMs).
        backward: the op's registered ``backward(ctx, *grads)``.
        impl: what runs instead of ``op._init_fn`` on the fast path (the same values: e.g. the
            same ATen ops called from C++ in one call); ``backward`` likewise.
        autograd_impl: what runs instead of the ``autograd.Function`` where autograd records the
            call (e.g. a C++ autograd node with the same forward and backward), or returns None
            where it does not apply.
    """

    def __init__(
        self,
        op: Any,
        setup_context: Callable[..., None] | None = None,
        backward: Callable[..., Any] | None = None,
        impl: Callable[..., Any] | None = None,
        autograd_impl: Callable[..., Any] | None = None,
    ) -> None:
        self.op = op
        self.impl = op._init_fn if impl is None else impl
        self.autograd_impl = autograd_impl
        self.function: Any = None
        if setup_context is not None and backward is not None:
            impl = self.impl

            def forward(ctx: Any, *inputs: Any) -> Any:
                output = impl(*inputs)
                setup_context(ctx, inputs, output)
                return output

            name = f"EagerBackwardFor_{op._qualname.replace('::', '_')}"
            self.function = type(
                name,
                (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)},
            )

    def __call__(self, *args: Any) -> Any:
        if not plain_eager(args):
            return self.op(*args)
        return self.call_plain(*args)

    def call_plain(self, *args: Any) -> Any:
        """The fast path, for a caller that has checked :func:`plain_eager` itself."""
        if (
            self.function is not None
            and torch.is_grad_enabled()
            and torch._C._any_requires_grad(*args)
        ):
            if self.autograd_impl is not None:
                out = self.autograd_impl(*args)
                if out is not None:
                    return out
            return self.function.apply(*args)
        return self.impl(*args)
