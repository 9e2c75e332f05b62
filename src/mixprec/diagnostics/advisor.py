"""The precision advisor: a policy string for this model on this hardware, and the reasons.

Design note: the advice is built from evidence, in the order a careful engineer would gather it,
and every step leaves a reason in words:

1. *Hardware.* :func:`mixprec.hardware.recommend` picks the 16-bit format the device computes fast
   (bf16 where it has bf16 units or none at all, fp16 where it has only fp16 units).
2. *Activation ranges.* One fp32 forward and backward of the batch records every module's largest
   input and output. A module whose values exceed fp16's max (65504) cannot run in fp16 (the
   classic T5 feed-forward case): with bf16 that needs nothing, with fp16 the innermost such
   modules become fp32 islands; if the model's own code (no submodule) exceeds it, fp16 is out.
3. *Underflow.* The fp32 parameter gradients are stored, on paper, in the chosen format at its
   starting loss scale (2**16 for fp16, capped at the largest scale at which nothing overflows;
   1 for bf16), counting what flushes to zero.
4. *Per-layer comparison.* The candidate policy runs the same batch against the fp32 run
   (:func:`~mixprec.diagnostics.layerwise.compare_layers`, with the norms and losses in fp32 as a
   session keeps them); modules where the error starts below the threshold are candidate fp32
   islands. Each candidate is *re-measured*: the comparison runs again with the islands applied,
   and an island stays only if its module's SNR rises (the reason states the dB before and
   after). Low SNR is not always precision's fault: a gradient that is zero in exact arithmetic
   (an attention key's bias, which softmax cancels) is pure rounding noise in fp32 too, and no
   island changes it. This repeats (at most ``max_rounds`` times) until nothing new is proposed,
   so the advised policy is the one that was checked.

Cost: one fp32 pass plus one or two passes per round, on deep copies of the model, for one batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mixprec.compute import Backend
from mixprec.diagnostics._checks import (
    check_batch_for_loss,
    check_loss_fn,
    check_model,
    check_nonempty_batch,
    check_threshold,
    nonfinite_inputs,
)
from mixprec.diagnostics.layerwise import (
    Capture,
    LayerComparison,
    capture,
    compare_layers,
    innermost,
)
from mixprec.diagnostics.underflow import UnderflowReport, underflow_report
from mixprec.formats import BF16, FP16
from mixprec.hardware import AutoChoice, HardwareReport, probe, recommend
from mixprec.policy import PRESETS, ModuleRule, Policy

__all__ = ["Advice", "advise"]

_FP16_START_SCALE = 2.0**16  # torch.amp.GradScaler's default init_scale


@dataclass(frozen=True)
class Advice:
    """What :func:`advise` recommends, and why.

    Attributes:
        policy: the recommended policy string (``Policy.parse`` accepts it as is).
        reasons: the evidence behind it, one sentence each.
        backend: the autocast backend for the device (``"native"`` or ``"emulated"``).
        init_scale: the loss scale to start from (None: no loss scaling, bf16 or fp32).
        fp16_ruled_out: modules whose fp32 activations exceed fp16's max ("" is the model's own
            code).
        activation_absmax: the largest fp32 input or output magnitude per module.
        underflow: the fp32 gradients stored in the advised format at ``init_scale`` (or 1).
        comparison: the advised policy compared against fp32, layer by layer.
        hardware: what the hardware probe alone recommended.
        rejected: islands the comparison proposed that did not raise their module's SNR when
            applied (re-measured), so they are left out of ``policy``.
    """

    policy: str
    reasons: tuple[str, ...]
    backend: str
    init_scale: float | None
    fp16_ruled_out: tuple[str, ...]
    activation_absmax: Mapping[str, float]
    underflow: UnderflowReport
    comparison: LayerComparison
    hardware: AutoChoice
    rejected: tuple[str, ...] = ()

    @property
    def scaler_options(self) -> dict[str, float]:
        """The loss-scaler options the advice implies: ``{"init_scale": ...}`` or ``{}``.

        Example:
            ``MixedPrecision(advice.policy, scaler_options=advice.scaler_options)``.
        """
        return {} if self.init_scale is None else {"init_scale": self.init_scale}

    def session_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`mixprec.MixedPrecision`: policy, backend, scaler options.

        Example:
            ``mp = MixedPrecision(device="cuda", **advice.session_kwargs())``.
        """
        return {
            "policy": self.policy,
            "backend": self.backend,
            "scaler_options": self.scaler_options,
        }

    def __str__(self) -> str:
        lines = [f"recommended policy: {self.policy} (backend {self.backend})"]
        if self.init_scale is not None:
            lines.append(f"start the loss scale at {self.init_scale:g}")
        lines.extend(f"- {reason}" for reason in self.reasons)
        return "\n".join(lines)


