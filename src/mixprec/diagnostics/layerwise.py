"""Per-layer error of a precision policy against FP32, and the FP32 islands that would remove it.

One batch runs twice, on two deep copies of the model (the caller's model and its gradients are
left alone): once in fp32, once under the policy exactly as a session runs it (parameters cast by
:func:`mixprec.optim.cast_module` with the default FP32 islands, so norms and losses stay fp32;
16-bit compute under :func:`mixprec.autocast` with the policy's islands). Hooks record every
module's inputs and outputs and the gradients w.r.t. them; each pair is compared as a
signal-to-noise ratio in dB, ``10 log10(sum ref**2 / sum (ref - test)**2)``.

Error propagates: after one layer overflows, every later layer is wrong too. So a module is only
proposed as an FP32 island where the error *starts*: its output is below the threshold while its
input was not (forward), or the gradient w.r.t. its input or parameters is below the threshold
while the gradient w.r.t. its output was not (backward); of nested candidates the innermost wins.
Both runs use the same random seed, so dropout draws the same masks.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from mixprec.compute import DEFAULT_ISLAND_RULES, Backend, autocast, fp32_islands
from mixprec.compute.islands import cast_outputs
from mixprec.diagnostics._checks import (
    check_loss_fn,
    check_model,
    check_scale,
    check_threshold,
    run_batch,
)
from mixprec.diagnostics.finite import floating_tensors
from mixprec.optim.cast import cast_module
from mixprec.policy import Policy

__all__ = ["Capture", "LayerComparison", "LayerReport", "capture", "compare_layers", "snr_db"]

_LOW = (torch.float16, torch.bfloat16)


def snr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-noise ratio of ``test`` against ``reference`` in dB, computed in float64.

    Args:
        reference: the exact values.
        test: the approximation, same number of elements.

    Returns:
        ``10 log10(sum ref**2 / sum (ref - test)**2)``; inf when they are equal, -inf when
        ``test`` is not finite or the reference is all zeros (and test is not), NaN when the
        reference itself is not finite.

    Raises:
        ValueError: the element counts differ.

    Example:
        >>> snr_db(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5]))  # 25 / 0.25
        20.0
    """
    ref = reference.detach().reshape(-1).to(torch.float64)
    approx = test.detach().reshape(-1).to(ref.device, torch.float64)
    if ref.numel() != approx.numel():
        raise ValueError(
            f"reference and test differ in size: {tuple(reference.shape)!r} vs "
            f"{tuple(test.shape)!r}"
        )
    if not bool(torch.isfinite(ref).all()):
        return math.nan
    if not bool(torch.isfinite(approx).all()):
        return -math.inf
    signal, noise = ref.square().sum().item(), (ref - approx).square().sum().item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@dataclass
class Capture:
    """What one forward and backward of one batch produced, per module (fp32 copies).

    Attributes:
        loss: the loss value (unscaled).
        classes: module name -> class name, in ``named_modules()`` order.
        inputs, outputs: floating inputs and outputs of each call of each module.
        grad_inputs, grad_outputs: the gradients w.r.t. them (unscaled).
        param_grads: parameter gradients by qualified name (unscaled).
        owners: module name -> qualified names of the parameters it owns directly.
    """

    loss: float = math.nan
    classes: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    grad_inputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    grad_outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    param_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    owners: dict[str, list[str]] = field(default_factory=dict)

    def absmax(self, name: str) -> tuple[float, float]:
        """Largest finite-or-inf magnitude of the module's (inputs, outputs); 0.0 if none."""
        return _absmax(self.inputs.get(name, [])), _absmax(self.outputs.get(name, []))


def _absmax(tensors: list[torch.Tensor]) -> float:
    return max(
        (float(t.abs().nan_to_num(nan=0.0, posinf=math.inf).max()) for t in tensors), default=0.0
    )


def session_storage(policy: Policy) -> Policy:
    """``policy`` with the session's FP32 islands appended: the formats ``prepare`` stores in."""
    return replace(policy, rules=policy.rules + DEFAULT_ISLAND_RULES)


def _record(store: dict[str, list[torch.Tensor]], name: str) -> Callable[[torch.Tensor], None]:
    def hook(grad: torch.Tensor) -> None:
        store.setdefault(name, []).append(grad.detach().to(torch.float32, copy=True))

    return hook


