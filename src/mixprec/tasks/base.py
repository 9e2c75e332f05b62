"""What a built-in task provides: data, a model, a loss and an evaluation, all seeded.

Design note: a task's batches are a pure function of ``(seed, step)`` (a generator seeded from
both), so a run resumed at step k sees exactly the batches an uninterrupted run sees, and every
precision in a comparison trains on the same data in the same order.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Batch", "Task", "TaskConfig"]

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TaskConfig:
    """Sizes and optimisation settings shared by the tasks (each task sets its own defaults)."""

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
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")


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
