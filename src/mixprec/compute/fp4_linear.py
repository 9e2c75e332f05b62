"""4-bit linear layers (NVFP4, MXFP4): custom-op GEMMs on block-scaled operands, and the module.

Design note: the same shape as :mod:`mixprec.compute.fp8_linear` — ``mixprec::fp4_linear`` is
one custom op (fake kernel, registered autograd) for the forward GEMM and each gradient GEMM is a
custom op of its own, so ``torch.compile`` and activation checkpointing see opaque nodes that
cannot fold the quantization away. Each GEMM quantizes its two operands to the recipe's format
(:func:`mixprec.blockscaled.fake_quantize`, bit for bit torchao's ``NVFP4Tensor``/``MXTensor``)
in blocks along the dimension it sums over, multiplies the dequantized values in fp32 — products
of 4-bit values times their scales are exact in fp32, so this is the tensor core's arithmetic up
to the order of the additions — and rounds once to the compute dtype (the bias added in fp32
before that rounding). What the recipe's options change (:mod:`mixprec.fp4_recipes`):

* ``weight_blocks=16x16`` (``32x32``): the weight is quantized once in square tiles and that same
  tensor serves the forward and the input-gradient GEMM; ``1x16`` (``1x32``) quantizes it along
  ``in_features`` for the forward and along ``out_features`` for the input gradient.
* ``rht``: the weight-gradient GEMM's operands (output gradient and input, tokens x features) go
  through :func:`mixprec.fp4_recipes.rht` along the tokens before they are quantized: widened,
  padded and transformed in one pass (:func:`~mixprec.fp4_recipes.rht_padded`, the bits of that
  composition), then quantized in place, where no one else holds them.
* ``sr_grad``: the output gradient's elements round stochastically (torch's global generator,
  drawn first for the input-gradient GEMM, then for the weight-gradient GEMM).
* ``amax_reduce``: NVFP4's tensor scale of each activation and gradient operand comes from its
  amax over all ranks (:func:`mixprec.scaled.reduce_amax`); a rank without tokens takes part
  with a zero amax, so the others never wait for it.

The token count of the weight-gradient GEMM is padded with zero rows to whole blocks.

On a CUDA device of compute capability 10.0+ (Blackwell; :func:`fp4_backend`, ``"auto"`` picks
it there and only there, ``"native"`` elsewhere is refused) each GEMM runs on block-scaled
``torch._scaled_mm`` instead: the same elements and scales, packed by
:mod:`mixprec.compute.fp4_native` (two e2m1 codes per byte, e4m3/E8M0 scales in cuBLAS's swizzled
layout), accumulated in fp32 and written in fp32, NVFP4's two tensor scales multiplied in after,
then the same bias and rounding. It differs from the emulation only in the order of the fp32
additions and in applying NVFP4's tensor scales to the sum rather than to each operand; on a
CPU the same packed arguments decode to the emulation bit for bit
(:func:`~mixprec.compute.fp4_native.emulate_gemm`), and the GPU tests (skipped without a
Blackwell GPU) hold the native layer to the emulated one within that tolerance. The custom
ops are the same ops with a ``native`` flag, so compile and checkpointing see no difference.
A layer whose ``in_features`` or ``out_features`` is not a multiple of 32
(the packed GEMM's alignment; nvfp4 allows 16) runs emulated there, with a warning.
:class:`Fp4Linear` subclasses :class:`~mixprec.compute.fp8_linear.Fp8Linear`, so everything that
handles a low-precision layer (FSDP2's gather in the stored dtype, the session's step, conversion)
handles it too; it keeps no amax history.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mixprec.blockscaled import Rounding, fake_quantize, fake_quantize_tiles, nvfp4_tensor_scale
from mixprec.blockscaled_build import fake_quantize_blocks
from mixprec.compute._eager import EagerOp
from mixprec.compute.emulated import no_autocast
from mixprec.compute.fp4_native import (
    native_misfit,
    prepare_operand,
    prepare_weight,
    run_gemm,
)
from mixprec.compute.fp8_linear import (
    Fp8Backend,
    Fp8Linear,
    _amax,
    _check_floating,
    _spec,
    check_backend_name,
)
from mixprec.fp4_recipes import Fp4Recipe, rht_padded
from mixprec.hardware import choose_fp4_backend
from mixprec.scaled import reduce_amax

__all__ = [
    "Fp4Linear",
    "fp4_backend",
    "fp4_linear",
    "quantize_fp4_operand",
    "quantize_fp4_weight",
    "reduced_tensor_scale",
]


# -- operands (pure functions) ------------------------------------------------------------------


def quantize_fp4_operand(
    t: torch.Tensor, recipe: Fp4Recipe, stochastic: bool = False, batch: bool = False
) -> Any:
    """``t`` (2-D) quantized in the recipe's blocks along its last dimension and back, in fp32.

    ``batch``: an activation or gradient, whose NVFP4 tensor scale ``amax_reduce`` takes over
    the ranks (:func:`reduced_tensor_scale`); a weight is the same on every rank.
    """
    scale = reduced_tensor_scale(t, recipe) if batch else None  # also when empty: see there
    return _quantized(t, recipe, stochastic, scale)


def _quantized(
    t: torch.Tensor, recipe: Fp4Recipe, stochastic: bool, scale: torch.Tensor | None
) -> torch.Tensor:
    """:func:`quantize_fp4_operand` under NVFP4's tensor scale ``scale`` (None: ``t``'s own)."""
    if t.numel() == 0:
        return t.float()
    if t.dtype not in (torch.bfloat16, torch.float16):  # 16-bit ones widen exactly, in the kernel
        t = t.float()
    rounding: Rounding = "stochastic" if stochastic else "nearest"
    return fake_quantize(t, recipe.format, rounding, per_tensor_scale=scale)


def reduced_tensor_scale(t: torch.Tensor, recipe: Fp4Recipe) -> torch.Tensor | None:
    """NVFP4's tensor scale of ``t`` from its amax over all ranks under ``amax_reduce``; None
    (the scale of ``t``'s own amax) without the option, for MX formats, and where the amax over
    the ranks is inf or NaN (the step is skipped; each rank's own amax poisons its operand).

    Every rank calls it for the same operands, one without rows too (with a zero amax, the
    identity of MAX): the reduction is a collective that the others would wait on forever.
    """
    if not recipe.amax_reduce or recipe.format.tensor_scale is None:
        return None
    amax = reduce_amax(_amax(t))  # an empty t: 0
    return nvfp4_tensor_scale(amax) if bool(torch.isfinite(amax)) else None


def quantize_fp4_weight(weight: torch.Tensor, recipe: Fp4Recipe, gemm: str) -> torch.Tensor:
    """The weight as ``gemm`` (``"output"`` or ``"grad_input"``) uses it, ``(out, in)`` in fp32.

    Square tiles give one tensor for both GEMMs; 1-D blocks run along ``in_features`` for the
    output GEMM and along ``out_features`` for the input-gradient GEMM.
    """
    w = weight.float()
    if recipe.weight_tile is not None:
        return fake_quantize_tiles(w, recipe.format, recipe.weight_tile)
    if gemm == "output":
        return quantize_fp4_operand(w, recipe)
    return quantize_fp4_operand(w.t(), recipe).t()


def _quantize_own(
    t: torch.Tensor, recipe: Fp4Recipe, stochastic: bool = False, batch: bool = False
) -> torch.Tensor:
    """:func:`quantize_fp4_operand` of an fp32 ``t`` this module made (the RHT's output), written
    over ``t`` where the kernel can: no second operand-sized tensor to allocate and fault in."""
    scale = reduced_tensor_scale(t, recipe) if batch else None  # once: a collective
    rounding = "stochastic" if stochastic else "nearest"
    block = (1, recipe.block)
    if t.numel() and (
        fake_quantize_blocks(t, recipe.format, block, rounding, None, scale, in_place=True)
        is not None
    ):
        return t
    return _quantized(t, recipe, stochastic, scale)


def _pad_tokens(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """``t`` with zero rows appended up to a multiple of ``multiple`` rows."""
    extra = -t.shape[0] % multiple
    return F.pad(t, (0, 0, 0, extra)) if extra else t


# -- the custom ops -----------------------------------------------------------------------------


def _on_tensor_cores(native: bool, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a GEMM runs on the packed operands (an empty one has nothing to pack)."""
    return native and a.numel() > 0 and b.numel() > 0


@torch.library.custom_op("mixprec::fp4_linear", mutates_args=())
def _fp4_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    recipe: str,
    out_dtype: torch.dtype,
    native: bool,
) -> torch.Tensor:
    r = Fp4Recipe.parse(recipe)
    with no_autocast():
        if _on_tensor_cores(native, x, weight):
            x_op = prepare_operand(x, r, tensor_scale=reduced_tensor_scale(x, r))
            out = run_gemm(x_op, prepare_weight(weight, r, "output"))
        else:
            a = quantize_fp4_operand(x, r, batch=True)
            b = quantize_fp4_weight(weight, r, "output")
            out = torch.mm(a, b.t())
        if bias is not None:
            out.add_(bias.float())  # in place: the GEMM's fresh output, no second fp32 tensor
        return out.to(out_dtype)


@_fp4_linear.register_fake
def _(x, weight, bias, recipe, out_dtype, native):  # type: ignore[no-untyped-def]
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=out_dtype)


@torch.library.custom_op("mixprec::fp4_linear_grad_input", mutates_args=())
def _fp4_grad_input(
    grad: torch.Tensor, weight: torch.Tensor, recipe: str, out_dtype: torch.dtype, native: bool
) -> torch.Tensor:
    """``grad @ weight``, both quantized along ``out_features``; rounded once to ``out_dtype``."""
    r = Fp4Recipe.parse(recipe)
    sr = bool(r.sr_grad)
    with no_autocast():
        if _on_tensor_cores(native, grad, weight):
            a_op = prepare_operand(grad, r, sr, reduced_tensor_scale(grad, r))
            return run_gemm(a_op, prepare_weight(weight, r, "grad_input")).to(out_dtype)
        a = quantize_fp4_operand(grad, r, stochastic=sr, batch=True)
        b = quantize_fp4_weight(weight, r, "grad_input")
        return torch.mm(a, b).to(out_dtype)


@_fp4_grad_input.register_fake
def _(grad, weight, recipe, out_dtype, native):  # type: ignore[no-untyped-def]
    return grad.new_empty((grad.shape[0], weight.shape[1]), dtype=out_dtype)


@torch.library.custom_op("mixprec::fp4_linear_grad_weight", mutates_args=())
def _fp4_grad_weight(
    grad: torch.Tensor, x: torch.Tensor, recipe: str, out_dtype: torch.dtype, native: bool
) -> torch.Tensor:
    """``grad.T @ x`` summed over the tokens (RHT first if the recipe says); one rounding."""
    r = Fp4Recipe.parse(recipe)
    sr = bool(r.sr_grad)
    with no_autocast():
        # fp32 where the RHT needs it (one pass from 16 bits, rht_padded); else the 16-bit
        # operands as they are: quantizing widens them exactly on reading
        pad = rht_padded if r.rht else _pad_tokens
        g, xs = pad(grad, r.block), pad(x, r.block)
        if _on_tensor_cores(native, g, xs):  # the tokens are padded to 32 on the packed operands
            a_op = prepare_operand(g.t(), r, sr, reduced_tensor_scale(g, r))
            b_op = prepare_operand(xs.t(), r, tensor_scale=reduced_tensor_scale(xs, r))
            return run_gemm(a_op, b_op).to(out_dtype)
        quantize = _quantize_own if r.rht else quantize_fp4_operand
        a = quantize(g.t(), r, stochastic=sr, batch=True)
        b = quantize(xs.t(), r, batch=True)
        return torch.mm(a, b.t()).to(out_dtype)


@_fp4_grad_weight.register_fake
def _(grad, x, recipe, out_dtype, native):  # type: ignore[no-untyped-def]
    return grad.new_empty((grad.shape[1], x.shape[1]), dtype=out_dtype)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, weight, bias, recipe, out_dtype, native = inputs
    ctx.save_for_backward(x, weight)
    ctx.recipe, ctx.out_dtype, ctx.native = recipe, out_dtype, native
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight = ctx.saved_tensors
    want = ctx.needs_input_grad
    gi = gw = gb = None
    args = (ctx.recipe, ctx.out_dtype, ctx.native)
    if want[0]:
        gi = _eager_grad_input(grad, weight, *args).to(x.dtype)
    if want[1]:
        gw = _eager_grad_weight(grad, x, *args).to(weight.dtype)
    if ctx.bias_dtype is not None and want[2]:
        gb = grad.sum_to_size(grad.shape[1:]).to(ctx.bias_dtype)
    return gi, gw, gb, None, None, None


_fp4_linear.register_autograd(_backward, setup_context=_setup)
# Eager calls on plain tensors skip torch.library's per-call machinery (mixprec.compute._eager)
_eager_linear = EagerOp(_fp4_linear, _setup, _backward)
_eager_grad_input = EagerOp(_fp4_grad_input)
_eager_grad_weight = EagerOp(_fp4_grad_weight)


def fp4_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    recipe: str | Fp4Recipe = "nvfp4",
    out_dtype: torch.dtype | None = None,
    backend: Fp8Backend = "emulated",
) -> torch.Tensor:
    """``F.linear`` with 4-bit GEMMs in the forward and backward, as ``recipe`` says.

    Args:
        x: input, ``(..., in_features)``; ``in_features`` a multiple of the recipe's block.
        weight: ``(out_features, in_features)``; ``out_features`` a multiple of the block too.
        bias: optional ``(out_features,)``.
        recipe: an :class:`~mixprec.fp4_recipes.Fp4Recipe` or its string (``"nvfp4:rht=false"``).
        out_dtype: the dtype the output (and each gradient GEMM) is rounded to once; default
            ``x.dtype``.
        backend: ``"emulated"``, ``"native"`` (block-scaled ``torch._scaled_mm``, CUDA compute
            capability 10.0+) or ``"auto"``; see :func:`fp4_backend`.

    Raises:
        ValueError: an unknown recipe, option or backend; ``"native"`` where it cannot run; a
            feature count that is not a multiple of the recipe's block (the message names it).

    Example:
        >>> x, w = torch.linspace(-2, 2, 64).reshape(4, 16), torch.ones(16, 16)
        >>> fp4_linear(x, w, recipe="nvfp4").shape
        torch.Size([4, 16])
    """
    r = Fp4Recipe.parse(recipe)
    _check_floating(x, weight, bias)
    _check_fits(weight, r)
    native = _resolve(backend, weight, "fp4_linear")
    flat = x.reshape(-1, x.shape[-1])
    out = _eager_linear(flat, weight, bias, _spec(r), out_dtype or x.dtype, native)
    return out.reshape(*x.shape[:-1], weight.shape[0])


