"""``MixedPrecision``: the one object a training loop needs, the same five lines for every policy.

Design note: the session owns no math; it applies the policy with the lower layers (casts, FP32
islands, an optimizer wrapper chosen by where the update happens, a loss scaler whose mode follows
the policy's formats) and keeps the order of a training step (unscale, clip, one skip-or-step
decision, write-back, scale update) in one place. After ``prepare`` every call of the model runs
under the policy (forward hooks, :mod:`mixprec.session.forward`), so eval loops and ``generate``
need no ``with`` block. Its checkpoint state is a collaborator (:mod:`mixprec.session.state`).

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
from typing import Any, Literal, get_args

import torch
from torch import nn

from mixprec.compute import apply_fp8_policy, autocast, fp32_islands
from mixprec.compute.fp8_convert import Fp8Conversion
from mixprec.compute.fp8_state import end_fp8_step, hold_fp8_state
from mixprec.diagnostics import NonFiniteTracer, nonfinite_grads, underflow_report
from mixprec.distributed import ReplicaCheck, check_prepare_order, check_replicas, ddp
from mixprec.distributed.replicas import check_replicas_every_arg
from mixprec.formats import FP32
from mixprec.hardware import auto_policy
from mixprec.optim import (
    KahanOptimizer,
    MasterWeightOptimizer,
    StochasticRoundingOptimizer,
    cast_module,
)
from mixprec.policy import Policy
from mixprec.session.forward import (
    Clock,
    PolicyForward,
    check_unprepared,
    hook_forward,
    mark_prepared,
)
from mixprec.session.in_backward import InBackward
from mixprec.session.materialize import Initializer, materialize
from mixprec.session.optimizer_states import check_state_formats, formats_for, states_only
from mixprec.session.owned import OwnedParams
from mixprec.session.setup import (
    check_ddp_order,
    check_device,
    check_implemented,
    check_master_remainder,
    check_owned,
    check_ranks_agree,
    check_session_args,
    check_shard_order,
    check_steppable,
    check_update_mode,
    declared_policy,
    default_device,
    make_scaler,
    params_of,
    plain_loop_loses,
    warn_unmatched_rules,
    with_default_islands,
)
from mixprec.session.state import SessionCheckpoint
from mixprec.session.step_report import StepLog, StepReport, delayed_fp8_state

__all__ = ["UPDATE_MODES", "MixedPrecision", "UpdateMode"]

UpdateMode = Literal["auto", "master", "stochastic", "kahan", "nearest"]
UPDATE_MODES: tuple[str, ...] = get_args(UpdateMode)


class MixedPrecision:
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
        step_in_backward: step each parameter in backward as soon as its gradient exists and
            free the gradient (no gradient buffer); :mod:`mixprec.session.in_backward` says
            what it refuses (loss scaling, global clipping, accumulation).
        master_remainder: store the fp32 masters of bf16 parameters as the parameter plus a
            remainder of 16 bits (exact: bit for bit full masters, 2 B/param instead of 4) or
            8 (24-bit masters, 1 B/param, lossy); None (default): full fp32 masters.

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
        step_in_backward: bool = False,
        master_remainder: int | None = None,
    ) -> None:
        self.device = check_device(device if device is not None else default_device())
        check_update_mode(update, UPDATE_MODES)
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
        flags = {"trace": trace, "track_underflow": track_underflow}
        flags.update(wrap_forward=wrap_forward, cast_buffers=cast_buffers)
        check_session_args(flags, fp32_attributes, metrics)
        self._check_every = check_replicas_every_arg(check_replicas_every)
        self._in_backward = InBackward(step_in_backward, self.scaler, str(self.policy))
        self._master_remainder = check_master_remainder(master_remainder, self._update_mode())
        self._wrap_forward = wrap_forward
        self._cast_buffers = cast_buffers
        self._fp32_attributes = tuple(fp32_attributes)
        self._forward_hooks: list[Any] = []
        self._trace = trace
        self._track_underflow = track_underflow
        self._log = StepLog(metrics, tensorboard, self.device) if metrics is not None else None
        self._tracer: NonFiniteTracer | None = None
        self._model: nn.Module | None = None
        self._steps = 0
        self._islands: Any = None
        self.fp8: Fp8Conversion | None = None  # after prepare: the linear layers put in FP8
        self._loss_sum: torch.Tensor | None = None  # what backward was given since the last step
        self._micro_batches = 0
        self._optimizers: tuple[torch.optim.Optimizer, ...] = ()
        self._owned = OwnedParams()  # what the model holds, checked each step without a walk
        scaled = self.scaler.scales_loss
        self._clock = Clock(plain_loop_loses(self.policy, scaled, self._update_mode()))
        self._checkpoint = SessionCheckpoint(self.policy, self.update, self.scaler)

    # -- setup ------------------------------------------------------------------------------

    def prepare(
        self, model: nn.Module, *optimizers: torch.optim.Optimizer, init: Initializer | None = None
    ) -> Any:
        """Apply the policy: move and cast ``model``, add FP32 islands, wrap ``optimizers``.

        Build the optimizers on ``model.parameters()`` before calling this; the parameters are
        cast in place, so the optimizers keep pointing at them. From then on, step the optimizers
        this returns: a wrapper keeps the update (fp32 masters, compensation), and stepping the
        optimizer it wraps would leave the model unchanged.

        A meta-device model is materialized in its storage formats (``init``: :mod:`.materialize`).

        Returns:
            ``model`` alone, or ``(model, *wrapped_optimizers)``.

        Raises:
            TypeError: ``model`` is not an ``nn.Module`` or an optimizer is not one.
            RuntimeError: ``prepare`` was already called on this session, ``model`` was already
                prepared by a session (a second policy would stack on the first), or an
                optimizer holds parameters that are not ``model``'s.
            ValueError: a meta-device module has no initializer, or it leaves a tensor unset.
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
        self._in_backward.check(model, optimizers)
        # raises for a keep-in-fp32 name matching none
        declared = declared_policy(self.policy, model, self._fp32_attributes)
        warn_unmatched_rules(model, self.policy)
        storage = with_default_islands(declared)
        check_prepare_order(model, storage)
        check_state_formats(optimizers, model, declared)
        materialize(model, storage, self.device, init=init)  # a meta model: nothing else to do
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
        self._in_backward.attach(model, wrapped)
        self._optimizers = wrapped
        return (model, *wrapped) if wrapped else model

    def _hook_forward(self, model: nn.Module) -> list[Any]:
        """Run every call of ``model`` (and of its direct children, which its own code may call
        on their own) under the policy's region, outputs in its output format; see
        :mod:`mixprec.session.forward`."""
        args = (self._region_args, self.policy.output.dtype, str(self.policy), self._clock)
        hooks = PolicyForward(*args)
        return hook_forward(model, hooks)

    def wrap(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The optimizer wrapped where the policy's update happens (what ``prepare`` returns for
        it): fp32 master weights, stochastic rounding, Kahan, or itself for fp32 parameters and
        round-to-nearest; for optimizers built after ``prepare``, as frameworks build theirs.
        States go in each module's ``state`` format (:mod:`mixprec.session.optimizer_states`)."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        states = formats_for(optimizer, self._model, self.policy, self._fp32_attributes)
        mode = self._update_mode()
        if not any(p.dtype in (torch.float16, torch.bfloat16) for p in params) or mode == "nearest":
            # the optimizer updates fp32 parameters (and nearest-rounded 16-bit ones) itself
            return optimizer if states is None else states_only(optimizer, states)
        if mode == "master":
            return MasterWeightOptimizer(
                optimizer, state=states, remainder_bits=self._master_remainder
            )
        if mode == "stochastic":
            return StochasticRoundingOptimizer(optimizer, seed=self.seed, state=states)
        return KahanOptimizer(optimizer, state=states)

    def _convert_fp8(self, model: nn.Module, declared: Policy) -> None:
        """Swap the linear layers ``declared`` puts in FP8 for Fp8Linear (same parameters, so
        optimizers keep working); nothing without an fp8 rule."""
        if any(p.fp8 for p in (self.policy, *(rule.policy for rule in self.policy.rules))):
            self.fp8 = apply_fp8_policy(model, declared)
            hold_fp8_state(model)  # amax histories live in the session's state, not the model's

    def _update_mode(self) -> str:
        """The update mode of 16-bit parameters, "auto" resolved."""
        if self.update == "auto":
            return "master" if self.policy.master == FP32 != self.policy.param else "stochastic"
        return self.update

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
        self._in_backward.arm(self._micro_batches)  # steps in there if step_in_backward
        try:
            self.scaler.scale(loss).backward()
        finally:
            self._in_backward.disarm()
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
            check_steppable(opt, self._model, self._optimizers, self._owned)
        self._in_backward.check_step(optimizers, self._micro_batches, max_grad_norm)
        scaling = self.scaler.scales_loss
        scale = self.scaler.get_scale() if scaling else 1.0
        underflow = None
        if self._track_underflow and self._model is not None:
            underflow = underflow_report(self._model, scale, "fp16", scaled=scaling)
        norms = []
        if max_grad_norm is not None:
            norms = [self.scaler.clip_grad_norm_(opt, max_grad_norm) for opt in optimizers]
        # One decision for all, before any steps: an inf in one optimizer's gradients must not
        # leave the other optimizers' half of the model updated.
        stepped = self.scaler.step_and_update(*optimizers)
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
        report = self._in_backward.finish(report)  # what the steps inside backward did
        self._steps += 1
        self._loss_sum, self._micro_batches, self._clock.started = None, 0, None
        if self._tracer is not None:
            self._tracer.reset()
        if self._log is not None:
            params = (
                self._model.parameters()
                if self._model is not None
                else (p for opt in optimizers for p in params_of(opt))
            )
            fp8 = delayed_fp8_state(self._model) if self.fp8 is not None else {}
            self._log.log(report, fp8, params)
        if self._check_every and self._model is not None and self._steps % self._check_every == 0:
            self.check_replicas(self._model).raise_if_differ()  # after the step is logged
        return report

    def close(self) -> None:
        """Detach the tracer, close the metrics file (also the end of a ``with`` block)."""
        if self._tracer is not None:
            self._tracer.detach()
            self._tracer = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> MixedPrecision:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- distributed ------------------------------------------------------------------------

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
        storage = with_default_islands(declared_policy(self.policy, model, self._fp32_attributes))
        check_ddp_order(model, storage)
        check_ranks_agree(self.policy, self._update_mode(), self.seed)
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

        check_shard_order(self._model, model)
        check_ranks_agree(self.policy, self._update_mode(), self.seed)
        declared = declared_policy(self.policy, model, self._fp32_attributes)
        # FSDP2 gathers the parameters of the modules it shards: an FP8 layer swapped in later
        # would see its DTensor shards.
        self._convert_fp8(model, declared)
        return fully_shard(model, with_default_islands(declared), mesh=mesh, **kwargs)

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

    # -- state and checkpoints (SessionCheckpoint) -----------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything precision-related a resumed run needs: the loss scaler, the step count and
        the state of the optimizers :meth:`prepare` returned (their fp32 masters, compensation
        buffers or stochastic-rounding generators, with the inner optimizer's state)."""
        return self._checkpoint.state_dict(self._steps, self._model, self._optimizers)

    def check_state_dict(self, state: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` (naming the mismatch) unless :meth:`load_state_dict` would take
        ``state``; changes nothing."""
        self._checkpoint.check(state, self._model, len(self._optimizers))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; all of it is checked before anything is loaded.

        Raises:
            ValueError: the state comes from another policy or update mode, holds another number
                of optimizers than :meth:`prepare` was given, a bad scaler state, step count or
                optimizer state, or is not a session state at all. Nothing was loaded then.
        """
        self._steps = self._checkpoint.load_state_dict(state, self._model, self._optimizers)

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
        self._checkpoint.save(path, model, optimizers, self._steps, self._model, extra)

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
        extra, self._steps = self._checkpoint.load(path, model, optimizers, self._model, strict)
        return extra

    def explain(self, model: nn.Module, example: Any = None) -> Any:
        """Per module, the formats and bytes this session's policy gives; see `mixprec.explain`."""
        from mixprec.diagnostics.explainer import explain

        return explain(model, self.policy, example, backend=self._region_args["backend"])
