"""FP8 linear layers: a ``torch.library`` custom-op GEMM on scaled fp8 operands, and a module swap.

Design note: ``mixprec::fp8_linear`` is one custom op (fake kernel, registered autograd) for the
three GEMMs of a linear layer, so ``torch.compile`` traces it as one opaque node and cannot fold
the quantization away. Each GEMM quantizes its two operands exactly as the recipe says
(:func:`~mixprec.compute.fp8.fp8_quantize`, along that GEMM's contraction), multiplies the
dequantized values with the fp32 kernel — products of fp8 values are exact in fp32, so this is
the tensor core's arithmetic up to the order of the fp32 additions — and rounds once to the
compute dtype. The output GEMM adds the bias in fp32 before that rounding; the weight gradient is
rounded to the compute dtype as a hardware FP8 GEMM writes it, then widened to the weight's dtype.
On a CUDA device with FP8 tensor cores (compute capability 8.9+) tensorwise and rowwise GEMMs run
on ``torch._scaled_mm`` instead; nothing on a CPU touches that path.

Applying FP8 to a model swaps ``nn.Linear`` modules for :class:`Fp8Linear`, a subclass holding the
*same* parameter objects, so ``state_dict`` keys, optimizers built before the swap, weight tying
and ``isinstance(m, nn.Linear)`` checks all keep working (torchao's
``convert_to_float8_training`` does the same). The alternatives cost more: forward hooks cannot
replace a module's computation without running it, and patching ``forward`` is monkeypatching.
The price of a swap is that it happens once, before ``torch.compile`` or an optimizer that must
see the new modules. Delayed scaling keeps its amax history in a buffer (``fp8_amax_history``,
checkpointed), the one state_dict key a swap adds.

A layer whose shape does not fit the recipe's blocks (blockwise and MX need whole 128 or 32
blocks) is left in high precision with a warning (``on_mismatch="fallback"``), or refused
(``"error"``); :class:`Fp8Conversion` lists what was converted and what was not, and why.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import nn

from mixprec.compute.emulated import no_autocast
from mixprec.compute.fp8 import (
    Fp8Recipe,
    Scaled,
    delayed_scale,
    dequantize,
    dynamic_scale,
    fp8_quantize,
)
from mixprec.policy import Policy

__all__ = [
    "Fp8Backend",
    "Fp8Conversion",
    "Fp8Linear",
    "Fp8Plan",
    "apply_fp8_policy",
    "convert_to_fp8",
    "fp8_backend",
    "fp8_linear",
]

Fp8Backend = Literal["auto", "emulated", "native"]
OnMismatch = Literal["fallback", "error"]
_BACKENDS: tuple[str, ...] = get_args(Fp8Backend)
_ON_MISMATCH: tuple[str, ...] = get_args(OnMismatch)
_NATIVE_GRANULARITIES = ("tensorwise", "rowwise")


# -- the custom op ------------------------------------------------------------------------------


def _operand(t: torch.Tensor, r: Fp8Recipe, role: Any, dim: int, gemm: Any, scale: Any) -> Any:
    return fp8_quantize(t, r, role, dim, gemm, scale)


def _gemm(a: Scaled | torch.Tensor, b: Scaled | torch.Tensor, native: bool, b_t: bool) -> Any:
    """``a @ b`` (``b.T`` when ``b_t``) in fp32 on dequantized (or high-precision) operands."""
    if native and isinstance(a, Scaled) and isinstance(b, Scaled):
        return _scaled_mm(a, b, b_t)
    wide_a = dequantize(a) if isinstance(a, Scaled) else a.float()
    wide_b = dequantize(b) if isinstance(b, Scaled) else b.float()
    return torch.mm(wide_a, wide_b.t() if b_t else wide_b)


def _scaled_mm(a: Scaled, b: Scaled, b_t: bool) -> torch.Tensor:
    """The same GEMM on FP8 tensor cores (``b`` is ``(N, K)`` when ``b_t``, else ``(K, N)``)."""
    b_data = b.data.t() if b_t else b.data.t().contiguous().t()  # column-major (K, N)
    rows, cols = a.data.shape[0], b_data.shape[1]
    scale_a = a.scale.reshape(-1, 1) if a.scale.numel() == rows else a.scale.reshape(())
    scale_b = b.scale.reshape(1, -1) if b.scale.numel() == cols else b.scale.reshape(())
    return torch._scaled_mm(
        a.data.contiguous(), b_data, scale_a.reciprocal(), scale_b.reciprocal(),
        out_dtype=torch.float32,
    )  # fmt: skip


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
            a = _operand(x, r, "input", 1, "output", sx)
            b = _operand(weight, r, "weight", 1, "output", sw)
        out = _gemm(a, b, native, b_t=True)
        if bias is not None:
            out = out + bias.float()
        return out.to(out_dtype)


def _fake(x, weight, bias, recipe, out_dtype, scales, native):  # type: ignore[no-untyped-def]
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=out_dtype)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, weight, bias, recipe, out_dtype, scales, native = inputs
    ctx.save_for_backward(x, weight, scales)
    ctx.recipe, ctx.native, ctx.out_dtype = recipe, native, out_dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _grad_scale(grad: torch.Tensor, r: Fp8Recipe, scales: torch.Tensor | None) -> Any:
    """The output gradient's delayed scale; 0 means no history yet, so it is scaled dynamically."""
    if scales is None:
        return None
    return torch.where(scales[2] > 0, scales[2], dynamic_scale(grad.abs().max(), r.grad_format))


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
        a = _operand(grad, r, "grad_output", 1, "grad_input", _grad_scale(grad, r, scales))
        b = _operand(weight, r, "weight", 0, "grad_input", s_w)
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
        a = _operand(grad, r, "grad_output", 0, "grad_weight", _grad_scale(grad, r, scales))
        b = _operand(x, r, "input", 0, "grad_weight", s_x)
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
        gi = _fp8_grad_input(grad, weight, *args).to(x.dtype)
    if want[1]:
        gw = _fp8_grad_weight(grad, x, *args).to(weight.dtype)
    if ctx.bias_dtype is not None and want[2]:
        gb = grad.sum_to_size(grad.shape[1:]).to(ctx.bias_dtype)
    return gi, gw, gb, None, None, None, None


