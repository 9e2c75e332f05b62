"""A memory plan per rank, before renting the machines: model state and activations.

Design note: the model-state figures are the bytes each tensor kind costs per parameter element
— the same tensors :func:`mixprec.optim.memory_report` counts per rank after a step, in the
dtypes each preset and update mode gives them (AdamW: two moments in the dtype of the tensors
it updates, fp32 unless the update is a plain 16-bit round-to-nearest one) — divided by how many
ranks share them: nothing under DDP (every rank holds a full replica), everything under FSDP2
(ZeRO-3: params, grads, masters and optimizer state are all sharded), so bf16-mixed AdamW costs
16/N B/param per rank. AdamW's step counter (4 bytes per parameter tensor, on every rank) is counted
when the number of tensors is given. FSDP2's all-gathered 16-bit copies of the layer being
computed are transient and left out. The optimizer's states are counted in the format each
preset's ``state`` gives them (``state=`` plans every preset with another), compressed masters
(``master_remainder``) and the step inside backward (``step_in_backward``: no gradient outlives
its parameter's step) as :mod:`mixprec.optim.state_bytes` says.

Activations follow Korthikanti et al. (2022), "Reducing Activation Recomputation in Large
Transformer Models": per layer and token ``hidden * 34`` bytes with 16-bit activations (the
tensors a transformer block saves for backward, with 1-byte dropout masks), plus
``5 * heads * seq`` when attention stores its score matrices (eager attention; fused attention
such as SDPA/FlashAttention does not), scaled by ``compute_bytes / 2``, without recomputation
and without tensor parallelism. It is an estimate for the shape given, per rank's
micro-batch; measured memory also holds allocator slack and temporary buffers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from mixprec.formats import resolve_state_format
from mixprec.optim.state_bytes import master_bytes, state_bytes
from mixprec.policy import PRESETS

__all__ = [
    "MemoryPlan",
    "PlanRow",
    "activation_bytes_per_token",
    "memory_plan",
    "parse_bytes",
]

Strategy = Literal["single", "ddp", "fsdp2"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
_UPDATES = ("master", "stochastic", "kahan", "nearest")
_STEP_BYTES = 4  # AdamW's float32 step counter, one per parameter tensor


@dataclass(frozen=True)
class PlanRow:
    """Bytes per parameter element per rank of one preset and update mode.

    Attributes:
        preset: the policy preset.
        update: the update mode (``"-"`` where params are fp32 and no 16-bit update happens).
        params, grads, master, optimizer_state, compensation: bytes per parameter per rank.
        activations: activation bytes per rank for the transformer shape (0 if none given).
        total_bytes: everything per rank, in bytes.
        fits: whether ``total_bytes`` fits the device memory (None if none given).
        state: the format the optimizer's states are stored in.
        master_format: how 16-bit parameters' masters are kept (``"fp32"``, ``"bf16+16"`` or
            ``"bf16+8"``: the parameter plus a remainder; ``"-"`` where there is none).
        step_in_backward: whether gradients are freed by a step inside backward.
    """

    preset: str
    update: str
    params: float
    grads: float
    master: float
    optimizer_state: float
    compensation: float
    activations: float
    total_bytes: float
    fits: bool | None
    state: str = "fp32"
    master_format: str = "-"
    step_in_backward: bool = False

    @property
    def state_per_param(self) -> float:
        """Model-state bytes per parameter per rank."""
        return self.params + self.grads + self.master + self.optimizer_state + self.compensation


@dataclass(frozen=True)
class MemoryPlan:
    """The plan for ``num_params`` parameters on ``world`` ranks; ``str()`` is a table."""

    num_params: float
    world: int
    strategy: str
    num_tensors: int
    activation_per_token: float
    tokens_per_rank: int
    device_memory: float | None
    rows: tuple[PlanRow, ...]

    def row(self, preset: str, update: str = "-") -> PlanRow:
        """The row of ``preset`` and ``update``.

        Raises:
            KeyError: no such row (the message lists the rows).
        """
        for row in self.rows:
            if row.preset == preset and row.update == update:
                return row
        choices = ", ".join(f"{r.preset}/{r.update}" for r in self.rows)
        raise KeyError(f"no plan row {preset}/{update}; rows: {choices}")

    def __str__(self) -> str:
        head = (
            f"memory per rank for {self.num_params:.3g} parameters, {self.strategy} over "
            f"{self.world} rank(s), AdamW"
        )
        if self.tokens_per_rank:
            head += (
                f"; activations {self.activation_per_token / 2**20:.3g} MiB/token (16-bit) x "
                f"{self.tokens_per_rank} tokens per rank"
            )
        lines = [
            head,
            f"{'preset':<12}{'update':<12}{'state':<6}{'params':>8}{'grads':>8}{'master':>8}"
            f"{'optim':>8}{'comp':>8}{'B/param':>9}{'activ. GB':>11}{'total GB':>10}  fits",
        ]
        for r in self.rows:
            fits = "-" if r.fits is None else ("yes" if r.fits else "NO")
            lines.append(
                f"{r.preset:<12}{r.update:<12}{r.state:<6}{r.params:>8.3g}{r.grads:>8.3g}"
                f"{r.master:>8.3g}{r.optimizer_state:>8.3g}{r.compensation:>8.3g}"
                f"{r.state_per_param:>9.3g}{r.activations / 1e9:>11.3g}"
                f"{r.total_bytes / 1e9:>10.3g}  {fits}"
            )
        notes = [f"masters {r.master_format}" for r in self.rows[:1] if r.master_format != "-"]
        notes += ["step inside backward (no gradient buffer)"] * any(
            r.step_in_backward for r in self.rows[:1]
        )
        if notes:
            lines.append("; ".join(notes))
        if self.device_memory is not None:
            lines.append(f"device memory: {self.device_memory / 1e9:.3g} GB")
        return "\n".join(lines)


def _element_bytes(
    preset: str,
    update: str,
    size: tuple[float, int, Sequence[Sequence[int]] | None],
    state: str | None = None,
    master_remainder: int | None = None,
    step_in_backward: bool = False,
) -> dict[str, float]:
    """Bytes per parameter element, unsharded, of each part: the dtypes and storages the
    session gives (``size``: parameter elements, tensors, shapes or None)."""
    policy = PRESETS[preset]
    state = policy.state if state is None else state
    num_params, num_tensors, shapes = size
    param = policy.param.dtype.itemsize
    grads = 0 if step_in_backward else param
    if policy.param.dtype == torch.float32:  # fp32 params: the optimizer steps them itself
        states = state_bytes(state, num_params, num_tensors, shapes) / num_params
        return {"params": 4, "grads": grads, "master": 0, "optimizer_state": states,
                "compensation": 0}  # fmt: skip
    # a plain round-to-nearest update with fp32 states: torch's optimizer on the 16-bit params
    fp32_bytes = param if update == "nearest" and state == "fp32" else 4
    states = state_bytes(state, num_params, num_tensors, shapes, fp32_bytes) / num_params
    bf16 = policy.param.dtype == torch.bfloat16
    return {
        "params": param,
        "grads": grads,
        "master": (master_bytes(master_remainder) if bf16 else 4) if update == "master" else 0,
        "optimizer_state": states,
        "compensation": param if update == "kahan" else 0,
    }


def _check_int(name: str, value: object, low: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low} ({what}), got {value!r}")


def _preset_names(presets: object) -> tuple[str, ...]:
    """Preset names from a sequence or from one string (``"bf16-mixed"``, ``"fp32,bf16-mixed"``)."""
    if isinstance(presets, str):
        names = tuple(presets.split(",")) if presets else ()
    elif isinstance(presets, Iterable) and not isinstance(presets, (bytes, dict)):
        names = tuple(presets)
    else:
        raise TypeError(
            f"presets must be a preset name or a sequence of them, got {presets!r}; "
            f"e.g. presets=['bf16-mixed', 'fp32']"
        )
    if not names:
        raise ValueError(
            f"presets is empty ({presets!r}); name at least one of: {', '.join(PRESETS)}, "
            "or leave it out to plan all of them"
        )
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"preset names are strings, got {name!r} in presets={presets!r}")
        if not name.strip():
            raise ValueError(
                f"empty preset name in presets={presets!r}; valid presets: {', '.join(PRESETS)}"
            )
    return names


def _rows_wanted(presets: Iterable[str]) -> list[tuple[str, str]]:
    rows = []
    for preset in presets:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
        if PRESETS[preset].param.dtype == torch.float32:
            rows.append((preset, "-"))
        else:
            rows.extend((preset, update) for update in _UPDATES)
    return rows


def activation_bytes_per_token(
    layers: int,
    hidden: int,
    seq: int,
    heads: int | None = None,
    compute_bytes: int = 2,
    *,
    attention_scores: bool = False,
) -> float:
    """Activation bytes per token of a transformer (Korthikanti et al. 2022, no recompute).

    Args:
        layers: transformer blocks.
        hidden: model width.
        seq: sequence length.
        heads: attention heads (None: ``hidden // 64``).
        compute_bytes: bytes per activation element (2 for 16-bit compute, 4 for fp32).
        attention_scores: count the stored attention scores (eager attention).

    Example:
        >>> activation_bytes_per_token(layers=1, hidden=64, seq=128)
        2176.0
        >>> activation_bytes_per_token(layers=1, hidden=64, seq=128, heads=1, attention_scores=True)
        2816.0
    """
    for name, value in (("layers", layers), ("hidden", hidden), ("seq", seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    heads = max(hidden // 64, 1) if heads is None else heads
    scores = 5 * heads * seq if attention_scores else 0
    return float(layers * (34 * hidden + scores) * compute_bytes / 2)


def memory_plan(
    num_params: float,
    world: int = 1,
    strategy: Strategy = "fsdp2",
    *,
    presets: Sequence[str] | str = tuple(PRESETS),
    num_tensors: int = 0,
    layers: int | None = None,
    hidden: int | None = None,
    seq: int | None = None,
    batch: int = 1,
    heads: int | None = None,
    attention_scores: bool = False,
    device_memory: float | str | None = None,
    state: str | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
    master_remainder: int | None = None,
    step_in_backward: bool = False,
) -> MemoryPlan:
    """Bytes per parameter per rank for each preset and update mode, and whether it fits.

    Args:
        num_params: parameter elements of the model (``7e9``).
        world: ranks.
        strategy: ``"single"`` (one process), ``"ddp"`` (replicas) or ``"fsdp2"`` (ZeRO-3).
        presets: the presets to plan (default: all): a sequence of names, or one string
            (``"bf16-mixed"``, or comma-separated names).
        num_tensors: parameter tensors (adds AdamW's 4-byte step counter each, on every rank).
        layers, hidden, seq: a transformer shape for the activation estimate (all or none).
        batch: sequences per rank per micro-batch.
        heads: attention heads (None: ``hidden // 64``).
        attention_scores: count stored attention scores (eager attention, not SDPA/flash).
        device_memory: bytes per device, or a string such as ``"80GB"`` or ``"80GiB"``.
        state: plan every preset with its optimizer states in this format (None: each
            preset's own ``state``; ``bf16-lean``'s is int8).
        shapes: the parameters' shapes, for exact state bytes (which tensors are quantized,
            their block scales); their element count must be ``num_params``.
        master_remainder: 16 or 8: masters of bf16 parameters kept as the parameter plus a
            remainder of that many bits (None: full fp32 masters).
        step_in_backward: each parameter steps in backward and its gradient is freed at once:
            no gradient buffer is counted.

    Returns:
        A :class:`MemoryPlan`.

    Raises:
        ValueError: a bad count, world, strategy, preset, shape or memory size.
        TypeError: ``presets`` is neither a string nor a sequence of strings.

    Example:
        >>> plan = memory_plan(7e9, world=64, strategy="fsdp2", presets=["bf16-mixed"])
        >>> plan.row("bf16-mixed").state_per_param == 16 / 64
        True
    """
    if (
        isinstance(num_params, bool)
        or not isinstance(num_params, (int, float))
        or not math.isfinite(num_params)
        or num_params <= 0
    ):
        raise ValueError(
            f"num_params must be a number > 0 and finite (e.g. 7e9), got {num_params!r}"
        )
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be an int >= 1 (the number of ranks), got {world!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid strategies: {STRATEGIES}")
    if strategy == "single" and world != 1:
        raise ValueError(f"strategy 'single' runs one process, got world={world!r}; use 'ddp'")
    _check_int("num_tensors", num_tensors, 0, "parameter tensors; 0 leaves out AdamW's step")
    _check_int("batch", batch, 1, "sequences per rank per micro-batch")
    if heads is not None:
        _check_int("heads", heads, 1, "attention heads; None means hidden // 64")
    presets = _preset_names(presets)
    shape = (layers, hidden, seq)
    if any(v is not None for v in shape) and any(v is None for v in shape):
        raise ValueError(
            f"give the whole transformer shape or none of it, got layers={layers!r}, "
            f"hidden={hidden!r}, seq={seq!r}"
        )
    memory = parse_bytes(device_memory) if device_memory is not None else None
    state = None if state is None else resolve_state_format(state)
    master_bytes(master_remainder)  # checked before any row
    if shapes is not None:
        shapes = [tuple(int(n) for n in shape) for shape in shapes]
        counted = sum(math.prod(shape) for shape in shapes)
        if counted != num_params:
            raise ValueError(
                f"shapes hold {counted} parameter elements but num_params={num_params!r}; "
                "give the shapes of every parameter (or none)"
            )
    size = (float(num_params), num_tensors, shapes)
    remainder_name = "fp32" if master_remainder is None else f"bf16+{master_remainder}"
    per_token = 0.0
    tokens = 0
    if layers is not None and hidden is not None and seq is not None:
        per_token = activation_bytes_per_token(
            layers, hidden, seq, heads, attention_scores=attention_scores
        )
        tokens = batch * seq
    shards = world if strategy == "fsdp2" else 1
    rows = []
    for preset, update in _rows_wanted(presets):
        element = _element_bytes(preset, update, size, state, master_remainder, step_in_backward)
        parts = {k: v / shards for k, v in element.items()}
        compute_bytes = PRESETS[preset].compute.dtype.itemsize
        activations = per_token * tokens * compute_bytes / 2
        steps = _STEP_BYTES * num_tensors
        total = sum(parts.values()) * num_params + steps + activations
        rows.append(
            PlanRow(
                preset=preset,
                update=update,
                **parts,
                activations=activations,
                total_bytes=total,
                fits=None if memory is None else total <= memory,
                state=PRESETS[preset].state if state is None else state,
                master_format=remainder_name if update == "master" else "-",
                step_in_backward=step_in_backward,
            )
        )
    return MemoryPlan(
        num_params=float(num_params),
        world=world,
        strategy=strategy,
        num_tensors=num_tensors,
        activation_per_token=per_token,
        tokens_per_rank=tokens,
        device_memory=memory,
        rows=tuple(rows),
    )


_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_bytes(value: float | str) -> float:
    """``"80GB"`` -> 8e10, ``"80GiB"`` -> 80 * 2**30; numbers are bytes.

    Raises:
        ValueError: not a positive size with a known unit.

    Example:
        >>> parse_bytes("80GB"), parse_bytes("1KiB")
        (80000000000.0, 1024.0)
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        # The exponent is matched before the unit so that "1E9" is 1e9 bytes, not "1" of unit "E9".
        match = re.fullmatch(
            r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value)
        )
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(
                f"device memory {value!r} is not a size; write e.g. '80GB', '80GiB' or a number "
                f"of bytes (units: {', '.join(u for u in _UNITS if u)})"
            )
        number, unit = float(match.group(1)), match.group(2).lower()
    if not math.isfinite(number * _UNITS[unit]) or number <= 0:
        raise ValueError(
            f"device memory must be a finite size > 0, got {value!r}; write e.g. '80GB' or 8e10"
        )
    return number * _UNITS[unit]