def _preset_name(policy: Policy) -> str:
    for name, preset in PRESETS.items():
        if preset == policy:
            return name
    return str(policy)


_FP32 = Policy.parse("fp32")


def _island(name: str) -> ModuleRule:
    """The rule that keeps module ``name`` in fp32."""
    return ModuleRule(name, _FP32)


def _rule_text(rule: ModuleRule) -> str:
    """A rule as the advice writes it: the policy by its preset name (``"fc -> fp32"``)."""
    prefix = "class:" if rule.kind == "class" else ""
    return f"{prefix}{rule.pattern} -> {_preset_name(rule.policy)}"


def _policy_string(base: str, rules: list[ModuleRule]) -> str:
    return "; ".join([base, *map(_rule_text, rules)])


@dataclass(frozen=True)
class _Ranges:
    """Evidence of step 2: every module's largest fp32 activation, and the innermost modules
    above fp16's max (``""``: the model's own code)."""

    absmax: Mapping[str, float]
    over: tuple[str, ...]


def _activation_ranges(reference: Capture) -> _Ranges:
    absmax = {name: max(reference.absmax(name)) for name in reference.classes}
    over = innermost([name for name, value in absmax.items() if value > FP16.max])
    if not over and absmax.get("", 0.0) > FP16.max:
        over = [""]  # the model's own code (no submodule) exceeds the range
    return _Ranges(absmax, tuple(over))


def _fp16_fits(choice: AutoChoice, ranges: _Ranges) -> bool:
    """Whether the advice keeps the hardware's (fp16) choice with loss scaling: not bf16, and
    no activation of the model's own code beyond fp16's range."""
    compute = choice.policy.compute
    return not (compute == BF16 or (compute == FP16 and "" in ranges.over))


def _range_evidence(choice: AutoChoice, ranges: _Ranges) -> tuple[str, list[ModuleRule], list[str]]:
    """Step 2: the base policy and the fp32 islands activation ranges call for, with reasons."""
    absmax, over = ranges.absmax, ranges.over
    if _fp16_fits(choice, ranges):
        rules = [_island(name) for name in over]
        reasons = [
            f"{name}: fp32 activations reach {absmax[name]:.3g} > fp16 max {FP16.max:g}: "
            "fp32 island"
            for name in over
        ]
        return _preset_name(choice.policy), rules, reasons
    if choice.policy.compute == FP16:
        return (
            "fp32",
            [],
            [
                f"fp16 is ruled out: the model's own code reaches {absmax['']:.3g} > fp16 max "
                f"{FP16.max:g}, which no module island can contain; this device has no fast "
                "bf16, so fp32 it is"
            ],
        )
    if over:
        ruled_out = ", ".join(f"{n or '<model>'} ({absmax[n]:.3g})" for n in over)
        return (
            "bf16-mixed",
            [],
            [
                f"fp16 is ruled out for {ruled_out}: fp32 activations above fp16 max "
                f"{FP16.max:g}; bf16 reaches {BF16.max:.3g}, so bf16-mixed needs no island there"
            ],
        )
    return (
        "bf16-mixed",
        [],
        [
            f"activations stay within fp16's range (abs-max {max(absmax.values()):.3g}); "
            "bf16 keeps fp32's range and needs no loss scaling"
        ],
    )


def _underflow_evidence(
    choice: AutoChoice, ranges: _Ranges, reference: Capture
) -> tuple[float | None, UnderflowReport, list[str]]:
    """Step 3: the loss scale to start from (None: no scaling) and what the gradients lose."""
    grads = reference.param_grads
    if not _fp16_fits(choice, ranges):
        fmt = "bf16" if choice.policy.compute == BF16 else "fp32"
        underflow = underflow_report(grads, 1.0, fmt)
        as_fp16 = underflow_report(grads, _FP16_START_SCALE, "fp16")
        return (
            None,
            underflow,
            [
                f"underflow: {fmt} at scale 1 flushes {underflow.total.flushed_fraction:.2%} of "
                f"the non-zero gradient elements (fp16 at {_FP16_START_SCALE:g} would flush "
                f"{as_fp16.total.flushed_fraction:.2%} and overflow "
                f"{as_fp16.total.overflow_fraction:.2%})"
            ],
        )
    fmt = choice.policy.compute.name
    safe = underflow_report(grads, _FP16_START_SCALE, fmt).largest_safe_scale
    init_scale = min(_FP16_START_SCALE, safe)
    underflow = underflow_report(grads, init_scale, fmt)
    reasons = [
        f"loss scale: start at {init_scale:g} (largest scale at which no gradient overflows "
        f"{fmt}: {underflow.largest_safe_scale:g}); there {underflow}"
    ]
    if underflow.total.flushed_fraction > 0.01:
        reasons.append(
            f"{underflow.total.flushed_fraction:.1%} of gradient elements flush even at the "
            "largest safe scale: bf16 would keep them, where the hardware has it"
        )
    return init_scale, underflow, reasons


