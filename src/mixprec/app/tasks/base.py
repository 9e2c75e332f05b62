"""What a built-in task provides: data, a model, a loss and an evaluation, all seeded.

Design note: a task's batches are a pure function of ``(seed, step)`` (a generator seeded from
both), so a run resumed at step k sees exactly the batches an uninterrupted run sees, and every
precision in a comparison trains on the same data in the same order.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["MAX_SEED", "Batch", "Task", "TaskConfig"]

Batch = tuple[torch.Tensor, torch.Tensor]

MAX_SEED = 2**32 - 1
"""The largest seed: batch generators are seeded with ``seed * 1_000_003 + step``, which must
stay within torch's 64-bit seeds for any number of steps a run can take."""


@dataclass(frozen=True)
class TaskConfig:
    """Sizes and optimisation settings shared by the tasks (each task sets its own defaults).

    Raises:
        ValueError: ``steps`` or ``batch_size`` below 1, an ``lr`` that is not a positive finite
            number, a negative or non-finite ``weight_decay``, a ``seed`` outside
            ``0..MAX_SEED``.
    """

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if not (
            isinstance(self.weight_decay, (int, float))
            and math.isfinite(self.weight_decay)
            and self.weight_decay >= 0
        ):
            raise ValueError(
                f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}"
            )
        if (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed <= MAX_SEED
        ):
            raise ValueError(f"seed must be an integer from 0 to {MAX_SEED}, got {self.seed!r}")


class Task(ABC):
    """A training task: ``batch(step)``, ``build_model()``, ``loss`` and ``evaluate``."""

    name: str
    config: TaskConfig
    DEFAULT_CONFIG: TaskConfig

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model (seeded from the task's seed)."""

    @abstractmethod
    def batch(self, step: int) -> Batch:
        """The training batch of ``step``: the same for every run with the same seed."""

    def example_batch(self, size: int) -> Batch:
        """``size`` training samples shaped like a batch, to measure memory per sample with.

        The default takes the first ``size`` samples of ``batch(0)``; the built-in tasks build
        only ``size`` samples, so the measurement costs nothing even for a huge batch size.
        """
        x, y = self.batch(0)
        return x[:size], y[:size]

    @abstractmethod
    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The scalar training loss, computed in fp32."""

    @abstractmethod
    def evaluate(
        self,
        model: nn.Module,
        region: Callable[[], contextlib.AbstractContextManager[object]],
    ) -> dict[str, float]:
        """Validation metrics (``val_loss`` and, for classifiers, ``val_accuracy``)."""

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """AdamW with the task's learning rate and weight decay."""
        return torch.optim.AdamW(
            model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay
        )

    def generator(self, step: int) -> torch.Generator:
        """A CPU generator seeded from the task's seed and ``step``."""
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)

    def describe(self) -> dict[str, object]:
        """The task's name and configuration (written into reports and checkpoints)."""
        return {"task": self.name, **self.config.__dict__}
