"""Per-step run metrics: one JSON object per line in ``metrics.jsonl``, optionally TensorBoard.

Each line is ``{"step": <int>, <key>: <value>, ...}`` with numbers, booleans, strings or null.
JSON has no inf or NaN, and a NaN loss is exactly what this file must be able to show, so a
NaN is written as ``null`` (what JSON readers take for "no number") and its key is listed under
``"nan_metrics"``, which tells it from a metric that is absent (``None``, also ``null``);
infinities are written as the strings ``"inf"`` and ``"-inf"``. :func:`read_metrics` turns both
back into floats. The file is opened for appending and every line
is flushed as it is written, so a resumed run continues the same file and a crash loses no step.

The session records, per step, the keys in :data:`STEP_KEYS`; :meth:`UnderflowReport.metrics
<mixprec.diagnostics.underflow.UnderflowReport.metrics>` supplies the underflow ones.

Under ``torch.distributed`` (:func:`rank_metrics_file`, :func:`group_mean`): a data-parallel
model's ranks train one model, so one line per step is written, by the first rank of the
model's process groups, with the loss averaged over them (the loss of the global batch); a
model that is not data-parallel trains on its own rank, so each rank writes its own
``metrics.rank<r>.jsonl``. No two processes append to one file.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import torch
import torch.distributed as dist

from mixprec import _dist

__all__ = ["STEP_KEYS", "MetricsWriter", "group_mean", "rank_metrics_file", "read_metrics"]

STEP_KEYS = (
    "loss",
    "loss_scale",
    "skipped",
    "grad_norm",
    "underflow_fraction",
    "overflow_fraction",
    "nonfinite_params",
)
"""The keys a training session writes per step (any other key is allowed too)."""

_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
NAN_KEY = "nan_metrics"
"""The reserved key of a line that lists which of its ``null`` values are NaN."""


def _encode(key: str, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"metric {key!r} must be a single number, got a tensor of shape "
                f"{tuple(value.shape)!r}; reduce it first"
            )
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        # NaN is written as null by log() (listed under NAN_KEY); infinities keep their sign.
        return value if math.isfinite(value) else str(value)  # "nan", "inf", "-inf"
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)  # e.g. the names of parameters with non-finite gradients
    raise TypeError(
        f"metric {key!r} must be a number, bool, string, None or a list of strings, got "
        f"{type(value).__name__} {value!r}"
    )


class MetricsWriter:
    """Append one JSON object per step to ``<directory>/metrics.jsonl``, and to TensorBoard.

    Args:
        directory: where ``metrics.jsonl`` (and TensorBoard's event files) go; created if needed.
        tensorboard: also write numeric metrics as TensorBoard scalars; needs the ``tensorboard``
            package.
        filename: the JSON-lines file's name.

    Raises:
        ModuleNotFoundError: ``tensorboard=True`` but the ``tensorboard`` package is missing.
        TypeError: ``tensorboard`` is not a bool.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as run:
        ...     with MetricsWriter(run) as writer:
        ...         writer.log(0, loss=2.5, loss_scale=65536.0, skipped=False)
        ...         writer.log(1, loss=float("nan"), loss_scale=32768.0, skipped=True)
        ...     rows = read_metrics(writer.path)
        >>> rows[1]["skipped"], math.isnan(rows[1]["loss"])
        (True, True)
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        tensorboard: bool = False,
        filename: str = "metrics.jsonl",
    ) -> None:
        if not isinstance(tensorboard, bool):
            raise TypeError(
                f"tensorboard must be a bool, got {type(tensorboard).__name__} {tensorboard!r}"
            )
        if tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ModuleNotFoundError(
                "MetricsWriter(tensorboard=True) needs the 'tensorboard' package, which is not "
                "installed: pip install tensorboard, or pass tensorboard=False (metrics.jsonl "
                "is written either way)"
            )
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / filename
        self._file: IO[str] | None = self.path.open("a", encoding="utf-8")
        self._tensorboard: Any = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(self.directory))

    def log(self, step: int, metrics: Mapping[str, Any] | None = None, **values: Any) -> None:
        """Write one line for ``step`` with ``metrics`` and ``values`` (keyword wins).

        Args:
            step: the optimizer step, an integer >= 0.
            metrics: a mapping of metric names to values (e.g. ``report.metrics()``).
            **values: more metrics, e.g. ``loss=0.7, loss_scale=65536.0, skipped=False``.

        Raises:
            RuntimeError: the writer is closed.
            ValueError: a negative step; a multi-element tensor; the reserved key
                ``"nan_metrics"``.
            TypeError: a non-integer step, a non-string key or an unsupported value.
        """
        if self._file is None:
            raise RuntimeError(f"this MetricsWriter for {str(self.path)!r} is closed")
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {type(step).__name__} {step!r}")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step!r}")
        merged = {**(metrics or {}), **values}
        row: dict[str, Any] = {"step": step}
        for key, value in merged.items():
            if not isinstance(key, str) or key == "step":
                raise TypeError(f"metric names are strings other than 'step', got {key!r}")
            if key == NAN_KEY:
                raise ValueError(
                    f"metric name {key!r} is reserved: it lists which null values of a line are "
                    "NaN; log the NaN values themselves (e.g. loss=float('nan'))"
                )
            row[key] = _encode(key, value)
        nan = [key for key, value in row.items() if value == "nan"]
        for key in nan:
            row[key] = None
        if nan:
            row[NAN_KEY] = nan
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for key, value in row.items():
                if key in nan:
                    self._tensorboard.add_scalar(key, math.nan, step)
                elif key != "step" and isinstance(value, (int, float)):  # bools are ints
                    self._tensorboard.add_scalar(key, float(value), step)
                elif isinstance(value, str) and value in _NONFINITE:
                    self._tensorboard.add_scalar(key, _NONFINITE[value], step)

    def close(self) -> None:
        """Flush and close the file (and TensorBoard); closing twice is harmless."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` file back, with ``"nan"``/``"inf"``/``"-inf"`` as floats.

    Args:
        path: the file, or the run directory that holds ``metrics.jsonl``.

    Returns:
        One dict per line, in file order.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    rows = []
    with path.open(encoding="utf-8") as file:
        for line in file:
            if line.strip():
                row = json.loads(line)
                nan = row.pop(NAN_KEY, ())
                rows.append(
                    {
                        k: math.nan
                        if k in nan
                        else (_NONFINITE.get(v, v) if isinstance(v, str) else v)
                        for k, v in row.items()
                    }
                )
    return rows


def rank_metrics_file(groups: Sequence[Any]) -> str | None:
    """The metrics file this process writes, or None when another rank writes its model's.

    Args:
        groups: the process groups the model is data-parallel over (None in it: the world), as
            :func:`mixprec.scaling.agreement.agreement_groups` finds them; empty for a model
            local to this rank.

    Returns:
        ``"metrics.jsonl"`` without a process group, or on the rank that is first in every one
        of ``groups``; None on the other ranks of ``groups``; ``"metrics.rank<r>.jsonl"`` for a
        model local to rank ``r`` of an initialised process group.

    Example:
        >>> rank_metrics_file([])  # no process group
        'metrics.jsonl'
    """
    if not _dist.initialized():
        return "metrics.jsonl"
    if not groups:
        return f"metrics.rank{dist.get_rank()}.jsonl"
    return "metrics.jsonl" if all(dist.get_rank(group) == 0 for group in groups) else None


def group_mean(value: float, groups: Sequence[Any], device: str | torch.device = "cpu") -> float:
    """The mean of ``value`` over the ranks of ``groups`` (a collective on each; in turn).

    Averaging over the groups one after another is the mean over all their ranks for a device
    mesh's groups and the plain mean for one group; no groups returns ``value``.

    Example:
        >>> group_mean(2.5, [])
        2.5
    """
    if not groups:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)  # nccl: a cuda device
    for group in groups:
        dist.all_reduce(total, group=group)
        total /= dist.get_world_size(group)
    return float(total.item())
