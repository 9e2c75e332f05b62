"""Built-in training tasks on real data that is already on the machine (nothing is downloaded).

* ``digits``: an MLP on scikit-learn's bundled handwritten digits (accuracy).
* ``charlm``: a byte-level transformer LM on Python standard library source, or ``--data PATH``.
"""

from __future__ import annotations

from typing import Any

from mixprec.tasks.base import MAX_SEED, Batch, Task, TaskConfig
from mixprec.tasks.charlm import CharLMTask
from mixprec.tasks.digits import DigitsTask

__all__ = [
    "MAX_SEED",
    "TASKS",
    "Batch",
    "CharLMTask",
    "DigitsTask",
    "Task",
    "TaskConfig",
    "make_task",
]

TASKS: dict[str, type[Task]] = {"digits": DigitsTask, "charlm": CharLMTask}


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
