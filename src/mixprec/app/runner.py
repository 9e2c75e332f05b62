"""Train one task under one precision recipe: the engine behind ``mixprec train`` and ``compare``.

Design note: a run is a folder. It holds ``metrics.jsonl`` (one JSON object per step),
``checkpoint.pt`` (written atomically every ``checkpoint_every`` steps and at the end) and
``result.json``. Batches depend only on ``(seed, step)`` and the checkpoint carries the model,
optimizer, session and RNG state, so a run killed at any point and resumed reaches the same final
weights, bit for bit, as one that never stopped. That promise holds only for the same run, so a
resume checks the task (every size that shapes the model, the data's digest), the precision and
the resolved autocast backend against the checkpoint; and a folder that holds a run is never
written over unless asked (``overwrite``). A batch size is checked against the memory the device
has before the first batch is built, from a measurement on two samples.

Under a process group (``torchrun``) the run is data-parallel over the world: each rank trains
its slice of the same global batch (:mod:`mixprec.distributed.launch`) on a model wrapped by
``MixedPrecision.ddp`` (``strategy="ddp"``, the default) or sharded by
``MixedPrecision.fully_shard`` (``strategy="fsdp2"``: each rank holds its shards of the weights,
gradients and optimizer state, and the optimizer is built on the sharded parameters);
``checkpoint.pt`` is then a sharded checkpoint folder (each rank its shards and RNG state), rank
0 writes ``metrics.jsonl`` (the loss averaged over the ranks) and ``result.json`` (with the world
size, the strategy and the bytes each rank handed to the gradient reduction per step), and the
checks that refuse a run are made on every rank before any rank writes. Under FSDP2 the memory
figures are per rank and the activation probe runs on an unsharded copy of the model.
"""

from __future__ import annotations

import functools
import gc
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch.distributed as dist
from torch import nn

from mixprec import _dist
from mixprec.app.memory_figures import memory_figures, resident_bytes, unmap_large_frees
from mixprec.app.probes import (
    activation_bytes,
    available_memory,
    bytes_per_sample,
    check_batch_memory,
    dry_run,
    grad_log2,
    probe_activations,
)
from mixprec.app.run_folder import (
    RUN_FILES,
    check_run_folder,
    checkpoint_extra,
    prepare_run_folder,
    resume_step,
)
from mixprec.app.tasks import Task
from mixprec.checkpoint import CheckpointError
from mixprec.diagnostics import read_metrics
from mixprec.distributed import ReduceState, launch
from mixprec.optim import memory_report
from mixprec.policy import PRESETS, Policy
from mixprec.session import UPDATE_MODES, MixedPrecision
from mixprec.session.materialize import has_meta
from mixprec.session.setup import check_device

__all__ = [
    "DEFAULT_RECIPES",
    "RUN_FILES",
    "STRATEGIES",
    "Recipe",
    "RunResult",
    "activation_bytes",
    "available_memory",
    "bytes_per_sample",
    "check_batch_memory",
    "train",
]

_TIMING_WARMUP = 3

STRATEGIES = ("ddp", "fsdp2")
"""How a run under a process group spreads the model: DDP replicas or FSDP2 shards."""


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
        """Parse ``POLICY[/UPDATE]``; raises ``ValueError`` naming the bad part and the choices.

        An update mode other than ``auto`` needs a policy with 16-bit parameters: on fp32
        parameters it would change nothing but the run's label, so it is refused.
        """
        policy, _, update = spec.strip().partition("/")
        parsed = Policy.parse(policy)  # validates, with the presets in its message
        update = update or "auto"
        if update not in UPDATE_MODES:
            raise ValueError(
                f"unknown update mode {update!r} in precision {spec!r}; valid modes: "
                f"{', '.join(UPDATE_MODES)} (e.g. 'bf16-pure/stochastic')"
            )
        if update != "auto" and not _has_16_bit_params(parsed):
            applies = [name for name, preset in PRESETS.items() if _has_16_bit_params(preset)]
            raise ValueError(
                f"update mode {update!r} in precision {spec!r} does not apply: {policy!r} keeps "
                f"parameters in fp32, and the optimizer updates fp32 parameters itself. An update "
                f"mode chooses how 16-bit parameters are updated; use it with a preset that "
                f"stores them in 16 bits ({', '.join(applies)}), e.g. "
                f"'{applies[0]}/{update}', or drop '/{update}'"
            )
        return cls(spec.strip(), policy, update)


