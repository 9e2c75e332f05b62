"""``digits``: an MLP classifier on scikit-learn's bundled handwritten digits (8x8, 1797 images).

The data ships inside scikit-learn, so nothing is downloaded. Pixels are scaled to [0, 1]; a
seeded permutation holds out 20% for validation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mixprec.app.tasks.base import Batch, Task, TaskConfig

__all__ = ["DigitsTask"]


class DigitsTask(Task):
    """Classify 8x8 digit images with a 64-256-256-10 MLP.

    Args:
        config: steps, batch size, learning rate and seed (default :attr:`DEFAULT_CONFIG`:
            600 steps, batch 64, AdamW at 1e-4).
        hidden: width of the two hidden layers.

    Example:
        >>> task = DigitsTask(TaskConfig(steps=1, batch_size=8, lr=1e-3))
        >>> x, y = task.batch(0)
        >>> tuple(x.shape), tuple(y.shape)
        ((8, 64), (8,))
    """

    name = "digits"
    # lr 1e-4 puts AdamW's updates below half a bf16 ulp of most weights: the setting where
    # round-to-nearest stalls and stochastic rounding does not.
    DEFAULT_CONFIG = TaskConfig(steps=600, batch_size=64, lr=1e-4)

    def __init__(self, config: TaskConfig | None = None, hidden: int = 256) -> None:
        from sklearn.datasets import load_digits

        self.config = config or self.DEFAULT_CONFIG
        self.hidden = hidden
        data = load_digits()
        images = torch.tensor(data.data, dtype=torch.float32) / 16.0
        labels = torch.tensor(data.target, dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
        n_val = len(labels) // 5
        self.val_x, self.val_y = images[order[:n_val]], labels[order[:n_val]]
        self.train_x, self.train_y = images[order[n_val:]], labels[order[n_val:]]

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.config.seed)
        return nn.Sequential(
            nn.Linear(64, self.hidden),
            nn.ReLU(),
            nn.Linear(self.hidden, self.hidden),
            nn.ReLU(),
            nn.Linear(self.hidden, 10),
        )

    def batch(self, step: int) -> Batch:
        return self._sample(step, self.config.batch_size)

    def example_batch(self, size: int) -> Batch:
        return self._sample(0, size)

    def _sample(self, step: int, size: int) -> Batch:
        index = torch.randint(0, len(self.train_y), (size,), generator=self.generator(step))
        return self.train_x[index], self.train_y[index]

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.float(), target)

    def evaluate(
        self,
        model: nn.Module,
        region: Callable[[], contextlib.AbstractContextManager[object]],
    ) -> dict[str, float]:
        with torch.no_grad(), region():
            logits = model(self.val_x).float()
        return {
            "val_loss": F.cross_entropy(logits, self.val_y).item(),
            "val_accuracy": (logits.argmax(-1) == self.val_y).float().mean().item(),
        }

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "hidden": self.hidden}