def _gemm_t(a: Scaled | torch.Tensor, b: Scaled | torch.Tensor, native: bool) -> torch.Tensor:
    """``a.T @ b``: the weight gradient ``grad.T @ x``."""
    if native and isinstance(a, Scaled) and isinstance(b, Scaled):
        return _scaled_mm(Scaled(a.data.t(), a.scale, a.block[::-1]), b, b_t=False)
    wide_a = dequantize(a) if isinstance(a, Scaled) else a.float()
    wide_b = dequantize(b) if isinstance(b, Scaled) else b.float()
    return torch.mm(wide_a.t(), wide_b)


_fp8_linear.register_fake(_fake)
_fp8_linear.register_autograd(_backward, setup_context=_setup)


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
        recipe: an :class:`~mixprec.compute.fp8.Fp8Recipe` or its string form.
        out_dtype: the dtype the output (and each gradient GEMM) is rounded to once; default
            ``x.dtype``.
        scales: delayed scales ``[input, weight, grad_output]`` (0 for grad_output: dynamic).
        backend: ``"emulated"``, ``"native"`` (``torch._scaled_mm``) or ``"auto"``.

    Returns:
        ``(..., out_features)`` in ``out_dtype``.

    Example:
        >>> x, w = torch.randn(4, 16), torch.randn(8, 16)
        >>> fp8_linear(x, w, recipe="rowwise").shape
        torch.Size([4, 8])
    """
    r = Fp8Recipe.parse(recipe)
    native = fp8_backend(backend, weight.device, r)[0] == "native"
    flat = x.reshape(-1, x.shape[-1])
    out = _fp8_linear(flat, weight, bias, str(r), out_dtype or x.dtype, scales, native)
    return out.reshape(*x.shape[:-1], weight.shape[0])


# -- which backend ------------------------------------------------------------------------------


def fp8_backend(
    backend: Fp8Backend, device: torch.device | str, recipe: Fp8Recipe | str = "tensorwise"
) -> tuple[str, str]:
    """Resolve ``backend`` for ``device``: ``("native" or "emulated", the reason)``.

    Native FP8 GEMMs need a CUDA device of compute capability 8.9+ (Ada, Hopper, Blackwell) and a
    tensorwise or rowwise recipe; everything else is emulated.

    Raises:
        ValueError: an unknown backend, or ``"native"`` where it cannot run.

    Example:
        >>> fp8_backend("auto", "cpu")[0]
        'emulated'
    """
    if backend not in _BACKENDS:
        raise ValueError(
            f"unknown fp8 backend {backend!r}; valid backends: {', '.join(map(repr, _BACKENDS))}"
        )
    r = Fp8Recipe.parse(recipe)
    device = torch.device(device)
    if backend == "emulated":
        return "emulated", "requested"
    reason = _native_missing(device, r)
    if reason is None:
        return "native", f"{device} has FP8 tensor cores and {r.granularity} runs on _scaled_mm"
    if backend == "native":
        raise ValueError(
            f"fp8 backend 'native' cannot run here: {reason}; use backend='emulated' (the same "
            "numerics, on fp32 kernels) or 'auto'"
        )
    return "emulated", reason


def _native_missing(device: torch.device, recipe: Fp8Recipe) -> str | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"device {str(device)!r} is not a CUDA GPU with FP8 tensor cores"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9) or not hasattr(torch, "_scaled_mm"):
        return f"CUDA compute capability {capability} has no FP8 tensor cores (8.9+ needed)"
    if recipe.granularity not in _NATIVE_GRANULARITIES:
        return f"{recipe.granularity!r} scaling has no _scaled_mm kernel here"
    return None


# -- the module ---------------------------------------------------------------------------------


class Fp8Linear(nn.Linear):
    """``nn.Linear`` whose three GEMMs run in FP8 as ``recipe`` says.

    Outside autocast the output has the input's dtype; inside an autocast region (torch's or
    mixprec's) the input is cast to the region's dtype and the output has it, as with ``F.linear``
    under autocast. Weights are quantized from whatever they are stored in (fp32 master weights
    in mixed training).

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        recipe: an :class:`~mixprec.compute.fp8.Fp8Recipe` or its string form.
        backend: ``"auto"``, ``"emulated"`` or ``"native"``.

    Example:
        >>> layer = Fp8Linear.from_linear(nn.Linear(16, 8), "tensorwise")
        >>> layer(torch.randn(2, 16)).shape
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
        self.recipe = Fp8Recipe.parse(recipe)
        fp8_backend(backend, "cpu" if device is None else device, self.recipe)  # validates
        self.backend: Fp8Backend = backend
        if self.recipe.scaling == "delayed":
            hist = torch.zeros(3, self.recipe.history, device=device)
            self.register_buffer("fp8_amax_history", hist)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, recipe: str | Fp8Recipe = "tensorwise", backend: Fp8Backend = "auto"
    ) -> Fp8Linear:
        """An ``Fp8Linear`` holding ``linear``'s own parameter objects (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=False, recipe=recipe)
        new.backend = backend
        fp8_backend(backend, linear.weight.device, new.recipe)
        new.weight = linear.weight
        new.bias = linear.bias
        if new.recipe.scaling == "delayed":
            new.fp8_amax_history = torch.zeros(3, new.recipe.history, device=linear.weight.device)
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        out_dtype = x.dtype
        if torch.is_autocast_enabled(device_type):
            out_dtype = torch.get_autocast_dtype(device_type)
            x = x.to(out_dtype)
        native = fp8_backend(self.backend, self.weight.device, self.recipe)[0] == "native"
        flat = x.reshape(-1, x.shape[-1])
        scales = self._delayed_scales(flat) if self.recipe.scaling == "delayed" else None
        out = _fp8_linear(flat, self.weight, self.bias, str(self.recipe), out_dtype, scales, native)
        if scales is not None and self.training and out.requires_grad:
            out.register_hook(self._record_grad_amax)
        return out.reshape(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def _delayed_scales(self, flat: torch.Tensor) -> torch.Tensor:
        """Scales from the history (before this step), then this step's amaxes recorded."""
        r, hist = self.recipe, self.fp8_amax_history
        amax_x, amax_w = flat.abs().max().float(), self.weight.detach().abs().max().float()
        s_go = delayed_scale(hist[2], torch.zeros_like(amax_x), r.grad_format, r.margin)
        scales = torch.stack(
            [
                delayed_scale(hist[0], amax_x, r.input_format, r.margin),
                delayed_scale(hist[1], amax_w, r.weight_format, r.margin),
                torch.where(hist[2].max() > 0, s_go, torch.zeros_like(s_go)),
            ]
        )
        if self.training:
            _record(hist[0], amax_x)
            _record(hist[1], amax_w)
        return scales

    @torch.no_grad()
    def _record_grad_amax(self, grad: torch.Tensor) -> None:
        _record(self.fp8_amax_history[2], grad.abs().max().float())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={str(self.recipe)!r}, backend={self.backend!r}"


