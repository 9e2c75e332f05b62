"""FP8 linear layers: a ``torch.library`` custom-op GEMM on scaled fp8 operands, and the module.

Design note: ``mixprec::fp8_linear`` is one custom op (fake kernel, registered autograd) for the
three GEMMs of a linear layer, so ``torch.compile`` traces it as one opaque node and cannot fold
the quantization away. Each GEMM quantizes its two operands exactly as the recipe says
(:func:`~mixprec.scaled.fp8_quantize`, along that GEMM's contraction), multiplies the
dequantized values with the fp32 kernel — products of fp8 values are exact in fp32, so this is
the tensor core's arithmetic up to the order of the fp32 additions — and rounds once to the
compute dtype. The output GEMM adds the bias in fp32 before that rounding; the weight gradient is
rounded to the compute dtype as a hardware FP8 GEMM writes it, then widened to the weight's dtype.
On a CUDA device with FP8 tensor cores (compute capability 8.9+) tensorwise and rowwise GEMMs run
on ``torch._scaled_mm`` instead; nothing on a CPU touches that path.

:class:`Fp8Linear` is the ``nn.Linear`` subclass that calls it; :mod:`mixprec.compute.fp8_convert`
swaps it into a model. Delayed scaling keeps its amax history in a buffer
(``fp8_amax_history``: in the layer's ``state_dict`` when used alone, in the session's state when
a session prepared the model, so a prepared model's ``state_dict`` stays plain): the history is
read before the op runs (scales for the input, the weight and the output gradient) and this
step's amaxes are recorded after it, the output gradient's by a hook on the output tensor, so the
op itself stays a pure function. The records are provisional until the session's step decides
(:meth:`Fp8Linear.end_step`): a skipped step leaves the history as it was.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from mixprec.compute import emulate_build  # (also hands mixprec.scaled its kernels)
from mixprec.compute._eager import EagerOp
from mixprec.compute.emulated import no_autocast
from mixprec.compute.fp8_plans import KERNEL_DTYPES, linear_node, plan_for
from mixprec.hardware import choose_fp8_backend
from mixprec.recipes import Fp8Recipe, delayed_scale, dynamic_scale
from mixprec.scaled import (
    Scaled,
    dequantize,
    empty_operand,
    fp8_fake_quantize,
    fp8_quantize,
    records_amax,
    reduce_amax,
)

__all__ = [
    "BACKENDS",
    "Fp8Backend",
    "Fp8Linear",
    "check_backend_name",
    "fp8_backend",
    "fp8_linear",
]

Fp8Backend = Literal["auto", "emulated", "native"]
BACKENDS: tuple[str, ...] = get_args(Fp8Backend)


# -- the custom op ------------------------------------------------------------------------------


def _operand(
    t: torch.Tensor, r: Fp8Recipe, role: Any, dim: int, gemm: Any, scale: Any, native: bool
) -> Any:
    """The operand as the GEMM takes it: a :class:`Scaled` fp8 tensor for ``torch._scaled_mm``,
    else its dequantized fp32 values in one pass (the same values; no fp8 tensor in between)."""
    if t.numel() == 0:  # an empty batch (an MoE expert without tokens): nothing to scale
        return t if scale is not None else empty_operand(t, r, role, dim)
    if native:
        return fp8_quantize(t, r, role, dim, gemm, scale)
    if scale is None and t.is_cpu and t.dtype in KERNEL_DTYPES:
        plan = plan_for(r, role, dim, gemm, tuple(t.shape))
        ops = None if plan is None else emulate_build.emulate_engine()
        if ops is not None:
            return ops.fake_quantize_dynamic(t.contiguous(), *plan)
    return fp8_fake_quantize(t, r, role, dim, gemm, scale)


def _gemm(a: Scaled | torch.Tensor, b: Scaled | torch.Tensor, native: bool, b_t: bool) -> Any:
    """``a @ b`` (``b.T`` when ``b_t``) in fp32 on dequantized (or high-precision) operands."""
    if native and isinstance(a, Scaled) and isinstance(b, Scaled) and _fits(a, b):
        return _scaled_mm(a, b, b_t)
    wide_a = dequantize(a) if isinstance(a, Scaled) else a.float()
    wide_b = dequantize(b) if isinstance(b, Scaled) else b.float()
    return torch.mm(wide_a, wide_b.t() if b_t else wide_b)


def _fits(a: Scaled, b: Scaled) -> bool:
    """``torch._scaled_mm`` needs every dimension a multiple of 16; other shapes are emulated."""
    return all(d % 16 == 0 for d in (*a.data.shape, *b.data.shape))


def _scaled_mm(a: Scaled, b: Scaled, b_t: bool) -> torch.Tensor:
    """The same GEMM on FP8 tensor cores (``b`` is ``(N, K)`` when ``b_t``, else ``(K, N)``).

    ``_scaled_mm`` multiplies by its scales, so it gets the reciprocals (exact for power-of-two
    scales). Rowwise scaling needs both operands rowwise (a tensorwise one is repeated, as torchao
    does) and a bf16 output, which is then the GEMM's one rounding; tensorwise writes fp32.
    """
    b_data = b.data.t() if b_t else b.data.t().contiguous().t()  # column-major (K, N)
    rows, cols = a.data.shape[0], b_data.shape[1]
    if a.scale.numel() == 1 and b.scale.numel() == 1:
        scale_a, scale_b, out_dtype = a.scale.reshape(()), b.scale.reshape(()), torch.float32
    else:
        scale_a = a.scale.reshape(-1).expand(rows).reshape(rows, 1).contiguous()
        scale_b = b.scale.reshape(-1).expand(cols).reshape(1, cols).contiguous()
        out_dtype = torch.bfloat16
    out = torch._scaled_mm(
        a.data.contiguous(), b_data, scale_a.reciprocal(), scale_b.reciprocal(),
        out_dtype=out_dtype,
    )  # fmt: skip
    return out.float()


@torch.library.custom_op("mixprec::fp8_linear", mutates_args=())
def _fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    recipe: str,
    out_dtype: torch.dtype,
    scales: torch.Tensor | None,
    native: bool,
) -> torch.Tensor:
    r = Fp8Recipe.parse(recipe)
    with no_autocast():
        if "output" in r.high_precision:
            a, b = x, weight
        else:
            sx, sw = (None, None) if scales is None else (scales[0], scales[1])
            a = _operand(x, r, "input", 1, "output", sx, native)
            b = _operand(weight, r, "weight", 1, "output", sw, native)
        out = _gemm(a, b, native, b_t=True)  # a fresh fp32 tensor: the bias is added in place
        if bias is not None:
            out.add_(bias.float())
        return out.to(out_dtype)


def _fake(x, weight, bias, recipe, out_dtype, scales, native):  # type: ignore[no-untyped-def]
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=out_dtype)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, weight, bias, recipe, out_dtype, scales, native = inputs
    ctx.save_for_backward(x, weight, scales)
    ctx.recipe, ctx.native, ctx.out_dtype = recipe, native, out_dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _grad_scale(grad: torch.Tensor, r: Fp8Recipe, scales: torch.Tensor | None) -> Any:
    """The output gradient's delayed scale; 0 means no history yet, so it is scaled dynamically.

    A non-finite gradient gets a NaN scale: a delayed scale is finite, so the saturating cast
    would turn an overflowed gradient into a finite one and the loss scaler would take a step it
    must skip. NaN makes the gradient GEMMs non-finite, as a dynamic scale does.
    """
    if scales is None or (grad.numel() == 0 and not r.amax_reduce):
        return None
    amax = _amax(grad)  # 0 for an empty gradient, whose rank still takes part in the reduction
    if r.amax_reduce:
        amax = reduce_amax(amax)
    scale = torch.where(scales[2] > 0, scales[2], dynamic_scale(amax, r.grad_format))
    return torch.where(torch.isfinite(amax), scale, torch.full_like(scale, float("nan")))


@torch.library.custom_op("mixprec::fp8_linear_grad_input", mutates_args=())
def _fp8_grad_input(
    grad: torch.Tensor,
    weight: torch.Tensor,
    recipe: str,
    out_dtype: torch.dtype,
    scales: torch.Tensor | None,
    native: bool,
) -> torch.Tensor:
    """``grad @ weight``, rounded once to ``out_dtype``."""
    r = Fp8Recipe.parse(recipe)
    with no_autocast():
        if "grad_input" in r.high_precision:
            return _gemm(grad, weight, native, b_t=False).to(out_dtype)
        s_w = None if scales is None else scales[1]
        a = _operand(grad, r, "grad_output", 1, "grad_input", _grad_scale(grad, r, scales), native)
        b = _operand(weight, r, "weight", 0, "grad_input", s_w, native)
        return _gemm(a, b, native, b_t=False).to(out_dtype)


@torch.library.custom_op("mixprec::fp8_linear_grad_weight", mutates_args=())
def _fp8_grad_weight(
    grad: torch.Tensor,
    x: torch.Tensor,
    recipe: str,
    out_dtype: torch.dtype,
    scales: torch.Tensor | None,
    native: bool,
) -> torch.Tensor:
    """``grad.T @ x``, rounded once to ``out_dtype``."""
    r = Fp8Recipe.parse(recipe)
    with no_autocast():
        if "grad_weight" in r.high_precision:
            return _gemm_t(grad, x, native).to(out_dtype)
        s_x = None if scales is None else scales[0]
        a = _operand(grad, r, "grad_output", 0, "grad_weight", _grad_scale(grad, r, scales), native)
        b = _operand(x, r, "input", 0, "grad_weight", s_x, native)
        return _gemm_t(a, b, native).to(out_dtype)


@_fp8_grad_input.register_fake
def _(grad, weight, recipe, out_dtype, scales, native):  # type: ignore[no-untyped-def]
    return grad.new_empty((grad.shape[0], weight.shape[1]), dtype=out_dtype)


@_fp8_grad_weight.register_fake
def _(grad, x, recipe, out_dtype, scales, native):  # type: ignore[no-untyped-def]
    return grad.new_empty((grad.shape[1], x.shape[1]), dtype=out_dtype)


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Each gradient GEMM is a custom op of its own, so a compiled backward keeps it whole."""
    x, weight, scales = ctx.saved_tensors
    want = ctx.needs_input_grad
    gi = gw = gb = None
    args = (ctx.recipe, ctx.out_dtype, scales, ctx.native)
    if want[0]:
        gi = _eager_grad_input(grad, weight, *args).to(x.dtype)
    if want[1]:
        gw = _eager_grad_weight(grad, x, *args).to(weight.dtype)
    if ctx.bias_dtype is not None and want[2]:
        gb = grad.sum_to_size(grad.shape[1:]).to(ctx.bias_dtype)
    return gi, gw, gb, None, None, None, None


