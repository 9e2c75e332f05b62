"""One-pass updates for the common torch optimizers: the wrappers at the speed of what they wrap.

Design note: stepped through the inner optimizer, a wrapper's update makes many passes over
memory: widen the 16-bit gradients (and weights), let torch's optimizer run its dozen foreach
passes over fp32 scratch, hash random bits, round back. For the optimizers most runs use
(``torch.optim.SGD``, ``Adam`` and ``AdamW``, exact types) this module does the whole update of a
parameter in one pass instead: a C++ kernel (``_fused.cpp``, registered with ``torch.library`` as
``torch.ops.mixprec_fused``) reads the 16-bit weight (or the fp32 master), the 16-bit gradient
times the inverse loss scale and the fp32 states, and writes the states and the 16-bit weight,
rounded to nearest (master weights), stochastically with the counter-based bits of
:mod:`mixprec.stochastic`, or with Kahan's 16-bit compensation. The states stay the inner
optimizer's own tensors (``inner.state[shadow]["exp_avg"]``...), created and counted exactly as
torch creates them, so state dicts, resume, LR schedulers and memory accounts are unchanged.

Arithmetic: operation by operation torch's, in the order of its CPU kernels (fused multiply-adds
where torch's vectorized kernels use them), so SGD (momentum, dampening, Nesterov, weight decay),
Adam and AdamW (weight decay coupled or decoupled) give the reference path's bits: the same
weights, masters, moments and compensation, and for a given seed the same stochastic rounding.
One operation is not done inline: torch's CPU ``sqrt`` (a vector math library's) is not
correctly rounded for about a fifth of its inputs, so Adam's kernel works through blocks of 16K
elements that stay in cache, in two loops around torch's own ``sqrt`` of the block; that costs
about a second pass over cache, not over memory.

States stored as int8 or fp8 block codes (``state="int8"``/``"fp8"``) are stepped in their
coded form, decoded and encoded per group of blocks inside the same pass, with the reference
path's bits (:mod:`mixprec.optim.fused_codes`).

The kernel is built on first use (:mod:`mixprec.optim.fused_build`: about 35 s, then cached).
When a whole step declines the one-pass path is one table, in :mod:`mixprec.optim.plan`; what
:func:`step_fused` itself declines, per parameter group or parameter, and leaves to the reference
path (same results): ``amsgrad``, ``maximize``, ``capturable``, ``differentiable``,
``fused=True``, tensor hyperparameters, parameters off the CPU, tensor subclasses other than
DTensor, non-contiguous tensors, gradients of another dtype than the parameter's, fp32 or
complex parameters, states of an unexpected form. ``wrapper.last_step_fused`` says how many
parameters the last step updated in one pass. A DTensor parameter (FSDP2) is updated through its
local shard, with its gradient, master, compensation and states when they are DTensors of the
same layout (as the wrappers make them); the states it creates are DTensors of that layout, so
sharded checkpoints see what the inner optimizer would have made.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from mixprec.optim import fused_codes
from mixprec.optim.fused_build import engine, engine_error
from mixprec.optim.shards import is_dtensor, wrap_like
from mixprec.stochastic import register_kernel

__all__ = [
    "FUSED_OPTIMIZERS",
    "MODES",
    "FusedMode",
    "engine",
    "engine_error",
    "order_states",
    "step_fused",
    "stochastic_round_",
]

FusedMode = Literal["auto", "off"]
Rounding = Literal["nearest", "stochastic", "kahan"]
# The kernels' ways of writing the new weight (``mode`` of the C++ ops): round the fp32 master to
# nearest (and write the master), round stochastically, round to nearest with Kahan's remainder.
MODES: dict[str, int] = {"nearest": 0, "stochastic": 1, "kahan": 2}
_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
# Exact types: a subclass may change the update.
FUSED_OPTIMIZERS: frozenset[type[torch.optim.Optimizer]] = frozenset(
    {torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW}
)
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def order_states(inner: torch.optim.Optimizer) -> None:
    """Reorder ``inner.state`` by parameter order, the order its own step creates states in
    (the fused and the reference path of one step create them in two runs)."""
    state = inner.state
    ordered = {p: state[p] for g in inner.param_groups for p in g["params"] if p in state}
    rest = {p: s for p, s in state.items() if p not in ordered}
    state.clear()
    state.update(ordered)
    state.update(rest)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _group_supported(inner: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    flags_off = all(not group.get(k, False) for k in ("maximize", "differentiable", "fused"))
    if isinstance(inner, torch.optim.SGD):
        return flags_off and all(
            _number(group[k]) for k in ("lr", "momentum", "dampening", "weight_decay")
        )
    betas = group["betas"]
    return (
        flags_off
        and not group["amsgrad"]
        and not group["capturable"]
        and all(_number(v) for v in (group["lr"], group["eps"], group["weight_decay"], *betas))
        and isinstance(group.get("decoupled_weight_decay", False), bool)
    )


def _plain(t: torch.Tensor | None, dtype: torch.dtype | None = None) -> bool:
    return (
        t is not None
        and type(t) in _PLAIN_TYPES  # not a subclass such as DTensor
        and t.device.type == "cpu"
        and t.is_contiguous()
        and not t.is_sparse
        and t.numel() < 2**31  # the kernels index in 32 bits
        and (dtype is None or t.dtype == dtype)
    )


def _local_like(t: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor | None:
    """``t`` itself next to a plain ``ref``; next to a DTensor ``ref``, the local shard of ``t``
    when it is a DTensor laid out as ``ref`` is (mesh, placements, shape), else None."""
    if t is None or not is_dtensor(ref):
        return t
    spec: Any = ref
    other: Any = t
    if (
        not is_dtensor(t)
        or other.device_mesh != spec.device_mesh
        or other.placements != spec.placements
        or t.shape != ref.shape
    ):
        return None
    return other.to_local()  # type: ignore[no-any-return]


def _local_states(
    state: dict[str, Any], keys: tuple[str, ...], param: torch.Tensor, numel: int
) -> dict[str, torch.Tensor] | None:
    """The local views of ``state``'s tensors (``{}`` before the first step), or None when the
    state is not of the form the kernels update (then the reference path steps it)."""
    if not state:
        return {}
    if set(state) - {"step"} != set(keys) - {"step"} or ("step" in keys) != ("step" in state):
        return None
    step = state.get("step")
    if "step" in keys and not (
        isinstance(step, torch.Tensor)
        and type(step) in _PLAIN_TYPES
        and step.dim() == 0
        and step.dtype == torch.float32
    ):
        return None
    views = {}
    for key in keys:
        if key != "step":
            view = _local_like(state[key], param)
            if not (_plain(view, torch.float32) and view is not None and view.numel() == numel):
                return None
            views[key] = view
    return views


def _adam_scalars(group: dict[str, Any], step: float, inv: float) -> list[float]:
    """The adam kernels' scalars for a group at step count ``step`` (torch's expressions)."""
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    weight_decay = group["weight_decay"]
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    return [
        inv,
        1 - lr * weight_decay,
        weight_decay,
        1 - beta1,
        beta2,
        1 - beta2,
        bias_correction2**0.5,
        eps,
        (lr / bias_correction1) * -1,
    ]


def step_fused(
    inner: torch.optim.Optimizer,
    entries: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]],
    inv_scale: torch.Tensor | float | None,
    rounding: Rounding,
    key: tuple[int, int] = (0, 0),
    storage: object = None,
) -> list[torch.Tensor]:
    """Update the parameters of ``entries`` that the fused kernels support; return the others.

    Args:
        inner: the wrapped optimizer (SGD, Adam or AdamW); its ``state`` is updated in place, keyed
            on the shadows, as its own step would.
        entries: ``(param, shadow, compensation, offset)`` per parameter with a gradient: the
            16-bit model parameter, the tensor ``inner`` steps (the fp32 master for
            ``rounding="nearest"``), the Kahan buffer (``"kahan"``), the index of its first
            element in the stochastic-rounding stream (``"stochastic"``).
        inv_scale: multiplies the 16-bit gradients (``1 / loss scale``), or None.
        rounding: how the new weight is written: ``"nearest"`` (the master is written too),
            ``"stochastic"`` (with the bits of ``key``), ``"kahan"``.
        key: the counter key of this step's stochastic rounding.
        storage: the wrapper's state storage; int8 and fp8 states are stepped in their coded
            form (:mod:`mixprec.optim.fused_codes`), others must be fp32.

    Returns:
        The parameters left to the reference path, in order.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
        >>> master = torch.ones(4)
        >>> sgd = torch.optim.SGD([master], lr=0.5)
        >>> w.grad = torch.ones_like(w)
        >>> rest = step_fused(sgd, [(w, master, None, 0)], None, "nearest")
        >>> w.tolist() if not rest else [0.5] * 4  # rest == [w] where no kernel can be built
        [0.5, 0.5, 0.5, 0.5]
    """
    ops = engine()
    if ops is None:
        return [entry[0] for entry in entries]
    groups = {id(s): g for g in inner.param_groups for s in g["params"]}
    supported = {id(g): _group_supported(inner, g) for g in inner.param_groups}
    inv = 1.0 if inv_scale is None else float(inv_scale)
    k1, k2 = key
    rest = []
    mode = MODES[rounding]
    for model_param, shadow, model_compensation, offset in entries:
        group = groups.get(id(shadow))
        # DTensors (FSDP2 shards) are updated through their local shards: elementwise, with the
        # stream offset of the shard's first element.
        param = _local_like(model_param, model_param)
        grad = _local_like(model_param.grad, model_param)
        compensation = _local_like(model_compensation, model_param)
        master = _local_like(shadow, model_param) if rounding == "nearest" else None
        ok = (
            group is not None
            and model_param.dtype in _SIXTEEN_BIT
            and _plain(param)
            and _plain(grad, model_param.dtype)
            and (rounding != "nearest" or _plain(master, torch.float32))
            and (rounding != "kahan" or _plain(compensation, model_param.dtype))
            and supported[id(group)]
        )
        if not ok or group is None or grad is None or param is None:
            rest.append(model_param)
            continue
        coded = fused_codes.coded_storage(storage, model_param)
        tensors = (model_param, param, grad, master, compensation)
        if isinstance(inner, torch.optim.SGD):
            momentum = group["momentum"]
            scalars = [inv, group["weight_decay"], momentum, 1 - group["dampening"], -group["lr"]]
            nesterov = bool(group["nesterov"]) and momentum != 0
            if coded is not None and momentum != 0:
                if not fused_codes.step_sgd(
                    ops, coded, inner.state[shadow], tensors, scalars, nesterov, mode, key, offset
                ):
                    rest.append(model_param)
                continue
            state = inner.state[shadow] if momentum != 0 else {}  # as SGD._init_group
            keys: tuple[str, ...] = ("momentum_buffer",) if momentum != 0 else ()
            local_states = _local_states(state, keys, model_param, param.numel())
            if momentum != 0 and local_states is None:
                rest.append(model_param)
                continue
            buffer = (local_states or {}).get("momentum_buffer") if momentum != 0 else None
            first = momentum != 0 and buffer is None
            if first:
                buffer = torch.empty(param.shape, dtype=torch.float32, device=param.device)
            ops.sgd_(
                param, grad, master, compensation, buffer, scalars, first, nesterov, mode, k1, k2,
                offset,
            )  # fmt: skip
            if first and buffer is not None:
                state["momentum_buffer"] = wrap_like(buffer, model_param)
            continue
        state = inner.state[shadow]
        decoupled = bool(group.get("decoupled_weight_decay", False))
        weight_decay_mode = 0 if group["weight_decay"] == 0 else (1 if decoupled else 2)
        if coded is not None:
            if not fused_codes.step_adam(
                ops, coded, state, tensors, lambda step, g=group: _adam_scalars(g, step, inv),
                weight_decay_mode, mode, key, offset,
            ):  # fmt: skip
                rest.append(model_param)
            continue
        local_states = _local_states(
            state, ("step", "exp_avg", "exp_avg_sq"), model_param, param.numel()
        )
        if local_states is None:
            rest.append(model_param)
            continue
        if not state:  # as torch's Adam._init_group creates them
            for name in ("exp_avg", "exp_avg_sq"):
                local_states[name] = torch.zeros(
                    param.shape, dtype=torch.float32, device=param.device
                )
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = wrap_like(local_states["exp_avg"], model_param)
            state["exp_avg_sq"] = wrap_like(local_states["exp_avg_sq"], model_param)
        state["step"] += 1
        ops.adam_(
            param, grad, master, compensation, local_states["exp_avg"],
            local_states["exp_avg_sq"], _adam_scalars(group, state["step"].item(), inv),
            weight_decay_mode, mode, k1, k2, offset,
        )  # fmt: skip
    return rest


def stochastic_round_(
    src: torch.Tensor, out: torch.Tensor, key: tuple[int, int], offset: int
) -> bool:
    """Round contiguous fp32 ``src`` into contiguous 16-bit ``out`` with the kernel, if it can.

    The bits are :mod:`mixprec.stochastic`'s (bf16: 16 bits of word ``e // 2``; fp16: the
    grid rounding of :func:`mixprec.quantize.round_to_grid` with 24-bit uniforms).

    Returns:
        Whether it rounded (False: the kernel is unavailable or the tensors do not fit it).
    """
    if not (
        out.dtype in _SIXTEEN_BIT
        and _plain(src, torch.float32)
        and _plain(out)
        and src.numel() == out.numel()
    ):
        return False
    ops = engine()
    if ops is None:
        return False
    ops.stochastic_round_(src, out, key[0], key[1], offset)
    return True


register_kernel(stochastic_round_)  # mixprec.stochastic rounds with it where it applies
