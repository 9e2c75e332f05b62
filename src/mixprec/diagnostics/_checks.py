"""Argument checks shared by the diagnostics: one wording for each kind of bad input."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

THRESHOLD_RANGE = (0.0, 150.0)
"""Valid SNR thresholds in dB, ``(low, high]``; fp32 rounding alone is about 150 dB."""


def check_model(model: object, who: str) -> nn.Module:
    """Return ``model`` if it is an ``nn.Module`` with at least one parameter."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who} needs an nn.Module, got {type(model).__name__} {model!r}")
    if next(model.parameters(), None) is None:
        raise ValueError(
            f"{who} needs a model with parameters, got {type(model).__name__} with none: "
            f"{model!r}; pass the model that holds the weights you train"
        )
    return model


def check_threshold(threshold_db: object) -> float:
    """Return ``threshold_db`` as a float if it is a number in ``THRESHOLD_RANGE``."""
    low, high = THRESHOLD_RANGE
    if isinstance(threshold_db, bool) or not isinstance(threshold_db, (int, float)):
        raise TypeError(
            f"threshold_db must be a number of dB, got {type(threshold_db).__name__} "
            f"{threshold_db!r}; valid range ({low:g}, {high:g}]"
        )
    if not (low < threshold_db <= high):
        raise ValueError(
            f"threshold_db={threshold_db!r} is out of range; valid range ({low:g}, {high:g}] dB "
            "(bf16 keeps ~50 dB per rounding, fp16 ~65 dB; 20 dB is a useful default)"
        )
    return float(threshold_db)


def check_scale(scale: object, name: str = "scale") -> float:
    """Return ``scale`` as a float if it is a positive finite number."""
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(
            f"{name} must be a positive number, got {type(scale).__name__} {scale!r}; "
            "valid range (0, inf), e.g. 65536.0"
        )
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{name}={scale!r} is out of range; valid range (0, inf), e.g. 65536.0")
    return float(scale)


def check_loss_fn(loss_fn: object) -> Callable[..., torch.Tensor]:
    """Return ``loss_fn`` if it is callable."""
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn must be callable as loss_fn(output, target), got "
            f"{type(loss_fn).__name__} {loss_fn!r}"
        )
    return loss_fn


def split_batch(batch: object) -> tuple[Any, Any]:
    """Split a batch into ``(inputs, target)``; see :func:`run_batch`."""
    if isinstance(batch, (torch.Tensor, Mapping)):
        return batch, None  # the model's own inputs; the loss is a function of its output
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            f"batch must be a tensor, a dict of keyword arguments or a pair (inputs, target), "
            f"got {type(batch).__name__} {_short(batch)}; in a pair, inputs is a tensor, a tuple "
            "of positional arguments or a dict of keyword arguments, and target is passed to "
            "loss_fn (None: loss_fn(output)), e.g. ((input_ids, mask), None)"
        )
    return batch[0], batch[1]


def _required_positional(fn: Callable[..., Any]) -> int | None:
    """How many positional arguments ``fn`` needs (None where its signature cannot be read)."""
    if isinstance(fn, nn.Module):  # its __call__ takes *args; forward says what it needs
        fn = fn.forward
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in params)


def check_batch_for_loss(batch: object, loss_fn: Callable[..., Any], caller: str) -> None:
    """Refuse a batch without a target given to a loss that needs one, before any forward.

    A bare tensor or dict batch is the model's input alone, so the loss is called as
    ``loss_fn(output)``; ``cross_entropy`` then fails deep inside with "missing target".

    Raises:
        TypeError: ``batch`` has no target and ``loss_fn`` needs two arguments.
    """
    inputs, target = split_batch(batch)
    if target is not None or (_required_positional(loss_fn) or 0) < 2:
        return
    kind = "Tensor" if isinstance(inputs, torch.Tensor) else type(inputs).__name__
    name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    raise TypeError(
        f"{caller}: batch is a {kind} without a target, so the loss would be called as "
        f"loss_fn(output), but {name} needs (output, target); pass the batch as a pair "
        f"(inputs, target), e.g. {caller}(model, (x, y), loss_fn), or a loss_fn taking only "
        "the output (e.g. lambda out: out.loss for a Hugging Face batch with labels)"
    )


def _tensors(tree: object, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in nested tuples, lists and mappings, with its index path (``[0]['ids']``)."""
    if isinstance(tree, torch.Tensor):
        yield path, tree
    elif isinstance(tree, (tuple, list)):
        for i, item in enumerate(tree):
            yield from _tensors(item, f"{path}[{i}]")
    elif isinstance(tree, Mapping):
        for key, item in tree.items():
            yield from _tensors(item, f"{path}[{key!r}]")


def check_nonempty_batch(batch: object, caller: str) -> None:
    """Refuse a batch whose inputs hold an empty tensor: nothing would be measured.

    Raises:
        ValueError: a tensor of the inputs has no elements (the message names it).
    """
    inputs, _ = split_batch(batch)
    empty = [
        f"inputs{path} {tuple(t.shape)}"
        for path, t in _tensors(inputs)
        if t.dim() > 0 and t.numel() == 0
    ]
    if empty:
        raise ValueError(
            f"{caller}: batch is empty: {', '.join(empty)} has 0 elements, so the forward "
            "measures nothing (the loss is NaN) and no advice could rest on it; pass one "
            "representative batch with at least one sample"
        )


def run_batch(model: nn.Module, batch: object, loss_fn: Callable[..., Any]) -> torch.Tensor:
    """Forward ``batch`` through ``model`` and return the scalar loss.

    ``batch`` is what the model takes, or a pair ``(inputs, target)``:

    * a tensor: ``model(batch)``, then ``loss_fn(output)``;
    * a dict (e.g. a Hugging Face batch): ``model(**batch)``, then ``loss_fn(output)``, e.g.
      ``lambda out: out.loss``;
    * a pair ``(inputs, target)``: ``model(inputs)`` for a tensor, ``model(*inputs)`` for a tuple
      or list of positional arguments, ``model(**inputs)`` for a dict; then
      ``loss_fn(output, target)``, or ``loss_fn(output)`` when the target is None.

    The model's own errors (a batch of the wrong shape) propagate unchanged.
    """
    inputs, target = split_batch(batch)
    if isinstance(inputs, Mapping):
        output = model(**inputs)
    elif isinstance(inputs, (tuple, list)):
        output = model(*inputs)
    else:
        output = model(inputs)
    loss = loss_fn(output) if target is None else loss_fn(output, target)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return a scalar tensor, got {shape!r}; reduce it, e.g. with .mean() "
            "(a Hugging Face model returns a loss only when the batch holds 'labels')"
        )
    return loss


def nonfinite_inputs(model: nn.Module, batch: object) -> list[str]:
    """What in ``batch`` and ``model``'s parameters holds inf or NaN: bad data, not precision.

    Returns:
        Descriptions such as ``"batch['input_embeds']"`` or ``"parameter 'emb.weight' (3 rows)"``.
    """
    found = [
        f"batch{path}"
        for path, t in _tensors(batch)
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    for name, param in model.named_parameters():
        bad = ~torch.isfinite(param.detach())
        if bool(bad.any()):
            rows = int(bad.reshape(bad.shape[0], -1).any(dim=1).sum()) if bad.dim() > 1 else 0
            found.append(f"parameter {name!r}" + (f" ({rows} rows)" if rows else ""))
    return found


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
