"""The FP8 state of a model: the amax histories of its delayed-scaling layers, as session state.

Design note: a delayed-scaling :class:`~mixprec.compute.fp8_linear.Fp8Linear` records amaxes
provisionally; the session's step decides (:func:`end_fp8_step`), so a skipped step changes no
history. A session that prepared a model holds these histories in its own state
(:func:`fp8_state`), not in the model's ``state_dict`` (:func:`hold_fp8_state`), so the model
exports a plain state dict that loads into the unconverted model, and the session's checkpoint
still resumes bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from mixprec.compute.fp8_linear import Fp8Linear

__all__ = ["check_fp8_state", "end_fp8_step", "fp8_state", "hold_fp8_state", "load_fp8_state"]


def _delayed_layers(model: nn.Module) -> list[tuple[str, Fp8Linear]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, Fp8Linear) and m.recipe.scaling == "delayed"
    ]


def hold_fp8_state(model: nn.Module) -> None:
    """Take the amax histories of ``model``'s delayed-scaling layers out of its ``state_dict``:
    a session that prepared the model keeps them in its own state (:func:`fp8_state`), so the
    model's ``state_dict`` stays a plain one that loads into the unconverted model."""
    for _, layer in _delayed_layers(model):
        layer.register_buffer("fp8_amax_history", layer.fp8_amax_history, persistent=False)


def fp8_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{layer name: amax history}`` of every delayed-scaling layer (copies)."""
    return {name: layer.fp8_amax_history.detach().clone() for name, layer in _delayed_layers(model)}


def check_fp8_state(model: nn.Module, state: object) -> None:
    """Raise ValueError unless ``state`` is :func:`fp8_state` of a model shaped as ``model``."""
    layers = dict(_delayed_layers(model))
    if not isinstance(state, dict) or set(state) != set(layers):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"its FP8 amax histories are for layers {got!r}; this model's delayed-scaling "
            f"layers are {sorted(layers)!r}"
        )
    for name, hist in state.items():
        own = layers[name].fp8_amax_history
        if not isinstance(hist, torch.Tensor) or hist.shape != own.shape or hist.dtype != own.dtype:
            shown = tuple(hist.shape) if isinstance(hist, torch.Tensor) else type(hist).__name__
            raise ValueError(
                f"the FP8 amax history of layer {name!r} is {shown!r}, expected a "
                f"{own.dtype} tensor of shape {tuple(own.shape)!r}"
            )


@torch.no_grad()
def load_fp8_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy :func:`fp8_state` back (check it first with :func:`check_fp8_state`)."""
    layers = dict(_delayed_layers(model))
    for name, hist in state.items():
        layers[name].fp8_amax_history.copy_(hist)
        layers[name]._fp8_committed = None


def end_fp8_step(model: nn.Module, taken: bool) -> None:
    """Commit (``taken``) or undo the amax histories every delayed-scaling :class:`Fp8Linear` of
    ``model`` recorded since the last call; the session's step decides."""
    for _, layer in _delayed_layers(model):
        layer.end_step(taken)
