"""Which linear layers FP8 hurts: per-layer SNR against bf16 on a batch, and a plan that says so.

Design note: a layer's FP8 error is measured in isolation, on the inputs and output gradients it
really sees. One fp32 forward and backward of the model on the user's batch records, by forward
and full-backward hooks (observing only, nothing is replaced), each ``nn.Linear``'s input and
output gradient. Then, per layer, the same three GEMMs run twice on those tensors: in bf16 (the
emulated tensor-core GEMM: bf16 operands, fp32 accumulation, one rounding) and in FP8 under the
recipe. The signal-to-noise ratio in dB of the FP8 output, input gradient and weight gradient
against the bf16 ones says how much precision FP8 costs that layer beyond what bf16 already does.
Layers whose worst SNR falls below a threshold are proposed to stay in bf16: usually the first
layer (raw, outlier-heavy inputs) and the LM head (its logits and gradients have a wide range).
Measuring layer by layer keeps errors from compounding, so a layer is judged on its own.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from mixprec.compute.emulated import emulated_linear
from mixprec.compute.fp4_linear import fp4_linear
from mixprec.compute.fp8_convert import Fp8Plan
from mixprec.compute.fp8_linear import fp8_linear
from mixprec.diagnostics.layerwise import snr_db
from mixprec.fp4_recipes import Fp4Recipe, parse_recipe
from mixprec.policy import ModuleRule, Policy
from mixprec.recipes import Fp8Recipe

__all__ = [
    "DEFAULT_FP4_THRESHOLD_DB",
    "DEFAULT_THRESHOLD_DB",
    "Fp8Advice",
    "Fp8OperandCounts",
    "LayerSnr",
    "advise_fp8",
    "fp8_flush_report",
    "fp8_layer_snr",
]

DEFAULT_THRESHOLD_DB = 20.0
"""A layer whose worst FP8 SNR against bf16 is below this stays in bf16. On a small transformer
e4m3 operands give about 28 dB and tensorwise e5m2 gradients about 24 dB in every layer, so 20 dB
singles out layers that fare clearly worse than FP8's usual cost."""
DEFAULT_FP4_THRESHOLD_DB = 12.0
"""The same for the 4-bit recipes (nvfp4, mxfp4): fp4 operands cost far more than fp8 ones
(on the charlm transformer NVFP4 gives roughly 15-19 dB per layer, stochastic rounding of the
gradients a few dB less), so a layer below 12 dB fares clearly worse than 4-bit's usual cost."""


@dataclass(frozen=True)
class LayerSnr:
    """One linear layer's FP8 SNR in dB against bf16: output, input gradient, weight gradient."""

    name: str
    output_db: float
    grad_input_db: float
    grad_weight_db: float

    @property
    def worst_db(self) -> float:
        """The lowest of the three."""
        return min(self.output_db, self.grad_input_db, self.grad_weight_db)