def _check_advise_args(
    hardware: object, device: object, max_rounds: object, min_gain_db: object
) -> None:
    if hardware is not None and not isinstance(hardware, HardwareReport):
        raise TypeError(
            f"hardware must be a mixprec.hardware.HardwareReport, got "
            f"{type(hardware).__name__} {hardware!r}; or leave it None to probe {device!r}"
        )
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise ValueError(f"max_rounds must be an integer >= 1, got {max_rounds!r}")
    if isinstance(min_gain_db, bool) or not isinstance(min_gain_db, (int, float)):
        raise TypeError(
            f"min_gain_db must be a number of dB, got {type(min_gain_db).__name__} "
            f"{min_gain_db!r}; e.g. 1.0"
        )
    if not (0 <= min_gain_db < math.inf):
        raise ValueError(f"min_gain_db={min_gain_db!r} is out of range; valid range [0, inf)")


def advise(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[..., torch.Tensor],
    device: str | torch.device = "cpu",
    *,
    threshold_db: float = 20.0,
    hardware: HardwareReport | None = None,
    backend: Backend = "auto",
    max_rounds: int = 3,
    min_gain_db: float = 1.0,
) -> Advice:
    """Recommend a precision policy for ``model`` on ``device``, with the reasons.

    Args:
        model: the model, on the device where the check should run; it is deep-copied, its
            weights and gradients are left alone.
        batch: one representative batch: a tensor, a dict of keyword arguments (a Hugging Face
            batch, with ``loss_fn=lambda out: out.loss``) or ``(inputs, target)``; see
            :func:`~mixprec.diagnostics.layerwise.compare_layers`.
        loss_fn: ``loss_fn(output, target)`` (or ``loss_fn(output)`` without a target)
            returning a scalar.
        device: the device to train on, probed for its 16-bit units.
        threshold_db: per-layer SNR below which a module becomes an fp32 island, in (0, 150].
        hardware: a hardware report to use instead of probing ``device`` (e.g. to ask what a GPU
            without bf16 would need, from a laptop).
        backend: the autocast backend for the per-layer comparison here (``"auto"`` emulates
            16-bit GEMMs where this machine has no units for them).
        max_rounds: how many times islands are added and the comparison re-run.
        min_gain_db: an island is kept only if, re-measured with it applied, its module's SNR
            rises by more than this (>= 0).

    Returns:
        An :class:`Advice`; ``advice.policy`` goes straight into ``Policy.parse``.

    Raises:
        TypeError: bad argument types; a batch that is not a tensor, a dict or a pair; a
            batch without a target for a ``loss_fn`` that needs one.
        ValueError: a model without parameters; a threshold out of range; a non-scalar loss;
            an empty batch;
            a batch or parameters that already hold inf or NaN (bad data).
        Exception: the model's own error for a batch it cannot take, unchanged.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> batch = (torch.randn(4, 8), torch.tensor([0, 1, 0, 1]))
        >>> advice = advise(model, batch, nn.functional.cross_entropy, "cpu")
        >>> Policy.parse(advice.policy) == Policy.parse("bf16-mixed")
        True
    """
    check_model(model, "advise")
    check_loss_fn(loss_fn)
    threshold = check_threshold(threshold_db)
    _check_advise_args(hardware, device, max_rounds, min_gain_db)
    check_batch_for_loss(batch, loss_fn, "advise")
    check_nonempty_batch(batch, "advise")
    bad = nonfinite_inputs(model, batch)
    if bad:
        raise ValueError(
            f"bad data, not precision: {', '.join(bad)} already hold inf or NaN in fp32, before "
            "any 16-bit rounding; no precision policy can fix that. Fix the data pipeline or the "
            "weights (a NaN embedding row comes from the checkpoint or a diverged update)"
        )
    # 1. hardware; 2. activation ranges; 3. underflow; 4. per-layer comparison (design note).
    choice = recommend(hardware if hardware is not None else probe(device))
    reference = capture(model, batch, loss_fn, "fp32")
    ranges = _activation_ranges(reference)
    base, rules, range_reasons = _range_evidence(choice, ranges)
    init_scale, underflow, underflow_reasons = _underflow_evidence(choice, ranges, reference)
    comparison, kept, rejected, island_reasons = _justified_islands(
        model,
        batch,
        loss_fn,
        base,
        rules,
        threshold=threshold,
        loss_scale=init_scale if init_scale is not None else 1.0,
        backend=backend,
        reference=reference,
        max_rounds=max_rounds,
        min_gain_db=min_gain_db,
    )
    reasons = [f"hardware: {choice.reason}", *range_reasons, *underflow_reasons, *island_reasons]
    scored = [
        v
        for layer in comparison.layers
        for v in (layer.output_snr_db, layer.grad_input_snr_db)
        if v is not None
    ]
    if scored:
        reasons.append(
            f"per-layer check of the advised policy against fp32: worst SNR {min(scored):.1f} dB "
            f"(threshold {threshold:g} dB), loss {comparison.policy_loss:.4g} vs "
            f"{comparison.reference_loss:.4g}"
        )
    return Advice(
        policy=_policy_string(base, rules + kept),
        reasons=tuple(reasons),
        backend=choice.backend,
        init_scale=init_scale,
        fp16_ruled_out=ranges.over,
        activation_absmax=ranges.absmax,
        underflow=underflow,
        comparison=comparison,
        hardware=choice,
        rejected=tuple(map(_rule_text, rejected)),
    )