def _record(row: torch.Tensor, amax: torch.Tensor) -> None:
    """Push ``amax`` onto an amax history row, newest first, in place."""
    row.copy_(torch.roll(row, 1))
    row[0] = amax


# -- applying it to a model ---------------------------------------------------------------------


@dataclass(frozen=True)
class Fp8Plan:
    """A recipe plus the layers that stay in high precision, with a string form that round-trips:
    ``"<recipe>[; <name glob> -> bf16]*"`` (globs match a module's dotted name or any dotted
    suffix of it, as policy rules do).

    Example:
        >>> text = "rowwise; lm_head -> bf16; blocks.0.* -> bf16"
        >>> plan = Fp8Plan.parse(text)
        >>> plan.keeps_high_precision("model.lm_head"), str(plan) == text
        (True, True)
    """

    recipe: Fp8Recipe
    keep_high_precision: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str | Fp8Recipe | Fp8Plan) -> Fp8Plan:
        """A plan from its string form (a bare recipe name is a plan without exceptions).

        Raises:
            ValueError: an unknown recipe, or a rule that is not ``'<glob> -> bf16'``.
        """
        if isinstance(spec, Fp8Plan):
            return spec
        if isinstance(spec, Fp8Recipe):
            return cls(spec)
        if not isinstance(spec, str):
            raise TypeError(
                f"an fp8 plan is a string such as 'rowwise; lm_head -> bf16', got {spec!r}"
            )
        head, *rules = spec.split(";")
        globs = []
        for rule in rules:
            pattern, arrow, target = (s.strip() for s in rule.partition("->"))
            if not arrow or not pattern or target not in ("bf16", "high"):
                raise ValueError(
                    f"malformed fp8 rule {rule.strip()!r} in {spec!r}; write '<name glob> -> bf16' "
                    "(that layer keeps its high-precision GEMMs), e.g. 'lm_head -> bf16'"
                )
            globs.append(pattern)
        return cls(Fp8Recipe.parse(head), tuple(globs))

    def keeps_high_precision(self, name: str) -> bool:
        """Whether the module called ``name`` matches one of the plan's rules."""
        parts = name.split(".")
        suffixes = [".".join(parts[i:]) for i in range(len(parts))]
        return any(fnmatch.fnmatchcase(s, g) for g in self.keep_high_precision for s in suffixes)

    def __str__(self) -> str:
        return "; ".join([str(self.recipe), *(f"{g} -> bf16" for g in self.keep_high_precision)])


