"""What ``MixedPrecision`` checks and builds before training: device, policy, scaler, rules.

Pure functions of their arguments (no session state), so each is tested on its own and the
session's constructor only strings them together.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mixprec import _dist
from mixprec.compute import DEFAULT_ISLAND_RULES
from mixprec.distributed import would_recast
from mixprec.distributed.agree import check_same_settings
from mixprec.formats import FP32
from mixprec.optim import (
    KahanOptimizer,
    MasterWeightOptimizer,
    StochasticRoundingOptimizer,
    WrappedOptimizer,
)
from mixprec.policy import ModuleRule, Policy
from mixprec.scaling import GradScaler
from mixprec.session.owned import OwnedParams

# (WrappedOptimizer itself: the states-only wrapper of mixprec.session.optimizer_states)
WRAPPERS = (MasterWeightOptimizer, StochasticRoundingOptimizer, KahanOptimizer, WrappedOptimizer)
"""The optimizer wrappers :meth:`~mixprec.MixedPrecision.prepare` may return."""

__all__ = [
    "WRAPPERS",
    "check_ddp_order",
    "check_device",
    "check_has_work",
    "check_implemented",
    "check_master_remainder",
    "check_not_replaced",
    "check_owned",
    "check_ranks_agree",
    "check_session_args",
    "check_shard_order",
    "check_steppable",
    "check_update_mode",
    "declared_policy",
    "default_device",
    "distributed",
    "fp32_attribute_rules",
    "make_scaler",
    "needs_loss_scaling",
    "params_of",
    "plain_loop_loses",
    "warn_unmatched_rules",
    "with_default_islands",
]


def distributed() -> bool:
    """Whether a ``torch.distributed`` process group is up."""
    return _dist.initialized()


def needs_loss_scaling(policy: Policy) -> bool:
    """Whether training under ``policy`` needs loss scaling (dynamic) or none.

    Gradients underflow in formats with a narrow exponent range: fp16 flushes magnitudes below
    2^-24 to zero, fp8 sooner. A format narrower than fp32's 8 exponent bits anywhere a gradient
    lives — the parameters, the compute, the outputs or the reduction, of the base policy or of
    any per-module rule — needs the loss scaled. bf16 and tf32 share fp32's range and need none.
    The master format holds no gradients and does not count.

    Example:
        >>> needs_loss_scaling(Policy.parse("bf16-mixed"))
        False
        >>> needs_loss_scaling(Policy.parse("bf16-mixed; lm_head -> fp16-mixed"))
        True
    """
    policies = (policy, *(rule.policy for rule in policy.rules))
    return any(
        fmt.exponent_bits < FP32.exponent_bits
        for p in policies
        for fmt in (p.param, p.compute, p.output, p.reduce)
    )


def fp32_attribute_rules(model: nn.Module, attributes: Sequence[str]) -> tuple[ModuleRule, ...]:
    """FP32 rules for the modules that ``model``'s submodules declare fp32 by an attribute.

    A module with such an attribute (e.g. Hugging Face's ``_keep_in_fp32_modules = ["wo"]``)
    lists name patterns; as in ``transformers``, a pattern names every submodule of that module
    one of whose dotted name parts equals it (``wo`` names ``encoder.block.0.layer.1.
    DenseReluDense.wo`` and what is inside it). Each match becomes a rule by its full name.

    Raises:
        TypeError: the attribute holds something other than a list of strings.
        ValueError: a pattern names no submodule (the message lists some module names).

    Example:
        >>> class Net(nn.Sequential):
        ...     _keep_in_fp32_modules = ["head"]
        >>> net = Net()
        >>> net.add_module("head", nn.Linear(2, 2))
        >>> [rule.pattern for rule in fp32_attribute_rules(net, ("_keep_in_fp32_modules",))]
        ['head']
    """
    names: dict[str, None] = {}
    for prefix, owner in model.named_modules():
        for attribute in attributes:
            patterns = getattr(owner, attribute, None)
            if patterns is None:
                continue
            if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
                raise TypeError(
                    f"{type(owner).__name__}.{attribute} must list module name patterns "
                    f"(strings), got {patterns!r}"
                )
            inner = [name for name, _ in owner.named_modules() if name]
            for pattern in patterns:
                found = [name for name in inner if pattern in name.split(".")]
                if not found:
                    raise ValueError(
                        f"{type(owner).__name__}.{attribute} names {pattern!r}, which matches no "
                        f"submodule of {prefix or 'the model'!r} (submodules include "
                        f"{inner[:6]!r}); fix the pattern, or leave {attribute!r} out of "
                        "fp32_attributes"
                    )
                for name in found:
                    names[f"{prefix}.{name}" if prefix else name] = None
    return tuple(ModuleRule(name, Policy()) for name in names)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, once it is known to exist on this machine.

    Raises:
        RuntimeError: an unparsable device, or a CUDA/MPS device this machine does not have.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch build has no CUDA"
                if torch.version.cuda is None
                else "no CUDA GPU is visible"
            )
            raise RuntimeError(
                f"device {str(dev)!r} is not available: {why}; train on 'cpu' instead"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise RuntimeError(
                f"device {str(dev)!r} does not exist: this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device {str(dev)!r} is not available on this machine; use 'cpu'")
    return dev


def check_implemented(policy: Policy) -> None:
    """Refuse what a policy can say but the session would silently not do.

    Raises:
        ValueError: tf32 anywhere (it has no storage dtype and the session does not switch
            CUDA's TF32 matmul mode), or an fp8 gradient-reduction format (no backend sums fp8;
            16- and 32-bit reduce formats are applied by :meth:`MixedPrecision.ddp` and
            :meth:`MixedPrecision.fully_shard`).
    """
    for p in (policy, *(rule.policy for rule in policy.rules)):
        formats = {"params": p.param, "compute": p.compute, "output": p.output, "master": p.master}
        for role, fmt in formats.items():
            if fmt.name == "tf32":
                raise ValueError(
                    f"policy {str(policy)!r} has {role}=tf32, which MixedPrecision does not "
                    "implement (tf32 is not a storage dtype, and the session does not change "
                    "CUDA's TF32 matmul mode); use fp32 and set "
                    "torch.backends.cuda.matmul.allow_tf32 = True yourself, or bf16"
                )
        if p.reduce.bits < 16:
            raise ValueError(
                f"policy {str(policy)!r} reduces gradients in {p.reduce}, which MixedPrecision "
                "does not implement: no torch.distributed backend sums fp8; use reduce=bf16 or "
                "reduce=fp32 (applied by mp.ddp and mp.fully_shard)"
            )


def make_scaler(
    policy: Policy, device: torch.device, options: Mapping[str, Any] | None
) -> GradScaler:
    """Dynamic loss scaling where :func:`needs_loss_scaling` says so; the off mode otherwise."""
    options = dict(options or {})
    if needs_loss_scaling(policy):
        return GradScaler(device.type, **options)
    if options:
        raise ValueError(
            f"scaler_options {options!r} were given, but policy {str(policy)!r} has no fp16 or "
            "fp8 and uses no loss scaling; drop scaler_options or use an fp16 policy"
        )
    return GradScaler(device.type, strategy="none")


def params_of(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def check_owned(optimizer: torch.optim.Optimizer, owned: set[int], what: str) -> None:
    """Refuse an optimizer with parameters outside ``owned`` (ids of the model's parameters)."""
    foreign = [p for p in params_of(optimizer) if id(p) not in owned]
    if foreign:
        shapes = [tuple(p.shape) for p in foreign[:3]]
        raise RuntimeError(
            f"{what} ({type(optimizer).__name__}) holds {len(foreign)} parameter(s) that are not "
            f"the model's (shapes {shapes}{' ...' if len(foreign) > 3 else ''}), so stepping it "
            "would not change the model; build it on this model's parameters, e.g. "
            "torch.optim.AdamW(model.parameters()), before mp.prepare(model, optimizer)"
        )


def warn_unmatched_rules(model: nn.Module, policy: Policy) -> None:
    """Warn, naming each, about ``policy``'s rules that match no module of ``model``.

    A misspelt rule (``lm_haed -> fp32``) would otherwise be ignored without a word, and the
    module it meant would train in the base policy's formats. A warning, not an error: one policy
    string may be shared by several models that do not all have every module.
    """
    modules = list(model.named_modules())
    for rule in policy.rules:
        if any(rule.matches(name, module) for name, module in modules):
            continue
        kind = "class names" if rule.kind == "class" else "module names"
        some = [name for name, _ in modules if name][:6]
        warnings.warn(
            f"policy rule {str(rule)!r} matches no module of {type(model).__name__}, so it "
            f"changes nothing; its pattern {rule.pattern!r} is matched against {kind} "
            f"(modules include {some!r}); fix the pattern or drop the rule",
            UserWarning,
            stacklevel=3,
        )


def check_not_replaced(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Refuse an optimizer whose parameters the model no longer holds (sharded after prepare).

    torch's ``fully_shard`` swaps every parameter of the modules it shards for a new DTensor
    parameter, so an optimizer built before it steps tensors the model no longer uses (and that
    never get a gradient).

    Raises:
        RuntimeError: naming the order that works.
    """
    owned = {id(p) for p in model.parameters()}
    gone = [p for p in params_of(optimizer) if id(p) not in owned]
    if not gone:
        return
    sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())
    cause = (
        "sharding (fully_shard) replaced them with DTensor parameters after prepare"
        if sharded
        else "the model's parameters were replaced after prepare"
    )
    raise RuntimeError(
        f"the {type(optimizer).__name__} holds {len(gone)} parameter(s) that the model no longer "
        f"has: {cause}, so stepping it would not train the model. Shard first, then build the "
        "optimizer and prepare: model = mp.fully_shard(model) (or torch's fully_shard(model)); "
        "opt = AdamW(model.parameters()); model, opt = mp.prepare(model, opt)"
    )


def check_has_work(optimizers: Sequence[torch.optim.Optimizer], micro_batches: int) -> None:
    """Refuse a step with nothing to apply: no backward since the last step, or no gradient.

    Raises:
        RuntimeError: naming the call order that works.
    """
    if micro_batches == 0:
        raise RuntimeError(
            "step was called without a backward since the last step, so there is nothing to "
            "apply; call mp.backward(loss) first (once per micro-batch when accumulating), "
            "and step all optimizers of an iteration in one call: mp.step(opt_a, opt_b)"
        )
    if not any(p.grad is not None for opt in optimizers for p in params_of(opt)):
        raise RuntimeError(
            "none of the optimizers' parameters has a gradient, so a step would change "
            "nothing; call mp.step(...) after mp.backward(loss) and before "
            "optimizer.zero_grad(), and check that the loss depends on these parameters"
        )


_UPDATE_NAMES = {
    "master": "fp32 master weights",
    "stochastic": "stochastic rounding",
    "kahan": "Kahan-compensated updates",
}


def plain_loop_loses(policy: Policy, scaled: bool, update: str) -> str | None:
    """What training a prepared model without the session's backward and step loses.

    Args:
        policy: the session's policy.
        scaled: whether the session scales the loss.
        update: the session's update mode of 16-bit parameters, "auto" resolved.

    Returns:
        ``"loss scaling"``, the update mode's name, both, or None when a plain loop (a plain
        ``loss.backward(); optimizer.step()``) does what the session would.
    """
    lost = ["loss scaling"] if scaled else []
    if any(p.param.bits <= 16 for p in (policy, *(rule.policy for rule in policy.rules))):
        if update in _UPDATE_NAMES:
            lost.append(_UPDATE_NAMES[update])
    return " and ".join(lost) or None


def check_steppable(
    optimizer: object,
    model: nn.Module | None,
    prepared: tuple[torch.optim.Optimizer, ...],
    owned: OwnedParams | None = None,
) -> None:
    """Refuse an optimizer whose step would not change the prepared model (``owned``: what
    the model was last seen to hold, which spares the walk over it while nothing changed)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"step takes torch.optim optimizers, got {type(optimizer).__name__} {optimizer!r}"
        )
    if model is None:
        return
    if any(optimizer is opt for opt in prepared):
        if owned is None or not owned.holds_all(model, params_of(optimizer)):
            check_not_replaced(optimizer, model)
        return
    for wrapper in prepared:
        if isinstance(wrapper, WrappedOptimizer) and wrapper.optimizer is optimizer:
            raise RuntimeError(
                f"step got the {type(optimizer).__name__} that prepare wrapped in a "
                f"{type(wrapper).__name__}; stepping it directly would leave the model "
                "unchanged. Step the optimizer prepare returned: "
                "model, optimizer = mp.prepare(model, optimizer)"
            )
    if owned is None or not owned.holds_all(model, params_of(optimizer)):
        check_owned(optimizer, {id(p) for p in model.parameters()}, "the optimizer")


def declared_policy(policy: Policy, model: nn.Module, fp32_attributes: Sequence[str]) -> Policy:
    """``policy`` with the user's rules, then the modules ``model`` declares fp32
    (:func:`fp32_attribute_rules`)."""
    kept = fp32_attribute_rules(model, fp32_attributes)
    return replace(policy, rules=policy.rules + kept)


def with_default_islands(policy: Policy) -> Policy:
    """``policy`` with the default FP32 islands (norms) after its rules: how params are stored."""
    return replace(policy, rules=policy.rules + DEFAULT_ISLAND_RULES)


def check_ddp_order(model: nn.Module, storage: Policy) -> None:
    """Refuse DDP before ``prepare``: a later recast would detach DDP's gradient hooks.

    Raises:
        RuntimeError: ``storage`` (how the policy stores parameters) still recasts some.
    """
    pending = would_recast(model, storage)
    if pending:
        raise RuntimeError(
            f"ddp was called before prepare: the policy still recasts {pending[:3]!r}, which "
            "would detach DDP's gradient hooks later. Call model, opt = mp.prepare(model, "
            "opt) first, then model = mp.ddp(model)"
        )


def check_shard_order(prepared: nn.Module | None, model: nn.Module) -> None:
    """Refuse sharding after ``prepare`` (``prepared``: the model prepare was given, if any).

    Raises:
        RuntimeError: sharding would replace the parameters the prepared optimizers hold.
    """
    if prepared is not None and not isinstance(model, DistributedDataParallel):
        # (a DDP model gets fully_shard's own error: it does not stack on DDP)
        raise RuntimeError(
            "fully_shard was called after prepare: sharding replaces the parameters, so the "
            "optimizers prepare wrapped would step the old ones. Shard first, then build the "
            "optimizer: model = mp.fully_shard(model); opt = AdamW(model.parameters()); "
            "model, opt = mp.prepare(model, opt)"
        )


def check_ranks_agree(policy: Policy, update: str, seed: int) -> None:
    """Under data parallelism every rank needs one policy and update mode (``update``, resolved),
    and stochastic rounding one seed (one collective; nothing outside a process group).

    Raises:
        ValueError: the ranks differ (naming the setting and the ranks).
    """
    policies = (policy, *(rule.policy for rule in policy.rules))
    stochastic = update == "stochastic" and any(p.param.bits <= 16 for p in policies)
    check_same_settings(str(policy), update, seed if stochastic else None)


def check_master_remainder(bits: object, update: str) -> int | None:
    """``MixedPrecision``'s ``master_remainder``: None, 16 or 8, and only with fp32 masters.

    Raises:
        ValueError: another value, or a remainder without the ``"master"`` update.
    """
    if bits is None:
        return None
    if isinstance(bits, bool) or bits not in (16, 8):
        raise ValueError(
            f"master_remainder must be None (full fp32 masters), 16 (exact, 2 B/param) or 8 "
            f"(24-bit masters, lossy), got {bits!r}"
        )
    if update != "master":
        raise ValueError(
            f"master_remainder={bits!r} compresses fp32 master weights, but the update is "
            f"{update!r}, which keeps none; use update='master' (or a policy with master=fp32 "
            "and update='auto'), or drop master_remainder"
        )
    return bits  # type: ignore[return-value]


def check_update_mode(update: object, modes: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``update`` is one of ``modes``."""
    if update not in modes:
        raise ValueError(
            f"unknown update mode {update!r}; valid modes: {', '.join(map(repr, modes))}"
        )


def check_session_args(
    flags: Mapping[str, object], fp32_attributes: object, metrics: object
) -> None:
    """Check the session's flags (bools), ``fp32_attributes`` (attribute names) and ``metrics``
    (a folder, or None).

    Raises:
        TypeError: a flag that is not a bool, names that are not a sequence of strings, a
            ``metrics`` that is no path.
        ValueError: a ``metrics`` path that names no folder (it would write nothing).
    """
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if isinstance(fp32_attributes, str) or not all(
        isinstance(a, str)
        for a in fp32_attributes  # type: ignore[attr-defined]
    ):
        raise TypeError(
            f"fp32_attributes must be a sequence of attribute names, got {fp32_attributes!r}; "
            "e.g. fp32_attributes=('_keep_in_fp32_modules',)"
        )
    if metrics is not None and not isinstance(metrics, (str, os.PathLike)):
        raise TypeError(f"metrics must be a folder path or None, got {metrics!r}")
    if metrics is not None and not os.fspath(metrics).strip():
        raise ValueError(
            f"metrics={metrics!r} names no folder, so no metrics would be written; give a "
            "folder, e.g. metrics='runs/exp1', or metrics=None to write none"
        )