def _gemm_t(a: Scaled | torch.Tensor, b: Scaled | torch.Tensor, native: bool) -> torch.Tensor:
    """``a.T @ b``: the weight gradient ``grad.T @ x``."""
    if native and isinstance(a, Scaled) and isinstance(b, Scaled) and _fits(a, b):
        return _scaled_mm(Scaled(a.data.t(), a.scale, a.block[::-1]), b, b_t=False)
    wide_a = dequantize(a) if isinstance(a, Scaled) else a.float()
    wide_b = dequantize(b) if isinstance(b, Scaled) else b.float()
    return torch.mm(wide_a.t(), wide_b)


_fp8_linear.register_fake(_fake)
_fp8_linear.register_autograd(_backward, setup_context=_setup)
# Eager calls on plain tensors skip torch.library's per-call machinery (mixprec.compute._eager)
_eager_linear = EagerOp(_fp8_linear, _setup, _backward, autograd_impl=linear_node)
_eager_grad_input = EagerOp(_fp8_grad_input)
_eager_grad_weight = EagerOp(_fp8_grad_weight)


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    recipe: str | Fp8Recipe = "tensorwise",
    out_dtype: torch.dtype | None = None,
    scales: torch.Tensor | None = None,
    backend: Fp8Backend = "emulated",
) -> torch.Tensor:
    """``F.linear`` with FP8 GEMMs in the forward and backward, scaled as ``recipe`` says.

    Args:
        x: input, ``(..., in_features)``.
        weight: ``(out_features, in_features)``.
        bias: optional ``(out_features,)``.
        recipe: an :class:`~mixprec.recipes.Fp8Recipe` or its string form.
        out_dtype: the dtype the output (and each gradient GEMM) is rounded to once; default
            ``x.dtype``.
        scales: delayed scales ``[input, weight, grad_output]`` (0 for grad_output: dynamic).
        backend: ``"emulated"``, ``"native"`` (``torch._scaled_mm``) or ``"auto"``.

    Returns:
        ``(..., out_features)`` in ``out_dtype``.

    Example:
        >>> x, w = torch.linspace(-2, 2, 64).reshape(4, 16), torch.ones(8, 16)
        >>> fp8_linear(x, w, recipe="rowwise").shape
        torch.Size([4, 8])
    """
    r = Fp8Recipe.parse(recipe)
    _check_floating(x, weight, bias)
    native = fp8_backend(backend, weight.device, r)[0] == "native"
    flat = x.reshape(-1, x.shape[-1])
    out = _eager_linear(flat, weight, bias, _spec(r), out_dtype or x.dtype, scales, native)
    return out.reshape(*x.shape[:-1], weight.shape[0])