def capture(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[..., torch.Tensor],
    policy: Policy | str = "fp32",
    *,
    loss_scale: float = 1.0,
    backend: Backend = "auto",
    seed: int = 0,
) -> Capture:
    """Run one batch forward and backward on a copy of ``model`` under ``policy``, recording all.

    Args:
        model: the model; it is deep-copied, so its weights and gradients are left alone.
        batch: a tensor, a dict of keyword arguments or ``(inputs, target)``; see
            :func:`mixprec.diagnostics.layerwise.compare_layers`.
        loss_fn: ``loss_fn(output, target)`` returning a scalar.
        policy: the policy to run under (``"fp32"``: the reference).
        loss_scale: the loss is multiplied by it before backward; gradients are recorded divided
            by it again.
        backend: the autocast backend for 16-bit compute.
        seed: the random seed both runs share (dropout).

    Returns:
        A :class:`Capture`.
    """
    policy = Policy.parse(policy)
    low = policy.compute.dtype if policy.compute.dtype in _LOW else None
    if low is None and policy.compute.bits < 32:
        raise ValueError(
            f"cannot run compute format {policy.compute} under autocast; comparable compute "
            "formats: fp32, tf32, bf16, fp16"
        )
    twin = copy.deepcopy(model)
    # as a session prepares a model: norms and losses stay fp32, buffers keep their dtype
    cast_module(twin, session_storage(policy), buffers=False)
    twin.zero_grad(set_to_none=True)
    device = next(twin.parameters()).device
    record = Capture()
    handles = []
    for name, module in twin.named_modules():
        record.classes[name] = type(module).__name__
        record.owners[name] = [
            f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)
        ]

        def forward_hook(
            module: nn.Module, args: Any, kwargs: Any, output: Any, name: str = name
        ) -> None:
            for store, grads, tree in (
                (record.inputs, record.grad_inputs, (args, kwargs)),
                (record.outputs, record.grad_outputs, output),
            ):
                for t in floating_tensors(tree):
                    store.setdefault(name, []).append(t.detach().to(torch.float32, copy=True))
                    if t.requires_grad:
                        t.register_hook(_record(grads, name))

        handles.append(module.register_forward_hook(forward_hook, with_kwargs=True))
    islands = fp32_islands(twin, policy) if low is not None else None
    if low is not None:  # the session's wrapped forward returns the policy's output format
        handles.append(
            twin.register_forward_hook(lambda m, a, out: cast_outputs(out, policy.output.dtype))
        )
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            with autocast(device.type, dtype=low, enabled=low is not None, backend=backend):
                loss = run_batch(twin, batch, loss_fn)
            (loss.float() * loss_scale).backward()
    finally:
        for handle in handles:
            handle.remove()
        if islands is not None:
            islands.remove()
    record.loss = loss.item()
    if loss_scale != 1.0:
        for store in (record.grad_inputs, record.grad_outputs):
            for grads in store.values():
                for g in grads:
                    g.div_(loss_scale)
    for name, param in twin.named_parameters():
        if param.grad is not None:
            record.param_grads[name] = param.grad.detach().to(torch.float32) / loss_scale
    return record


@dataclass(frozen=True)
class LayerReport:
    """One module's error under the policy, in dB (None: nothing to compare).

    Attributes:
        name, module_class: the module.
        output_snr_db, input_snr_db: of its outputs and inputs against fp32.
        grad_output_snr_db: of the gradient w.r.t. its outputs.
        grad_input_snr_db: the worst of the gradients w.r.t. its inputs and its own parameters.
        input_absmax, output_absmax: largest magnitudes in the fp32 run.
        flagged: an output or gradient SNR is below the threshold.
        origin: the error starts here (see the module docstring).
    """

    name: str
    module_class: str
    output_snr_db: float | None
    input_snr_db: float | None
    grad_output_snr_db: float | None
    grad_input_snr_db: float | None
    input_absmax: float
    output_absmax: float
    flagged: bool
    origin: bool


@dataclass(frozen=True)
class LayerComparison:
    """The per-layer comparison of a policy against fp32 and the islands it proposes.

    Attributes:
        policy: the policy compared, as a string.
        threshold_db: modules below this SNR are flagged.
        loss_scale: the loss scale of the policy run.
        reference_loss, policy_loss: the two losses.
        layers: one report per module, in ``named_modules()`` order.
        proposed_rules: ``"<module> -> fp32"`` for each module where error starts.
    """

    policy: str
    threshold_db: float
    loss_scale: float
    reference_loss: float
    policy_loss: float
    layers: tuple[LayerReport, ...]
    proposed_rules: tuple[str, ...]

    @property
    def flagged(self) -> list[str]:
        """Names of the modules with an SNR below the threshold."""
        return [layer.name for layer in self.layers if layer.flagged]

    @property
    def proposed_policy(self) -> Policy:
        """The compared policy with the proposed FP32 islands appended."""
        return Policy.parse(self.policy).with_rules(*self.proposed_rules)

    def table(self) -> str:
        """A plain-text table: one line per module."""

        def db(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f}"

        lines = [f"{'module':<32} {'class':<16} {'out dB':>8} {'grad dB':>8}  flags"]
        for layer in self.layers:
            flags = ("origin " if layer.origin else "") + ("flagged" if layer.flagged else "")
            lines.append(
                f"{layer.name or '<model>':<32} {layer.module_class:<16} "
                f"{db(layer.output_snr_db):>8} {db(layer.grad_input_snr_db):>8}  {flags}"
            )
        return "\n".join(lines)