# -- which backend ------------------------------------------------------------------------------


def fp4_backend(backend: Fp8Backend, device: torch.device | str) -> tuple[str, str]:
    """Resolve ``backend`` for ``device``: ``("native" or "emulated", the reason)``, by
    :func:`mixprec.hardware.choose_fp4_backend`.

    Native 4-bit GEMMs need a CUDA device of compute capability 10.0+ (Blackwell); everything
    else is emulated, with the same quantized operands.

    Raises:
        ValueError: an unknown backend, or ``"native"`` where it cannot run (naming the device
            and its compute capability).

    Example:
        >>> fp4_backend("auto", "cpu")[0]
        'emulated'
    """
    check_backend_name(backend, "fp4")
    return choose_fp4_backend(backend, device)


def _resolve(backend: Fp8Backend, weight: torch.Tensor, what: str) -> bool:
    """Whether ``weight``'s GEMMs run native; a shape the native GEMM cannot take runs
    emulated, with a warning saying so (the device could run it, the layer cannot)."""
    if fp4_backend(backend, weight.device)[0] != "native":
        return False
    out_f, in_f = weight.shape
    misfit = native_misfit(out_f, in_f)
    if misfit is None:
        return True
    warnings.warn(
        f"{what} ({out_f}x{in_f}) runs its 4-bit GEMMs emulated on {str(weight.device)!r}: "
        f"{misfit}, which the native block-scaled GEMM needs; pad the features to multiples of "
        "32 or keep the layer in bf16 to silence this",
        stacklevel=4,
    )
    return False