def _has_16_bit_params(policy: Policy) -> bool:
    """Whether ``policy`` (or one of its module rules) stores parameters in 16 bits or fewer."""
    return policy.param.bits <= 16 or any(_has_16_bit_params(r.policy) for r in policy.rules)


DEFAULT_RECIPES = (
    "fp32",
    "bf16-mixed",
    "fp16-mixed",
    "bf16-pure/nearest",
    "bf16-pure/stochastic",
    "fp8-mixed",
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
    world_size: int = 1
    strategy: str = "single"  # "single" (one process), "ddp" or "fsdp2" (over the world)
    reduce_format: str | None = None  # the gradients' reduce format(s), under a process group
    reduce_bytes_per_step: float | None = None  # bytes each rank handed to the gradient reduction
    memory: dict[str, Any] | None = None  # measured peak beside the plan's (memory_figures)

    def save(self, folder: Path) -> None:
        """Write ``result.json`` into ``folder``."""
        (folder / "result.json").write_text(json.dumps(asdict(self)))


def run_strategy(strategy: str | None, parallel: bool) -> str:
    """The strategy a run uses: ``"single"`` without a process group, else ``strategy``
    (None: ``"ddp"``).

    Raises:
        ValueError: an unknown strategy, or one given without a process group.

    Example:
        >>> run_strategy(None, parallel=False), run_strategy(None, parallel=True)
        ('single', 'ddp')
    """
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(
            f"unknown strategy {strategy!r}; valid strategies: {', '.join(STRATEGIES)} "
            "(ddp: replicas, fsdp2: shards)"
        )
    if not parallel:
        if strategy is not None:
            raise ValueError(
                f"strategy {strategy!r} trains over a process group, but none is open; launch "
                f"with torchrun, e.g. torchrun --nproc-per-node 2 -m mixprec train ... "
                f"--strategy {strategy}, or leave --strategy out to train in one process"
            )
        return "single"
    return strategy or "ddp"


def train(
    task: Task,
    recipe: Recipe,
    out: str | Path,
    *,
    device: str = "cpu",
    backend: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    checkpoint_every: int | None = None,
    on_step: Callable[[int], None] | None = None,
    strategy: str | None = None,
    step_in_backward: bool = False,
) -> RunResult:
    """Train ``task`` under ``recipe``, writing metrics, checkpoints and the result to ``out``.

    Args:
        task: the task (data, model, loss, evaluation).
        recipe: the precision.
        out: the run's folder (created; must not be a file).
        device: where to train.
        backend: autocast backend for 16-bit compute.
        resume: continue from ``out/checkpoint.pt`` if it exists (from scratch if not).
        overwrite: replace the run already in ``out`` (its checkpoint, metrics and result).
        checkpoint_every: also checkpoint every this many steps (None: only at the end).
        on_step: called after every step with the step number (progress bars).
        strategy: under a process group, ``"ddp"`` (replicas, the default) or ``"fsdp2"``
            (shards); None picks ``"ddp"`` there and one process without a group.
        step_in_backward: step each parameter inside backward (no gradient buffer); refused
            with loss scaling (fp16) and under a process group.

    Raises:
        ValueError: ``out`` is empty or a file, or holds a run and neither ``resume`` nor
            ``overwrite`` is set (or both are); a checkpoint of another task, recipe, backend or
            model shape; a ``checkpoint_every`` below 1; a batch that does not fit in memory; under
            a process group, a batch size the world size does not divide, or a one-process
            checkpoint to resume from; an unknown ``strategy``, or one without a process group.
        RuntimeError: ``device`` does not exist on this machine.
    """
    folder = _check_args(out, checkpoint_every)
    unmap_large_frees()  # the peak resident set is what the run needed, not glibc's hoard
    start_rss = resident_bytes()
    rank, world = launch.rank(), launch.world_size()
    parallel = _dist.initialized()
    spread = run_strategy(strategy, parallel)
    if parallel:
        launch.check_divisible(task.config.batch_size, world)
    check_run_folder(folder, resume=resume, overwrite=overwrite)
    check_device(device)
    checkpoint = folder / "checkpoint.pt"
    resuming = resume and checkpoint.exists()
    if resuming and parallel and not checkpoint.is_dir():
        raise CheckpointError(
            f"cannot resume from {str(checkpoint)!r} on {world} ranks: it is a one-process "
            "checkpoint file; resume it without torchrun, or start a new run"
        )
    # Everything is checked before a file is touched: a refused run loses nothing.
    per_rank = task.config.batch_size // world
    if step_in_backward:  # what the session refuses (fp16 scaling), before a file is touched
        MixedPrecision(recipe.policy, device, backend=backend, step_in_backward=True)
    run_backend = dry_run(task, recipe.policy, recipe.update, device, backend, per_rank)
    gc.collect()  # the dry run's model (in reference cycles with its hooks) is gone before ours
    start = resume_step(checkpoint, task, recipe.name, run_backend) if resuming else 0
    model = task.build_model()
    if spread == "fsdp2" and has_meta(model):
        raise ValueError(
            "this task builds its model on the meta device (--model-size), which the fsdp2 "
            "strategy cannot shard yet; train it in one process or with --strategy ddp"
        )
    # FSDP2: the optimizer is built on the sharded parameters, once the session has sharded them.
    optimizer = None if spread == "fsdp2" else task.build_optimizer(model)
    if parallel:
        dist.barrier()  # every rank has checked the folder before rank 0 changes it
    if rank == 0:
        prepare_run_folder(folder, overwrite=overwrite, start=start)
    if parallel:
        dist.barrier()
    mp = MixedPrecision(
        recipe.policy,
        device,
        backend=backend,
        update=recipe.update,  # type: ignore[arg-type]
        seed=task.config.seed,  # the stochastic-rounding stream follows the run's seed
        metrics=folder,
        step_in_backward=step_in_backward,
    )
    if optimizer is None:
        model = mp.fully_shard(model.to(mp.device))
        optimizer = task.build_optimizer(model)
    model, optimizer = mp.prepare(model, optimizer)
    net = model  # the plain (or sharded) module: probes and evaluation run outside DDP's reducer
    if spread == "ddp":
        model = mp.ddp(model)
    if resuming:
        mp.load(checkpoint, model, optimizer, strict=True)  # a resume is the same run
    saved = probe_activations(
        task, net if spread != "fsdp2" else None, mp, (recipe.policy, recipe.update), rank, world
    )
    save = functools.partial(mp.save, checkpoint, model, optimizer)
    extra = functools.partial(checkpoint_extra, task, recipe.name, run_backend)
    grad_log2, state_bytes = _loop(
        task, mp, model, net, optimizer, start, checkpoint_every, on_step, save, extra
    )
    if parallel:
        dist.barrier()  # rank 0 has closed metrics.jsonl
    result = _result(task, recipe, run_backend, folder, start, net, mp, saved, grad_log2)
    figures = memory_figures(
        net,
        task.describe(),
        recipe.policy,
        mp._update_mode(),
        mp.device,
        start_rss,
        step_in_backward=step_in_backward,
    )
    result = replace(result, state_bytes_per_param=state_bytes, memory=figures)
    if parallel:
        parallel_figures = _parallel_figures(model, spread, world, task.config.steps - start)
        result = replace(result, **parallel_figures)
    if rank == 0:
        result.save(folder)
    return result


def _check_args(out: str | Path, checkpoint_every: int | None) -> Path:
    """The run folder ``out`` names, once it and ``checkpoint_every`` are valid."""
    if not str(out).strip():
        raise ValueError("the run folder is an empty path; give a folder, e.g. runs/digits")
    if checkpoint_every is not None and (
        isinstance(checkpoint_every, bool)
        or not isinstance(checkpoint_every, int)
        or checkpoint_every < 1
    ):
        raise ValueError(
            f"checkpoint_every must be an integer >= 1 (or None: only at the end), got "
            f"{checkpoint_every!r}"
        )
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output folder {str(folder)!r} is a file; give a folder path")
    return folder


def _loop(
    task: Task,
    mp: MixedPrecision,
    model: nn.Module,
    net: nn.Module,
    optimizer: Any,
    start: int,
    checkpoint_every: int | None,
    on_step: Callable[[int], None] | None,
    save: Callable[..., None],
    extra: Callable[[int], dict[str, Any]],
) -> tuple[list[float], float]:
    """The training steps from ``start``, with checkpoints; returns the last step's gradient
    magnitudes (log2) and model-state bytes per parameter, measured while gradients exist."""
    rank, world = launch.rank(), launch.world_size()
    grad_log2_: list[float] = []
    state_bytes = math.nan
    with mp:
        for step in range(start, task.config.steps):
            x, y = (launch.local_slice(t, rank, world).to(mp.device) for t in task.batch(step))
            with mp.autocast():
                loss = task.loss(model(x), y)
            mp.backward(loss)
            report = mp.step(optimizer)
            if step == task.config.steps - 1:  # gradients exist now: measure with them
                grad_log2_ = grad_log2(net, report.scale)
                state_bytes = memory_report(net, optimizer).per_param["total"]
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if checkpoint_every and done % checkpoint_every == 0 and done < task.config.steps:
                save(**extra(done))
            if on_step is not None:
                on_step(done)
        save(**extra(task.config.steps))
    return grad_log2_, float(state_bytes)


def _result(
    task: Task,
    recipe: Recipe,
    backend: str,
    folder: Path,
    start: int,
    net: nn.Module,
    mp: MixedPrecision,
    saved: int,
    grad_log2_: list[float],
) -> RunResult:
    """The run's figures, read back from its ``metrics.jsonl`` (rank 0 wrote it)."""
    history = read_metrics(folder / "metrics.jsonl")
    times = [float(r["seconds"]) for r in history if r["step"] >= start]
    losses = [float(r["loss"]) for r in history]
    tail = max(1, len(losses) // 10)
    steady = times[_TIMING_WARMUP:] or times
    return RunResult(
        recipe=recipe.name,
        task=task.describe(),
        backend=backend,
        steps=task.config.steps,
        final_train_loss=statistics.fmean(losses[-tail:]) if losses else math.nan,
        metrics=task.evaluate(net, mp.autocast),
        ms_per_step=1e3 * statistics.median(steady) if steady else math.nan,
        activation_bytes=saved,
        state_bytes_per_param=math.nan,
        skipped_steps=sum(bool(r["skipped"]) for r in history),
        final_scale=float(history[-1]["loss_scale"]) if history else 1.0,
        losses=losses,
        scales=[float(r["loss_scale"]) for r in history],
        grad_log2=grad_log2_,
    )


def _parallel_figures(model: nn.Module, strategy: str, world: int, steps: int) -> dict[str, Any]:
    """The data-parallel fields of a result: world, strategy, reduce format and bytes per step
    (what DDP's hook counted; under FSDP2 the reduce-scatter's input, from the shapes)."""
    if strategy == "fsdp2":
        from mixprec.distributed.fsdp import reduce_bytes_per_step

        traffic = reduce_bytes_per_step(model)
        dtypes = ",".join(str(d).removeprefix("torch.") for d in traffic)
        return {
            "world_size": world,
            "strategy": strategy,
            "reduce_format": dtypes,
            "reduce_bytes_per_step": float(sum(traffic.values())) if steps else None,
        }
    state = cast(ReduceState, model.mixprec_reduce)  # set by mixprec.distributed.ddp
    return {
        "world_size": world,
        "strategy": strategy,
        "reduce_format": str(state.dtype).removeprefix("torch."),
        "reduce_bytes_per_step": state.bytes_reduced / steps if steps else None,
    }
