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

import contextlib
import json
import math
import os
import shutil
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from mixprec._session_setup import check_device
from mixprec.checkpoint import CheckpointError, load_checkpoint
from mixprec.diagnostics import read_metrics
from mixprec.diagnostics.explainer import is_weight_copy
from mixprec.distributed import ReduceState, launch
from mixprec.optim import memory_report
from mixprec.optim._shards import local
from mixprec.policy import PRESETS, Policy
from mixprec.session import _UPDATE_MODES, MixedPrecision
from mixprec.tasks import Task

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
_PROBE_SAMPLES = 2

STRATEGIES = ("ddp", "fsdp2")
"""How a run under a process group spreads the model: DDP replicas or FSDP2 shards."""

RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "result.json")
"""The files a run writes into its folder (``checkpoint.pt`` is a sharded checkpoint folder for a
run under a process group)."""


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
        if update not in _UPDATE_MODES:
            raise ValueError(
                f"unknown update mode {update!r} in precision {spec!r}; valid modes: "
                f"{', '.join(_UPDATE_MODES)} (e.g. 'bf16-pure/stochastic')"
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
        if storage.data_ptr() not in params and not is_weight_copy(t):
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


def bytes_per_sample(
    task: Task,
    model: nn.Module,
    region: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext,
) -> int:
    """Memory one training sample of ``task`` needs: its input and target, the activations its
    forward saves for backward (under ``region``), and their gradients, which are as large.

    Measured on :data:`_PROBE_SAMPLES` samples (:meth:`~mixprec.tasks.Task.example_batch`), so
    it costs almost nothing whatever the batch size; with ``model`` on its device.
    """
    device = next(model.parameters()).device
    x, y = (t.to(device) for t in task.example_batch(_PROBE_SAMPLES))

    def forward() -> torch.Tensor:
        with region():
            return model(x)

    saved = activation_bytes(model, forward)
    data = x.element_size() * x.nelement() + y.element_size() * y.nelement()
    return math.ceil((data + 2 * saved) / _PROBE_SAMPLES)


def available_memory(device: str | torch.device) -> int | None:
    """Bytes free for new allocations on ``device``: CUDA's free memory, or the host's
    ``MemAvailable``; None where it cannot be read."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    if dev.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_batch_memory(batch_size: int, per_sample: int, available: int | None) -> None:
    """Refuse a batch whose samples need more memory than is ``available``.

    Args:
        batch_size: samples per batch.
        per_sample: bytes one sample needs (see :func:`bytes_per_sample`).
        available: bytes free on the device; None skips the check.

    Raises:
        ValueError: ``batch_size * per_sample > available``; the message gives the largest
            batch size that fits.

    Example:
        >>> check_batch_memory(1000, per_sample=2**20, available=2**30)  # 1000 MiB of 1 GiB
        >>> check_batch_memory(2000, per_sample=2**20, available=2**30)
        Traceback (most recent call last):
        ...
        ValueError: batch size 2000 needs about 1.95 GiB (1024.0 KiB per sample: data, saved activations and their gradients), but only 1.00 GiB is available; use a batch size of at most 1024
    """  # noqa: E501
    if available is None or batch_size * per_sample <= available:
        return
    raise ValueError(
        f"batch size {batch_size} needs about {batch_size * per_sample / 2**30:.2f} GiB "
        f"({per_sample / 1024:.1f} KiB per sample: data, saved activations and their "
        f"gradients), but only {available / 2**30:.2f} GiB is available; use a batch size of at "
        f"most {max(1, available // per_sample)}"
    )


def _grad_log2(model: nn.Module, scale: float) -> list[float]:
    """log2 of the non-zero unscaled gradient magnitudes (a sample of at most 200k)."""
    grads = [
        local(p.grad).detach().float().flatten() for p in model.parameters() if p.grad is not None
    ]
    if not grads:
        return []
    flat = torch.cat(grads).abs() / scale
    flat = flat[(flat > 0) & torch.isfinite(flat)]
    if flat.numel() > 200_000:
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))]
        flat = flat[:200_000]
    return torch.log2(flat).tolist()


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

    Raises:
        ValueError: ``out`` is empty or a file, or holds a run and neither ``resume`` nor
            ``overwrite`` is set (or both are); a checkpoint of another task, recipe, backend or
            model shape; a ``checkpoint_every`` below 1; a batch that does not fit in memory; under
            a process group, a batch size the world size does not divide, or a one-process
            checkpoint to resume from; an unknown ``strategy``, or one without a process group.
        RuntimeError: ``device`` does not exist on this machine.
    """
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
    rank, world = launch.rank(), launch.world_size()
    parallel = dist.is_available() and dist.is_initialized()
    spread = run_strategy(strategy, parallel)
    if parallel:
        launch.check_divisible(task.config.batch_size, world)
    _check_run_folder(folder, resume=resume, overwrite=overwrite)
    check_device(device)
    checkpoint = folder / "checkpoint.pt"
    metrics_file = folder / "metrics.jsonl"
    resuming = resume and checkpoint.exists()
    if resuming and parallel and not checkpoint.is_dir():
        raise CheckpointError(
            f"cannot resume from {str(checkpoint)!r} on {world} ranks: it is a one-process "
            "checkpoint file; resume it without torchrun, or start a new run"
        )
    # Everything is checked before a file is touched: a refused run loses nothing.
    run_backend = _dry_run(task, recipe, device, backend, task.config.batch_size // world)
    start = _resume_step(checkpoint, task, recipe, run_backend) if resuming else 0
    model = task.build_model()
    # FSDP2: the optimizer is built on the sharded parameters, once the session has sharded them.
    optimizer = None if spread == "fsdp2" else task.build_optimizer(model)
    if parallel:
        dist.barrier()  # every rank has checked the folder before rank 0 changes it
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in RUN_FILES:
                _remove(folder / name)
        kept = [r for r in _read_metrics(metrics_file) if r["step"] < start]  # drop the redone
        metrics_file.write_text("".join(json.dumps(r) + "\n" for r in kept))
    if parallel:
        dist.barrier()
    mp = MixedPrecision(
        recipe.policy,
        device,
        backend=backend,
        update=recipe.update,  # type: ignore[arg-type]
        seed=task.config.seed,  # the stochastic-rounding stream follows the run's seed
        metrics=folder,
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
    saved = _probe_activations(task, recipe, net if spread != "fsdp2" else None, mp, rank, world)
    grad_log2: list[float] = []
    state_bytes = math.nan
    with mp:
        for step in range(start, task.config.steps):
            x, y = (launch.local_slice(t, rank, world).to(mp.device) for t in task.batch(step))
            with mp.autocast():
                loss = task.loss(model(x), y)
            mp.backward(loss)
            report = mp.step(optimizer)
            if step == task.config.steps - 1:  # gradients exist now: measure with them
                grad_log2 = _grad_log2(net, report.scale)
                state_bytes = memory_report(net, optimizer).per_param["total"]
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if checkpoint_every and done % checkpoint_every == 0 and done < task.config.steps:
                mp.save(checkpoint, model, optimizer, **_extra(task, recipe, run_backend, done))
            if on_step is not None:
                on_step(done)
        mp.save(
            checkpoint, model, optimizer, **_extra(task, recipe, run_backend, task.config.steps)
        )
    if parallel:
        dist.barrier()  # rank 0 has closed metrics.jsonl
    history = read_metrics(metrics_file)
    times = [float(r["seconds"]) for r in history if r["step"] >= start]
    losses = [float(r["loss"]) for r in history]
    tail = max(1, len(losses) // 10)
    steady = times[_TIMING_WARMUP:] or times
    result = RunResult(
        recipe=recipe.name,
        task=task.describe(),
        backend=run_backend,
        steps=task.config.steps,
        final_train_loss=statistics.fmean(losses[-tail:]) if losses else math.nan,
        metrics=task.evaluate(net, mp.autocast),
        ms_per_step=1e3 * statistics.median(steady) if steady else math.nan,
        activation_bytes=saved,
        state_bytes_per_param=float(state_bytes),
        skipped_steps=sum(bool(r["skipped"]) for r in history),
        final_scale=float(history[-1]["loss_scale"]) if history else 1.0,
        losses=losses,
        scales=[float(r["loss_scale"]) for r in history],
        grad_log2=grad_log2,
        **_parallel_figures(model, spread, world, task.config.steps - start) if parallel else {},
    )
    if rank == 0:
        result.save(folder)
    return result


def _probe_activations(
    task: Task, recipe: Recipe, net: nn.Module | None, mp: MixedPrecision, rank: int, world: int
) -> int:
    """The activation bytes of one forward on this rank's slice of the first batch, measured on
    ``net``, or (None: the run is sharded by FSDP2, whose all-gathered weights are no
    activations) on an unsharded copy under the same policy."""
    x0 = launch.local_slice(task.batch(0)[0], rank, world)
    region = mp.autocast
    if net is None:
        probe = MixedPrecision(recipe.policy, mp.device, backend=mp.backend, update=recipe.update)  # type: ignore[arg-type]
        net, region = probe.prepare(task.build_model()), probe.autocast

    def probe_forward() -> torch.Tensor:
        with region():
            return net(x0.to(mp.device))

    kept_buffers = {name: b.clone() for name, b in net.named_buffers()}
    saved = activation_bytes(net, probe_forward)
    with torch.no_grad():  # the probe is no training step: BatchNorm's statistics stay as they were
        for name, buffer in net.named_buffers():
            buffer.copy_(kept_buffers[name])
    return saved


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


def _remove(path: Path) -> None:
    """Remove a run file: a one-process checkpoint file or a sharded checkpoint folder."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _dry_run(task: Task, recipe: Recipe, device: str, backend: str, batch_size: int) -> str:
    """Check the session and the batch's memory (``batch_size`` samples per process) on a
    throwaway copy of the run; return the backend the run's numerics depend on (the resolved
    one, or "fp32" for fp32 compute)."""
    mp = MixedPrecision(recipe.policy, device, backend=backend, update=recipe.update)  # type: ignore[arg-type]
    model = mp.prepare(task.build_model())
    per_sample = bytes_per_sample(task, model, mp.autocast)
    check_batch_memory(batch_size, per_sample, available_memory(mp.device))
    return mp.backend if mp.policy.compute.bits <= 16 else "fp32"


def _extra(task: Task, recipe: Recipe, backend: str, step: int) -> dict[str, Any]:
    return {
        "step": step,
        "task": json.dumps(task.describe()),
        "recipe": recipe.name,
        "backend": backend,
    }


def _check_run_folder(folder: Path, *, resume: bool, overwrite: bool) -> None:
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


def _resume_step(checkpoint: Path, task: Task, recipe: Recipe, backend: str) -> int:
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
    if extra.get("recipe") != recipe.name:
        raise CheckpointError(
            f"{cannot}: it was trained with precision {extra.get('recipe')!r}, not "
            f"{recipe.name!r}; resume with --precision {extra.get('recipe')}, or start a new run"
        )
    if extra.get("backend") != backend:
        raise CheckpointError(
            f"{cannot}: it was trained with autocast backend "
            f"{extra.get('backend')!r}, here the backend is {backend!r}; another backend computes "
            f"other numbers, so the run would not continue as it began; resume with backend "
            f"{extra.get('backend')!r} (--backend) or start a new run"
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