def _check_fits(weight: torch.Tensor, r: Fp4Recipe) -> None:
    out_f, in_f = weight.shape
    if out_f % r.block or in_f % r.block:
        raise ValueError(
            f"recipe {str(r)!r} quantizes blocks of {r.block} along in_features and out_features, "
            f"got a weight of shape {(out_f, in_f)!r}; keep this layer in bf16 (a rule "
            f"'<name> -> bf16-mixed') or pad it to multiples of {r.block}"
        )


# -- the module ---------------------------------------------------------------------------------


class Fp4Linear(Fp8Linear):
    """``nn.Linear`` whose three GEMMs run in a 4-bit format as ``recipe`` says.

    Autocast as :class:`~mixprec.compute.fp8_linear.Fp8Linear`: inside a region the input is cast
    to the region's dtype and the output has it. Weights are quantized from what they are stored
    in (fp32 master weights in mixed training).

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``; both feature counts
            multiples of the recipe's block (16 for nvfp4, 32 for mxfp4).
        recipe: an :class:`~mixprec.fp4_recipes.Fp4Recipe` or its string form.
        backend: ``"auto"`` (native on a CUDA device of compute capability 10.0+, else
            emulated), ``"emulated"`` or ``"native"`` (refused where it cannot run). A layer
            whose features are not multiples of 32 runs emulated there, with a warning.

    Example:
        >>> with torch.random.fork_rng():
        ...     layer = Fp4Linear.from_linear(nn.Linear(32, 16), "nvfp4")
        >>> layer(torch.ones(2, 32)).shape
        torch.Size([2, 16])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        recipe: str | Fp4Recipe = "nvfp4",
        backend: Fp8Backend = "auto",
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            bias,
            device,
            dtype,
            recipe=recipe,  # type: ignore[arg-type]  # parsed by _adopt_recipe below
            backend=backend,
        )

    def _adopt_recipe(self, recipe: Any) -> Fp4Recipe:
        parsed = Fp4Recipe.parse(recipe)
        _check_fits(self.weight, parsed)
        return parsed

    def _check_backend(self, backend: Fp8Backend, device: Any) -> None:
        fp4_backend(backend, device)

    def _resolve_native(self) -> bool:
        # a shape the packed GEMM cannot take warns here, once per device
        return _resolve(self.backend, self.weight, "Fp4Linear")

    def _keeps_history(self) -> bool:
        return False  # 4-bit recipes scale every block from its own amax

    @classmethod
    def from_linear(  # type: ignore[override]
        cls, linear: nn.Linear, recipe: str | Fp4Recipe = "nvfp4", backend: Fp8Backend = "auto"
    ) -> Fp4Linear:
        """An ``Fp4Linear`` holding ``linear``'s own parameter objects (no copy)."""
        return super().from_linear(linear, recipe, backend)  # type: ignore[arg-type,return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, out_dtype = self._autocast_input(x)
        native = self._native()
        flat = x.reshape(-1, x.shape[-1])
        spec = _spec(self.recipe)
        out = _eager_linear(flat, self.weight, self.bias, spec, out_dtype, native)
        return out.reshape(*x.shape[:-1], self.out_features)
