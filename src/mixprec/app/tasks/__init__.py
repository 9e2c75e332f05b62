"""Built-in training tasks on real data that is already on the machine (nothing is downloaded).

* ``digits``: an MLP on scikit-learn's bundled handwritten digits (accuracy).
* ``charlm``: a byte-level transformer LM on Python standard library source, or ``--data PATH``.
* ``cnn``: a conv net with BatchNorm on the same digits images.
* ``gpt2``: Hugging Face's GPT-2 architecture (small config) on the ``charlm`` text; needs
  ``transformers`` (``pip install 'mixprec[transformers]'``).
"""

from __future__ import annotations

from typing import Any

from mixprec.app.tasks.base import MAX_SEED, Batch, Task, TaskConfig
from mixprec.app.tasks.charlm import CharLMTask
from mixprec.app.tasks.cnn import CNNTask
from mixprec.app.tasks.digits import DigitsTask
from mixprec.app.tasks.gpt2 import GPT2Task

__all__ = [
    "DEFAULT_TASKS",
    "MAX_SEED",
    "TASKS",
    "Batch",
    "CNNTask",
    "CharLMTask",
    "DigitsTask",
    "GPT2Task",
    "Task",
    "TaskConfig",
    "make_task",
]

TASKS: dict[str, type[Task]] = {
    "digits": DigitsTask,
    "charlm": CharLMTask,
    "cnn": CNNTask,
    "gpt2": GPT2Task,
}

DEFAULT_TASKS: tuple[str, ...] = ("charlm", "cnn")
"""What ``mixprec compare`` trains unless told otherwise: a transformer and a CNN."""


def make_task(name: str, config: TaskConfig | None = None, **options: Any) -> Task:
    """Build a task by name.

    Raises:
        ValueError: unknown task name (the message lists the valid ones).
    """
    try:
        cls = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}") from None
    return cls(config, **options)  # type: ignore[call-arg]
