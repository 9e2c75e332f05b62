"""The one-pass kernels on block-quantized optimizer states (``state="int8"`` or ``"fp8"``).

Design note: the states of :class:`~mixprec.optim.quantized_states.Int8States` and
:class:`~mixprec.optim.quantized_states.Fp8States` stay 8-bit codes with an fp32 scale per block
between steps. The reference path decodes a chunk's states to fp32, lets torch's optimizer step
them and encodes them back: three passes over the chunk's fp32 states besides torch's own dozen.
Here the kernel (``_fused_states.cpp``) does all of it per group of blocks that stays in cache
(64 blocks of 256): decode the codes of the group into fp32 (map entry or e4m3 value times the
block's scale, squared for a second moment stored as its root), do the kernel's SGD/Adam/AdamW
arithmetic (:mod:`mixprec.optim.fused`, torch's operation by operation, torch's own ``sqrt``),
write the weight by the update rule, and encode the new values: the block's absmax, then each
code by :mod:`mixprec.optim.codecs`' rule (the int8 code by the same bucket tables, the e4m3
code by c10's cast after :func:`~mixprec.quantize.round_to_grid`'s stochastic rounding), with
the same counter-based draws (the storage's ``[salt, rounds]`` counter, element by its global
position). The result is the reference path's, bit for bit, for finite states; memory traffic
is the 16-bit weight and gradient plus one byte per state element.

What stays on the reference path (same results), per parameter: a second moment stored with
negative (signed-map) blocks, codes or scales not of the stored form (a state loaded and not
yet narrowed), and everything :func:`~mixprec.optim.fused.step_fused` declines anyway. A
parameter whose states the storage keeps in fp32 (small or 1-D ones) takes the fp32 kernel.
Salts (the streams of the draws) are given to new states in the order they are first stored,
as on the reference path; a step where some parameters of a chunk decline the kernel stores
those after the others, so their salts may differ from a run without the kernel (the draws stay
independent either way).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from mixprec.optim import codecs
from mixprec.optim.per_param_states import PerParameterStates
from mixprec.optim.quantized_states import (
    ROUNDING_KEY,
    SCALE_SUFFIX,
    BlockQuantizedStates,
    _wrap_scale,
)
from mixprec.optim.shards import flat_offset, is_dtensor, wrap_like

__all__ = ["coded_storage", "step_adam", "step_sgd"]

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def coded_storage(storage: object, param: torch.Tensor) -> BlockQuantizedStates | None:
    """``storage`` (or, per parameter, the one of its formats that keeps ``param``'s states)
    where it stores ``param``'s states as codes, else None."""
    if isinstance(storage, PerParameterStates):
        storage = storage.storage_of(param)
    if isinstance(storage, BlockQuantizedStates) and storage.quantizes(param):
        return storage
    return None


@functools.cache
def _tables(fmt: str, signed: bool) -> list[torch.Tensor]:
    """The kernel's tables: the 256 decoded values of a code; for int8 also the packed bucket
    tables of the nearest code and of the code below (:func:`_packed`)."""
    if fmt == "fp8":
        return [torch.arange(256, dtype=torch.uint8).view(codecs.FP8_DTYPE).float()]
    base, threshold = codecs._code_table(signed, torch.device("cpu"))
    qmap = codecs.dynamic_map(signed)
    first, last = _bucket_ends()
    finite = torch.isfinite(first) & torch.isfinite(last)
    below_first = torch.bucketize(first, qmap, right=True)  # 1 + the code of the entry below
    below_last = torch.bucketize(last, qmap, right=True)
    if bool(((below_last - below_first > 1) & finite).any()):  # pragma: no cover - by the map
        raise AssertionError("two map entries in one 16-bit bucket")
    inside = finite & (below_last > below_first)
    entry = qmap[below_first.clamp(max=255)]
    below = torch.where(finite, below_first, base.long() + 1)
    return [
        qmap,
        _packed(base.long(), torch.where(torch.isinf(threshold), float("nan"), threshold)),
        _packed(below, torch.where(inside, entry, float("nan"))),
    ]


def _bucket_ends() -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest and the largest fp32 value of each upper-16-bit bucket."""
    top = torch.arange(1 << 16, dtype=torch.int64) << 16
    top = torch.where(top >= 1 << 31, top - (1 << 32), top)  # as int32 patterns
    first = torch.where(top < 0, top | 0xFFFF, top).to(torch.int32).view(torch.float32)
    last = torch.where(top < 0, top, top | 0xFFFF).to(torch.int32).view(torch.float32)
    return first, last


def _packed(code: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Per bucket ``code << 17 | key``: the kernel takes ``code + (key(y) >= key)``, with
    ``key(y)`` the lower 16 bits of y's pattern (reversed for a negative bucket: the order of the
    values), ``0x10000`` (never reached) where ``bound`` is NaN (no bound inside the bucket)."""
    low = bound.view(torch.int32).long() & 0xFFFF
    negative = torch.arange(1 << 16) >= 1 << 15
    key = torch.where(negative, 0xFFFF - low, low)
    key = torch.where(torch.isnan(bound), 0x10000, key)
    return ((code << 17) | key).to(torch.int32)


def _tables_of(storage: BlockQuantizedStates, key: str) -> list[torch.Tensor]:
    return _tables(storage.name, key not in storage.sqrt_keys)


def _plain_local(t: object, dtype: torch.dtype, numel: int, sharded: bool) -> torch.Tensor | None:
    """The local tensor of ``t`` where it is a contiguous CPU tensor of ``dtype`` and ``numel``
    elements (a DTensor exactly where the parameter is one), else None."""
    if not isinstance(t, torch.Tensor) or is_dtensor(t) != sharded:
        return None
    view = t.to_local() if sharded else t  # type: ignore[attr-defined]
    ok = (
        type(view) in _PLAIN_TYPES
        and view.device.type == "cpu"
        and view.dtype == dtype
        and view.is_contiguous()
        and view.numel() == numel
    )
    return view if ok else None


def _views(
    storage: BlockQuantizedStates,
    state: dict[str, Any],
    keys: tuple[str, ...],
    model_param: torch.Tensor,
    param: torch.Tensor,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """The local (codes, scale) of each of ``keys``: ``{}`` for a new state, None where the state
    is not of the stored form (then the reference path steps it)."""
    if not state or set(state) == {"step"}:
        return {} if not state else None
    expected = {*keys, *(k + SCALE_SUFFIX for k in keys)}
    extra = set(state) - expected - {ROUNDING_KEY, "step"}
    if extra or not expected <= set(state):
        return None
    rows = param.shape[0]
    blocks = rows * codecs.block_count(param.numel() // rows, storage.block_size)
    views = {}
    sharded = is_dtensor(model_param)
    for key in keys:
        if state[key].shape != model_param.shape:
            return None
        codes = _plain_local(state[key], storage.code_dtype, param.numel(), sharded)
        scale = _plain_local(state[key + SCALE_SUFFIX], torch.float32, blocks, sharded)
        if codes is None or scale is None:
            return None
        if key in storage.sqrt_keys and storage.name == "int8" and bool((scale < 0).any()):
            return None  # signed blocks under a second moment's name: the reference path
        views[key] = (codes, scale)
    return views


def _new_views(
    storage: BlockQuantizedStates,
    state: dict[str, Any],
    keys: tuple[str, ...],
    model_param: torch.Tensor,
    param: torch.Tensor,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Codes and scales for the new states ``keys``, placed in ``state`` in the order the
    reference path leaves them (the states, the draws' counter, the scales)."""
    rows = param.shape[0]
    blocks = codecs.block_count(param.numel() // rows, storage.block_size)
    views = {}
    for key in keys:
        codes = torch.empty(param.shape, dtype=storage.code_dtype)
        views[key] = (codes, torch.empty(rows, blocks))
        state[key] = wrap_like(codes, model_param)
    if storage.rounding == "stochastic":
        storage.draws.key(state, keys[0])  # the counter comes before the scales
    for key in keys:
        state[key + SCALE_SUFFIX] = _wrap_scale(views[key][1], model_param)
    return views


def _layout(
    storage: BlockQuantizedStates, param: torch.Tensor, model_param: torch.Tensor
) -> list[int]:
    return [storage.block_size, param.shape[0], (flat_offset(model_param) or 0) % 2**32]


def _keys(storage: BlockQuantizedStates, state: dict[str, Any], keys: tuple[str, ...]) -> list[int]:
    if storage.rounding != "stochastic":
        return [0, 0] * len(keys)
    return [k for key in keys for k in storage.draws.key(state, key)]


def step_sgd(
    ops: Any,
    storage: BlockQuantizedStates,
    state: dict[str, Any],
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any, Any],
    scalars: list[float],
    nesterov: bool,
    mode: int,
    key: tuple[int, int],
    offset: int,
) -> bool:
    """SGD with momentum on a coded momentum buffer; False where the state is not of the stored
    form (nothing changed).

    Args:
        tensors: ``(model_param, param, grad, master, compensation)``, the last four local.
    """
    model_param, param, grad, master, compensation = tensors
    views = _views(storage, state, ("momentum_buffer",), model_param, param)
    if views is None:
        return False
    storage.draws.seen(state)
    first = not views
    if first:
        views = _new_views(storage, state, ("momentum_buffer",), model_param, param)
    codes, scale = views["momentum_buffer"]
    fp8 = storage.name == "fp8"
    ops.sgd_coded_(
        param, grad, master, compensation, codes, scale,
        _tables_of(storage, "momentum_buffer"), scalars, first, nesterov, mode, key[0], key[1],
        offset, _layout(storage, param, model_param),
        [int(fp8), int(storage.rounding == "stochastic"),
         *_keys(storage, state, ("momentum_buffer",))],
    )  # fmt: skip
    if storage.rounding == "stochastic":
        storage.draws.advance(state)
    return True


def step_adam(
    ops: Any,
    storage: BlockQuantizedStates,
    state: dict[str, Any],
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any, Any],
    scalars_of: Any,
    weight_decay_mode: int,
    mode: int,
    key: tuple[int, int],
    offset: int,
) -> bool:
    """Adam/AdamW on coded moments; False where the state is not of the stored form (nothing
    changed). ``scalars_of(step)`` gives the kernel's scalars after the step count is raised.

    Args:
        tensors: ``(model_param, param, grad, master, compensation)``, the last four local.
    """
    model_param, param, grad, master, compensation = tensors
    names = ("exp_avg", "exp_avg_sq")
    views = _views(storage, state, names, model_param, param)
    if views is None:
        return False
    step = state.get("step")
    if views and not (
        isinstance(step, torch.Tensor)
        and type(step) in _PLAIN_TYPES
        and step.dim() == 0
        and step.dtype == torch.float32
    ):
        return False
    storage.draws.seen(state)
    fresh = not views
    if fresh:  # as torch's Adam._init_group, then the storage's encode
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        views = _new_views(storage, state, names, model_param, param)
    state["step"] += 1
    (m_codes, m_scale), (v_codes, v_scale) = views["exp_avg"], views["exp_avg_sq"]
    flags = [
        int(storage.name == "fp8"),
        int(fresh),
        int(storage.rounding == "stochastic"),
        int("exp_avg_sq" in storage.sqrt_keys),
        *_keys(storage, state, names),
    ]
    ops.adam_coded_(
        param, grad, master, compensation, m_codes, m_scale, v_codes, v_scale,
        _tables_of(storage, "exp_avg"), _tables_of(storage, "exp_avg_sq"),
        scalars_of(state["step"].item()), weight_decay_mode, mode, key[0], key[1], offset,
        _layout(storage, param, model_param), flags,
    )  # fmt: skip
    if storage.rounding == "stochastic":
        storage.draws.advance(state)
    return True
