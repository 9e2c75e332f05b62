"""A Lightning ``Precision`` plugin that trains with a mixprec policy.

    import lightning.pytorch as pl
    from mixprec.integrations.lightning import MixprecPrecision

    trainer = pl.Trainer(plugins=[MixprecPrecision("bf16-pure")], gradient_clip_val=1.0)
    trainer.fit(module)                       # ckpt_path=... restores the precision state too

Design note: Lightning routes every precision decision through its ``Precision`` plugin, in the
same places torch's AMP recipe needs them, so the plugin is a thin map from those hooks onto a
:class:`~mixprec.MixedPrecision` session:

* ``convert_module`` prepares the module with the session (params cast by the policy, fp32
  islands) before Lightning moves it and builds the optimizers on its parameters;
* ``connect`` wraps the optimizers as the session would (fp32 master weights, stochastic
  rounding, Kahan, or none) and points the LR schedulers at the wrappers, whose ``param_groups``
  are the ones that step;
* ``forward_context`` enters the session's autocast region (training, validation, test and
  predict steps);
* ``pre_backward`` scales the loss; ``optimizer_step`` runs the closure (forward and backward),
  unscales, lets Lightning's hooks and clipping see the unscaled gradients, then steps — or
  skips on inf/NaN — and updates the scale, as Lightning's own ``MixedPrecision`` plugin does
  with ``torch.amp.GradScaler``;
* ``clip_grad_by_norm`` clips the *unscaled* gradients with
  :meth:`mixprec.GradScaler.clip_grad_norm_`, which also serves optimizers that unscale inside
  their step (the 16-bit wrappers), where Lightning's plugin refuses to clip;
* ``state_dict``/``load_state_dict`` put the session state (policy, update mode, loss scaler and
  its skip counters) into Lightning checkpoints; the wrappers' masters and generators ride in
  the optimizer states Lightning saves anyway. A checkpoint without the session state, or of
  another policy, is refused on resume.

What it costs: like Lightning's AMP plugin, a skipped step still advances the LR schedulers
(Lightning steps them on its own schedule); ``skipped_steps`` says how many steps were skipped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Mapping
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
from mixprec.policy import Policy
from mixprec.session import MixedPrecision, UpdateMode

try:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.precision import Precision
except ImportError as err:  # pragma: no cover - the test extra installs lightning
    raise ImportError(
        "mixprec.integrations.lightning needs the lightning package; install it with "
        "`pip install mixprec[lightning]`"
    ) from err

__all__ = ["MixprecPrecision"]


class MixprecPrecision(SessionFigures, Precision):
    """Lightning precision plugin: ``pl.Trainer(plugins=[MixprecPrecision("fp16-mixed")])``.

    Leave the Trainer's own ``precision=`` at its default; the policy says what runs in 16 bits.

    Args:
        precision: a preset (``"fp16-mixed"``, ``"bf16-mixed"``, ``"bf16-pure"``, ``"fp32"``,
            ``"auto"``), a policy string or :class:`~mixprec.Policy`, or a ready
            :class:`~mixprec.MixedPrecision` session that was not prepared yet.
        device: where the model trains, as for :class:`~mixprec.MixedPrecision` (default: cuda
            if available, else cpu). Only with a ``precision`` that is not a session.
        update: where 16-bit parameters are updated (``"auto"``, ``"master"``,
            ``"stochastic"``, ``"kahan"``, ``"nearest"``). Only with a ``precision`` that is not
            a session.
        backend: the autocast backend (``"auto"``, ``"native"``, ``"emulated"``). Only with a
            ``precision`` that is not a session.
        scaler_options: :class:`~mixprec.GradScaler` settings for fp16 policies. Only with a
            ``precision`` that is not a session.

    Raises:
        TypeError: ``precision`` is neither a string, a Policy nor a MixedPrecision, or session
            options were given together with a session.
        ValueError: a bad policy or update mode.

    Example:
        >>> plugin = MixprecPrecision("bf16-pure", device="cpu", backend="emulated")
        >>> plugin.precision, plugin.loss_scale
        ('bf16-true', 1.0)
    """

    def __init__(
        self,
        precision: str | Policy | MixedPrecision = "auto",
        device: str | torch.device | None = None,
        *,
        update: UpdateMode = "auto",
        backend: str = "auto",
        scaler_options: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(precision, MixedPrecision) and device is not None:
            raise TypeError("device= configures a new session; pass it to MixedPrecision(...)")
        device = torch.device(device) if device is not None else None
        self.mixed_precision = session_of(precision, device, update, backend, scaler_options)
        self.precision = _lightning_name(self.mixed_precision.policy)  # type: ignore[assignment]
        self._module: nn.Module | None = None

    # -- the model and its optimizers --------------------------------------------------------

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Prepare ``module`` with the session, once (later fit/validate calls reuse it).

        Raises:
            RuntimeError: the plugin already prepared another module; make one plugin per model.
        """
        if self._module is None:
            self.mixed_precision.prepare(module)
            managed(self.mixed_precision)
            self._module = module
        elif module is not self._module:
            raise RuntimeError(
                f"this MixprecPrecision already applied its policy to a "
                f"{type(self._module).__name__}; got another module "
                f"({type(module).__name__}); give each model its own MixprecPrecision"
            )
        return module

    def connect(
        self, model: nn.Module, optimizers: list[torch.optim.Optimizer], lr_schedulers: list[Any]
    ) -> tuple[nn.Module, list[torch.optim.Optimizer], list[Any]]:
        """Wrap the optimizers for 16-bit params and point the LR schedulers at the wrappers."""
        wrapped = []
        for optimizer in optimizers:
            new = optimizer if is_wrapped(optimizer) else self.mixed_precision.wrap(optimizer)
            if new is not optimizer:
                for config in lr_schedulers:
                    scheduler = getattr(config, "scheduler", config)
                    if getattr(scheduler, "optimizer", None) is optimizer:
                        # The wrapper's param_groups are the ones the step reads the lr from.
                        scheduler.optimizer = new
            wrapped.append(new)
        return model, wrapped, lr_schedulers

    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        """The session's autocast region around every step's forward."""
        with self.mixed_precision.autocast():
            yield

    # -- backward and step -------------------------------------------------------------------

    def pre_backward(self, tensor: torch.Tensor, module: pl.LightningModule) -> torch.Tensor:  # type: ignore[override]
        """Scale the loss (checked to be a floating scalar) before Lightning's backward hooks."""
        check_loss(tensor)
        return super().pre_backward(self.mixed_precision.scaler.scale(tensor), module)

    def optimizer_step(  # type: ignore[override]
        self,
        optimizer: torch.optim.Optimizer,
        model: pl.LightningModule,
        closure: Callable[[], Any],
        **kwargs: Any,
    ) -> Any:
        """Forward and backward, unscale, Lightning's hooks and clipping, step or skip, update.

        Raises:
            TypeError: ``optimizer`` is an ``LBFGS`` (its closure re-evaluates an unscaled loss).
        """
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError(
                "MixprecPrecision cannot step LBFGS: its closure recomputes the loss, which the "
                "loss scaler does not see; use a first-order optimizer (SGD, AdamW...)"
            )
        scaler = self.mixed_precision.scaler
        closure_result = closure()
        # Automatic optimization returns None when training_step skipped the backward.
        skipped_backward = closure_result is None and model.automatic_optimization
        if not skipped_backward and not getattr(optimizer, "_step_supports_amp_scaling", False):
            # Hooks and clipping then see unscaled gradients. Optimizers that unscale inside
            # their step keep theirs (16-bit gradients are not divided in place).
            scaler.unscale_(optimizer)
        self._after_closure(model, optimizer)
        if skipped_backward:
            return closure_result
        result = scaler.step(optimizer, **kwargs)
        scaler.update()
        return result

    def clip_grad_by_norm(self, optimizer: torch.optim.Optimizer, clip_val: float) -> None:
        """Clip the unscaled gradients to ``clip_val`` (any optimizer, 16-bit wrappers too)."""
        self.mixed_precision.scaler.clip_grad_norm_(optimizer, float(clip_val))

    def clip_grad_by_value(self, optimizer: torch.optim.Optimizer, clip_val: float) -> None:
        """Clip the unscaled gradients by value.

        Raises:
            RuntimeError: the optimizer unscales inside its step while the loss is scaled, so its
                gradients are still scaled here; clip by norm instead.
        """
        scaling = self.mixed_precision.scaler.scales_loss
        if scaling and getattr(optimizer, "_step_supports_amp_scaling", False):
            raise RuntimeError(
                f"gradient_clip_algorithm='value' with {type(optimizer).__name__}, which unscales "
                "inside its step: its gradients are still scaled when clipping runs; use "
                "gradient_clip_algorithm='norm'"
            )
        super().clip_grad_by_value(optimizer, clip_val)

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The session state: policy, update mode, loss scaler and its counters."""
        return self.mixed_precision.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Restore :meth:`state_dict`; refuses (ValueError) the state of another policy."""
        self.mixed_precision.load_state_dict(state_dict)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint that holds no mixprec state (its loss scale would be lost).

        Raises:
            ValueError: the checkpoint was saved without this plugin.
        """
        key = type(self).__qualname__
        if key not in checkpoint:
            raise ValueError(
                f"the checkpoint holds no {key!r} state (keys: {sorted(checkpoint)!r}), so its "
                "loss scale and precision state are unknown; resume from a checkpoint saved "
                "with MixprecPrecision, or load only the weights (LightningModule."
                "load_from_checkpoint) and start a new fit"
            )


def _lightning_name(policy: Policy) -> str:
    # Lightning's precision names, which its own code and loggers read from trainer.precision.
    if policy.param.bits <= 16:
        return "bf16-true" if policy.param.name == "bf16" else "16-true"
    if policy.compute.bits <= 16:
        return "bf16-mixed" if policy.compute.name == "bf16" else "16-mixed"
    return "32-true"
