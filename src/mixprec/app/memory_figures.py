"""A run's measured peak memory beside the memory plan's figures for fp32 and for its policy.

Design note: the measurement is the process's peak resident set (``VmHWM`` in
``/proc/self/status``, else ``ru_maxrss``) and its resident set when the run began, so the
difference is what the run itself added: the model, its gradients and optimizer state,
activations, and the allocator's slack. The plan (:func:`mixprec.distributed.plan.memory_plan`)
is the model state the policy's dtypes imply (AdamW, from the parameters' shapes, without a
gradient buffer where the run stepped inside backward) plus its activation estimate for the
task's transformer shape and batch; it is computed for plain fp32 AdamW and for the run's policy
when the policy is a preset (a policy string with rules has no plan row: its figure is None).
On CUDA the peak is the device's (``torch.cuda.max_memory_allocated``) and the host figures are
left out.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixprec.policy import PRESETS

__all__ = ["memory_figures", "memory_line", "resident_bytes", "unmap_large_frees"]

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_MMAP_THRESHOLD = 1 << 20


def unmap_large_frees() -> bool:
    """Make glibc give allocations of 1 MiB and more back to the system when they are freed.

    glibc serves a large allocation with its own mapping, but raises that threshold (up to
    32 MiB) each time such a block is freed, after which blocks of that size come from the heap
    and stay resident once freed: a training step's activations and transient copies then keep
    the process's resident set far above what is live (a 2e8-parameter run: 2.86 GB peak where
    2.11 GB were ever live at once). A fixed threshold keeps the peak resident set what the run
    really needs, which is what the report measures. Returns False (and changes nothing) where
    the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))


def resident_bytes(peak: bool = False) -> int | None:
    """This process's resident memory now (``VmRSS``) or at its peak (``VmHWM``), in bytes;
    None where neither ``/proc`` nor ``getrusage`` can tell."""
    key = "VmHWM:" if peak else "VmRSS:"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    if peak:  # ru_maxrss: KiB on Linux, bytes on macOS
        scale = 1 if sys.platform == "darwin" else 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
    return None


def memory_figures(
    model: nn.Module,
    task: dict[str, Any],
    policy: str,
    update: str,
    device: torch.device,
    start_bytes: int | None,
    step_in_backward: bool = False,
) -> dict[str, Any]:
    """The measured peak and the plan's totals, for ``result.json``.

    Args:
        model: the trained model (its parameters are counted).
        task: the task's description (``d_model``, ``n_layers``, ``seq_len``, ``n_heads``,
            ``batch_size`` give the activation estimate where present).
        policy: the run's policy as given (a preset name gets a plan row).
        update: the resolved update mode of 16-bit parameters.
        device: where the run trained.
        start_bytes: the resident memory when the run began.
        step_in_backward: the run stepped each parameter inside backward (no gradient buffer
            is planned).
    """
    from mixprec.distributed.plan import memory_plan

    params = [p for p in model.parameters()]
    count = sum(p.numel() for p in params)
    shape: dict[str, Any] = {}
    if all(isinstance(task.get(k), int) for k in ("n_layers", "d_model", "seq_len")):
        shape = {
            "layers": task["n_layers"],
            "hidden": task["d_model"],
            "seq": task["seq_len"],
            "heads": task.get("n_heads"),
            "batch": int(task.get("batch_size", 1)),
        }
    preset = policy.strip() if policy.strip() in PRESETS else None
    sizes = {
        "num_tensors": len(params),
        "shapes": [tuple(p.shape) for p in params],  # exact state bytes: block scales, 1-D
        **shape,
    }
    # The fp32 row is plain fp32 AdamW (a gradient buffer), what the policy is compared with.
    fp32 = memory_plan(count, 1, "single", presets="fp32", **sizes).row("fp32")
    row = None
    if preset is not None:
        ours = memory_plan(
            count, 1, "single", presets=preset, step_in_backward=step_in_backward, **sizes
        )
        row = ours.row(preset, "-" if PRESETS[preset].param.bits == 32 else update)
    peak: int | None
    start: int | None
    if device.type == "cuda":
        peak, start = torch.cuda.max_memory_allocated(device), None
    else:
        peak, start = resident_bytes(peak=True), start_bytes
    return {
        "params": count,
        "measured_peak_bytes": peak,
        "measured_at_start_bytes": start,
        "measured_by": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS",
        "plan_fp32_bytes": fp32.total_bytes,
        "plan_fp32_state_per_param": fp32.state_per_param,
        "plan_policy_bytes": None if row is None else row.total_bytes,
        "plan_policy_state_per_param": None if row is None else row.state_per_param,
        "plan_activation_bytes": None if row is None else row.activations,
    }


def memory_line(recipe: str, figures: dict[str, Any]) -> str:
    """One line for a run's summary: measured peak beside the plan's figures.

    Example:
        >>> figures = {"params": 2e8, "measured_peak_bytes": 3e9, "measured_at_start_bytes": 5e8,
        ...            "measured_by": "peak RSS", "plan_fp32_bytes": 3.2e9,
        ...            "plan_policy_bytes": 2.4e9, "plan_policy_state_per_param": 12.0}
        >>> memory_line("bf16-pure", figures)
        'memory: 2e+08 params; peak RSS 3.00 GB (2.50 GB above the start); plan: fp32 3.20 GB, bf16-pure 2.40 GB (12 B/param of model state)'
    """  # noqa: E501
    peak, start = figures["measured_peak_bytes"], figures.get("measured_at_start_bytes")
    measured = "not measured" if peak is None else _size(peak)
    if peak is not None and start is not None:
        measured += f" ({_size(peak - start)} above the start)"
    ours = figures.get("plan_policy_bytes")
    policy = (
        f"{recipe} {_size(ours)} ({figures['plan_policy_state_per_param']:.3g} B/param of "
        "model state)"
        if ours is not None
        else f"{recipe} has no plan row (not a preset)"
    )
    return (
        f"memory: {figures['params']:.3g} params; {figures['measured_by']} {measured}; plan: "
        f"fp32 {_size(figures['plan_fp32_bytes'])}, {policy}"
    )


def _size(count: float) -> str:
    """Bytes in GB, or MB below 0.1 GB (small runs)."""
    return f"{count / 1e9:.2f} GB" if abs(count) >= 1e8 else f"{count / 1e6:.1f} MB"