@dataclass(frozen=True)
class Fp8Advice:
    """The measurement and the proposal: :meth:`policy` (a policy string), and ``str(advice)``
    (the recipe shorthand ``"<recipe>; <layer> -> bf16"``), which
    :func:`~mixprec.compute.fp8_convert.convert_to_fp8` accepts as it is."""

    recipe: Fp8Recipe | Fp4Recipe
    layers: tuple[LayerSnr, ...]
    threshold_db: float
    keep_bf16: tuple[str, ...]
    misfits: tuple[str, ...] = ()  # layers whose shape does not fit the recipe's blocks

    @property
    def plan(self) -> Fp8Plan:
        """Deprecated (warns): the recipe with the layers that stay in bf16 as an ``Fp8Plan``;
        pass ``str(advice)`` or :meth:`policy` to ``convert_to_fp8`` instead."""
        return Fp8Plan(self.recipe, self.keep_bf16)  # type: ignore[arg-type]  # an FP8 recipe

    def policy(self, base: str | Policy = "bf16-mixed") -> str:
        """The proposal as a policy string: ``base`` with ``compute=fp8:<recipe>``, and a rule
        ``<layer> -> base`` for each layer that stays in bf16.

        Raises:
            ValueError: ``base`` does not compute in bf16.
        """
        base_policy = Policy.parse(base)
        plain = replace(base_policy, rules=(), fp8=None)
        rules = tuple(ModuleRule(name, plain) for name in self.keep_bf16)
        return str(replace(plain, fp8=str(self.recipe), rules=rules))

    def report(self) -> str:
        """A table of the figures, one layer a line, with the verdict."""
        kind = "" if isinstance(self.recipe, Fp4Recipe) else "fp8 "
        lines = [f"{kind}{self.recipe} vs bf16, threshold {self.threshold_db:.1f} dB"]
        lines.append(f"{'layer':<32} {'out dB':>8} {'gin dB':>8} {'gw dB':>8}  verdict")
        for layer in self.layers:
            verdict = "bf16" if layer.name in self.keep_bf16 else (kind.strip() or "4-bit")
            lines.append(
                f"{layer.name:<32} {layer.output_db:8.1f} {layer.grad_input_db:8.1f} "
                f"{layer.grad_weight_db:8.1f}  {verdict}"
            )
        misfit = "(shape does not fit the blocks)"
        lines += [f"{name:<32} {misfit:>26}  bf16" for name in self.misfits]
        lines.append(f"plan: {self}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return "; ".join([str(self.recipe), *(f"{name} -> bf16" for name in self.keep_bf16)])


def fp8_layer_snr(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[[Any], torch.Tensor],
    recipe: str | Fp8Recipe | Fp4Recipe = "tensorwise",
) -> tuple[LayerSnr, ...]:
    """Each ``nn.Linear`` layer's FP8 (or 4-bit) SNR against bf16 on ``batch`` (see the module's
    note). Under a 4-bit recipe a layer whose shape does not fit its blocks is left out.

    Args:
        model: the model (unchanged; its gradients are left as they were).
        batch: passed to ``model`` as ``model(batch)``.
        loss_fn: maps the model's output to a scalar loss.
        recipe: the FP8 recipe to measure.

    Returns:
        One :class:`LayerSnr` per linear layer that ran, in execution order.

    Raises:
        ValueError: an unknown recipe, or a model with no linear layer that ran on the batch.
    """
    r = parse_recipe(recipe)
    seen, modules = _capture(model, batch, loss_fn, "fp8_layer_snr")
    return tuple(
        _measure(name, modules[name], io["x"], io["g"], r)
        for name, io in seen.items()
        if "g" in io and not _misfit(modules[name], r)
    )


def _misfit(layer: nn.Linear, recipe: Fp8Recipe | Fp4Recipe) -> bool:
    """A 4-bit layer needs whole blocks along both feature dims (FP8 recipes measure any)."""
    return isinstance(recipe, Fp4Recipe) and any(
        d % recipe.block for d in (layer.in_features, layer.out_features)
    )


def _capture(
    model: nn.Module, batch: Any, loss_fn: Callable[[Any], torch.Tensor], caller: str
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, nn.Linear]]:
    """One fp32 forward and backward that records each linear layer's input and output grad."""
    seen: dict[str, dict[str, torch.Tensor]] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_hook(_keep_input(seen, name)))
            handles.append(mod.register_full_backward_hook(_keep_grad(seen, name)))
    saved_grads = {p: p.grad for p in model.parameters()}
    try:
        with warnings.catch_warnings():  # a first layer's input needs no gradient: expected here
            warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
            loss_fn(model(batch)).backward()
    finally:
        for h in handles:
            h.remove()
        for p, g in saved_grads.items():
            p.grad = g
    if not seen:
        raise ValueError(
            f"no nn.Linear layer of {type(model).__name__} ran on the batch; {caller} "
            "measures linear layers only"
        )
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return seen, linears


@dataclass(frozen=True)
class Fp8OperandCounts:
    """What FP8 quantization does to one GEMM operand of one layer, at the recipe's scales.

    Attributes:
        layer: the module name.
        operand: ``"input"``, ``"weight"`` or ``"grad_output"``.
        format: the fp8 format of the operand.
        numel: elements.
        nonzero: non-zero finite elements before quantization.
        flushed: of those, how many quantize to zero (underflow at the scale).
        subnormal: how many land in the format's subnormal range (precision lost).
        saturated: how many exceed the format's range at the scale and are clamped to its max.
    """

    layer: str
    operand: str
    format: str
    numel: int
    nonzero: int
    flushed: int
    subnormal: int
    saturated: int

    @property
    def flushed_fraction(self) -> float:
        return self.flushed / self.nonzero if self.nonzero else 0.0

    @property
    def saturated_fraction(self) -> float:
        return self.saturated / self.numel if self.numel else 0.0


def fp8_flush_report(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[[Any], torch.Tensor],
    recipe: str | Fp8Recipe = "tensorwise",
) -> tuple[Fp8OperandCounts, ...]:
    """Per linear layer and GEMM operand: the fraction FP8 flushes to zero or saturates.

    The operands are those of the forward GEMM (input, weight) and the output gradient as the
    input-gradient GEMM quantizes it, recorded on ``batch`` as :func:`fp8_layer_snr` records
    them, and quantized with the recipe's own scales (dynamic or power-of-two per block; E8M0 for
    MXFP8; a delayed recipe is measured at its first, dynamic, step). Dynamic scales map each
    block's amax to the format's max, so saturation shows only where scales are stale or fixed;
    flushing shows small values lost below the block's scale.

    Example:
        >>> with torch.random.fork_rng():
        ...     net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> counts = fp8_flush_report(net, torch.ones(4, 32), lambda out: out.sum())
        >>> [(c.layer, c.operand) for c in counts][:3]
        [('0', 'input'), ('0', 'weight'), ('0', 'grad_output')]
    """
    from mixprec.scaled import fp8_quantize

    r = Fp8Recipe.parse(recipe)
    seen, modules = _capture(model, batch, loss_fn, "fp8_flush_report")
    counts = []
    for name, io in seen.items():
        if "g" not in io:
            continue
        weight = modules[name].weight.detach()
        x = io["x"].reshape(-1, io["x"].shape[-1])
        g = io["g"].reshape(-1, io["g"].shape[-1])
        for role, tensor, gemm in (
            ("input", x, "output"),
            ("weight", weight, "output"),
            ("grad_output", g, "grad_input"),
        ):
            q = fp8_quantize(tensor, r, role, 1, gemm)  # type: ignore[arg-type]
            counts.append(_count(name, role, tensor, q, r.format_of(role)))  # type: ignore[arg-type]
    return tuple(counts)