# -- which backend ------------------------------------------------------------------------------


def check_backend_name(backend: object, kind: str) -> None:
    """Raise ValueError, naming the valid ones, for a backend not in :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown {kind} backend {backend!r}; valid backends: {', '.join(map(repr, BACKENDS))}"
        )


def fp8_backend(
    backend: Fp8Backend, device: torch.device | str, recipe: Fp8Recipe | str = "tensorwise"
) -> tuple[str, str]:
    """Resolve ``backend`` for ``device``: ``("native" or "emulated", the reason)``, by
    :func:`mixprec.hardware.choose_fp8_backend`.

    Native FP8 GEMMs need a CUDA device of compute capability 8.9+ (Ada, Hopper, Blackwell) and a
    tensorwise or rowwise recipe; everything else is emulated.

    Raises:
        ValueError: an unknown backend, or ``"native"`` where it cannot run.

    Example:
        >>> fp8_backend("auto", "cpu")[0]
        'emulated'
    """
    check_backend_name(backend, "fp8")
    return choose_fp8_backend(backend, device, Fp8Recipe.parse(recipe).granularity)


# -- the module ---------------------------------------------------------------------------------


class Fp8Linear(nn.Linear):
    """``nn.Linear`` whose three GEMMs run in FP8 as ``recipe`` says.

    Outside autocast the output has the input's dtype; inside an autocast region (torch's or
    mixprec's) the input is cast to the region's dtype and the output has it, as with ``F.linear``
    under autocast. Weights are quantized from whatever they are stored in (fp32 master weights
    in mixed training).

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        recipe: an :class:`~mixprec.recipes.Fp8Recipe` or its string form.
        backend: ``"auto"``, ``"emulated"`` or ``"native"``.

    Dynamic recipes compile (``torch.compile``) like any custom op. Delayed scaling updates its
    history buffer in place and records the output gradient's amax with a tensor hook; it is
    tested eagerly only.

    Example:
        >>> with torch.random.fork_rng():  # examples leave the global generator as it was
        ...     layer = Fp8Linear.from_linear(nn.Linear(16, 8), "tensorwise")
        >>> layer(torch.ones(2, 16)).shape
        torch.Size([2, 8])
    """

    fp8_amax_history: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        recipe: str | Fp8Recipe = "tensorwise",
        backend: Fp8Backend = "auto",
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.recipe = self._adopt_recipe(recipe)
        self._check_backend(backend, "cpu" if device is None else device)
        self.backend: Fp8Backend = backend
        self._fp8_committed: torch.Tensor | None = None  # the history before this step's records
        self._backend_for: tuple[Any, bool] | None = None  # ((device, backend), native?)
        if self._keeps_history():
            hist = torch.zeros(3, self.recipe.history, device=device)
            self.register_buffer("fp8_amax_history", hist)

    # What a subclass with other recipes (Fp4Linear) overrides: its recipe, backend rule, history.

    def _adopt_recipe(self, recipe: Any) -> Any:
        """The parsed recipe (checked against the layer's shape where the format needs it)."""
        return Fp8Recipe.parse(recipe)

    def _check_backend(self, backend: Fp8Backend, device: Any) -> None:
        """Refuse an unknown ``backend``, or ``"native"`` where it cannot run on ``device``."""
        fp8_backend(backend, device, self.recipe)

    def _resolve_native(self) -> bool:
        """Whether the GEMMs run native on the weight's device (called once per device)."""
        return fp8_backend(self.backend, self.weight.device, self.recipe)[0] == "native"

    def _keeps_history(self) -> bool:
        return self.recipe.scaling == "delayed"

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, recipe: str | Fp8Recipe = "tensorwise", backend: Fp8Backend = "auto"
    ) -> Fp8Linear:
        """An ``Fp8Linear`` holding ``linear``'s own parameter objects (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=False, recipe=recipe)
        new._check_backend(backend, linear.weight.device)
        new.backend = backend
        new.weight = linear.weight
        new.bias = linear.bias
        if new._keeps_history():
            new.fp8_amax_history = torch.zeros(3, new.recipe.history, device=linear.weight.device)
        new.train(linear.training)
        return new

    def _autocast_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
        """``x`` checked, and cast to the autocast region's dtype inside one; the output dtype."""
        _check_floating(x, self.weight, self.bias)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            out_dtype = torch.get_autocast_dtype(device_type)
            return x.to(out_dtype), out_dtype
        return x, x.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, out_dtype = self._autocast_input(x)
        native = self._native()
        flat = x.reshape(-1, x.shape[-1])
        scales = self._delayed_scales(flat) if self.recipe.scaling == "delayed" else None
        spec = _spec(self.recipe)
        out = _eager_linear(flat, self.weight, self.bias, spec, out_dtype, scales, native)
        if scales is not None and self.training and out.requires_grad:
            out.register_hook(self._record_grad_amax)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _native(self) -> bool:
        """Whether the GEMMs run native (``torch._scaled_mm``): resolved once per layer, device
        and backend (through :func:`mixprec.hardware.probe`), not on every forward."""
        key = (self.weight.device, self.backend)
        if self._backend_for is None or self._backend_for[0] != key:
            self._backend_for = (key, self._resolve_native())
        return self._backend_for[1]

    @torch.no_grad()
    def _delayed_scales(self, flat: torch.Tensor) -> torch.Tensor:
        """Scales from the history (before this step), then this step's amaxes recorded.

        A non-finite input (or weight) gets a NaN scale, so the output is non-finite and the
        step is skipped as in the 16-bit presets; a finite delayed scale would saturate an inf
        to the format's max and the step would be taken on it.
        """
        r, hist = self.recipe, self.fp8_amax_history
        amax_x, amax_w = _amax(flat), _amax(self.weight.detach())
        if r.amax_reduce:  # the whole batch's amax, as one process would record it
            amax_x = reduce_amax(amax_x)
        s_go = delayed_scale(hist[2], torch.zeros_like(amax_x), r.grad_format, r.margin)
        s_x = delayed_scale(hist[0], amax_x, r.input_format, r.margin)
        s_w = delayed_scale(hist[1], amax_w, r.weight_format, r.margin)
        scales = torch.stack(
            [
                _nan_unless_finite(s_x, amax_x),
                _nan_unless_finite(s_w, amax_w),
                torch.where(hist[2].max() > 0, s_go, torch.zeros_like(s_go)),
            ]
        )
        if self.training and records_amax(flat, r):
            self._record(0, amax_x)
            self._record(1, amax_w)
        return scales

    @torch.no_grad()
    def _record_grad_amax(self, grad: torch.Tensor) -> None:
        if records_amax(grad, self.recipe):
            amax = _amax(grad)
            self._record(2, reduce_amax(amax) if self.recipe.amax_reduce else amax)

    def _record(self, row: int, amax: torch.Tensor) -> None:
        """Push ``amax`` onto history row ``row`` provisionally (see :meth:`end_step`).

        A non-finite amax is not recorded: its step is skipped, and in the history it would
        spoil the scales of the next ``history`` steps.
        """
        if self._fp8_committed is None:  # first change since the last decision: keep a copy
            self._fp8_committed = self.fp8_amax_history.clone()
        _push(self.fp8_amax_history[row], amax)

    @torch.no_grad()
    def end_step(self, taken: bool) -> None:
        """Keep the amaxes recorded since the last call if the optimizer step was ``taken``,
        else restore the history as it was: a skipped step changes no state.

        :class:`mixprec.MixedPrecision` calls it at each ``step``; without a session the
        history keeps every finite amax, as before.
        """
        if self._fp8_committed is not None and not taken:
            self.fp8_amax_history.copy_(self._fp8_committed)
        self._fp8_committed = None

    @torch.no_grad()
    def delayed_scaling_state(self) -> dict[str, float]:
        """The latest recorded amax and the scale the next step will use, per operand (delayed
        scaling only; for the metrics of a run). A scale of 0 means "no history yet: dynamic".

        Raises:
            RuntimeError: the layer's recipe scales dynamically.
        """
        if self.recipe.scaling != "delayed":
            raise RuntimeError(
                f"layer recipe {str(self.recipe)!r} scales dynamically and keeps no amax history; "
                "use a delayed recipe such as 'tensorwise_delayed'"
            )
        r, hist = self.recipe, self.fp8_amax_history
        state = {}
        for row, (name, fmt) in enumerate(
            (("input", r.input_format), ("weight", r.weight_format), ("grad_output", r.grad_format))
        ):
            past = hist[row]
            scale = delayed_scale(past, torch.zeros(()), fmt, r.margin) if past.max() > 0 else 0.0
            state[f"amax_{name}"] = float(past[0])
            state[f"scale_{name}"] = float(scale)
        return state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={str(self.recipe)!r}, backend={self.backend!r}"


