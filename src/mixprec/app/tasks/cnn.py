"""``cnn``: a small conv net with BatchNorm on scikit-learn's bundled digits images (8x8).

The same data, split and batches as :mod:`~mixprec.app.tasks.digits` (nothing is downloaded); the
images are seen as 1x8x8 pictures by two 3x3 conv + BatchNorm + ReLU stages, a 2x2 max-pool and
a linear classifier. BatchNorm is what makes this task differ from the MLP: its running
statistics are buffers, and the session keeps norms in fp32 (an FP32 island).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from mixprec.app.tasks.base import TaskConfig
from mixprec.app.tasks.digits import DigitsTask

__all__ = ["CNNTask"]


class CNNTask(DigitsTask):
    """Classify 8x8 digit images with a conv net (conv-BN-ReLU x2, max-pool, linear).

    Args:
        config: steps, batch size, learning rate and seed (default :attr:`DEFAULT_CONFIG`:
            200 steps, batch 32, AdamW at 2e-3: a comparison of five precisions stays well under
            a minute on two CPU cores).
        channels: channels of the first conv stage (the second has twice as many).

    Example:
        >>> task = CNNTask(TaskConfig(steps=1, batch_size=8, lr=1e-3))
        >>> x, _ = task.batch(0)
        >>> tuple(task.build_model()(x).shape)
        (8, 10)
    """

    name = "cnn"
    DEFAULT_CONFIG = TaskConfig(steps=200, batch_size=32, lr=2e-3)

    def __init__(self, config: TaskConfig | None = None, channels: int = 8) -> None:
        super().__init__(config or self.DEFAULT_CONFIG)
        self.channels = channels

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.config.seed)
        c = self.channels
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),  # the batches are flat 64-pixel rows, as for the MLP
            nn.Conv2d(1, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.BatchNorm2d(2 * c),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * c * 4 * 4, 10),
        )

    def evaluate(
        self,
        model: nn.Module,
        region: Callable[[], contextlib.AbstractContextManager[object]],
    ) -> dict[str, float]:
        """Validation metrics in eval mode: BatchNorm normalises by its running statistics."""
        training = model.training
        model.eval()
        try:
            return super().evaluate(model, region)
        finally:
            model.train(training)

    def describe(self) -> dict[str, object]:
        described = super().describe()
        described.pop("hidden", None)
        return {**described, "channels": self.channels}
