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
from dataclasses import replace
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mixprec.compute import DEFAULT_ISLAND_RULES, apply_fp8_policy, autocast, fp32_islands
from mixprec.compute.fp8_convert import Fp8Conversion
from mixprec.compute.fp8_state import end_fp8_step, hold_fp8_state
from mixprec.diagnostics import (
    MetricsWriter,
    NonFiniteTracer,
    nonfinite_grads,
    underflow_report,
)
from mixprec.diagnostics.metrics import group_mean, rank_metrics_file
from mixprec.distributed import ReplicaCheck, check_prepare_order, check_replicas, ddp, would_recast
from mixprec.distributed.agree import check_same_settings
from mixprec.distributed.replicas import check_replicas_every_arg
from mixprec.formats import FP32
from mixprec.hardware import auto_policy
from mixprec.optim import (
    KahanOptimizer,
    MasterWeightOptimizer,
    StochasticRoundingOptimizer,
    WrappedOptimizer,
    cast_module,
)
from mixprec.policy import Policy
from mixprec.scaling.agreement import agreement_groups
from mixprec.session.forward import (
    Clock,
    PolicyForward,
    check_unprepared,
    hook_forward,
    mark_prepared,
)
from mixprec.session.optimizer_states import check_state_formats, formats_for, states_only
from mixprec.session.setup import (
    check_device,
    check_has_work,
    check_implemented,
    check_not_replaced,
    check_owned,
    default_device,
    distributed,
    fp32_attribute_rules,
    make_scaler,
    params_of,
    plain_loop_loses,
    warn_unmatched_rules,
)
from mixprec.session.state import SessionState
from mixprec.session.step_report import StepReport, delayed_fp8_state

__all__ = ["UPDATE_MODES", "MixedPrecision", "UpdateMode"]

UpdateMode = Literal["auto", "master", "stochastic", "kahan", "nearest"]
UPDATE_MODES: tuple[str, ...] = get_args(UpdateMode)