def _spec(recipe: object) -> str:
    """The recipe's (an FP8 or a 4-bit one) string form, which the custom op is told: formatted
    once per recipe in eager code (torch.compile formats it while tracing; it does not trace a
    cache)."""
    if torch.compiler.is_compiling():
        return str(recipe)
    return _cached_spec(recipe)


@functools.lru_cache(maxsize=64)
def _cached_spec(recipe: object) -> str:
    return str(recipe)


def _push(row: torch.Tensor, amax: torch.Tensor) -> None:
    """Push a finite ``amax`` onto an amax history row, newest first, in place (no host sync)."""
    pushed = torch.roll(row, 1)
    pushed[0] = amax
    row.copy_(torch.where(torch.isfinite(amax), pushed, row))


def _amax(t: torch.Tensor) -> torch.Tensor:
    """max |t| in fp32; 0 for an empty tensor (``max`` refuses those)."""
    return t.abs().amax().float() if t.numel() else t.new_zeros((), dtype=torch.float32)


def _check_floating(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Refuse a non-floating input with torch's own error for ``F.linear`` (which ``nn.Linear``
    raises), plus what to do; the GEMM would otherwise cast it and return an integer tensor."""
    if x.is_floating_point():
        return
    help_text = (
        f"; Fp8Linear takes a floating-point input (fp32, bf16 or fp16), got {x.dtype}: "
        "cast it first, e.g. layer(x.float())"
    )
    try:
        with no_autocast():  # torch's text on two empty operands of the same dtypes
            b = None if bias is None else bias.new_empty(1)
            F.linear(x.new_empty((0, 1)), weight.new_empty((1, 1)), b)
    except RuntimeError as err:
        raise RuntimeError(f"{err}{help_text}") from None
    raise RuntimeError(help_text[2:])


def _nan_unless_finite(scale: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(amax), scale, torch.full_like(scale, float("nan")))
