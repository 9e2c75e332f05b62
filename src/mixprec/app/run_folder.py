"""A run's folder: what it holds, when it may be written, and where a resume continues.

Design note: a run is a folder holding ``checkpoint.pt`` (a file, or a sharded checkpoint folder
under a process group), ``metrics.jsonl`` and ``result.json``. A folder that holds a run is never
written over unless asked, and a resume continues only the same run: the checkpoint records the
task (every size that shapes the model, the data's digest), the precision and the resolved
autocast backend, and each is checked before anything is touched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mixprec.app.tasks import Task
from mixprec.checkpoint import CheckpointError, load_checkpoint
from mixprec.diagnostics.metrics import keep_metrics_before

__all__ = [
    "RUN_FILES",
    "check_run_folder",
    "checkpoint_extra",
    "prepare_run_folder",
    "resume_step",
]

RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "result.json")
"""The files a run writes into its folder (``checkpoint.pt`` is a sharded checkpoint folder for a
run under a process group)."""


def prepare_run_folder(folder: Path, *, overwrite: bool, start: int) -> None:
    """Create ``folder``; with ``overwrite`` remove the run it held; keep the metrics of the
    steps before ``start`` (a resume redoes the rest). Rank 0's work, after every check."""
    folder.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in RUN_FILES:
            _remove(folder / name)
    keep_metrics_before(folder / "metrics.jsonl", start)


def checkpoint_extra(task: Task, recipe: str, backend: str, step: int) -> dict[str, Any]:
    """What a run's checkpoint records beside the state, for :func:`resume_step` to check."""
    return {
        "step": step,
        "task": json.dumps(task.describe()),
        "recipe": recipe,
        "backend": backend,
    }


def check_run_folder(folder: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to write a new run over one that is already in ``folder``."""
    if resume and overwrite:
        raise ValueError(
            "resume and overwrite exclude each other: --resume continues the run in the folder, "
            "--overwrite replaces it; pass one"
        )
    found = [name for name in RUN_FILES if (folder / name).exists()] if folder.is_dir() else []
    if found and not resume and not overwrite:
        raise ValueError(
            f"run folder {str(folder)!r} already holds a run ({', '.join(found)}); pass --resume "
            "to continue it, --overwrite to replace it, or give another folder"
        )


def resume_step(checkpoint: Path, task: Task, recipe: str, backend: str) -> int:
    """The step a checkpoint was written at, once it is of this task, recipe and backend."""
    if checkpoint.is_dir():  # sharded, by a run under torchrun
        from mixprec.distributed.checkpoint import read_state

        extra = read_state(checkpoint).get("extra", {})
    else:
        extra = load_checkpoint(checkpoint).get("extra", {})
    cannot = f"cannot resume from {str(checkpoint)!r}"
    here = json.loads(json.dumps(task.describe()))  # as the checkpoint stores it
    try:
        there = json.loads(extra.get("task", "null"))
    except (TypeError, json.JSONDecodeError):
        there = None
    if not isinstance(there, dict):
        raise CheckpointError(f"{cannot}: it records no task settings; start a new run")
    if there != here:
        changed = ", ".join(
            f"{key} {there.get(key, '(none)')} there, {here.get(key, '(none)')} here"
            for key in sorted(set(there) | set(here))
            if there.get(key) != here.get(key)
        )
        raise CheckpointError(
            f"{cannot}: another task ({changed}); use the same settings, or start a new run"
        )
    if extra.get("recipe") != recipe:
        raise CheckpointError(
            f"{cannot}: it was trained with precision {extra.get('recipe')!r}, not "
            f"{recipe!r}; resume with --precision {extra.get('recipe')}, or start a new run"
        )
    if extra.get("backend") != backend:
        raise CheckpointError(
            f"{cannot}: it was trained with autocast backend "
            f"{extra.get('backend')!r}, here the backend is {backend!r}; another backend computes "
            f"other numbers, so the run would not continue as it began; resume with backend "
            f"{extra.get('backend')!r} (--backend) or start a new run"
        )
    return int(extra["step"])


def _remove(path: Path) -> None:
    """Remove a run file: a one-process checkpoint file or a sharded checkpoint folder."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