def _module_snr(comparison: LayerComparison, name: str) -> float | None:
    """The worst finite-or-inf SNR of the module's output and input/parameter gradients."""
    layer = next((layer for layer in comparison.layers if layer.name == name), None)
    if layer is None:
        return None
    snrs = (layer.output_snr_db, layer.grad_input_snr_db)
    known = [v for v in snrs if v is not None and not math.isnan(v)]
    return min(known) if known else None


def _justified_islands(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[..., torch.Tensor],
    base: str,
    rules: list[ModuleRule],
    *,
    threshold: float,
    loss_scale: float,
    backend: Backend,
    reference: Capture,
    max_rounds: int,
    min_gain_db: float,
) -> tuple[LayerComparison, list[ModuleRule], list[ModuleRule], list[str]]:
    """Step 4: add the islands the comparison proposes, keeping only those that measurably help.

    Each round compares the current policy against fp32, then re-measures with the proposed
    islands applied; an island stays only if its module's SNR (the worst of output and gradient)
    rises by more than ``min_gain_db``. A module whose error is rounding noise on a gradient that
    is zero in exact arithmetic (an attention key's bias) keeps the same SNR in fp32 and is
    dropped. Returns the final comparison, the kept and the dropped rules, and a reason per
    decision.
    """

    def compare(extra: list[ModuleRule]) -> LayerComparison:
        return compare_layers(
            model,
            batch,
            loss_fn,
            Policy.parse(_policy_string(base, rules + extra)),
            threshold_db=threshold,
            loss_scale=loss_scale,
            backend=backend,
            reference=reference,
        )

    kept: list[ModuleRule] = []
    rejected: list[ModuleRule] = []
    reasons: list[str] = []
    comparison = compare(kept)
    for round_ in range(max_rounds + 1):
        proposed = [_island(rule.split(" ->")[0]) for rule in comparison.proposed_rules]
        new = [r for r in proposed if r not in kept and r not in rejected]
        if not new:
            break
        if round_ == max_rounds:
            reasons.append(
                f"after {max_rounds} rounds these modules still fall below {threshold:g} dB: "
                f"{', '.join(r.pattern for r in new)}"
            )
            break
        trial = compare(kept + new)
        helped = []
        for rule in new:
            name = rule.pattern
            before, after = _module_snr(comparison, name), _module_snr(trial, name)
            change = f"SNR {before:.1f} dB without the island, {after:.1f} dB with it"
            if before is not None and after is not None and after > before + min_gain_db:
                helped.append(rule)
                reasons.append(
                    f"{name}: {change} (threshold {threshold:g} dB, under "
                    f"{comparison.policy}): fp32 island"
                )
            else:
                rejected.append(rule)
                reasons.append(
                    f"{name}: below {threshold:g} dB, but an fp32 island does not help ({change}; "
                    f"needs a gain above {min_gain_db:g} dB): not proposed"
                )
        if not helped:
            break
        kept.extend(helped)
        comparison = trial if len(helped) == len(new) else compare(kept)
    return comparison, kept, rejected, reasons
