"""Train any Hugging Face ``transformers`` model with a mixprec policy through ``Trainer``.

    from mixprec.integrations.transformers import MixprecTrainer

    trainer = MixprecTrainer(
        model=model, args=TrainingArguments("out", max_grad_norm=1.0), train_dataset=data,
        precision="fp16-mixed",
    )
    trainer.train()                               # logs loss_scale and skipped_steps
    trainer.train(resume_from_checkpoint=True)    # restores the precision state too

Design note: ``Trainer`` already runs torch's AMP protocol through Accelerate — it calls
``accelerator.backward(loss)`` (``scaler.scale(loss).backward()`` when Accelerate holds a
scaler), ``optimizer.step()`` on an ``AcceleratedOptimizer`` (``scaler.step`` + ``scaler.update``,
and no LR-scheduler step when the scaler skipped), and it saves and restores
``accelerator.scaler`` with its checkpoints. :class:`mixprec.GradScaler` is a drop-in for
``torch.amp.GradScaler``, so :class:`MixprecTrainer` hands the session's scaler to Accelerate
and overrides only the documented extension points that decide *precision*:

* ``__init__`` builds a :class:`~mixprec.MixedPrecision` session and prepares the model (params
  cast by the policy, fp32 islands), before ``Trainer`` sees it, so ``evaluate``/``predict``
  before training see the same weights as training does;
* ``create_accelerator_and_postprocess`` gives Accelerate the session's scaler and refuses an
  Accelerate mixed-precision mode (``fp16=True``/``bf16=True`` would autocast twice);
* ``create_optimizer`` wraps the optimizer as the session would (fp32 master weights,
  stochastic rounding, Kahan, or none), so its masters and generators ride in Trainer's own
  ``optimizer.pt``;
* ``compute_loss_context_manager`` enters the session's autocast region (training and eval);
* ``compute_loss`` refuses a loss that is not a real scalar tensor;
* ``_clip_grad_norm``/``_get_grad_norm`` clip and measure the *unscaled* gradients with
  :meth:`mixprec.GradScaler.clip_grad_norm_` (Accelerate unscales only in its own fp16 mode);
* ``_save_scaler``/``_load_scaler`` write and read ``mixprec.pt`` (the session state: policy,
  update mode, loss scaler and its skip counters) beside Trainer's files, so
  ``resume_from_checkpoint`` restores it and refuses a checkpoint of another policy;
* ``_load_optimizer_and_scheduler`` checks ``mixprec.pt``'s policy before Trainer reads
  ``optimizer.pt``, so a checkpoint of another policy is refused by naming both;
* ``_save_optimizer_and_scheduler`` lays a wrapped optimizer's ``optimizer.pt`` out as a plain
  torch optimizer state (the wrapper's entries beside it), so a plain ``Trainer`` resumes it;
* ``log`` adds ``loss_scale`` and ``skipped_steps`` to every training log.

What it costs: Accelerate learns that a step was skipped from whether ``optimizer.step`` was
called. Optimizers that skip *inside* their step (torch's ``fused=True`` ones, which Trainer
picks by default on recent torch, and mixprec's 16-bit wrappers) are always called, so on a
skipped step the LR scheduler still advances, exactly as with Trainer's own ``fp16=True`` and
a fused optimizer. The weights and the skip count are right either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mixprec.integrations._common import (
    SessionFigures,
    check_loss,
    is_wrapped,
    managed,
    session_of,
)
from mixprec.optim.plain_state import export_plain
from mixprec.policy import Policy
from mixprec.scaling.clip import global_norm
from mixprec.session import MixedPrecision, UpdateMode

try:
    from transformers import Trainer, TrainingArguments
except ImportError as err:  # pragma: no cover - the test extra installs transformers
    raise ImportError(
        "mixprec.integrations.transformers needs the transformers package (and accelerate for "
        "Trainer); install them with `pip install mixprec[transformers]`"
    ) from err

__all__ = ["STATE_NAME", "MixprecTrainer", "check_loss", "refused_precision_flags"]

STATE_NAME = "mixprec.pt"
"""The file, inside each Trainer checkpoint folder, that holds the session state."""
OPTIMIZER_FILE = "optimizer.pt"  # Trainer's OPTIMIZER_NAME

# Trainer's own mixed-precision switches: each would make Accelerate autocast (or scale) a
# second time around mixprec's region. Missing fields (older or newer transformers) are skipped.
_PRECISION_FLAGS = ("fp16", "bf16", "fp16_full_eval", "bf16_full_eval")
_PRECISION_CHOICES = ("half_precision_backend", "fp16_backend", "fp16_opt_level")


def refused_precision_flags(args: TrainingArguments) -> list[str]:
    """The mixed-precision settings of ``args`` that a mixprec policy cannot be combined with.

    Args:
        args: the Trainer arguments.

    Returns:
        ``"name=value"`` for each boolean flag that is on (``fp16``, ``bf16``,
        ``fp16_full_eval``, ``bf16_full_eval``) and each half-precision backend choice that is
        set to something other than its default; empty when ``args`` leave precision alone.
    """
    fields = {f.name: f for f in dataclasses.fields(args)}
    refused = [f"{name}=True" for name in _PRECISION_FLAGS if getattr(args, name, False) is True]
    for name in _PRECISION_CHOICES:
        if name in fields:
            value = getattr(args, name)
            if value != fields[name].default and value not in ("auto", None):
                refused.append(f"{name}={value!r}")
    return refused


class MixprecTrainer(SessionFigures, Trainer):
    """A ``transformers.Trainer`` whose precision is a mixprec policy.

    Everything else is Trainer's: arguments, callbacks, logging, evaluation, checkpoint
    rotation, ``resume_from_checkpoint``. Leave Trainer's own ``fp16``/``bf16`` flags off; the
    policy says what runs in 16 bits.

    Args:
        *args: ``Trainer``'s positional arguments (``model``, ``args``, ...).
        precision: a preset (``"fp16-mixed"``, ``"bf16-mixed"``, ``"bf16-pure"``, ``"fp32"``,
            ``"auto"``), a policy string or :class:`~mixprec.Policy`, or a ready
            :class:`~mixprec.MixedPrecision` session that was not prepared yet.
        update: where 16-bit parameters are updated (``"auto"``, ``"master"``,
            ``"stochastic"``, ``"kahan"``, ``"nearest"``); see :class:`~mixprec.MixedPrecision`.
            Only with a ``precision`` that is not a session.
        backend: the autocast backend (``"auto"``, ``"native"``, ``"emulated"``). Only with a
            ``precision`` that is not a session.
        scaler_options: :class:`~mixprec.GradScaler` settings for fp16 policies
            (``init_scale``, ``growth_interval``, ``hysteresis``...). Only with a ``precision``
            that is not a session.
        **kwargs: ``Trainer``'s keyword arguments.

    Raises:
        ValueError: ``args`` turn on Trainer's own mixed precision (``fp16=True``,
            ``bf16=True``...) or Accelerate was configured for it; or a bad policy/update mode.
        TypeError: ``precision`` is neither a string, a Policy nor a MixedPrecision; session
            options were given together with a session; or no ``model`` was given
            (``model_init`` is not supported: the policy is applied to one model).
        RuntimeError: the given session was already prepared on another model.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32))
        >>> args = TrainingArguments("out", fp16=True, use_cpu=True, report_to=[])
        >>> MixprecTrainer(model=model, args=args, precision="fp16-mixed")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: TrainingArguments turn on Trainer's own mixed precision (fp16=True) ...
    """

    def __init__(
        self,
        *args: Any,
        precision: str | Policy | MixedPrecision = "auto",
        update: UpdateMode = "auto",
        backend: str = "auto",
        scaler_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        names = ("model", "args")
        bound = dict(zip(names, args, strict=False)) | {k: kwargs[k] for k in names if k in kwargs}
        model, training_args = bound.get("model"), bound.get("args")
        if training_args is not None:
            refused = refused_precision_flags(training_args)
            if refused:
                raise ValueError(
                    f"TrainingArguments turn on Trainer's own mixed precision "
                    f"({', '.join(refused)}) together with the mixprec policy {precision!r}; "
                    "both would autocast and scale. Drop those flags and let the policy choose "
                    "the formats, e.g. MixprecTrainer(..., precision='fp16-mixed')"
                )
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"MixprecTrainer needs the model itself (model=...), got "
                f"{type(model).__name__} {model!r}; model_init is not supported, because the "
                "policy is applied once, to one model"
            )
        device = training_args.device if training_args is not None else None
        self.mixed_precision = session_of(precision, device, update, backend, scaler_options)
        self.mixed_precision.prepare(model)
        managed(self.mixed_precision)
        super().__init__(*args, **kwargs)

    # -- precision: the region, the scaler, the optimizer ------------------------------------

    def create_accelerator_and_postprocess(self) -> None:
        """Create Trainer's Accelerator, then give it the session's loss scaler.

        Raises:
            ValueError: Accelerate was configured for its own mixed precision (for example by
                ``ACCELERATE_MIXED_PRECISION``), which would autocast a second time.
        """
        super().create_accelerator_and_postprocess()
        mode = self.accelerator.mixed_precision
        if mode != "no":
            raise ValueError(
                f"Accelerate runs in mixed precision {mode!r} together with the mixprec policy "
                f"{str(self.mixed_precision.policy)!r}; both would autocast. Unset "
                "ACCELERATE_MIXED_PRECISION (or `mixed_precision` in the accelerate config)"
            )
        # Accelerate's backward, optimizer step and Trainer's scaler checkpoints all go through
        # `accelerator.scaler`; mixprec's GradScaler speaks torch.amp.GradScaler's protocol.
        self.accelerator.scaler = self.mixed_precision.scaler

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's optimizer, wrapped as the session wraps optimizers for 16-bit params.

        Raises:
            ValueError: ``optimizers=(optimizer, scheduler)`` were given for 16-bit params: the
                scheduler would set the learning rate on the unwrapped optimizer.
        """
        optimizer = super().create_optimizer(model)
        if not is_wrapped(optimizer):
            wrapped = self.mixed_precision.wrap(optimizer)
            scheduler = self.lr_scheduler
            if wrapped is not optimizer and getattr(scheduler, "optimizer", None) is optimizer:
                raise ValueError(
                    f"the LR scheduler {type(scheduler).__name__} passed in optimizers= drives "
                    f"the plain {type(optimizer).__name__}, but policy "
                    f"{str(self.mixed_precision.policy)!r} wraps it as "
                    f"{type(wrapped).__name__}; pass optimizers=(optimizer, None) and set "
                    "lr_scheduler_type in TrainingArguments instead"
                )
            optimizer = self.optimizer = wrapped
        self._mixprec_optimizer = optimizer
        return optimizer

    def compute_loss_context_manager(self) -> contextlib.ExitStack:
        """Trainer's context for every forward (training and eval), plus the policy's region."""
        stack = super().compute_loss_context_manager()
        stack.enter_context(self.mixed_precision.autocast())
        return stack

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Trainer's loss, checked to be a real floating scalar before it is scaled.

        Raises:
            ValueError: the loss is not a scalar tensor (for example a per-token loss from a
                custom ``compute_loss_func``).
            TypeError: the loss is not a floating-point tensor.
        """
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        loss = result[0] if return_outputs else result
        check_loss(loss)
        return result

    # -- clipping and norms on unscaled gradients ---------------------------------------------

    def _clip_grad_norm(self, model: nn.Module) -> torch.Tensor:
        """Clip the *unscaled* gradients to ``max_grad_norm``; returns their norm before."""
        # The optimizer create_optimizer made, inside Accelerate's AcceleratedOptimizer: the
        # object the scaler keeps its per-optimizer record for.
        return self.mixed_precision.scaler.clip_grad_norm_(
            self._mixprec_optimizer, self.args.max_grad_norm
        )

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        """The unscaled gradient norm, measured without clipping when no clip was asked for."""
        if grad_norm is not None:
            return super()._get_grad_norm(model, grad_norm=grad_norm)
        grads: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in model.parameters():
            if p.grad is not None:
                grads.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        if not grads:
            return None
        device = next(iter(grads))[0]
        return global_norm(grads, 2.0, device) / self.loss_scale

    # -- logs and checkpoints -----------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer's log, with ``loss_scale`` and ``skipped_steps`` beside each training loss."""
        if "loss" in logs or "train_loss" in logs:
            logs = {**logs, "loss_scale": self.loss_scale, "skipped_steps": self.skipped_steps}
        super().log(logs, start_time)

    def _save_scaler(self, output_dir: str) -> None:
        # Replaces Trainer's scaler.pt: the session state holds the scaler and says which policy
        # and update mode wrote it.
        if self.args.should_save:
            torch.save(self.mixed_precision.state_dict(), os.path.join(output_dir, STATE_NAME))

    def _load_scaler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        state = self._session_state_of(checkpoint)
        try:
            self.mixed_precision.load_state_dict(state)
        except ValueError as err:
            raise ValueError(f"checkpoint {checkpoint!r}: {err}") from None

    def _session_state_of(self, checkpoint: str) -> dict[str, Any]:
        """The session state saved in ``checkpoint``, checked to be this session's policy.

        Raises:
            ValueError: there is none, or it names another policy or update mode.
        """
        path = os.path.join(checkpoint, STATE_NAME)
        if not os.path.isfile(path):
            raise ValueError(
                f"checkpoint {checkpoint!r} has no {STATE_NAME!r}, so its loss scale and "
                f"precision state are unknown; resume a MixprecTrainer run from a checkpoint "
                "that a MixprecTrainer saved, or start without resume_from_checkpoint"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            self.mixed_precision.check_state_dict(state)
        except ValueError as err:
            raise ValueError(f"checkpoint {checkpoint!r}: {err}") from None
        return state  # type: ignore[no-any-return]

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Trainer's optimizer load, once the checkpoint's policy is known to be this one's.

        Trainer loads ``optimizer.pt`` before the scaler: the optimizer state of another policy
        (a plain one where this policy wraps, or the reverse) would fail there, saying something
        about the state's format instead of naming the two policies.
        """
        if checkpoint is not None:
            self._session_state_of(checkpoint)
        super()._load_optimizer_and_scheduler(checkpoint)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Trainer's save, with a wrapped optimizer's ``optimizer.pt`` laid out as a plain one's.

        A plain ``Trainer`` resuming the checkpoint then loads the inner optimizer's state (its
        own ``optimizer.load_state_dict`` ignores the wrapper's entries beside it), and a
        MixprecTrainer's wrapper takes the whole back
        (:func:`mixprec.optim.plain_state.import_plain`).
        """
        super()._save_optimizer_and_scheduler(output_dir)
        path = os.path.join(output_dir, OPTIMIZER_FILE)
        plain_save = not (self.is_deepspeed_enabled or self.is_fsdp_enabled)
        wrapped = is_wrapped(getattr(self, "_mixprec_optimizer", None))  # type: ignore[arg-type]
        if plain_save and self.args.should_save and wrapped and os.path.isfile(path):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            torch.save(export_plain(state), path + ".tmp")
            os.replace(path + ".tmp", path)