def _count(name: str, role: str, x: torch.Tensor, q: Any, fmt: Any) -> Fp8OperandCounts:
    """Flushed, subnormal and saturated elements of ``x`` quantized to ``q`` (blockwise scales)."""
    br, bc = q.block
    rows, cols = x.shape
    scale = q.scale.expand(q.scale.shape[0], br, q.scale.shape[2], bc)
    scale = scale.reshape(q.scale.shape[0] * br, q.scale.shape[2] * bc)[:rows, :cols]
    scaled = x.float() * scale
    finite = torch.isfinite(scaled)
    nonzero = finite & (x != 0)
    data = q.data.float()
    return Fp8OperandCounts(
        layer=name,
        operand=role,
        format=fmt.name,
        numel=x.numel(),
        nonzero=int(nonzero.sum()),
        flushed=int((nonzero & (data == 0)).sum()),
        subnormal=int((nonzero & (data != 0) & (data.abs() < fmt.min_normal)).sum()),
        saturated=int((finite & (scaled.abs() > fmt.max)).sum()),
    )


def advise_fp8(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[[Any], torch.Tensor],
    recipe: str | Fp8Recipe | Fp4Recipe = "tensorwise",
    threshold_db: float | None = None,
) -> Fp8Advice:
    """Measure FP8's (or a 4-bit recipe's) per-layer SNR and propose which layers stay in bf16.

    ``threshold_db`` defaults to :data:`DEFAULT_THRESHOLD_DB` for FP8 recipes and
    :data:`DEFAULT_FP4_THRESHOLD_DB` for ``nvfp4`` and ``mxfp4``. Under a 4-bit recipe a layer
    whose shape does not fit the blocks is proposed to stay in bf16 too (``misfits``).

    Example:
        >>> with torch.random.fork_rng():  # examples leave the global generator as it was
        ...     net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> batch = torch.linspace(-3, 3, 512).reshape(16, 32)
        >>> advice = advise_fp8(net, batch, lambda out: out.square().mean())
        >>> str(advice).startswith("tensorwise")
        True
    """
    r = parse_recipe(recipe)
    if threshold_db is None:
        fp4 = isinstance(r, Fp4Recipe)
        threshold_db = DEFAULT_FP4_THRESHOLD_DB if fp4 else DEFAULT_THRESHOLD_DB
    if not isinstance(threshold_db, (int, float)) or isinstance(threshold_db, bool):
        raise TypeError(f"threshold_db must be a number of dB, got {threshold_db!r}")
    layers = fp8_layer_snr(model, batch, loss_fn, r)
    misfits = tuple(
        name
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and _misfit(mod, r)
    )
    keep = tuple(layer.name for layer in layers if layer.worst_db < threshold_db) + misfits
    return Fp8Advice(r, layers, float(threshold_db), keep, misfits)


def _keep_input(seen: dict[str, dict[str, torch.Tensor]], name: str) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        seen.setdefault(name, {})["x"] = args[0].detach()

    return hook


def _keep_grad(seen: dict[str, dict[str, torch.Tensor]], name: str) -> Callable[..., None]:
    def hook(module: nn.Module, grad_input: Any, grad_output: tuple[torch.Tensor, ...]) -> None:
        seen.setdefault(name, {})["g"] = grad_output[0].detach()

    return hook


def _measure(
    name: str, layer: nn.Linear, x: torch.Tensor, g: torch.Tensor, recipe: Fp8Recipe | Fp4Recipe
) -> LayerSnr:
    bf16 = torch.bfloat16
    x16, g16 = x.to(bf16), g.to(bf16)
    results: list[tuple[torch.Tensor, ...]] = []
    for fp8 in (False, True):
        xi = x16.clone().requires_grad_()
        w = layer.weight.detach().clone().requires_grad_()
        b = None if layer.bias is None else layer.bias.detach()
        if fp8 and isinstance(recipe, Fp4Recipe):
            out = fp4_linear(xi, w, b, recipe, out_dtype=bf16)
        elif fp8:
            out = fp8_linear(xi, w, b, recipe, out_dtype=bf16)  # type: ignore[arg-type]
        else:
            out = emulated_linear(xi, w.to(bf16), None if b is None else b.to(bf16))
        out.backward(g16)
        assert xi.grad is not None and w.grad is not None  # both required grad
        results.append((out.detach(), xi.grad, w.grad))
    (o16, gi16, gw16), (o8, gi8, gw8) = results
    return LayerSnr(name, snr_db(o16, o8), snr_db(gi16, gi8), snr_db(gw16, gw8))