@dataclass
class Fp8Conversion:
    """What :func:`convert_to_fp8` did: the model, and each linear layer's fate by name."""

    model: nn.Module
    converted: list[str] = field(default_factory=list)
    fallbacks: dict[str, str] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)


def convert_to_fp8(
    model: nn.Module,
    plan: str | Fp8Recipe | Fp8Plan = "tensorwise",
    *,
    module_filter: Callable[[nn.Module, str], bool] | None = None,
    on_mismatch: OnMismatch = "fallback",
    backend: Fp8Backend = "auto",
) -> Fp8Conversion:
    """Swap the ``nn.Linear`` modules of ``model`` for :class:`Fp8Linear`, in place.

    The new modules hold the same parameters, so ``state_dict`` keys (plus ``fp8_amax_history``
    for delayed scaling) and existing optimizers are unchanged. Call it before ``torch.compile``
    and before building a mixed-precision session's optimizer wrapper.

    Args:
        model: the model (a bare ``nn.Linear`` is returned converted in ``.model``).
        plan: a recipe, or a plan string such as ``"rowwise; lm_head -> bf16"``.
        module_filter: ``(module, name) -> bool``; layers for which it is False stay as they are
            (torchao's ``module_filter_fn``).
        on_mismatch: a layer whose shape does not fit the recipe's blocks: ``"fallback"`` keeps
            it in high precision with a warning, ``"error"`` refuses.
        backend: ``"auto"``, ``"emulated"`` or ``"native"``.

    Returns:
        An :class:`Fp8Conversion`.

    Raises:
        ValueError: an unknown recipe, mismatch setting or backend; a layer that does not fit
            with ``on_mismatch="error"``.

    Example:
        >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> done = convert_to_fp8(net, "mxfp8", on_mismatch="fallback")  # doctest: +SKIP
        >>> done.converted, list(done.fallbacks)  # doctest: +SKIP
        (['0'], ['2'])
    """
    p = Fp8Plan.parse(plan)
    _check_settings(on_mismatch, backend)

    def recipe_for(name: str, mod: nn.Linear) -> Fp8Recipe | None:
        if p.keeps_high_precision(name) or (module_filter and not module_filter(mod, name)):
            return None
        return p.recipe

    def exclusion(name: str) -> str:
        return f"'{p}; {name or '*'} -> bf16'"

    return _convert(model, recipe_for, on_mismatch, backend, exclusion)