def _snr_of(ref: list[torch.Tensor], test: list[torch.Tensor]) -> float | None:
    if (
        not ref
        or len(ref) != len(test)
        or any(a.shape != b.shape for a, b in zip(ref, test, strict=True))
    ):
        return None
    return snr_db(torch.cat([t.reshape(-1) for t in ref]), torch.cat([t.reshape(-1) for t in test]))


def _below(value: float | None, threshold: float) -> bool:
    return value is not None and not math.isnan(value) and value < threshold


def _layer_report(name: str, ref: Capture, test: Capture, threshold: float) -> LayerReport:
    out_snr = _snr_of(ref.outputs.get(name, []), test.outputs.get(name, []))
    in_snr = _snr_of(ref.inputs.get(name, []), test.inputs.get(name, []))
    grad_out = _snr_of(ref.grad_outputs.get(name, []), test.grad_outputs.get(name, []))
    candidates = [_snr_of(ref.grad_inputs.get(name, []), test.grad_inputs.get(name, []))]
    for param in ref.owners.get(name, []):
        if param in ref.param_grads and param in test.param_grads:
            candidates.append(_snr_of([ref.param_grads[param]], [test.param_grads[param]]))
    known = [c for c in candidates if c is not None]
    grad_in = min(known) if known else None
    forward_origin = _below(out_snr, threshold) and not _below(in_snr, threshold)
    backward_origin = _below(grad_in, threshold) and not _below(grad_out, threshold)
    in_max, out_max = ref.absmax(name)
    return LayerReport(
        name,
        ref.classes[name],
        out_snr,
        in_snr,
        grad_out,
        grad_in,
        in_max,
        out_max,
        flagged=_below(out_snr, threshold) or _below(grad_in, threshold),
        origin=forward_origin or backward_origin,
    )


def innermost(names: list[str]) -> list[str]:
    """Drop every name that has a descendant in ``names`` (and the model itself, ``""``)."""
    return [
        n for n in names if n and not any(other.startswith(n + ".") for other in names if other)
    ]


def compare_layers(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[..., torch.Tensor],
    policy: Policy | str,
    *,
    threshold_db: float = 20.0,
    loss_scale: float | None = None,
    backend: Backend = "auto",
    reference: Capture | None = None,
) -> LayerComparison:
    """Compare one batch under ``policy`` against fp32, module by module.

    Args:
        model: the model (deep-copied twice; left untouched).
        batch: a tensor (``model(batch)``), a dict of keyword arguments (``model(**batch)``,
            e.g. a Hugging Face batch), each followed by ``loss_fn(output)``; or a pair
            ``(inputs, target)``: ``model(inputs)`` for a tensor, ``model(*inputs)`` for a tuple,
            ``model(**inputs)`` for a dict, then ``loss_fn(output, target)`` (or
            ``loss_fn(output)`` when target is None).
        loss_fn: returns a scalar loss.
        policy: the policy to compare, e.g. ``"fp16-mixed"`` or a :class:`~mixprec.Policy`.
        threshold_db: flag modules below this SNR, in (0, 150].
        loss_scale: scale of the policy run's loss (default: 2**16 for fp16 compute, else 1).
        backend: the autocast backend (``"emulated"`` gives tensor-core numerics on any CPU).
        reference: a :func:`capture` of the fp32 run to reuse.

    Returns:
        A :class:`LayerComparison`.

    Raises:
        TypeError: bad argument types; a batch that is not a tensor, a dict or a pair.
        ValueError: a model without parameters; a threshold out of range; a non-scalar loss.
        Exception: the model's own error for a batch it cannot take, unchanged.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> batch = (torch.randn(4, 8), torch.tensor([0, 1, 0, 1]))
        >>> result = compare_layers(model, batch, nn.functional.cross_entropy, "bf16-mixed",
        ...                         backend="emulated")
        >>> result.proposed_rules, result.layers[1].output_snr_db > 30
        ((), True)
    """
    check_model(model, "compare_layers")
    check_loss_fn(loss_fn)
    threshold = check_threshold(threshold_db)
    policy = Policy.parse(policy)
    if loss_scale is None:
        loss_scale = 2.0**16 if policy.compute.dtype == torch.float16 else 1.0
    loss_scale = check_scale(loss_scale, "loss_scale")
    if reference is None:
        reference = capture(model, batch, loss_fn, "fp32")
    test = capture(model, batch, loss_fn, policy, loss_scale=loss_scale, backend=backend)
    layers = tuple(_layer_report(name, reference, test, threshold) for name in reference.classes)
    origins = [
        name
        for name in innermost([layer.name for layer in layers if layer.origin])
        # a module the policy already computes in fp32 cannot be helped by another island
        if session_storage(policy).for_module(name, reference.classes[name]).compute.bits <= 16
    ]
    return LayerComparison(
        str(policy),
        threshold,
        loss_scale,
        reference.loss,
        test.loss,
        layers,
        tuple(f"{name} -> fp32" for name in origins),
    )
