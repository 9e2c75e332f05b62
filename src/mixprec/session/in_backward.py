"""The step inside backward: each parameter stepped in its post-accumulate-grad hook.

Design note: a training step normally holds every parameter's gradient at once, between the end
of backward and the optimizer step: 2 bytes per parameter in bf16, 4 in fp32. PyTorch's recipe
("How to save memory by fusing the optimizer step into the backward pass") steps each parameter
as soon as autograd has accumulated its gradient, in a hook registered with
``Tensor.register_post_accumulate_grad_hook``, and frees the gradient at once, so no more than
one parameter's gradient is alive at a time. :class:`InBackward` does this for the optimizers
``prepare`` returns: a mixprec wrapper steps the one parameter through
:meth:`~mixprec.optim.wrapper.WrappedOptimizer.step_parameters` (its rule, chunking and one-pass
kernel as in a whole step; the rule's counter moves once per step, at ``mp.step``), a plain
torch optimizer through its own ``step()`` (the only gradient it sees is that parameter's).
The user's loop stays the same five lines: ``mp.backward`` steps, ``mp.step`` closes the step
(LR schedulers see ``optimizer.step()`` called) and reports; ``optimizer.zero_grad()`` finds
nothing to reset. LR schedulers drive the per-parameter steps: each one reads the settings of
the user's optimizer as they are when the hook runs.

For the optimizers whose update of a parameter reads only that parameter (SGD, Adam, AdamW,
RMSprop...: ``mixprec.optim.plan.SEPARABLE_OPTIMIZERS``) the result is bit for bit that of the
ordinary step. What it cannot do, and refuses:

* **loss scaling** (fp16 policies): an overflow found in a later gradient cannot un-step the
  parameters stepped before it;
* **global-norm clipping** (``mp.step(max_grad_norm=...)``, a wrapper's ``max_grad_norm``): the
  norm needs every gradient before the first step;
* **gradient accumulation**: a second ``mp.backward`` before ``mp.step`` would step each
  parameter once per micro-batch;
* optimizers that may couple parameters (LBFGS, subclasses), and DDP/FSDP2 models (their
  gradient reduction runs in hooks of its own).

A non-finite gradient (bf16 or fp32 policies: no loss scale to back off) skips that parameter's
step alone, leaves its weights and optimizer state as they were, and is reported:
``StepReport.stepped`` is False and ``nonfinite_params`` names the parameters not stepped (the
others were). Refusing the step was not possible (the earlier parameters are stepped), and
stepping on an inf would write NaN into the weights for good. The check is one fp32 norm per
gradient, which also gives the step's gradient norm (``StepReport.grad_norm``) for free, at the
cost of one host sync per parameter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mixprec._dist import is_dtensor
from mixprec.optim.plan import SEPARABLE_OPTIMIZERS
from mixprec.optim.wrapper import WrappedOptimizer
from mixprec.session.setup import check_has_work, params_of

if TYPE_CHECKING:
    from mixprec.scaling import GradScaler
    from mixprec.session.step_report import StepReport

__all__ = ["InBackward"]


class _StepHook:
    """The post-accumulate-grad hook of one parameter (an object: it names what it steps)."""

    def __init__(self, owner: InBackward, name: str, optimizer: torch.optim.Optimizer) -> None:
        self.owner, self.name, self.optimizer = owner, name, optimizer

    def __call__(self, param: torch.Tensor) -> None:
        self.owner.step_one(param, self.name, self.optimizer)


class InBackward:
    """The session's step inside backward; ``enabled=False`` is the off mode (no hooks, the
    ordinary step), with the same interface.

    Args:
        enabled: step each parameter in backward.
        scaler: the session's loss scaler (refused unless its strategy is ``"none"``).
        policy: the policy's string, for messages.

    Raises:
        TypeError: ``enabled`` is not a bool.
        ValueError: ``enabled`` with a policy that scales the loss.
    """

    def __init__(self, enabled: bool, scaler: GradScaler, policy: str) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"step_in_backward must be True or False, got {enabled!r}")
        if enabled and scaler.strategy != "none":
            raise ValueError(
                f"step_in_backward=True cannot run with {scaler.strategy} loss scaling (policy "
                f"{policy!r}): a parameter is stepped as soon as its gradient exists, so an "
                "overflow found in a later gradient could not un-step the earlier ones. Use a "
                "policy without loss scaling (bf16-mixed, bf16-pure, fp32), or "
                "step_in_backward=False for fp16"
            )
        self.enabled = enabled
        self._armed = False
        self._handles: list[Any] = []
        self._skipped: list[str] = []
        self._stepped = 0
        self._norm_sq = 0.0

    # -- setup ----------------------------------------------------------------------------

    def check(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Refuse what the step inside backward cannot do, before ``prepare`` changes anything.

        Raises:
            ValueError: no optimizer; an optimizer that may couple its parameters; a wrapper
                that clips by a global norm; a DDP or FSDP2 (DTensor) model.
        """
        if not self.enabled:
            return
        if not optimizers:
            raise ValueError(
                "step_in_backward=True steps the optimizers given to prepare, and got none; "
                "call model, optimizer = mp.prepare(model, optimizer)"
            )
        if isinstance(model, nn.parallel.DistributedDataParallel) or any(
            is_dtensor(p) for p in model.parameters()
        ):
            raise ValueError(
                "step_in_backward=True runs on a single process: DDP and FSDP2 reduce gradients "
                "in hooks of their own, after which a per-parameter step would have to wait. "
                "Use step_in_backward=False with ddp/fully_shard"
            )
        for optimizer in optimizers:
            inner = optimizer.optimizer if isinstance(optimizer, WrappedOptimizer) else optimizer
            if type(inner) not in SEPARABLE_OPTIMIZERS:
                valid = ", ".join(sorted(t.__name__ for t in SEPARABLE_OPTIMIZERS))
                raise ValueError(
                    f"step_in_backward=True steps each parameter alone, which gives the "
                    f"optimizer's own result only when its update of a parameter reads nothing "
                    f"else; {type(inner).__name__} may couple its parameters. Use one of "
                    f"{valid} (exact types), or step_in_backward=False"
                )
            clip = getattr(optimizer, "max_grad_norm", None)
            if clip is not None:
                raise ValueError(
                    f"step_in_backward=True cannot clip by a global norm (the wrapper's "
                    f"max_grad_norm={clip!r}): the norm needs every gradient "
                    "before the first parameter steps. Drop max_grad_norm, or use "
                    "step_in_backward=False"
                )

    def attach(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Hook every parameter of ``optimizers`` (those ``prepare`` returns) that needs a
        gradient."""
        if not self.enabled:
            return
        self.check(model, optimizers)
        names: dict[torch.Tensor, str] = {p: name for name, p in model.named_parameters()}
        for optimizer in optimizers:
            for p in dict.fromkeys(params_of(optimizer)):
                if p.requires_grad:
                    hook = _StepHook(self, names.get(p, "?"), optimizer)
                    self._handles.append(p.register_post_accumulate_grad_hook(hook))

    # -- the loop -------------------------------------------------------------------------

    def arm(self, micro_batches: int) -> None:
        """Before the session's ``loss.backward()``: the hooks step only between this and
        :meth:`disarm` (called in a ``finally``: plain calls, not a context manager, because
        this is a fixed cost of every backward of every session).

        Raises:
            RuntimeError: a second backward before ``mp.step`` (accumulation).
        """
        if self.enabled and micro_batches > 0:
            raise RuntimeError(
                f"step_in_backward=True got a second backward before mp.step ({micro_batches} "
                "already): each backward steps the parameters, so gradients cannot accumulate "
                "over micro-batches. Call mp.step(optimizer) after every mp.backward(loss), or "
                "use step_in_backward=False to accumulate"
            )
        self._armed = self.enabled

    def disarm(self) -> None:
        """After the session's ``loss.backward()``, also when it raised."""
        self._armed = False

    @torch.no_grad()
    def step_one(self, param: torch.Tensor, name: str, optimizer: torch.optim.Optimizer) -> None:
        """Step ``param`` alone and free its gradient (a hook's body)."""
        grad = param.grad
        if not self._armed or grad is None:
            return  # a backward outside mp.backward: the gradient stays, as torch leaves it
        norm = float(torch.linalg.vector_norm(grad, dtype=torch.float32))
        # A finite norm means finite elements; an inf norm may be an overflow of the sum.
        if not math.isfinite(norm) and not bool(torch.isfinite(grad).all()):
            self._skipped.append(name)
        else:
            self._norm_sq += norm * norm
            self._stepped += 1
            if isinstance(optimizer, WrappedOptimizer):
                optimizer.step_parameters([param])
            else:
                optimizer.step()  # the only gradient it holds is this one
        param.grad = None

    def check_step(
        self,
        optimizers: Sequence[torch.optim.Optimizer],
        micro_batches: int,
        max_grad_norm: float | None,
    ) -> None:
        """What the session checks before a step (ordinary: gradients exist).

        Raises:
            ValueError: ``max_grad_norm`` under the step inside backward.
            RuntimeError: no backward since the last step.
        """
        if not self.enabled:
            check_has_work(optimizers, micro_batches)
            return
        if max_grad_norm is not None:
            raise ValueError(
                f"max_grad_norm={max_grad_norm!r} clips by the norm of all gradients, but with "
                "step_in_backward=True every parameter was already stepped (unclipped) in "
                "backward. Drop max_grad_norm (the step's report still gives grad_norm), or use "
                "step_in_backward=False to clip"
            )
        if micro_batches == 0:  # the gradients are gone: only the backward can be checked
            check_has_work(optimizers, micro_batches)

    def finish(self, report: StepReport) -> StepReport:
        """The step's report with what the hooks did: parameters not stepped (non-finite
        gradients) and the gradient norm; then ready for the next step. A backward that stepped
        no parameter (its loss did not reach the optimizers' parameters) reports
        ``stepped=False`` and no norm."""
        if not self.enabled:
            return report
        skipped, stepped, norm_sq = tuple(self._skipped), self._stepped, self._norm_sq
        self._skipped, self._stepped, self._norm_sq = [], 0, 0.0
        return replace(
            report,
            stepped=report.stepped and stepped > 0 and not skipped,
            nonfinite_params=skipped,
            grad_norm=math.sqrt(norm_sq) if stepped else None,
        )

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
