"""gpu_check's shared parts: a section's time budget and its checks, and GPU timing."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


class OverBudget(Exception):
    """A section ran out of its time budget; the rest of it is skipped."""


class Section:
    """A section's time budget and the checks it counted."""

    def __init__(self, name: str, budget_s: float) -> None:
        self.name = name
        self.deadline = time.perf_counter() + budget_s
        self.budget_s = budget_s
        self.passed = 0
        self.failures: list[str] = []

    def check_time(self, what: str) -> None:
        if time.perf_counter() > self.deadline:
            raise OverBudget(f"{self.name}: over its {self.budget_s:.0f} s budget before {what}")

    def record(self, ok: bool, what: str) -> None:
        if ok:
            self.passed += 1
        else:
            self.failures.append(what)
            print(f"  FAIL {what}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> float:
    """Seconds per call of ``fn``: one warm-up call, then the mean of ten."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / 10
