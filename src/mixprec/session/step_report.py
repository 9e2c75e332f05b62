"""What one ``MixedPrecision.step`` did: :class:`StepReport`, and where its metrics line goes
(:class:`StepLog`)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mixprec import _dist
from mixprec.diagnostics import MetricsWriter, UnderflowReport
from mixprec.diagnostics.metrics import group_mean, rank_metrics_file
from mixprec.scaling.agreement import agreement_groups

__all__ = ["StepLog", "StepReport", "delayed_fp8_state"]


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

    def metrics(self) -> dict[str, Any]:
        """The report as one line of metrics (what ``MixedPrecision(metrics=...)`` writes)."""
        values: dict[str, Any] = {
            "loss": self.loss,
            "micro_batches": self.micro_batches,
            "loss_scale": self.scale,
            "skipped": not self.stepped,
            "grad_norm": self.grad_norm,
            "seconds": self.seconds,
        }
        if self.nonfinite_params:
            values["nonfinite_params"] = list(self.nonfinite_params)
        if self.origin:
            values["origin"] = self.origin
        if self.underflow is not None:
            values.update(self.underflow.metrics())
        return values


def delayed_fp8_state(model: nn.Module | None) -> dict[str, float]:
    """``fp8/<layer>/<amax|scale>_<operand>`` of every delayed-scaling FP8 layer of ``model``."""
    from mixprec.compute.fp8_linear import Fp8Linear

    values: dict[str, float] = {}
    for name, module in model.named_modules() if model is not None else ():
        if isinstance(module, Fp8Linear) and module.recipe.scaling == "delayed":
            for key, value in module.delayed_scaling_state().items():
                values[f"fp8/{name}/{key}"] = value
    return values


class StepLog:
    """One metrics line per step in ``folder`` (``metrics.jsonl``, and TensorBoard scalars).

    Under a process group the file depends on the model's ranks, so it is opened at the first
    step: the first rank of the model's data-parallel group writes it, with the loss averaged over
    the group (:func:`mixprec.diagnostics.metrics.rank_metrics_file`); a model local to its rank
    writes ``metrics.rank<r>.jsonl``.

    Args:
        folder: where the metrics go.
        tensorboard: also write TensorBoard scalars.
        device: the session's device (where the loss is averaged).
    """

    def __init__(
        self, folder: str | os.PathLike[str], tensorboard: bool, device: torch.device
    ) -> None:
        self.folder, self.tensorboard, self.device = folder, tensorboard, device
        self.writer = None if _dist.initialized() else self._open("metrics.jsonl")

    def _open(self, filename: str) -> MetricsWriter:
        return MetricsWriter(self.folder, tensorboard=self.tensorboard, filename=filename)

    def log(
        self, report: StepReport, extra: Mapping[str, float], params: Iterable[torch.Tensor]
    ) -> None:
        """Write ``report``'s line, with ``extra`` values; ``params`` are the model's (they say
        which ranks the model is data-parallel over)."""
        values = {**report.metrics(), **extra}
        if _dist.initialized():
            groups = agreement_groups(params, "auto")
            if report.loss is not None:
                values["loss"] = group_mean(report.loss, groups, self.device)
            if self.writer is None:
                filename = rank_metrics_file(groups)
                if filename is None:
                    return
                self.writer = self._open(filename)
        if self.writer is not None:
            self.writer.log(report.step, values)

    def close(self) -> None:
        """Close the metrics file."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