class MixedPrecision(SessionState):
    """Apply a precision policy to a model, its optimizers and its training loop.

    Args:
        policy: ``"auto"`` (chosen from the device's hardware, see :attr:`reason`), a preset
            (``"fp32"``, ``"bf16-mixed"``, ``"fp16-mixed"``, ``"bf16-pure"``, ``"bf16-lean"``:
            int8 optimizer states, per module by the policy's ``state``), a policy string,
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
        self.device = check_device(device if device is not None else default_device())
        if update not in UPDATE_MODES:
            raise ValueError(
                f"unknown update mode {update!r}; valid modes: {', '.join(map(repr, UPDATE_MODES))}"
            )
        if isinstance(policy, str) and policy.strip().lower() == "auto":
            choice = auto_policy(self.device)
            self.policy, self.reason = choice.policy, choice.reason
            backend = choice.backend if backend == "auto" else backend
        else:
            self.policy = Policy.parse(policy)
            self.reason = "chosen by the user"
        check_implemented(self.policy)
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
        self.scaler = make_scaler(self.policy, self.device, scaler_options)
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
        if metrics is not None and not isinstance(metrics, (str, os.PathLike)):
            raise TypeError(f"metrics must be a folder path or None, got {metrics!r}")
        if metrics is not None and not os.fspath(metrics).strip():
            raise ValueError(
                f"metrics={metrics!r} names no folder, so no metrics would be written; give a "
                "folder, e.g. metrics='runs/exp1', or metrics=None to write none"
            )
        self._metrics = (metrics, tensorboard) if metrics is not None else None
        self._writer = None if not metrics or distributed() else self._open_metrics(metrics)
        self._tracer: NonFiniteTracer | None = None
        self._model: nn.Module | None = None
        self._steps = 0
        self._islands: Any = None
        self.fp8: Fp8Conversion | None = None  # after prepare: the linear layers put in FP8
        self._loss_sum: torch.Tensor | None = None  # what backward was given since the last step
        self._micro_batches = 0
        self._optimizers: tuple[torch.optim.Optimizer, ...] = ()
        scaled = self.scaler.strategy != "none"
        self._clock = Clock(plain_loop_loses(self.policy, scaled, self._update_mode()))

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
            RuntimeError: ``prepare`` was already called on this session, ``model`` was already
                prepared by a session (a second policy would stack on the first), or an
                optimizer holds parameters that are not ``model``'s.
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
        check_unprepared(model)
        owned = {id(p) for p in model.parameters()}
        for index, opt in enumerate(optimizers):
            check_owned(opt, owned, f"optimizer {index} given to prepare")
        declared = self._declared_policy(model)  # raises for a keep-in-fp32 name matching none
        warn_unmatched_rules(model, self.policy)
        storage = _with_default_islands(declared)
        check_prepare_order(model, storage)
        check_state_formats(optimizers, model, declared)
        model.to(self.device)
        cast_module(model, storage, buffers=self._cast_buffers)
        if self.fp8 is None:  # mp.fully_shard converts before it shards
            self._convert_fp8(model, declared)
        self._islands = fp32_islands(model, declared)
        self._model = model
        mark_prepared(model, str(self.policy))
        if self._wrap_forward and self._region_args["enabled"]:
            self._forward_hooks = self._hook_forward(model)
        if self._trace:
            self._tracer = NonFiniteTracer(model).attach()
        wrapped = tuple(self.wrap(opt) for opt in optimizers)
        self._optimizers = wrapped
        return (model, *wrapped) if wrapped else model

    def _hook_forward(self, model: nn.Module) -> list[Any]:
        """Run every call of ``model`` (and of its direct children, which its own code may call
        on their own) under the policy's region, outputs in its output format; see
        :mod:`mixprec.session.forward`."""
        hooks = PolicyForward(
            self._region_args, self.policy.output.dtype, str(self.policy), self._clock
        )
        return hook_forward(model, hooks)

    def wrap(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The optimizer wrapped where the policy's update happens (what ``prepare`` returns for
        it): fp32 master weights, stochastic rounding, Kahan, or itself for fp32 parameters and
        round-to-nearest; for optimizers built after ``prepare``, as frameworks build theirs.
        States go in each module's ``state`` format (:mod:`mixprec.session.optimizer_states`)."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        model = self._model
        policy = self.policy if model is None else self._declared_policy(model)
        states = formats_for(optimizer, model, policy)
        mode = self._update_mode()
        if not any(p.dtype in (torch.float16, torch.bfloat16) for p in params) or mode == "nearest":
            # the optimizer updates fp32 parameters (and nearest-rounded 16-bit ones) itself
            return optimizer if states is None else states_only(optimizer, states)
        if mode == "master":
            return MasterWeightOptimizer(optimizer, state=states)
        if mode == "stochastic":
            return StochasticRoundingOptimizer(optimizer, seed=self.seed, state=states)
        return KahanOptimizer(optimizer, state=states)

    def _convert_fp8(self, model: nn.Module, declared: Policy) -> None:
        """Swap the linear layers ``declared`` (:meth:`_declared_policy`) puts in FP8 for
        Fp8Linear (same parameters, so optimizers keep working); nothing without an fp8 rule."""
        if any(p.fp8 for p in (self.policy, *(rule.policy for rule in self.policy.rules))):
            self.fp8 = apply_fp8_policy(model, declared)
            hold_fp8_state(model)  # amax histories live in the session's state, not the model's

    def _update_mode(self) -> str:
        """The update mode of 16-bit parameters, "auto" resolved."""
        if self.update == "auto":
            return "master" if self.policy.master == FP32 != self.policy.param else "stochastic"
        return self.update

    def _check_seed_agrees(self) -> None:
        """Under data parallelism every rank needs one policy and update mode, and stochastic
        rounding one seed (one collective)."""
        policies = (self.policy, *(rule.policy for rule in self.policy.rules))
        stochastic = self._update_mode() == "stochastic" and any(
            p.param.bits <= 16 for p in policies
        )
        check_same_settings(
            str(self.policy), self._update_mode(), self.seed if stochastic else None
        )

    def _fp8_metrics(self) -> dict[str, float]:
        return delayed_fp8_state(self._model) if self.fp8 is not None else {}

    def autocast(self) -> autocast:
        """The autocast region for the forward pass (disabled when the policy computes in fp32)."""
        self._clock.start()  # the iteration's clock starts at its first forward
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
        self._clock.backwards += 1

    def step(
        self, *optimizers: torch.optim.Optimizer, max_grad_norm: float | None = None
    ) -> StepReport:
        """Unscale, clip, step (or skip on inf/NaN), update the scale; report what happened.

        Args:
            optimizers: the optimizers :meth:`prepare` returned; at least one. One decision for
                all: an inf/NaN in any one's gradients skips every one of them.
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
        check_has_work(optimizers, self._micro_batches)
        scaling = self.scaler.is_enabled() and self.scaler.strategy != "none"
        scale = self.scaler.get_scale() if scaling else 1.0
        underflow = None
        if self._track_underflow and self._model is not None:
            underflow = underflow_report(self._model, scale, "fp16", scaled=scaling)
        norms = []
        if max_grad_norm is not None:
            norms = [self.scaler.clip_grad_norm_(opt, max_grad_norm) for opt in optimizers]
        # One decision for all, before any steps: an inf in one optimizer's gradients must not
        # leave the other optimizers' half of the model updated.
        self.scaler.decide_together_(optimizers)
        for optimizer in optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()
        stepped = not self.scaler.step_skipped()
        if self.fp8 is not None and self._model is not None:
            end_fp8_step(self._model, stepped)  # a skipped step keeps no FP8 amax either
        started = self._clock.started
        report = StepReport(
            step=self._steps,
            stepped=stepped,
            scale=float(scale),
            grad_norm=math.sqrt(sum(float(n) ** 2 for n in norms)) if norms else None,
            loss=None if self._loss_sum is None else float(self._loss_sum),
            micro_batches=self._micro_batches,
            seconds=None if started is None else time.perf_counter() - started,
            nonfinite_params=(
                () if stepped or self._model is None else tuple(nonfinite_grads(self._model))
            ),
            origin=self._tracer.summary() if self._tracer and self._tracer.first else None,
            underflow=underflow,
        )
        self._steps += 1
        self._loss_sum, self._micro_batches, self._clock.started = None, 0, None
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
        values = {**report.metrics(), **self._fp8_metrics()}
        if distributed():
            params = (
                self._model.parameters()
                if self._model is not None
                else (p for opt in optimizers for p in params_of(opt))
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
        if self._model is None:
            return
        if any(optimizer is opt for opt in self._optimizers):
            check_not_replaced(optimizer, self._model)
            return
        for wrapper in self._optimizers:
            if isinstance(wrapper, WrappedOptimizer) and wrapper.optimizer is optimizer:
                raise RuntimeError(
                    f"step got the {type(optimizer).__name__} that prepare wrapped in a "
                    f"{type(wrapper).__name__}; stepping it directly would leave the model "
                    "unchanged. Step the optimizer prepare returned: "
                    "model, optimizer = mp.prepare(model, optimizer)"
                )
        check_owned(optimizer, {id(p) for p in self._model.parameters()}, "the optimizer")

    def close(self) -> None:
        """Detach the tracer, close the metrics file (also the end of a ``with`` block)."""
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

    # -- distributed ------------------------------------------------------------------------

    def _declared_policy(self, model: nn.Module) -> Policy:
        """The policy with the user's rules, then the modules ``model`` declares fp32
        (:func:`fp32_attribute_rules`)."""
        kept = fp32_attribute_rules(model, self._fp32_attributes)
        return replace(self.policy, rules=self.policy.rules + kept)

    def _storage_policy(self, model: nn.Module) -> Policy:
        """The policy parameters are stored by: :meth:`_declared_policy`, then the default FP32
        islands."""
        return _with_default_islands(self._declared_policy(model))

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
        declared = self._declared_policy(model)
        # FSDP2 gathers the parameters of the modules it shards: an FP8 layer swapped in later
        # would see its DTensor shards.
        self._convert_fp8(model, declared)
        return fully_shard(model, _with_default_islands(declared), mesh=mesh, **kwargs)

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

    def explain(self, model: nn.Module, example: Any = None) -> Any:
        """Per module, the formats and bytes this session's policy gives; see `mixprec.explain`."""
        from mixprec.diagnostics.explainer import explain

        return explain(model, self.policy, example, backend=self._region_args["backend"])


def _with_default_islands(policy: Policy) -> Policy:
    """``policy`` with the default FP32 islands (norms) after its rules: how params are stored."""
    return replace(policy, rules=policy.rules + DEFAULT_ISLAND_RULES)
