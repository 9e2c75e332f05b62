"""``--model-size``: the built-in transformer scaled to a parameter count.

Design note — the shape rule. The parameters of
:class:`~mixprec.app.tasks.transformer.TinyTransformer` are ``12 d² + 13 d`` per block (qkv,
projection, a 4x MLP, two LayerNorms) plus the embeddings, positions, final norm and head
(``(2 V + S + 2) d + V`` for a vocabulary ``V`` and ``S`` positions). Width and depth follow the
GPT-3 family's proportions, whose width/depth ratio stays between about 40 and 130: the width is
``d = (64 N / 12)^(1/3)`` (so that ``d ≈ 64 L``), rounded to a multiple of 64 so every head is 64
wide (``heads = d / 64``, as GPT-2/3 and Llama use); the depth is then the number of blocks that
brings the count nearest ``N``. 2e8 gives 1024 wide x 16 deep, 350M 1216 x 20, 3B 2496 x 40;
the count reached is within half a block of the request (:func:`charlm_shape` returns it).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "ModelShape",
    "charlm_lr",
    "charlm_params",
    "charlm_shape",
    "eager_model",
    "parse_model_size",
    "sized_task_options",
]

_SUFFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
_HEAD_DIM = 64


def parse_model_size(text: str | float) -> int:
    """A parameter count from ``"3e9"``, ``"3B"``, ``"350M"``, ``"1.3b"`` or a number.

    Raises:
        ValueError: not a positive count (the message shows the forms that work).

    Example:
        >>> parse_model_size("3B"), parse_model_size("350M"), parse_model_size("2e6")
        (3000000000, 350000000, 2000000)
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+]?[0-9]+)?)\s*([a-zA-Z]?)\s*", str(text))
    suffix = match.group(2).lower() if match else ""
    exponent_and_suffix = match is not None and suffix and "e" in match.group(1).lower()
    if match is None or suffix not in _SUFFIXES or exponent_and_suffix:
        raise ValueError(
            f"model size {text!r} is not a parameter count; write e.g. 3e9, 3B, 350M or 2e6"
        )
    count = round(float(match.group(1)) * _SUFFIXES[suffix])
    if count < 1:
        raise ValueError(f"model size {text!r} must be at least one parameter")
    return count


@dataclass(frozen=True)
class ModelShape:
    """A transformer shape and the parameter count it has."""

    d_model: int
    n_layers: int
    n_heads: int
    params: int


def charlm_params(d_model: int, n_layers: int, vocab: int = 256, seq_len: int = 64) -> int:
    """Parameters of ``TinyTransformer(vocab, d_model, n_layers, heads, seq_len)``.

    Example:
        >>> charlm_params(128, 2)  # the charlm task's default model
        470784
    """
    block = 12 * d_model**2 + 13 * d_model
    return n_layers * block + (2 * vocab + seq_len + 2) * d_model + vocab


def charlm_shape(params: int, vocab: int = 256, seq_len: int = 64) -> ModelShape:
    """Width, depth and heads for about ``params`` parameters (the module's rule).

    Raises:
        ValueError: ``params`` is below the smallest model the rule builds (64 wide, 1 block).

    Example:
        >>> charlm_shape(3_000_000_000)
        ModelShape(d_model=2496, n_layers=40, n_heads=39, params=2993148544)
    """
    smallest = charlm_params(_HEAD_DIM, 1, vocab, seq_len)
    if params < smallest:
        raise ValueError(
            f"model size {params!r} is below the smallest charlm model ({smallest} parameters: "
            f"{_HEAD_DIM} wide, one block); ask for at least {smallest}"
        )
    width = (_HEAD_DIM * params / 12) ** (1 / 3)
    d_model = max(_HEAD_DIM, _HEAD_DIM * round(width / _HEAD_DIM))
    while d_model > _HEAD_DIM and charlm_params(d_model, 1, vocab, seq_len) > params:
        d_model -= _HEAD_DIM  # small counts: the embeddings alone must leave room for a block
    outside = charlm_params(d_model, 0, vocab, seq_len)
    per_block = charlm_params(d_model, 1, vocab, seq_len) - outside
    n_layers = max(1, math.floor((params - outside) / per_block + 0.5))
    return ModelShape(
        d_model, n_layers, d_model // _HEAD_DIM, charlm_params(d_model, n_layers, vocab, seq_len)
    )


# GPT-3's learning rates by model size (Brown et al. 2020, table 2.1): parameters -> Adam lr.
_GPT3_LR = ((125e6, 6.0e-4), (350e6, 3.0e-4), (760e6, 2.5e-4), (1.3e9, 2.0e-4),
            (2.7e9, 1.6e-4), (6.7e9, 1.2e-4), (13e9, 1.0e-4), (175e9, 0.6e-4))  # fmt: skip


def charlm_lr(params: int, default: float) -> float:
    """The AdamW learning rate of a sized charlm model: GPT-3's rate for its size (interpolated
    in log-log between the sizes of its table, the first segment's slope below 125M parameters,
    the last rate beyond 175B), never above the task's ``default``, which the small models keep.
    A billion-parameter model at the small task's rate (2e-3) diverges within two steps.

    Example:
        >>> charlm_lr(2_000_000, 2e-3), charlm_lr(1_300_000_000, 2e-3), charlm_lr(10**12, 2e-3)
        (0.002, 0.0002, 6e-05)
    """
    segments = list(itertools.pairwise(_GPT3_LR))
    (n0, lr0), (n1, lr1) = next(((a, b) for a, b in segments if params <= b[0]), segments[-1])
    if params > _GPT3_LR[-1][0]:
        return min(default, _GPT3_LR[-1][1])
    rate = lr0 * (lr1 / lr0) ** (math.log(params / n0) / math.log(n1 / n0))
    return min(default, float(rate))


def sized_task_options(task: str, size: str | float) -> dict[str, object]:
    """The task options that scale ``task``'s model to ``size`` parameters (build it on meta:
    ``task.meta = True``).

    Raises:
        ValueError: a task other than ``charlm``; a size :func:`parse_model_size` or
            :func:`charlm_shape` refuses.

    Example:
        >>> sized_task_options("charlm", "2e6")
        {'d_model': 192, 'n_layers': 4, 'n_heads': 3}
    """
    if task != "charlm":
        raise ValueError(
            f"--model-size scales the charlm transformer; task {task!r} has a fixed model. "
            "Use --task charlm, or drop --model-size"
        )
    shape = charlm_shape(parse_model_size(size))
    return {"d_model": shape.d_model, "n_layers": shape.n_layers, "n_heads": shape.n_heads}


def eager_model(task: Any, device: str | torch.device) -> nn.Module:
    """``task``'s model on ``device`` in fp32, materialized if the task builds it on meta (for
    the commands that inspect a model rather than train it: ``advise``, ``explain``)."""
    from mixprec.policy import Policy
    from mixprec.session.materialize import has_meta, materialize

    model = task.build_model()
    if has_meta(model):
        materialize(model, Policy.parse("fp32"), device)
    return model.to(device)
