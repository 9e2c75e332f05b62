"""``MixedPrecision``: the one object a training loop needs, the same five lines for every policy.

Design note: the session owns no math. ``prepare`` applies the policy with the lower layers —
:func:`~mixprec.optim.cast_module` (params in the policy's format, FP32 islands kept fp32),
:func:`~mixprec.compute.fp32_islands` (norms and losses computed in fp32), an optimizer wrapper
chosen by where the update happens (fp32 master weights, stochastic rounding, Kahan, or plain
round-to-nearest), and a :class:`~mixprec.scaling.GradScaler` whose strategy follows every format
the policy and its rules use (:func:`needs_loss_scaling`: dynamic when any is fp16 or fp8, none
for bf16/fp32; the off mode has the same interface). After ``prepare`` every call of the model
runs under the policy's autocast region and returns its outputs in the policy's ``output`` format:
a forward pre-hook enters the region and an always-called forward hook leaves it, so eval loops,
``no_grad`` and ``generate`` need no ``with`` block (``wrap_forward=False`` opts out; an explicit
``mp.autocast()`` around the call stays harmless). ``step`` then runs
unscale -> clip -> skip-or-step -> master write-back -> scale update and reports what happened.
Floating buffers keep their dtype (``cast_buffers=True`` casts them), and the modules a model
declares fp32 (Hugging Face's ``_keep_in_fp32_modules``) are stored and computed in fp32.

    mp = MixedPrecision("bf16-mixed")
    model, optimizer = mp.prepare(model, optimizer)
    for x, y in data:
        loss = loss_fn(model(x), y)  # the forward runs under the policy
        mp.backward(loss)
        mp.step(optimizer, max_grad_norm=1.0)
        optimizer.zero_grad()
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mixprec._state_checks import (
    check_model_state,
    check_optimizer_states,
    check_rng_state,
    load_optimizers,
)
from mixprec.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mixprec.compute import DEFAULT_ISLAND_RULES, apply_fp8_policy, autocast, fp32_islands
from mixprec.compute.fp8_convert import Fp8Conversion
from mixprec.diagnostics import (
    MetricsWriter,
    NonFiniteTracer,
    UnderflowReport,
    nonfinite_grads,
    underflow_report,
)
from mixprec.diagnostics.metrics import group_mean, rank_metrics_file
from mixprec.distributed import ReplicaCheck, check_prepare_order, check_replicas, ddp, would_recast
from mixprec.distributed._agree import check_same_seed
from mixprec.distributed.replicas import check_replicas_every_arg
from mixprec.formats import FP32
from mixprec.hardware import auto_policy
from mixprec.optim import (
    KahanOptimizer,
    MasterWeightOptimizer,
    StochasticRoundingOptimizer,
    cast_module,
)
from mixprec.policy import ModuleRule, Policy, cast_floating
from mixprec.scaling import GradScaler
from mixprec.scaling._checks import parse_state_dict
from mixprec.scaling._distributed import agreement_groups

__all__ = [
    "MixedPrecision",
    "StepReport",
    "UpdateMode",
    "fp32_attribute_rules",
    "needs_loss_scaling",
]

UpdateMode = Literal["auto", "master", "stochastic", "kahan", "nearest"]
_UPDATE_MODES: tuple[str, ...] = get_args(UpdateMode)
_STATE_VERSION = 1
_WRAPPERS = (MasterWeightOptimizer, StochasticRoundingOptimizer, KahanOptimizer)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)  # outputs the policy recasts; fp64 stays


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


@dataclass(frozen=True)
class StepReport:
    """What one :meth:`MixedPrecision.step` did.

    Attributes:
        step: the index of this step (0 for the first; continues after a resume).
        stepped: False if the step was skipped because gradients were not finite.
        scale: the loss scale the gradients were computed with (1.0 without scaling).
        grad_norm: the unscaled global gradient norm when clipping was asked for, else None.
        loss: the (unscaled) losses passed to :meth:`MixedPrecision.backward` since the previous
            step, summed: under gradient accumulation, the loss of the whole step as the user
            wrote it (with each micro-batch's loss divided by their number, the mean).
        seconds: wall time from the iteration's first ``autocast()`` to the end of ``step``.
        nonfinite_params: on a skipped step, the parameters whose gradients were inf/NaN.
        origin: with ``trace=True``, where the first inf/NaN appeared (module and phase).
        underflow: with ``track_underflow=True``, the fp16 underflow account of the gradients.
        micro_batches: how many :meth:`MixedPrecision.backward` calls this step applied.
    """

    step: int
    stepped: bool
    scale: float
    grad_norm: float | None = None
    loss: float | None = None
    seconds: float | None = None
    nonfinite_params: tuple[str, ...] = ()
    origin: str | None = None
    underflow: UnderflowReport | None = field(default=None, repr=False)
    micro_batches: int = 1


class MixedPrecision:
    """Apply a precision policy to a model, its optimizers and its training loop.

    Args:
        policy: ``"auto"`` (chosen from the device's hardware, see :attr:`reason`), a preset
            (``"fp32"``, ``"bf16-mixed"``, ``"fp16-mixed"``, ``"bf16-pure"``), a policy string,
            or a :class:`~mixprec.Policy`.
        device: where the model trains (default: cuda if available, else cpu).
        backend: autocast backend, ``"auto"``, ``"native"`` or ``"emulated"``.
        update: where 16-bit parameters are updated: ``"master"`` (fp32 master weights),
            ``"stochastic"`` (stochastic rounding, no master), ``"kahan"`` (16-bit compensation
            buffers), ``"nearest"`` (round to nearest: the plain 16-bit update, which stalls when
            updates fall below half an ulp) or ``"auto"`` (master when the policy's master format
            differs from its param format, else stochastic).
        seed: seed of the stochastic-rounding generators.
        scaler_options: extra :class:`~mixprec.scaling.GradScaler` arguments for fp16 runs
            (``init_scale``, ``growth_interval``, ``hysteresis``, ``min_scale`` ...).
        trace: name the module where an inf/NaN first appears, forward or backward (hooks are
            registered only when True).
        track_underflow: account, every step, for gradient elements that fp16 would flush to
            zero, keep as subnormals or overflow at the current scale (a pass over the
            gradients).
        metrics: a folder to append one JSON line per step to (``metrics.jsonl``): loss, loss
            scale, skipped, grad norm, step time, non-finite parameters, underflow fractions.
            Under a process group, a DDP or FSDP2 model's first rank writes it with the loss
            averaged over the ranks (every rank must step); a model local to its rank writes
            ``metrics.rank<r>.jsonl``.
        tensorboard: also write the metrics as TensorBoard scalars (needs ``tensorboard``).
        wrap_forward: after :meth:`prepare`, every call of the model runs under the policy's
            autocast region and returns its floating outputs in the policy's ``output`` format,
            with no ``with`` block (training, eval, ``no_grad``, HF ``generate``). ``False``
            leaves the model's calls as they are: enter :meth:`autocast` yourself.
        cast_buffers: also cast floating buffers to the param format. By default buffers keep
            their dtype under every policy (rotary ``inv_freq``, running statistics).
        fp32_attributes: names of module attributes that list module name patterns to keep in
            fp32 (params stored in fp32, compute in fp32), as Hugging Face models do with
            ``_keep_in_fp32_modules`` (T5's ``wo``). A pattern matches a submodule of the module
            that declares it when it equals one of the submodule name's dotted parts.
        check_replicas_every: every this many steps, :meth:`step` compares the prepared
            model's replicated parameters across the ranks (:meth:`check_replicas`: one
            all-gather of two hash numbers per parameter) and raises when they differ. None
            (the default) never checks; outside a process group there is nothing to compare.

    Raises:
        ValueError: an unknown update mode or policy; a policy the session does not implement
            (tf32 anywhere, a reduce format other than the params'); ``scaler_options`` for a
            policy without loss scaling.
        RuntimeError: ``device`` does not exist on this machine (e.g. cuda without CUDA).
        TypeError: ``trace``, ``track_underflow``, ``wrap_forward`` or ``cast_buffers`` is not
            a bool, ``fp32_attributes`` is not a sequence of strings, or
            ``check_replicas_every`` is neither None nor an int (below 1: ValueError).

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> mp = MixedPrecision("bf16-pure", device="cpu", backend="emulated")
        >>> model, optimizer = mp.prepare(model, optimizer)
        >>> loss = model(torch.randn(4, 8)).float().pow(2).mean()  # runs under the policy
        >>> mp.backward(loss)
        >>> mp.step(optimizer).stepped
        True
    """

    def __init__(
        self,
        policy: str | Policy = "auto",
        device: str | torch.device | None = None,
        *,
        backend: str = "auto",
        update: UpdateMode = "auto",
        seed: int = 0,
        scaler_options: Mapping[str, Any] | None = None,
        trace: bool = False,
        track_underflow: bool = False,
        metrics: str | os.PathLike[str] | None = None,
        tensorboard: bool = False,
        wrap_forward: bool = True,
        cast_buffers: bool = False,
        fp32_attributes: Sequence[str] = ("_keep_in_fp32_modules",),
        check_replicas_every: int | None = None,
    ) -> None:
        self.device = _check_device(device if device is not None else _default_device())
        if update not in _UPDATE_MODES:
            raise ValueError(
                f"unknown update mode {update!r}; valid modes: "
                f"{', '.join(map(repr, _UPDATE_MODES))}"
            )
        if isinstance(policy, str) and policy.strip().lower() == "auto":
            choice = auto_policy(self.device)
            self.policy, self.reason = choice.policy, choice.reason
            backend = choice.backend if backend == "auto" else backend
        else:
            self.policy = Policy.parse(policy)
            self.reason = "chosen by the user"
        _check_implemented(self.policy)
        self.update = update
        self.seed = seed
        compute = self.policy.compute
        low_compute = compute.bits <= 16
        region = autocast(
            self.device.type,
            dtype=compute.dtype if low_compute else None,
            enabled=low_compute,
            backend=backend,  # type: ignore[arg-type]
        )
        self.backend = region.backend
        self._region_args: dict[str, Any] = {
            "device_type": region.device_type,
            "dtype": region.dtype,
            "enabled": region.enabled,
            "backend": region.backend,  # resolved once: "auto" probes only here
        }
        self.scaler = _make_scaler(self.policy, self.device, scaler_options)
        flags = {
            "trace": trace,
            "track_underflow": track_underflow,
            "wrap_forward": wrap_forward,
            "cast_buffers": cast_buffers,
        }
        for name, flag in flags.items():
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        if isinstance(fp32_attributes, str) or not all(isinstance(a, str) for a in fp32_attributes):
            raise TypeError(
                f"fp32_attributes must be a sequence of attribute names, got {fp32_attributes!r}; "
                "e.g. fp32_attributes=('_keep_in_fp32_modules',)"
            )
        self._check_every = check_replicas_every_arg(check_replicas_every)
        self._wrap_forward = wrap_forward
        self._cast_buffers = cast_buffers
        self._fp32_attributes = tuple(fp32_attributes)
        self._forward_hooks: list[Any] = []
        self._trace = trace
        self._track_underflow = track_underflow
        # Under a process group the file depends on the model's ranks: opened at the first step.
        self._metrics = (metrics, tensorboard) if metrics else None
        self._writer = None if not metrics or _distributed() else self._open_metrics(metrics)
        self._tracer: NonFiniteTracer | None = None
        self._model: nn.Module | None = None
        self._steps = 0
        self._islands: Any = None
        self.fp8: Fp8Conversion | None = None  # after prepare: the linear layers put in FP8
        self._loss_sum: torch.Tensor | None = None  # what backward was given since the last step
        self._micro_batches = 0
        self._optimizers: tuple[torch.optim.Optimizer, ...] = ()
        self._started: float | None = None

    # -- setup ------------------------------------------------------------------------------

    def prepare(self, model: nn.Module, *optimizers: torch.optim.Optimizer) -> Any:
        """Apply the policy: move and cast ``model``, add FP32 islands, wrap ``optimizers``.

        Build the optimizers on ``model.parameters()`` before calling this; the parameters are
        cast in place, so the optimizers keep pointing at them. From then on, step the optimizers
        this returns: a wrapper keeps the update (fp32 masters, compensation), and stepping the
        optimizer it wraps would leave the model unchanged.

        Returns:
            ``model`` alone, or ``(model, *wrapped_optimizers)``.

        Raises:
            TypeError: ``model`` is not an ``nn.Module`` or an optimizer is not one.
            RuntimeError: ``prepare`` was already called on this session, or an optimizer holds
                parameters that are not ``model``'s (stepping it would not train the model).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"prepare needs an nn.Module, got {type(model).__name__} {model!r}")
        for opt in optimizers:
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(
                    f"prepare takes torch.optim optimizers, got {type(opt).__name__} {opt!r}"
                )
        if self._islands is not None:
            raise RuntimeError("this MixedPrecision session is already prepared; make a new one")
        owned = {id(p) for p in model.parameters()}
        for index, opt in enumerate(optimizers):
            _check_owned(opt, owned, f"optimizer {index} given to prepare")
        storage = self._storage_policy(model)  # raises for a keep-in-fp32 name that matches none
        check_prepare_order(model, storage)
        model.to(self.device)
        cast_module(model, storage, buffers=self._cast_buffers)
        kept = fp32_attribute_rules(model, self._fp32_attributes)
        if self.fp8 is None:  # mp.fully_shard converts before it shards
            self._convert_fp8(model)
        self._islands = fp32_islands(model, replace(self.policy, rules=self.policy.rules + kept))
        self._model = model
        if self._wrap_forward and self._region_args["enabled"]:
            self._forward_hooks = self._hook_forward(model)
        if self._trace:
            self._tracer = NonFiniteTracer(model).attach()
        wrapped = tuple(self.wrap(opt) for opt in optimizers)
        self._optimizers = wrapped
        return (model, *wrapped) if wrapped else model

    def _hook_forward(self, model: nn.Module) -> list[Any]:
        """Run every call of ``model`` under the policy's region, outputs in its output format.

        A forward pre-hook enters the session's region and a forward hook registered with
        ``always_call=True`` leaves it (also when ``forward`` raises), then casts the floating
        outputs. Entering a region inside an open one with the same settings changes nothing, so
        an explicit ``with mp.autocast():`` around the call is harmless.
        """
        region = autocast(**self._region_args)
        output_dtype = self.policy.output.dtype
        depth: list[int] = []  # calls entered and not yet left: a model may call itself

        @torch._dynamo.disable  # region entry is eager (torch.compile sees its autocast state)
        def enter() -> None:
            if self._started is None:
                self._started = time.perf_counter()
            region.__enter__()
            depth.append(1)

        @torch._dynamo.disable
        def leave() -> bool:
            if not depth:  # an earlier pre-hook raised before ours ran
                return False
            depth.pop()
            region.__exit__(None, None, None)
            return True

        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            enter()

        def post_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if not leave() or output is None:
                return None
            return cast_floating(output, output_dtype, _FLOATS)

        return [
            model.register_forward_pre_hook(pre_hook, prepend=True),
            model.register_forward_hook(post_hook, always_call=True),
        ]

    def wrap(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The optimizer wrapped where the policy's update happens (what ``prepare`` returns for
        it): fp32 master weights, stochastic rounding, Kahan, or itself for fp32 parameters and
        round-to-nearest; for optimizers built after ``prepare``, as frameworks build theirs."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if not any(p.dtype in (torch.float16, torch.bfloat16) for p in params):
            return optimizer  # fp32 (and complex) parameters: the optimizer updates them itself
        mode = self._update_mode()
        if mode == "master":
            return MasterWeightOptimizer(optimizer)
        if mode == "stochastic":
            return StochasticRoundingOptimizer(optimizer, seed=self.seed)
        if mode == "kahan":
            return KahanOptimizer(optimizer)
        return optimizer  # nearest: the optimizer updates the 16-bit parameters itself

    def _convert_fp8(self, model: nn.Module) -> None:
        """Swap the linear layers the policy puts in FP8 for Fp8Linear (same parameters, so
        optimizers keep working); nothing without an fp8 rule."""
        if any(p.fp8 for p in (self.policy, *(rule.policy for rule in self.policy.rules))):
            kept = fp32_attribute_rules(model, self._fp32_attributes)
            self.fp8 = apply_fp8_policy(model, replace(self.policy, rules=self.policy.rules + kept))

    def _update_mode(self) -> str:
        """The update mode of 16-bit parameters, "auto" resolved."""
        if self.update == "auto":
            return "master" if self.policy.master == FP32 != self.policy.param else "stochastic"
        return self.update

    def _check_seed_agrees(self) -> None:
        """Under data parallelism, stochastic rounding needs one seed on every rank."""
        policies = (self.policy, *(rule.policy for rule in self.policy.rules))
        if self._update_mode() == "stochastic" and any(p.param.bits <= 16 for p in policies):
            check_same_seed(self.seed)

    def _fp8_metrics(self) -> dict[str, float]:
        return _delayed_fp8_state(self._model) if self.fp8 is not None else {}

    def autocast(self) -> autocast:
        """The autocast region for the forward pass (disabled when the policy computes in fp32)."""
        if self._started is None:  # the iteration's clock starts at its first forward
            self._started = time.perf_counter()
        return autocast(**self._region_args)

    # -- the loop ---------------------------------------------------------------------------

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` on the scaled loss (the plain loss when no scaling is used).

        Under gradient accumulation call it once per micro-batch; the next :meth:`step` reports
        the sum of the losses given here since the previous step, and how many there were.
        """
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"backward needs the loss tensor, got {type(loss).__name__} {loss!r}")
        self.scaler.scale(loss).backward()
        value = loss.detach().float()  # stays a tensor: no device sync per micro-batch
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._micro_batches += 1

    def step(
        self, *optimizers: torch.optim.Optimizer, max_grad_norm: float | None = None
    ) -> StepReport:
        """Unscale, clip, step (or skip on inf/NaN), update the scale; report what happened.

        Args:
            optimizers: the optimizers :meth:`prepare` returned; at least one.
            max_grad_norm: clip each optimizer's gradients to this global norm (unscaled).

        Raises:
            ValueError: no optimizer, or a bad ``max_grad_norm``.
            TypeError: an argument is not a torch optimizer.
            RuntimeError: no :meth:`backward` since the last step; no parameter of the optimizers
                has a gradient; or an optimizer would not change the prepared model (one that
                ``prepare`` wrapped, or one over other parameters); with
                ``check_replicas_every``, on a checked step whose replicas differ across ranks
                (the step itself was taken and logged).
        """
        if not optimizers:
            raise ValueError("step needs at least one optimizer, e.g. mp.step(optimizer)")
        if max_grad_norm is not None and not (
            isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0
        ):
            raise ValueError(f"max_grad_norm must be a positive number, got {max_grad_norm!r}")
        for opt in optimizers:
            self._check_steppable(opt)
        if self._micro_batches == 0:
            raise RuntimeError(
                "step was called without a backward since the last step, so there is nothing to "
                "apply; call mp.backward(loss) first (once per micro-batch when accumulating), "
                "and step all optimizers of an iteration in one call: mp.step(opt_a, opt_b)"
            )
        if not any(p.grad is not None for opt in optimizers for p in _params_of(opt)):
            raise RuntimeError(
                "none of the optimizers' parameters has a gradient, so a step would change "
                "nothing; call mp.step(...) after mp.backward(loss) and before "
                "optimizer.zero_grad(), and check that the loss depends on these parameters"
            )
        scaling = self.scaler.is_enabled() and self.scaler.strategy != "none"
        scale = self.scaler.get_scale() if scaling else 1.0
        underflow = None
        if self._track_underflow and self._model is not None:
            underflow = underflow_report(self._model, scale, "fp16", scaled=scaling)
        norms = []
        for optimizer in optimizers:
            if max_grad_norm is not None:
                norms.append(self.scaler.clip_grad_norm_(optimizer, max_grad_norm))
            self.scaler.step(optimizer)
        self.scaler.update()
        stepped = not self.scaler.step_skipped()
        report = StepReport(
            step=self._steps,
            stepped=stepped,
            scale=float(scale),
            grad_norm=math.sqrt(sum(float(n) ** 2 for n in norms)) if norms else None,
            loss=None if self._loss_sum is None else float(self._loss_sum),
            micro_batches=self._micro_batches,
            seconds=None if self._started is None else time.perf_counter() - self._started,
            nonfinite_params=() if stepped or self._model is None else _nonfinite(self._model),
            origin=self._tracer.summary() if self._tracer and self._tracer.first else None,
            underflow=underflow,
        )
        self._steps += 1
        self._loss_sum, self._micro_batches, self._started = None, 0, None
        if self._tracer is not None:
            self._tracer.reset()
        if self._metrics is not None:
            self._log(report, optimizers)
        if self._check_every and self._model is not None and self._steps % self._check_every == 0:
            self.check_replicas(self._model).raise_if_differ()  # after the step is logged
        return report

    def _open_metrics(self, folder: Any, filename: str = "metrics.jsonl") -> MetricsWriter:
        tensorboard = self._metrics is not None and self._metrics[1]
        return MetricsWriter(folder, tensorboard=tensorboard, filename=filename)

    def _log(self, report: StepReport, optimizers: tuple[torch.optim.Optimizer, ...]) -> None:
        """One metrics line; under a process group, the loss averaged over the model's ranks,
        written by the first of them (see :func:`mixprec.diagnostics.metrics.rank_metrics_file`)."""
        values = {**_metrics_of(report), **self._fp8_metrics()}
        if _distributed():
            params = (
                self._model.parameters()
                if self._model is not None
                else (p for opt in optimizers for p in _params_of(opt))
            )
            groups = agreement_groups(params, "auto")
            if report.loss is not None:
                values["loss"] = group_mean(report.loss, groups, self.device)
            if self._writer is None and self._metrics is not None:
                filename = rank_metrics_file(groups)
                if filename is None:
                    return
                self._writer = self._open_metrics(self._metrics[0], filename)
        if self._writer is not None:
            self._writer.log(report.step, values)

    def _check_steppable(self, optimizer: object) -> None:
        """Refuse an optimizer whose step would not change the prepared model."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"step takes torch.optim optimizers, got {type(optimizer).__name__} {optimizer!r}"
            )
        if self._model is None or any(optimizer is opt for opt in self._optimizers):
            return
        for wrapper in self._optimizers:
            if isinstance(wrapper, _WRAPPERS) and wrapper.optimizer is optimizer:
                raise RuntimeError(
                    f"step got the {type(optimizer).__name__} that prepare wrapped in a "
                    f"{type(wrapper).__name__}; stepping it directly would leave the model "
                    "unchanged. Step the optimizer prepare returned: "
                    "model, optimizer = mp.prepare(model, optimizer)"
                )
        _check_owned(optimizer, {id(p) for p in self._model.parameters()}, "the optimizer")

    def close(self) -> None:
        """Detach the tracer and close the metrics file (also the end of a ``with`` block)."""
        if self._tracer is not None:
            self._tracer.detach()
            self._tracer = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._metrics = None

    def __enter__(self) -> MixedPrecision:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything precision-related a resumed run needs: the loss scaler, the step count and
        the state of the optimizers :meth:`prepare` returned (their fp32 masters, compensation
        buffers or stochastic-rounding generators, with the inner optimizer's state)."""
        return {
            **self._session_state(),
            "optimizers": [opt.state_dict() for opt in self._optimizers],
        }

    def _session_state(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "policy": str(self.policy),
            "update": self.update,
            "steps": self._steps,
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; all of it is checked before anything is loaded.

        Raises:
            ValueError: the state comes from another policy or update mode, holds another number
                of optimizers than :meth:`prepare` was given, a bad scaler state, step count or
                optimizer state, or is not a session state at all. Nothing was loaded then.
        """
        self._check_session_state(state)
        optimizer_states = state.get("optimizers")
        if optimizer_states is not None:  # absent in checkpoints, which store them beside
            check_optimizer_states(self._optimizers, optimizer_states)
            load_optimizers(self._optimizers, optimizer_states)
        self._load_session_state(state)

    def _check_session_state(self, state: object, strict: bool = True) -> bool:
        """Raise ValueError unless ``state`` is a session state this session can load.

        Returns whether its loss-scaler state is loaded: with ``strict=False`` a state of
        another policy is accepted (the caller checks the weights' formats), and its scaler
        state is loaded only where this session's scaler takes it (fp16 -> fp16 policies); a
        session that scales where the saved one did not starts from its initial scale.
        """
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"not a MixedPrecision state (version {_STATE_VERSION} expected), got keys "
                f"{sorted(map(str, state)) if isinstance(state, Mapping) else type(state).__name__}"
            )
        missing = [key for key in ("policy", "update", "steps", "scaler") if key not in state]
        if missing:
            raise ValueError(
                f"the MixedPrecision state lacks {missing!r} (keys present: "
                f"{sorted(map(str, state))!r}); save it with MixedPrecision.state_dict()"
            )
        try:
            same_policy = Policy.parse(state["policy"]) == self.policy
        except (TypeError, ValueError):
            same_policy = False
        if (strict and not same_policy) or state["update"] != self.update:
            raise ValueError(
                f"the state was saved with policy {state['policy']!r} and update "
                f"{state['update']!r}; this session uses {str(self.policy)!r} and {self.update!r}"
                + (
                    ""
                    if state["update"] != self.update
                    else "; pass strict=False to load it where the weights' stored formats are "
                    "the same (e.g. bf16-mixed and fp16-mixed both keep fp32 weights)"
                )
            )
        steps = state["steps"]
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"the state's step count must be an int >= 0, got {steps!r}")
        optimizer_states = state.get("optimizers")
        if optimizer_states is not None and (
            not isinstance(optimizer_states, list) or len(optimizer_states) != len(self._optimizers)
        ):
            count = len(optimizer_states) if isinstance(optimizer_states, list) else "no list of"
            raise ValueError(
                f"the state holds {count} optimizer states; this session prepared "
                f"{len(self._optimizers)} optimizers"
            )
        if not same_policy and needs_loss_scaling(Policy.parse(state["policy"])) != (
            needs_loss_scaling(self.policy)
        ):
            return False  # one of the two runs scales and the other does not: nothing to carry
        if self.scaler.is_enabled():
            try:  # the scaler's own check, run without loading
                parse_state_dict(state["scaler"], self.scaler.rule, self.scaler.strategy)
            except (TypeError, ValueError) as err:
                raise ValueError(f"the state's loss scaler state is refused: {err}") from None
        return True

    def _load_session_state(self, state: Mapping[str, Any], scaler: bool = True) -> None:
        if scaler:
            self.scaler.load_state_dict(state["scaler"])
        self._steps = state["steps"]

    def save(
        self,
        path: str | os.PathLike[str],
        model: nn.Module,
        *optimizers: torch.optim.Optimizer,
        **extra: Any,
    ) -> None:
        """Write model, optimizers, session and RNG state and ``extra`` to ``path`` atomically.

        Under a process group (or when ``path`` is an existing folder) this writes a sharded,
        re-shardable checkpoint folder instead, each rank its own shards and RNG state
        (:mod:`mixprec.distributed.checkpoint`; a collective: every rank calls it); :meth:`load`
        reads either kind, a folder as sharded.

        Args:
            path: the checkpoint file.
            model: the prepared model.
            optimizers: the optimizers :meth:`prepare` returned.
            extra: plain values to keep beside (step, config...): numbers, strings, tensors and
                lists/dicts of them, anything ``torch.load(weights_only=True)`` reads back.

        Raises:
            TypeError: an ``extra`` value (or a state entry) that ``weights_only`` loading
                refuses, such as a numpy scalar or a ``Path``: nothing is written, and a
                previous checkpoint at ``path`` stays as it was.
        """
        model = _uncompiled(model)
        if _saves_sharded(path):
            state = {"mixed_precision": self._session_state(), "extra": extra}
            from mixprec.distributed import checkpoint as sharded_checkpoint

            sharded_checkpoint.save(path, model, optimizers, state=state)
            return
        save_checkpoint(
            path,
            {
                "model": _without_compile_prefix(model.state_dict()),
                "optimizers": [opt.state_dict() for opt in optimizers],
                "mixed_precision": self._session_state(),
                "rng": torch.get_rng_state(),
                "extra": extra,
            },
        )

    def load(
        self,
        path: str | os.PathLike[str],
        model: nn.Module,
        *optimizers: torch.optim.Optimizer,
        strict: bool = False,
    ) -> dict[str, Any]:
        """Restore a checkpoint written by :meth:`save`; returns its ``extra`` values.

        Everything is checked before anything is loaded — the file's checksums, the model's
        entries, shapes and dtypes, the optimizer count and states, the session and scaler state
        and the RNG state — so a checkpoint that is refused changes neither the model, the
        optimizers, the scaler, the step count nor the RNG.

        A model compiled with ``torch.compile`` saves and loads like the model it wraps: the
        ``_orig_mod.`` part its state dict adds to every key is not stored, and is accepted in
        checkpoints that hold it, so a checkpoint moves between a compiled and a plain model.

        Args:
            path: the checkpoint file (or sharded checkpoint folder).
            model: the prepared model (plain or compiled).
            optimizers: the optimizers :meth:`prepare` returned.
            strict: ``True`` refuses a checkpoint of another policy. ``False`` (the default)
                loads one whose stored weights and optimizer states have this session's formats
                (bf16-mixed <-> fp16-mixed: both keep fp32 weights); the loss scale carries over
                between fp16 policies, and a session that scales where the saved run did not
                starts from its initial scale. The update mode must still be the same.

        Raises:
            CheckpointError: the file is unreadable or damaged, or does not match this model,
                policy or optimizers, or holds a malformed entry (named in the message).
        """
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be True or False, got {type(strict).__name__} {strict!r}")
        model = _uncompiled(model)
        if Path(path).is_dir():  # a sharded checkpoint folder
            return self._load_sharded(path, model, *optimizers, strict=strict)
        record = load_checkpoint(path)
        saved_optimizers = record.get("optimizers")
        extra = record.get("extra", {})
        weights: Any = record.get("model")
        if isinstance(weights, Mapping):
            weights = _keys_of(model, weights)
        try:
            check_model_state(model, weights)
            if not isinstance(saved_optimizers, list) or len(saved_optimizers) != len(optimizers):
                count = (
                    len(saved_optimizers) if isinstance(saved_optimizers, list) else "no list of"
                )
                raise ValueError(
                    f"it holds {count} optimizer states; {len(optimizers)} optimizers were given"
                )
            if not isinstance(extra, Mapping):
                raise ValueError(f"its 'extra' is a {type(extra).__name__}, not a dict")
            scaler = self._check_session_state(record.get("mixed_precision"), strict)
            check_optimizer_states(optimizers, saved_optimizers)
            check_rng_state(record.get("rng"))
            load_optimizers(optimizers, saved_optimizers)  # each checks its own fields first
        except ValueError as err:
            raise CheckpointError(f"checkpoint {str(path)!r}: {err}") from None
        model.load_state_dict(weights)
        self._load_session_state(record["mixed_precision"], scaler)
        torch.set_rng_state(record["rng"])
        return dict(extra)

    # -- distributed ------------------------------------------------------------------------

    def _storage_policy(self, model: nn.Module) -> Policy:
        """The policy parameters are stored by: the user's rules, the modules ``model`` declares
        fp32 (:func:`fp32_attribute_rules`), then the default FP32 islands."""
        kept = fp32_attribute_rules(model, self._fp32_attributes)
        return replace(self.policy, rules=self.policy.rules + kept + DEFAULT_ISLAND_RULES)

    def ddp(self, model: nn.Module, **ddp_kwargs: Any) -> nn.Module:
        """Wrap the prepared ``model`` in DDP, all-reducing gradients in the policy's reduce format.

        The order that works: ``model, opt = mp.prepare(model, opt)`` then
        ``model = mp.ddp(model)``. The scaler (``process_group="auto"``) then makes all ranks
        skip or step together. See :func:`mixprec.distributed.ddp`.

        Raises:
            RuntimeError: the parameters are not yet in the policy's formats (call
                :meth:`prepare` first), or see :func:`mixprec.distributed.ddp`.
            ValueError: the session rounds stochastically and the ranks' seeds differ.
        """
        pending = would_recast(model, self._storage_policy(model))
        if pending:
            raise RuntimeError(
                f"ddp was called before prepare: the policy still recasts {pending[:3]!r}, which "
                "would detach DDP's gradient hooks later. Call model, opt = mp.prepare(model, "
                "opt) first, then model = mp.ddp(model)"
            )
        self._check_seed_agrees()
        return ddp(model, self.policy, **ddp_kwargs)

    def fully_shard(self, model: nn.Module, mesh: Any = None, **kwargs: Any) -> nn.Module:
        """Cast ``model`` to the policy's storage formats and shard it with FSDP2, per module.

        The order that works: ``model = mp.fully_shard(model)``, then build the optimizer on
        ``model.parameters()``, then ``model, opt = mp.prepare(model, opt)``. See
        :func:`mixprec.distributed.fully_shard` (``wrap=``, FSDP2's own arguments).

        Raises:
            RuntimeError: ``model`` is wrapped in DDP or already sharded, or this session is
                already prepared (its optimizers hold the parameters sharding replaces).
            ValueError: the session rounds stochastically and the ranks' seeds differ.
        """
        from mixprec.distributed.fsdp import fully_shard

        if self._model is not None and not isinstance(model, DistributedDataParallel):
            # (a DDP model gets fully_shard's own error: it does not stack on DDP)
            raise RuntimeError(
                "fully_shard was called after prepare: sharding replaces the parameters, so the "
                "optimizers prepare wrapped would step the old ones. Shard first, then build the "
                "optimizer: model = mp.fully_shard(model); opt = AdamW(model.parameters()); "
                "model, opt = mp.prepare(model, opt)"
            )
        self._check_seed_agrees()
        storage = self._storage_policy(model)
        # FSDP2 gathers the parameters of the modules it shards: an FP8 layer swapped in later
        # would see its DTensor shards.
        self._convert_fp8(model)
        return fully_shard(model, storage, mesh=mesh, **kwargs)

    def check_replicas(self, model: nn.Module | None = None, group: Any = None) -> ReplicaCheck:
        """Compare ``model``'s replicated parameters across the ranks (every rank calls it).

        Args:
            model: the model (default: the prepared one; a DDP wrapper of it works too).
            group: the replicas' process group (None: the world).

        Returns:
            A :class:`~mixprec.distributed.ReplicaCheck`; ``.raise_if_differ()`` raises a
            RuntimeError naming the parameters and ranks. See
            :func:`mixprec.distributed.check_replicas`.

        Raises:
            RuntimeError: no ``model`` was given and none was prepared yet.
        """
        if model is None:
            if self._model is None:
                raise RuntimeError(
                    "check_replicas has no model: pass one, mp.check_replicas(model), or call "
                    "mp.prepare(model, ...) first"
                )
            model = self._model
        return check_replicas(model, group)

    def _load_sharded(
        self,
        path: str | os.PathLike[str],
        model: nn.Module,
        *optimizers: torch.optim.Optimizer,
        strict: bool = True,
    ) -> dict[str, Any]:
        scaler: list[bool] = []

        def check(state: Mapping[str, Any]) -> None:
            scaler.append(self._check_session_state(state.get("mixed_precision"), strict))
            if not isinstance(state.get("extra", {}), Mapping):
                raise ValueError("its 'extra' is not a dict")

        from mixprec.distributed import checkpoint as sharded_checkpoint

        state = sharded_checkpoint.load(path, model, optimizers, check_state=check)
        self._load_session_state(state["mixed_precision"], all(scaler))
        return dict(state.get("extra", {}))

    def explain(self, model: nn.Module, example: Any = None) -> Any:
        """Per module, the formats and bytes this session's policy gives; see `mixprec.explain`."""
        from mixprec.diagnostics.explainer import explain

        return explain(model, self.policy, example, backend=self._region_args["backend"])


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


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


_COMPILE_PREFIX = "_orig_mod."


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile(module)`` wraps, or ``model`` itself when it is not compiled."""
    inner = getattr(model, "_orig_mod", None)
    compiled = isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
    return inner if compiled and isinstance(inner, nn.Module) else model


def _without_compile_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with the ``_orig_mod.`` that compiled (sub)modules add to their keys removed."""
    return {str(key).replace(_COMPILE_PREFIX, ""): value for key, value in state.items()}


def _keys_of(model: nn.Module, state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` keyed as ``model.state_dict()`` is, whichever of them went through compile."""
    own = {key.replace(_COMPILE_PREFIX, ""): key for key in model.state_dict()}
    plain = _without_compile_prefix(state)
    return {own.get(key, key): value for key, value in plain.items()}


def _saves_sharded(path: str | os.PathLike[str]) -> bool:
    """Whether a save to ``path`` writes a sharded checkpoint folder: under a process group, or
    into an existing folder."""
    return _distributed() or Path(path).is_dir()


def _nonfinite(model: nn.Module) -> tuple[str, ...]:
    return tuple(nonfinite_grads(model))


def _delayed_fp8_state(model: nn.Module | None) -> dict[str, float]:
    """``fp8/<layer>/<amax|scale>_<operand>`` of every delayed-scaling FP8 layer of ``model``."""
    from mixprec.compute.fp8_linear import Fp8Linear

    values: dict[str, float] = {}
    for name, module in model.named_modules() if model is not None else ():
        if isinstance(module, Fp8Linear) and module.recipe.scaling == "delayed":
            for key, value in module.delayed_scaling_state().items():
                values[f"fp8/{name}/{key}"] = value
    return values


def _metrics_of(report: StepReport) -> dict[str, Any]:
    values: dict[str, Any] = {
        "loss": report.loss,
        "micro_batches": report.micro_batches,
        "loss_scale": report.scale,
        "skipped": not report.stepped,
        "grad_norm": report.grad_norm,
        "seconds": report.seconds,
    }
    if report.nonfinite_params:
        values["nonfinite_params"] = list(report.nonfinite_params)
    if report.origin:
        values["origin"] = report.origin
    if report.underflow is not None:
        values.update(report.underflow.metrics())
    return values


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_device(device: str | torch.device) -> torch.device:
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


def _check_implemented(policy: Policy) -> None:
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


def _make_scaler(
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


def _params_of(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _check_owned(optimizer: torch.optim.Optimizer, owned: set[int], what: str) -> None:
    """Refuse an optimizer with parameters outside ``owned`` (ids of the model's parameters)."""
    foreign = [p for p in _params_of(optimizer) if id(p) not in owned]
    if foreign:
        shapes = [tuple(p.shape) for p in foreign[:3]]
        raise RuntimeError(
            f"{what} ({type(optimizer).__name__}) holds {len(foreign)} parameter(s) that are not "
            f"the model's (shapes {shapes}{' ...' if len(foreign) > 3 else ''}), so stepping it "
            "would not change the model; build it on this model's parameters, e.g. "
            "torch.optim.AdamW(model.parameters()), before mp.prepare(model, optimizer)"
        )
