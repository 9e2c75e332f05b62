"""Gradient plumbing shared by the scaler and the clip: grouping, the fp16 check, unscaling.

All functions are free of host synchronisation: found-inf flags stay on the device.
"""

from __future__ import annotations

from collections import defaultdict

import torch

GradGroups = dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]
"""Gradients (or, for sparse gradients, their values) keyed by (device, dtype)."""


def check_unscalable(optimizer: torch.optim.Optimizer, grads: GradGroups) -> None:
    """Refuse to unscale fp16 gradients held by the optimizer's parameters.

    Dividing an fp16 gradient by the scale in fp16 flushes the small values the scale was there
    to protect. This is the one place that decides which optimizers may hold fp16 gradients, so
    that a master-weight optimizer (whose parameters are fp32 copies) can be admitted here.

    Args:
        optimizer: The optimizer whose gradients are about to be unscaled.
        grads: Its gradients grouped by (device, dtype).

    Raises:
        ValueError: If any gradient is fp16.
    """
    count = sum(len(g) for (_, dtype), g in grads.items() if dtype == torch.float16)
    if count:
        raise ValueError(
            f"Attempting to unscale FP16 gradients: {count} parameter(s) of "
            f"{type(optimizer).__name__!r} have torch.float16 gradients. Unscaling in fp16 "
            "flushes the small gradients that loss scaling protects. Keep the parameters in "
            "fp32 and let torch.autocast / mixprec.autocast compute in fp16 (parameters stay "
            "fp32, their gradients are fp32), or give the optimizer FP32 master weights."
        )


def group_grads(optimizer: torch.optim.Optimizer) -> GradGroups:
    """Collect the optimizer's gradients by (device, dtype), the layout foreach kernels need.

    Sparse gradients contribute their values; fp16 sparse gradients are coalesced first so that
    duplicate indices are summed before the finite check (their sum may overflow). Complex
    gradients contribute their real view (the same memory), which torch's kernels can check.

    Args:
        optimizer: Any ``torch.optim.Optimizer``.

    Returns:
        The groups; parameters without a gradient are left out.
    """
    groups: GradGroups = defaultdict(list)
    for group in optimizer.param_groups:
        for param in group["params"]:
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                if grad.dtype == torch.float16:
                    param.grad = grad = grad.coalesce()
                grad = grad._values()
            if grad.is_complex():
                grad = torch.view_as_real(grad)
            groups[(grad.device, grad.dtype)].append(grad)
    return dict(groups)


def unscale_and_check_(
    grads: GradGroups, factor: torch.Tensor, found_inf: torch.Tensor
) -> torch.Tensor:
    """Multiply all gradients by ``factor`` in place and flag non-finite values.

    One read-write pass per gradient (``torch._amp_foreach_non_finite_check_and_unscale_``).
    The finite check looks at the values before the multiplication.

    Args:
        grads: Gradients grouped by (device, dtype).
        factor: A 0-dim float32 tensor, usually ``1 / scale``.
        found_inf: A 0-dim float32 tensor on ``factor``'s device; set to 1 if any value is
            non-finite and left unchanged otherwise.

    Returns:
        ``found_inf`` (0 or 1: fused optimizers compare it with 1), covering every device.
    """
    per_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
    for (device, _), tensors in grads.items():
        if device not in per_device:
            if device == found_inf.device:
                per_device[device] = (factor, found_inf)
            else:
                per_device[device] = (factor.to(device), torch.zeros_like(found_inf, device=device))
        dev_factor, dev_found = per_device[device]
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, dev_found, dev_factor)
    for device, (_, dev_found) in per_device.items():
        if device != found_inf.device:
            found_inf.copy_(torch.maximum(found_inf, dev_found.to(found_inf.device)))
    return found_inf
