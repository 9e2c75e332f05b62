"""Train one task under one precision recipe: the engine behind ``mixprec train`` and ``compare``.

Design note: a run is a folder. It holds ``metrics.jsonl`` (one JSON object per step),
``checkpoint.pt`` (written atomically every ``checkpoint_every`` steps and at the end) and
``result.json``. Batches depend only on ``(seed, step)`` and the checkpoint carries the model,
optimizer, session and RNG state, so a run killed at any point and resumed reaches the same final
weights, bit for bit, as one that never stopped.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixprec.checkpoint import CheckpointError, load_checkpoint
from mixprec.diagnostics import read_metrics
from mixprec.optim import memory_report
from mixprec.policy import Policy
from mixprec.session import _UPDATE_MODES, MixedPrecision
from mixprec.tasks import Task

__all__ = ["DEFAULT_RECIPES", "Recipe", "RunResult", "activation_bytes", "train"]

_TIMING_WARMUP = 3


@dataclass(frozen=True)
class Recipe:
    """One precision to train with: a policy and where the update happens.

    The text form is ``POLICY[/UPDATE]``, e.g. ``"bf16-mixed"`` or ``"bf16-pure/nearest"``.

    Example:
        >>> Recipe.parse("bf16-pure/stochastic").update
        'stochastic'
    """

    name: str
    policy: str
    update: str = "auto"

    @classmethod
    def parse(cls, spec: str) -> Recipe:
        """Parse ``POLICY[/UPDATE]``; raises ``ValueError`` naming the bad part and the choices."""
        policy, _, update = spec.strip().partition("/")
        Policy.parse(policy)  # validates, with the presets in its message
        update = update or "auto"
        if update not in _UPDATE_MODES:
            raise ValueError(
                f"unknown update mode {update!r} in precision {spec!r}; valid modes: "
                f"{', '.join(_UPDATE_MODES)} (e.g. 'bf16-pure/stochastic')"
            )
        return cls(spec.strip(), policy, update)


DEFAULT_RECIPES = (
    "fp32",
    "bf16-mixed",
    "fp16-mixed",
    "bf16-pure/nearest",
    "bf16-pure/stochastic",
)
"""What ``mixprec compare`` runs unless told otherwise."""


@dataclass
class RunResult:
    """The figures of one finished run (what ``result.json`` holds)."""

    recipe: str
    task: dict[str, Any]
    backend: str
    steps: int
    final_train_loss: float
    metrics: dict[str, float]
    ms_per_step: float
    activation_bytes: int
    state_bytes_per_param: float
    skipped_steps: int
    final_scale: float
    losses: list[float] = field(default_factory=list, repr=False)
    scales: list[float] = field(default_factory=list, repr=False)
    grad_log2: list[float] = field(default_factory=list, repr=False)

    def save(self, folder: Path) -> None:
        """Write ``result.json`` into ``folder``."""
        (folder / "result.json").write_text(json.dumps(asdict(self)))


def activation_bytes(model: nn.Module, forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward during one ``forward()``.

    Parameters and autocast's casts of parameters (weight copies) are not activations and are
    left out. Exact and deterministic: each saved tensor's storage is counted once, through
    ``torch.autograd.graph.saved_tensors_hooks``.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and not _is_parameter_cast(t):
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


_VIEW_NODES = frozenset(
    {"TBackward0", "TransposeBackward0", "PermuteBackward0", "ViewBackward0", "ExpandBackward0",
     "UnsafeViewBackward0", "AsStridedBackward0", "SqueezeBackward0", "UnsqueezeBackward0"}
)  # fmt: skip


def _is_parameter_cast(t: torch.Tensor) -> bool:
    """Whether ``t`` is autocast's dtype cast of a parameter, or a view of one (a weight copy,
    not an activation)."""
    fn = t.grad_fn
    while fn is not None and type(fn).__name__ in _VIEW_NODES:
        fn = fn.next_functions[0][0] if fn.next_functions else None
    if fn is None or type(fn).__name__ != "ToCopyBackward0":
        return False
    return any(type(f).__name__ == "AccumulateGrad" for f, _ in fn.next_functions if f is not None)


def _grad_log2(model: nn.Module, scale: float) -> list[float]:
    """log2 of the non-zero unscaled gradient magnitudes (a sample of at most 200k)."""
    grads = [p.grad.detach().float().flatten() for p in model.parameters() if p.grad is not None]
    if not grads:
        return []
    flat = torch.cat(grads).abs() / scale
    flat = flat[(flat > 0) & torch.isfinite(flat)]
    if flat.numel() > 200_000:
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))]
        flat = flat[:200_000]
    return torch.log2(flat).tolist()


def train(
    task: Task,
    recipe: Recipe,
    out: str | Path,
    *,
    device: str = "cpu",
    backend: str = "auto",
    resume: bool = False,
    checkpoint_every: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> RunResult:
    """Train ``task`` under ``recipe``, writing metrics, checkpoints and the result to ``out``.

    Args:
        task: the task (data, model, loss, evaluation).
        recipe: the precision.
        out: the run's folder (created; must not be a file).
        device: where to train.
        backend: autocast backend for 16-bit compute.
        resume: continue from ``out/checkpoint.pt`` if it exists.
        checkpoint_every: also checkpoint every this many steps (None: only at the end).
        on_step: called after every step with the step number (progress bars).

    Raises:
        ValueError: ``out`` is a file; a checkpoint of another task, recipe or model shape.
    """
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output folder {str(folder)!r} is a file; give a folder path")
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "checkpoint.pt"
    metrics_file = folder / "metrics.jsonl"
    resuming = resume and checkpoint.exists()
    start = _check_same_run(checkpoint, task, recipe) if resuming else 0
    kept = [r for r in _read_metrics(metrics_file) if r["step"] < start]  # drop what is redone
    metrics_file.write_text("".join(json.dumps(r) + "\n" for r in kept))
    model = task.build_model()
    optimizer = task.build_optimizer(model)
    mp = MixedPrecision(
        recipe.policy,
        device,
        backend=backend,
        update=recipe.update,  # type: ignore[arg-type]
        metrics=folder,
    )
    model, optimizer = mp.prepare(model, optimizer)
    if resuming:
        mp.load(checkpoint, model, optimizer)
    x0, _ = task.batch(0)

    def probe_forward() -> torch.Tensor:
        with mp.autocast():
            return model(x0.to(mp.device))

    saved = activation_bytes(model, probe_forward)
    grad_log2: list[float] = []
    state_bytes = math.nan
    with mp:
        for step in range(start, task.config.steps):
            x, y = (t.to(mp.device) for t in task.batch(step))
            with mp.autocast():
                loss = task.loss(model(x), y)
            mp.backward(loss)
            report = mp.step(optimizer)
            if step == task.config.steps - 1:  # gradients exist now: measure with them
                grad_log2 = _grad_log2(model, report.scale)
                state_bytes = memory_report(model, optimizer).per_param["total"]
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if checkpoint_every and done % checkpoint_every == 0 and done < task.config.steps:
                mp.save(checkpoint, model, optimizer, **_extra(task, recipe, done))
            if on_step is not None:
                on_step(done)
        mp.save(checkpoint, model, optimizer, **_extra(task, recipe, task.config.steps))
    history = read_metrics(metrics_file)
    times = [float(r["seconds"]) for r in history if r["step"] >= start]
    losses = [float(r["loss"]) for r in history]
    tail = max(1, len(losses) // 10)
    steady = times[_TIMING_WARMUP:] or times
    result = RunResult(
        recipe=recipe.name,
        task=task.describe(),
        backend=mp.backend if mp.policy.compute.bits <= 16 else "fp32",
        steps=task.config.steps,
        final_train_loss=statistics.fmean(losses[-tail:]) if losses else math.nan,
        metrics=task.evaluate(model, mp.autocast),
        ms_per_step=1e3 * statistics.median(steady) if steady else math.nan,
        activation_bytes=saved,
        state_bytes_per_param=float(state_bytes),
        skipped_steps=sum(bool(r["skipped"]) for r in history),
        final_scale=float(history[-1]["loss_scale"]) if history else 1.0,
        losses=losses,
        scales=[float(r["loss_scale"]) for r in history],
        grad_log2=grad_log2,
    )
    result.save(folder)
    return result


def _extra(task: Task, recipe: Recipe, step: int) -> dict[str, Any]:
    return {"step": step, "task": json.dumps(task.describe()), "recipe": recipe.name}


def _check_same_run(checkpoint: Path, task: Task, recipe: Recipe) -> int:
    """The step a checkpoint was written at, once it is known to be of this task and recipe."""
    extra = load_checkpoint(checkpoint).get("extra", {})
    saved_task = extra.get("task")
    if saved_task != json.dumps(task.describe()) or extra.get("recipe") != recipe.name:
        raise CheckpointError(
            f"cannot resume from {str(checkpoint)!r}: it was written by task {saved_task} with "
            f"precision {extra.get('recipe')!r}, not {json.dumps(task.describe())} with "
            f"{recipe.name!r}"
        )
    return int(extra["step"])


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` up to the first line a kill may have torn."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the checkpoint decides where the run continues anyway
            break
    return records
