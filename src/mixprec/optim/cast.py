"""Cast a model's parameters and buffers to the storage format a policy gives each module.

Casting is in place (``param.data`` is replaced, as ``Module.to`` does), so ``nn.Parameter``
objects keep their identity and an optimizer built before the cast still holds them; gradients
are dropped, because they would have the old dtype. Only floating tensors change: integer buffers
such as ``BatchNorm.num_batches_tracked`` stay as they are.

Reversibility: the *dtypes* are reversible, the *values* are not. Casting fp32 to bf16 rounds each
weight to nearest and throws away 16 bits of its mantissa; :func:`restore_dtypes` casts back to the
original dtypes (exactly, since every 16-bit value is an fp32 value) but cannot bring the lost bits
back. For an exact round trip keep a copy first (``copy.deepcopy(model.state_dict())``) or train
with :class:`~mixprec.optim.MasterWeightOptimizer`, whose fp32 masters are the full-precision
weights.
"""

from __future__ import annotations

import torch
from torch import nn

from mixprec.policy import Policy

__all__ = ["cast_module", "restore_dtypes", "storage_plan"]

_STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cast_module(
    module: nn.Module, policy: Policy | str, *, buffers: bool = True
) -> dict[str, torch.dtype]:
    """Cast every floating parameter (and buffer) of ``module`` to its policy's param format.

    Each tensor follows the policy of the module that owns it (``policy.for_module(name,
    submodule)``), so rules such as ``class:*Norm* -> fp32`` keep those layers in fp32.

    Args:
        module: the model, cast in place.
        policy: a :class:`~mixprec.Policy` or its string form, e.g.
            ``"bf16-pure; class:*Norm* -> fp32"``.
        buffers: also cast floating buffers. ``False`` keeps every buffer in its own dtype:
            buffers are state computed once or tracked (rotary ``inv_freq``, BatchNorm running
            statistics), not trained weights, and rounding them to 16 bits costs accuracy
            (a bf16 ``inv_freq`` is off by up to 2^-9 relative, an error that grows with
            position) without saving memory that matters.

    Returns:
        The original dtype of every tensor whose dtype changed, by qualified name (as in
        ``module.state_dict()``); pass it to :func:`restore_dtypes` to cast back.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``, ``policy`` not a policy or ``buffers``
            not a bool.
        ValueError: a policy stores params in a format with no storage dtype for training (fp8);
            a tensor shared by two modules gets two different formats.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        >>> changed = cast_module(model, "bf16-pure; class:LayerNorm -> fp32")
        >>> model[0].weight.dtype, model[1].weight.dtype, sorted(changed)
        (torch.bfloat16, torch.float32, ['0.bias', '0.weight'])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"cast_module expects an nn.Module, got {type(module).__name__} {module!r}")
    if not isinstance(buffers, bool):
        raise TypeError(f"buffers must be True or False, got {type(buffers).__name__} {buffers!r}")
    plan = storage_plan(module, Policy.parse(policy), buffers=buffers)
    originals: dict[str, torch.dtype] = {}
    with torch.no_grad():
        for name, tensor, dtype in plan.values():
            if tensor.dtype != dtype:
                originals[name] = tensor.dtype
                _cast_in_place(tensor, dtype)
    return originals


def storage_plan(
    module: nn.Module, policy: Policy, *, buffers: bool = True
) -> dict[int, tuple[str, torch.Tensor, torch.dtype]]:
    """The storage dtype :func:`cast_module` gives each floating tensor, without casting.

    Returns:
        ``{id(tensor): (qualified name of its first owner, tensor, dtype)}``; a tensor shared by
        several modules appears once.

    Raises:
        ValueError: as :func:`cast_module` (fp8 params; a shared tensor given two formats).
    """
    plan: dict[int, tuple[str, torch.Tensor, torch.dtype]] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        dtype = _storage_dtype(policy, prefix, sub)
        owned = [*sub._parameters.items(), *(sub._buffers.items() if buffers else ())]
        for local, tensor in owned:
            if tensor is None or not tensor.is_floating_point():
                continue
            name = f"{prefix}.{local}" if prefix else local
            previous = plan.get(id(tensor))
            if previous is not None and previous[2] != dtype:
                raise ValueError(
                    f"tensor {previous[0]!r} is shared with {name!r} but the policy gives them "
                    f"different formats ({previous[2]} and {dtype}); add a rule so both owners "
                    "get the same format"
                )
            plan.setdefault(id(tensor), (name, tensor, dtype))
    return plan


def restore_dtypes(module: nn.Module, originals: dict[str, torch.dtype]) -> None:
    """Cast tensors back to the dtypes :func:`cast_module` returned (values stay rounded).

    Args:
        module: the module that was cast.
        originals: the mapping returned by :func:`cast_module`.

    Raises:
        ValueError: a name in ``originals`` is not a parameter or buffer of ``module`` (nothing is
            changed then).

    Example:
        >>> model = nn.Linear(2, 2)
        >>> restore_dtypes(model, cast_module(model, "bf16"))
        >>> model.weight.dtype
        torch.float32
    """
    tensors: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    unknown = sorted(set(originals) - set(tensors))
    if unknown:
        raise ValueError(
            f"restore_dtypes: {unknown!r} are not parameters or buffers of this module; pass the "
            "mapping cast_module returned for this same module"
        )
    with torch.no_grad():
        for name, dtype in originals.items():
            _cast_in_place(tensors[name], dtype)


def _storage_dtype(policy: Policy, name: str, module: nn.Module) -> torch.dtype:
    fmt = policy.for_module(name, module).param
    if fmt.dtype not in _STORAGE_DTYPES:
        raise ValueError(
            f"module {name or '<root>'!r}: params in {fmt.name!r} are not supported for "
            "training; store params in fp32, tf32, bf16 or fp16 (use fp8 for compute only)"
        )
    return fmt.dtype


def _cast_in_place(tensor: torch.Tensor, dtype: torch.dtype) -> None:
    if tensor.grad is not None:
        tensor.grad = None  # a gradient of the old dtype could not be used any more
    tensor.data = tensor.data.to(dtype)
