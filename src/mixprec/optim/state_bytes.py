"""Bytes of the optimizer's states in each storage format, and of compressed masters: the arithmetic
the memory plan (:mod:`mixprec.distributed.plan`) and `mixprec.explain` share.

Design note: the same tensors :func:`mixprec.optim.memory_report` counts after a step, from the
storages of :mod:`mixprec.optim.quantized_states`, as pure arithmetic:

* ``fp32``: 4 B per moment element (AdamW keeps two moments); ``fp16``: 2 B; ``bf16``: 2 B plus
  the 16-byte draw counter (:data:`~mixprec.optim.quantized_states.ROUNDING_KEY`) per tensor.
* ``int8`` and ``fp8``: 1 B per moment element plus an fp32 scale per block of 256 within a row
  (``rows * ceil(cols / 256) * 4`` B per moment: 4/256 B per element where rows are whole
  blocks), plus the 16-byte draw counter per tensor; a parameter of fewer than 2 dimensions or
  fewer than :data:`~mixprec.optim.quantized_states.MIN_NUMEL` elements keeps fp32 states.
  Without the shapes the plan assumes every element is in a quantized matrix whose rows are
  whole blocks (what a model of billions of parameters is, to well under 1%); with them
  (``shapes=``) it is exact.
* The states of a tensor whose format is fp32 are in the dtype of what the inner optimizer
  steps: fp32 (a shadow or an fp32 parameter), or the parameter's 16-bit dtype under a plain
  round-to-nearest update with fp32 states (torch's optimizer on the 16-bit parameter itself).
* Compressed masters (``master_remainder``: 16 or 8 bits): the fp32 master of a bf16 parameter
  kept as the parameter plus a remainder of that many bits: 2 or 1 B per element instead of 4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from mixprec.optim.codecs import BLOCK_SIZE
from mixprec.optim.quantized_states import MIN_NUMEL

__all__ = [
    "ROUNDING_BYTES",
    "master_bytes",
    "state_bytes",
    "state_bytes_per_element",
    "stored_format",
]

MOMENTS = 2  # AdamW's exp_avg and exp_avg_sq
ROUNDING_BYTES = 16  # int64 [salt, rounds] per tensor whose states are rounded stochastically
_ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}


def state_bytes_per_element(state: str, fp32_bytes: int = 4) -> float:
    """Bytes per parameter element of AdamW's two moments stored as ``state``, without shapes
    (8-bit formats: whole blocks; ``fp32_bytes``: the dtype fp32-format states are kept in).

    Example:
        >>> state_bytes_per_element("int8"), state_bytes_per_element("bf16")
        (2.03125, 4)
    """
    if state == "fp32":
        return MOMENTS * fp32_bytes
    if state in ("int8", "fp8"):
        return MOMENTS * (1 + 4 / BLOCK_SIZE)
    return MOMENTS * _ELEMENT[state]


def _quantized(shape: Sequence[int]) -> bool:
    return len(shape) >= 2 and math.prod(shape) >= MIN_NUMEL


def stored_format(state: str, shapes: Sequence[Sequence[int]]) -> str:
    """The format the states of parameters of ``shapes`` are really kept in under ``state``:
    an 8-bit format where at least one of them is quantized, else fp32 (``"fp32 (small)"``:
    every one below 2 dimensions or :data:`MIN_NUMEL` elements).

    Example:
        >>> stored_format("int8", [(512, 128), (512,)]), stored_format("int8", [(512,)])
        ('int8', 'fp32 (small)')
    """
    if state in ("int8", "fp8") and not any(_quantized(shape) for shape in shapes):
        return "fp32 (small)"
    return state


def state_bytes(
    state: str,
    num_params: float,
    num_tensors: int = 0,
    shapes: Sequence[Sequence[int]] | None = None,
    fp32_bytes: int = 4,
) -> float:
    """Bytes of AdamW's moments for a model, stored as ``state`` (step counters not included).

    Args:
        state: a format of :data:`~mixprec.formats.STATE_FORMATS`.
        num_params: parameter elements (used without ``shapes``).
        num_tensors: parameter tensors (their draw counters, without ``shapes``).
        shapes: the parameters' shapes: exact accounting of which tensors are quantized, their
            block scales and draw counters.
        fp32_bytes: the bytes of an element of states kept uncompressed in fp32 format (2 under
            a plain 16-bit update).

    Example:
        >>> state_bytes("int8", 0, shapes=[(64, 300), (64,)])  # two blocks per row; a 1-D bias
        39952.0
    """
    if shapes is None:
        counters = ROUNDING_BYTES * num_tensors if state in ("bf16", "int8", "fp8") else 0
        return state_bytes_per_element(state, fp32_bytes) * num_params + counters
    total = 0.0
    for shape in shapes:
        numel = math.prod(shape)
        if state in ("int8", "fp8") and _quantized(shape):
            scales = shape[0] * math.ceil(numel // shape[0] / BLOCK_SIZE)
            total += MOMENTS * (numel + 4 * scales) + ROUNDING_BYTES
        elif state in ("int8", "fp8", "fp32"):
            total += MOMENTS * fp32_bytes * numel
        else:
            total += MOMENTS * _ELEMENT[state] * numel + (ROUNDING_BYTES if state == "bf16" else 0)
    return total


def master_bytes(master_remainder: int | None) -> int:
    """Bytes per element of a bf16 parameter's fp32 master: 4, or the parameter plus a 16- or
    8-bit remainder (2 or 1).

    Raises:
        ValueError: ``master_remainder`` not None, 16 or 8.
    """
    if master_remainder is None:
        return 4
    if master_remainder not in (16, 8) or isinstance(master_remainder, bool):
        raise ValueError(
            f"master_remainder must be None (full fp32 masters), 16 (exact: 2 B/param) or 8 "
            f"(24-bit masters: 1 B/param), got {master_remainder!r}"
        )
    return master_remainder // 8