def apply_fp8_policy(
    model: nn.Module,
    policy: Policy | str,
    *,
    on_mismatch: OnMismatch = "fallback",
    backend: Fp8Backend = "auto",
) -> Fp8Conversion:
    """Convert the linear layers a :class:`~mixprec.policy.Policy` puts in FP8 (in place).

    Each ``nn.Linear`` named ``name`` is converted with the recipe of
    ``policy.for_module(name, module).fp8``; a layer whose rule has no fp8 recipe (e.g.
    ``lm_head -> bf16-mixed``) stays as it is. What a mixed-precision session calls in ``prepare``
    for a ``compute=fp8:<recipe>`` policy, before it wraps the optimizer.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> done = apply_fp8_policy(net, "params=fp32,compute=fp8:rowwise,output=fp32; 2 -> bf16")
        >>> done.converted, done.excluded
        (['0'], ['2'])
    """
    pol = Policy.parse(policy)
    _check_settings(on_mismatch, backend)

    def recipe_for(name: str, mod: nn.Linear) -> Fp8Recipe | None:
        recipe = pol.for_module(name, mod).fp8
        return None if recipe is None else Fp8Recipe.parse(recipe)

    def exclusion(name: str) -> str:
        return f"a rule '{name or '*'} -> bf16-mixed'"

    return _convert(model, recipe_for, on_mismatch, backend, exclusion)


def _check_settings(on_mismatch: object, backend: object) -> None:
    if on_mismatch not in _ON_MISMATCH:
        raise ValueError(
            f"unknown on_mismatch {on_mismatch!r}; valid choices: "
            f"{', '.join(map(repr, _ON_MISMATCH))}"
        )
    if backend not in _BACKENDS:
        raise ValueError(
            f"unknown fp8 backend {backend!r}; valid backends: {', '.join(map(repr, _BACKENDS))}"
        )


def _convert(
    model: nn.Module,
    recipe_for: Callable[[str, nn.Linear], Fp8Recipe | None],
    on_mismatch: OnMismatch,
    backend: Fp8Backend,
    exclusion: Callable[[str], str],
) -> Fp8Conversion:
    result = Fp8Conversion(model)
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if type(mod) is nn.Linear  # exactly nn.Linear: subclasses may compute something else
    ]
    for name, mod in targets:
        recipe = recipe_for(name, mod)
        if recipe is None:
            result.excluded.append(name)
            continue
        misfit = _misfit(mod, recipe)
        if misfit:
            if on_mismatch == "error":
                raise ValueError(
                    f"layer {name!r} ({mod.out_features}x{mod.in_features}) does not fit recipe "
                    f"{str(recipe)!r}: {misfit}; pass on_mismatch='fallback' to keep it in "
                    f"high precision, or exclude it: {exclusion(name)}"
                )
            result.fallbacks[name] = misfit
            warnings.warn(f"fp8: layer {name!r} stays in high precision: {misfit}", stacklevel=3)
            continue
        new = Fp8Linear.from_linear(mod, recipe, backend)
        if name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
        else:
            result.model = new
        result.converted.append(name)
    return result


def _misfit(linear: nn.Linear, recipe: Fp8Recipe) -> str | None:
    rows, cols = recipe.required_multiple()
    if linear.out_features % rows or linear.in_features % cols:
        return (
            f"{recipe.granularity} needs out_features and in_features divisible by "
            f"{recipe.block}, got {linear.out_features} and {linear.in_features}"
        )
    return None
