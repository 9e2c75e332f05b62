"""The stepping plan: how one step is cut into chunks, and which chunks the one-pass kernel takes.

Design note, chunks (CPU): without a closure the parameters are stepped in chunks of
``chunk_numel`` elements, one call of the inner optimizer per chunk, with the other shadows'
gradients absent so that it skips them. The fp32 scratch of a chunk is a few MiB kept between
steps (:mod:`mixprec.optim.scratch`): reused, it costs no page faults, and it is still in cache
when the inner optimizer reads it. For the torch optimizers whose update of a parameter reads
nothing but that parameter (:data:`SEPARABLE_OPTIMIZERS`: SGD, Adam, AdamW, RMSprop...) the bits
are those of one call. Every other case takes one call (:func:`chunk_limit`): another optimizer
class (subclasses included, which may couple parameters), step hooks on the inner optimizer or
global ones (they would run once per chunk), ``max_grad_norm`` (a norm over all gradients),
parameters off the CPU, and a closure.

Design note, one pass: each chunk is first offered to the one-pass kernel
(:func:`mixprec.optim.fused.step_fused`) and what it leaves goes through the inner optimizer
(the reference path, the same bits). :data:`ONE_PASS_DECLINES` is the one table of when a whole
step declines the kernel, and why; :func:`step_fused` documents what it declines per parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from mixprec.optim.fused import FUSED_OPTIMIZERS, engine, engine_error
from mixprec.optim.shards import local_numel

if TYPE_CHECKING:
    from mixprec.optim.rules.base import UpdateRule
    from mixprec.optim.states import StateStorage

__all__ = [
    "CPU_CHUNK_NUMEL",
    "ONE_PASS_DECLINES",
    "SEPARABLE_OPTIMIZERS",
    "SIXTEEN_BIT",
    "chunk_limit",
    "chunks",
    "one_pass_refusal",
    "run_in_chunks",
]

SIXTEEN_BIT = (torch.float16, torch.bfloat16)
# The torch optimizers whose update of a parameter reads only that parameter's gradient and state,
# so that stepping the parameters in several calls gives the bits of one call. Exact types only: a
# subclass may couple its parameters (a global norm, a shared statistic).
SEPARABLE_OPTIMIZERS: frozenset[type[torch.optim.Optimizer]] = frozenset(
    {
        torch.optim.ASGD,
        torch.optim.Adadelta,
        torch.optim.Adafactor,
        torch.optim.Adagrad,
        torch.optim.Adam,
        torch.optim.AdamW,
        torch.optim.Adamax,
        torch.optim.NAdam,
        torch.optim.RAdam,
        torch.optim.RMSprop,
        torch.optim.Rprop,
        torch.optim.SGD,
    }
)
# On CPUs the fp32 scratch of one chunk (a few MiB) stays in cache and in the allocator's heap;
# GPU caching allocators keep a whole-model buffer and prefer few, large kernel launches.
CPU_CHUNK_NUMEL = 1 << 21


def _has_step_hooks(inner: torch.optim.Optimizer) -> bool:
    return bool(
        inner._optimizer_step_pre_hooks
        or inner._optimizer_step_post_hooks
        or _global_optimizer_pre_hooks
        or _global_optimizer_post_hooks
    )


class _Step:
    """What the table below reads about one step."""

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        fused: str,
        clipping: bool,
        rule: UpdateRule,
        storage: StateStorage,
    ) -> None:
        self.inner, self.fused, self.clipping = inner, fused, clipping
        self.rule, self.storage = rule, storage


# When a whole step declines the one-pass kernel, in the order they are checked: (declines?, why).
ONE_PASS_DECLINES: tuple[tuple[Callable[[_Step], bool], Callable[[_Step], str]], ...] = (
    (lambda s: s.fused == "off", lambda s: "fused='off'"),
    (
        lambda s: s.rule.one_pass_mode is None,
        lambda s: f"the {s.rule.name} rule has no one-pass mode: {s.rule.one_pass_decline}",
    ),
    (
        lambda s: not s.storage.one_pass,
        lambda s: (
            f"optimizer states are stored as {s.storage.name}; the kernel reads fp32 states "
            "or int8/fp8 block codes, not 16-bit states"
        ),
    ),
    (
        lambda s: type(s.inner) not in FUSED_OPTIMIZERS,
        lambda s: f"{type(s.inner).__name__} is not one of SGD, Adam, AdamW (exact types)",
    ),
    (lambda s: s.clipping, lambda s: "max_grad_norm clips by a norm over all gradients"),
    (
        lambda s: _has_step_hooks(s.inner),
        lambda s: "step hooks run inside the inner optimizer's step",
    ),
    (
        lambda s: engine() is None,
        lambda s: f"the fused kernels are unavailable: {engine_error()}",
    ),
)


def one_pass_refusal(
    inner: torch.optim.Optimizer,
    fused: str,
    clipping: bool,
    rule: UpdateRule,
    storage: StateStorage,
) -> str | None:
    """Why a step cannot offer its chunks to the one-pass kernel (None: it can), by
    :data:`ONE_PASS_DECLINES`."""
    step = _Step(inner, fused, clipping, rule, storage)
    for declines, why in ONE_PASS_DECLINES:
        if declines(step):
            return why(step)
    return None


def chunk_limit(
    inner: torch.optim.Optimizer,
    params: list[torch.Tensor],
    chunk_numel: int | None,
    clipping: bool,
) -> int | None:
    """``chunk_numel`` where this step may be cut into chunks, else None (one call)."""
    if (
        clipping
        or type(inner) not in SEPARABLE_OPTIMIZERS
        or _has_step_hooks(inner)  # hooks would run once per chunk
        or any(p.device.type != "cpu" for p in params)
    ):
        return None
    return chunk_numel


def chunks(
    params: list[torch.Tensor], limit: int | None, counted: bool = False
) -> list[list[torch.Tensor]]:
    """``params`` cut, in order, into runs of at most ``limit`` 16-bit elements (a larger
    parameter is a run of its own); ``counted``: fp32 elements count too (their states are
    decoded per run)."""
    if limit is None:
        return [params]
    runs: list[list[torch.Tensor]] = []
    current: list[torch.Tensor] = []
    size = 0
    for p in params:
        numel = local_numel(p) if counted or p.dtype in SIXTEEN_BIT else 0
        if current and size + numel > limit:
            runs.append(current)
            current, size = [], 0
        current.append(p)
        size += numel
    if current:
        runs.append(current)
    return runs


def run_in_chunks(
    runs: list[list[torch.Tensor]],
    is_own_shadow: Callable[[torch.Tensor], bool],
    step_chunk: Callable[[list[torch.Tensor]], None],
) -> None:
    """Call ``step_chunk`` on each run in turn. A parameter that is its own shadow (fp32) keeps
    its gradient only while its run is stepped, so that the inner optimizer skips it elsewhere;
    the 16-bit ones have shadows whose gradients exist only inside their run anyway."""
    if len(runs) <= 1:
        step_chunk(runs[0] if runs else [])
        return
    hidden = {p: p.grad for run in runs for p in run if is_own_shadow(p)}
    try:
        for p in hidden:
            p.grad = None
        for run in runs:
            own = [p for p in run if p in hidden]
            for p in own:
                p.grad = hidden[p]
            step_chunk(run)
            for p in own:
                p.grad = None
    finally:
        for p, grad in hidden.items():
            p.grad = grad
