"""Checks of saved state against the live model and optimizers, run before anything is loaded.

Design note: :meth:`MixedPrecision.load <mixprec.MixedPrecision.load>` promises that a refused
checkpoint changes nothing. Torch's own ``load_state_dict`` methods check little (an optimizer takes
per-parameter state of any shape and fails at the next step), so every part of a checkpoint is
checked here first, as pure functions that raise ``ValueError`` naming the bad entry; only then is
anything loaded. The checks read the state and the live objects, and write nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mixprec.optim.quantized_states import ROUNDING_KEY, SCALE_SUFFIX
from mixprec.optim.wrapper import WrappedOptimizer

__all__ = ["check_model_state", "check_optimizer_states", "check_rng_state", "load_optimizers"]


def check_model_state(model: nn.Module, state: Any) -> None:
    """Raise ValueError unless ``state`` holds a tensor of the right shape and dtype for every
    entry of ``model.state_dict()`` and nothing else."""
    if not isinstance(state, Mapping):
        raise ValueError(f"it holds no model state (got {type(state).__name__})")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(map(str, set(state) - set(expected)))
    if missing or unexpected:
        raise ValueError(
            f"it is of another model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in expected.items():
        saved = state[name]
        if not isinstance(tensor, torch.Tensor):
            continue  # a module's extra state: its own set_extra_state judges it
        if not isinstance(saved, torch.Tensor):
            raise ValueError(
                f"it is malformed: model entry {name!r} is a {type(saved).__name__} "
                f"({_short(saved)}), not a tensor of shape {tuple(tensor.shape)} {tensor.dtype}"
            )
        if saved.shape != tensor.shape or saved.dtype != tensor.dtype:
            raise ValueError(
                f"it is of another model shape or precision: {name!r} is {tuple(saved.shape)} "
                f"{saved.dtype} there and {tuple(tensor.shape)} {tensor.dtype} here"
            )


def check_optimizer_states(
    optimizers: Sequence[torch.optim.Optimizer], states: Sequence[Any]
) -> None:
    """Raise ValueError unless each saved state fits its optimizer; nothing is loaded.

    Torch's ``Optimizer.load_state_dict`` checks the param group sizes but loads per-parameter
    state of any shape (the next step then fails). Here a state tensor must be a scalar or have its
    parameter's number of dimensions, each size equal to the parameter's or 1 (Adam's moments,
    SGD's momentum, Adafactor's factored row/column statistics); so must every tensor in a wrapper's
    per-parameter buffer lists (fp32 masters, compensation buffers).
    """
    for index, (opt, state) in enumerate(zip(optimizers, states, strict=True)):
        what = f"optimizer {index} ({type(opt).__name__})"
        if not isinstance(state, Mapping):
            raise ValueError(f"the state of {what} is a {type(state).__name__}, not a dict")
        if isinstance(opt, WrappedOptimizer):
            params = [p for group in opt.param_groups for p in group["params"]]
            shapes = [[list(p.shape) for p in group["params"]] for group in opt.param_groups]
            if state.get("shapes", shapes) != shapes:
                raise ValueError(
                    f"the state of {what} was saved for parameters of shapes "
                    f"{_short(state['shapes'])}, these are {_short(shapes)}; it comes from "
                    "another model"
                )
            for key, value in state.items():
                if key != "shapes" and _is_buffer_list(value, len(params)):
                    for number, (buffer, param) in enumerate(zip(value, params, strict=True)):
                        if buffer is not None and tuple(buffer.shape) != tuple(param.shape):
                            raise ValueError(
                                f"{what} entry {key!r} {number} has shape {tuple(buffer.shape)} "
                                f"but its parameter is {tuple(param.shape)}; the state is "
                                "malformed or of another model"
                            )
            inner = state.get("optimizer")
            if inner is None:
                raise ValueError(
                    f"the state of {what} has no inner 'optimizer' state (keys "
                    f"{sorted(map(str, state))!r}); save it with {type(opt).__name__}.state_dict()"
                )
            # the inner groups mirror the outer ones; a shadow may be an empty placeholder
            _check_torch_optimizer_state(opt.param_groups, inner, f"{what}, inner optimizer")
        else:
            _check_torch_optimizer_state(opt.param_groups, state, what)


def load_optimizers(optimizers: Sequence[torch.optim.Optimizer], states: Sequence[Any]) -> None:
    """Load checked states; if one optimizer still refuses its state (a field only it knows),
    the ones loaded before it get their previous state back."""
    previous: list[dict[str, Any]] = []
    for opt, state in zip(optimizers, states, strict=True):
        snapshot = opt.state_dict() if len(optimizers) > 1 else {}
        try:
            opt.load_state_dict(state)
        except (TypeError, ValueError) as err:
            for earlier, earlier_state in zip(optimizers, previous, strict=False):
                earlier.load_state_dict(earlier_state)
            raise ValueError(f"{type(opt).__name__} refused its state: {err}") from None
        previous.append(snapshot)


def _is_buffer_list(value: Any, count: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == count
        and all(item is None or isinstance(item, torch.Tensor) for item in value)
    )


def _check_torch_optimizer_state(groups: list[dict[str, Any]], state: Any, what: str) -> None:
    if not (
        isinstance(state, Mapping)
        and isinstance(state.get("state"), Mapping)
        and isinstance(state.get("param_groups"), list)
        and all(isinstance(g, Mapping) and isinstance(g.get("params"), list)
                for g in state["param_groups"])
    ):  # fmt: skip
        raise ValueError(
            f"the state of {what} is not a torch optimizer state dict (a dict with 'state' and "
            f"'param_groups' lists of 'params'); got {_short(state)}"
        )
    saved_groups = state["param_groups"]
    saved_sizes = [len(g["params"]) for g in saved_groups]
    sizes = [len(g["params"]) for g in groups]
    if saved_sizes != sizes:
        raise ValueError(
            f"the state of {what} has param groups of sizes {saved_sizes}, the optimizer "
            f"{sizes}; it comes from another model or grouping"
        )
    params = {
        saved_id: param
        for saved_group, group in zip(saved_groups, groups, strict=True)
        for saved_id, param in zip(saved_group["params"], group["params"], strict=True)
    }
    for key, entries in state["state"].items():
        if key not in params:
            raise ValueError(
                f"the state of {what} holds state for parameter {key!r}, which no param group "
                f"lists (ids {sorted(map(str, params))[:5]}...)"
            )
        if not isinstance(entries, Mapping):
            raise ValueError(
                f"the state of {what} for parameter {key!r} is a {type(entries).__name__}, "
                "not a dict"
            )
        shape = tuple(params[key].shape)
        for name, value in entries.items():
            if name == ROUNDING_KEY or str(name).endswith(SCALE_SUFFIX):
                # compressed states' draw counter [salt, rounds] and block scales (rows, blocks)
                value_shape = tuple(getattr(value, "shape", ()))
                if name == ROUNDING_KEY or value_shape[:1] == (shape[:1] if shape else (1,)):
                    continue
            if isinstance(value, torch.Tensor) and not _fits(tuple(value.shape), shape):
                raise ValueError(
                    f"the state of {what}: {name!r} of parameter {key!r} has shape "
                    f"{tuple(value.shape)} but the parameter is {shape}; the state is malformed "
                    "or of another model"
                )


def _fits(state_shape: tuple[int, ...], param_shape: tuple[int, ...]) -> bool:
    """A scalar, or the parameter's rank with each size the parameter's or 1."""
    if len(state_shape) == 0 or math.prod(state_shape) == 1:
        return True
    return len(state_shape) == len(param_shape) and all(
        s in (p, 1) for s, p in zip(state_shape, param_shape, strict=True)
    )


def check_rng_state(rng: Any) -> None:
    """Raise ValueError unless ``rng`` is a state the CPU generator accepts (tried on a scratch
    generator, so the global one is untouched)."""
    try:
        if not isinstance(rng, torch.Tensor):
            raise TypeError(type(rng).__name__)
        torch.Generator().set_state(rng)
    except (TypeError, RuntimeError, ValueError):
        expected = torch.get_rng_state()
        raise ValueError(
            f"'rng' is {_short(rng)}, not a CPU generator state (a {expected.dtype} tensor of "
            f"{expected.numel()} bytes from torch.get_rng_state())"
        ) from None


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
