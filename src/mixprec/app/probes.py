"""What a run measures about memory: the bytes a sample needs, what the device has free, the
activations one forward saves, and the gradients' magnitudes.

Design note: every figure is measured, not estimated. Activations are the tensors autograd saves
for backward, seen through ``torch.autograd.graph.saved_tensors_hooks``, each storage counted
once; a batch is checked against free memory from a two-sample measurement, before its first
batch is built, so a batch that cannot fit is refused in milliseconds rather than after minutes.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable

import torch
from torch import nn

from mixprec.app.tasks import Task
from mixprec.diagnostics.explainer import is_weight_copy
from mixprec.distributed import launch
from mixprec.optim.shards import local
from mixprec.session import MixedPrecision

__all__ = [
    "activation_bytes",
    "available_memory",
    "bytes_per_sample",
    "check_batch_memory",
    "dry_run",
    "grad_log2",
    "probe_activations",
]

_PROBE_SAMPLES = 2


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
        if storage.data_ptr() not in params and not is_weight_copy(t, params):
            seen[storage.data_ptr()] = storage.nbytes()
        # Detached: a saved output that held itself (tensor -> grad_fn -> saved tensor) would be
        # a reference cycle through C++ that outlives the probe, activations and all.
        return t.detach()

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

    Measured on :data:`_PROBE_SAMPLES` samples (:meth:`~mixprec.app.tasks.Task.example_batch`), so
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


def grad_log2(model: nn.Module, scale: float, sample: int = 200_000) -> list[float]:
    """log2 of the non-zero finite unscaled gradient magnitudes: all of them when there are at
    most ``sample``, else ``sample`` drawn uniformly (with replacement, seeded) across them.

    One gradient at a time is upcast, so the probe costs about the largest gradient in fp32,
    not a copy of every gradient (which at 16 bytes per parameter would dominate the run's
    measured peak memory).
    """
    grads = [local(p.grad).detach() for p in model.parameters() if p.grad is not None]
    counts = [int(_magnitudes(g, scale).numel()) for g in grads]
    total = sum(counts)
    if total == 0:
        return []
    if total <= sample:
        return torch.log2(torch.cat([_magnitudes(g, scale) for g in grads])).tolist()
    picks = torch.randint(total, (sample,), generator=torch.Generator().manual_seed(0)).sort()
    chosen, offset = [], 0
    for grad, count in zip(grads, counts, strict=True):
        lo, hi = torch.searchsorted(picks.values, torch.tensor([offset, offset + count])).tolist()
        if hi > lo:
            chosen.append(_magnitudes(grad, scale)[picks.values[lo:hi] - offset])
        offset += count
    return torch.log2(torch.cat(chosen)).tolist()


def _magnitudes(grad: torch.Tensor, scale: float) -> torch.Tensor:
    flat = grad.float().flatten().abs() / scale
    return flat[(flat > 0) & torch.isfinite(flat)]


def probe_activations(
    task: Task,
    net: nn.Module | None,
    mp: MixedPrecision,
    recipe: tuple[str, str],
    rank: int,
    world: int,
) -> int:
    """The activation bytes of one forward on this rank's slice of the first batch, measured on
    ``net``, or (None: the run is sharded by FSDP2, whose all-gathered weights are no
    activations) on an unsharded copy under the same ``recipe`` (policy, update mode)."""
    x0 = launch.local_slice(task.batch(0)[0], rank, world)
    region = mp.autocast
    if net is None:
        policy, update = recipe
        probe = MixedPrecision(policy, mp.device, backend=mp.backend, update=update)  # type: ignore[arg-type]
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


def dry_run(
    task: Task, policy: str, update: str, device: str, backend: str, batch_size: int
) -> str:
    """Check the session and the batch's memory (``batch_size`` samples per process) on a
    throwaway copy of the run; return the backend the run's numerics depend on (the resolved
    one, or "fp32" for fp32 compute)."""
    mp = MixedPrecision(policy, device, backend=backend, update=update)  # type: ignore[arg-type]
    model = mp.prepare(task.build_model())
    per_sample = bytes_per_sample(task, model, mp.autocast)
    check_batch_memory(batch_size, per_sample, available_memory(mp.device))
    return mp.backend if mp.policy.compute.bits <= 16 else "fp32"
