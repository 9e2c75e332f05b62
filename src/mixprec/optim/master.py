"""FP32 master weights for any torch.optim optimizer.

Design note: a 16-bit weight cannot take an update smaller than half its ulp (a bf16 weight of 1.0
ignores a step of 1e-4: its neighbours are 1 - 2**-8 and 1 + 2**-7), so a model whose parameters
are stored in bf16/fp16 stops learning once its updates get small. The cure is the one the
mixed-precision recipe has always used: the optimizer keeps an fp32 *master* copy of every 16-bit
parameter and applies its update there, and the 16-bit parameter is only ever the master rounded
to nearest. :class:`MasterWeightOptimizer` does this around an optimizer the user already built, so
any optimizer works unchanged (SGD, Adam, AdamW, a user's own): it moves the inner optimizer onto
the masters and, at each step,

1. copies the 16-bit gradients into fp32 gradients of the masters, dividing by the loss scale in
   the same pass when a ``GradScaler`` steps it (and skipping everything when it found inf/NaN);
2. steps the inner optimizer on the masters;
3. rounds the masters into the 16-bit parameters (one fused cast, round to nearest even).

The model keeps its 16-bit parameters and gradients, so forward and backward stay in 16 bits and
hooks, ``clip_grad_norm_`` and ``GradScaler.unscale_`` see the tensors users expect.

Cost: 4 bytes per 16-bit parameter for the master (16 B/param with Adam: 2 params + 2 grads +
4 master + 8 Adam states, the same as fp32 training), plus fp32 gradients that exist only inside
``step``. On CPUs the step goes in chunks of ``chunk_numel`` elements (see
``WrappedOptimizer._step_in_chunks``): the fp32 gradients of one chunk live in a buffer that is
kept between steps, a fixed workspace of at most ``4 * chunk_numel`` bytes whatever the model's
size (``memory_report`` shows it apart from the per-parameter account), so no step pays the page
faults of a fresh whole-model buffer and the chunk is still in cache when the inner optimizer
reads it. Elsewhere (GPUs, whose caching allocators keep freed memory) the buffer is allocated for
the step. Time: two memory-bound copies per step on top of the inner optimizer's own work.
``keep_grad_buffers=True`` keeps whole-model fp32 gradient buffers instead (20 B/param with Adam).
``benchmarks/bench_master.py`` measures them. Parameters that are already fp32
(norm layers a policy kept in fp32) are their own master: no copy, no cost; so are complex
parameters, which mixed precision leaves alone as torch's autocast does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mixprec.optim._shards import local, wrap_like
from mixprec.optim._wrapper import WrappedOptimizer, check_saved_buffers
from mixprec.optim.fused import step_fused

__all__ = ["MasterWeightOptimizer"]


class MasterWeightOptimizer(WrappedOptimizer):
    """Keep fp32 master weights for the 16-bit parameters of any torch optimizer.

    Build the optimizer on the model's (16-bit) parameters as usual and wrap it; then use the
    wrapper as the optimizer. ``param_groups`` hold the model's parameters and their settings, so
    LR schedulers, ``zero_grad`` and ``clip_grad_norm_(model.parameters())`` work as usual; the
    settings are passed to the inner optimizer at each step. After every step each 16-bit
    parameter equals its master rounded to nearest. fp32 and complex parameters are their own
    master (the wrapper is the identity for them; for a model with no 16-bit parameter it warns).
    ``step(closure)`` works with optimizers that evaluate the closure several times (LBFGS): each
    evaluation sees the masters rounded to nearest.

    Args:
        optimizer: a ``torch.optim.Optimizer`` over the model's parameters, not stepped yet.
        max_grad_norm: if given, clip the fp32 master gradients to this total norm after the
            unscale and before the inner step (``last_grad_norm`` holds the norm). This is the way
            to clip fp16 parameters with ``torch.amp.GradScaler``, whose ``unscale_`` refuses fp16
            gradients (``mixprec.scaling.GradScaler.clip_grad_norm_`` needs no option: it hands
            the clip to ``step`` through ``grad_scale``).
        keep_grad_buffers: keep an fp32 gradient buffer per master between steps (4 more bytes
            per 16-bit parameter, counted as grads by :func:`memory_report`) instead of the
            chunk-sized workspace. Rarely worth it now: on CPUs the chunked default already
            reuses its buffer, and GPU caching allocators make fresh buffers free.

    Raises:
        TypeError: ``optimizer`` is not a torch optimizer, is already wrapped, or has parameters
            that are not fp16/bf16/fp32/complex; ``keep_grad_buffers`` is not a bool.
        ValueError: a param group mixes devices, or ``max_grad_norm`` is not positive.
        RuntimeError: the optimizer has already stepped (it holds state).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 2, bias=False).to(torch.bfloat16)
        >>> _ = torch.nn.init.ones_(model.weight)
        >>> opt = MasterWeightOptimizer(torch.optim.SGD(model.parameters(), lr=1e-4))
        >>> for _ in range(100):
        ...     model.weight.grad = torch.ones_like(model.weight)  # a step of 1e-4 each time
        ...     opt.step()
        >>> round(opt.master_params()[0][0, 0].item(), 4), model.weight[0, 0].item()
        (0.99, 0.98828125)
    """

    _kind = "master"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_grad_norm: float | None = None,
        keep_grad_buffers: bool = False,
    ) -> None:
        if not isinstance(keep_grad_buffers, bool):
            raise TypeError(
                f"keep_grad_buffers must be True or False, got "
                f"{type(keep_grad_buffers).__name__} {keep_grad_buffers!r}"
            )
        self.keep_grad_buffers = keep_grad_buffers
        self._grad_buffers: dict[torch.Tensor, torch.Tensor] = {}
        super().__init__(optimizer, max_grad_norm=max_grad_norm)

    def _make_shadow(self, param: torch.Tensor) -> torch.Tensor:
        master = param.detach().to(torch.float32, copy=True)
        return nn.Parameter(master, requires_grad=param.requires_grad)

    def master_params(self) -> list[torch.Tensor]:
        """The tensors the inner optimizer steps, in ``param_groups`` order: the fp32 master of
        each 16-bit parameter, the parameter itself where it is fp32 or complex."""
        self._adopt_inner_groups()
        return [self._shadows[p] for p in self._params()]

    def _load_weights(self, params: list[torch.Tensor]) -> None:
        pass  # the masters hold the weights between steps

    def _copy_grads(
        self, params: list[torch.Tensor], inv_scale: torch.Tensor | float | None
    ) -> None:
        copied = [p for p in params if self._shadows[p] is not p]
        own = [p.grad for p in params if self._shadows[p] is p and p.grad is not None]
        masters = [self._shadows[p] for p in copied]
        grads = self._grad_buffers_for(masters)  # local shards of DTensor masters
        if grads:
            torch._foreach_copy_(grads, [local(p.grad) for p in copied if p.grad is not None])
        self._unscale_in_place(grads + own, inv_scale)
        for master, grad in zip(masters, grads, strict=True):
            master.grad = wrap_like(grad, master)

    def _step_fused(
        self, params: list[torch.Tensor], inv_scale: torch.Tensor | float | None
    ) -> list[torch.Tensor]:
        if self.keep_grad_buffers:
            return params
        entries = [(p, self._shadows[p], None, 0) for p in params]
        return step_fused(self.optimizer, entries, inv_scale, "nearest")

    def _after_inner_step(self, stepped: list[torch.Tensor], loaded: list[torch.Tensor]) -> None:
        self._write_trial_point(stepped)  # fp32 -> 16 bits: round to nearest even
        for p in loaded:
            if self._shadows[p] is not p:
                self._shadows[p].grad = None  # the fp32 gradient is only visible inside step()

    def _grad_buffers_for(self, masters: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self.keep_grad_buffers:
            return self._scratch.like("grads", [local(m) for m in masters], self._scratch_limit())
        for master in masters:
            if master not in self._grad_buffers:
                self._grad_buffers[master] = torch.empty_like(local(master))
        return [self._grad_buffers[m] for m in masters]

    def _tensors_by_part(self) -> dict[str, list[torch.Tensor]]:
        parts = super()._tensors_by_part()
        parts["grads"] = parts["grads"] + list(self._grad_buffers.values())
        return parts

    # -- state dict ---------------------------------------------------------------------------

    def _extra_state(self) -> dict[str, Any]:
        return {"masters": [m.detach().clone() if m is not p else None for p, m in self._pairs()]}

    def _pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(p, self._shadows[p]) for p in self._params()]

    def _check_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        owned = [(p, None if m is p else m) for p, m in self._pairs()]
        check_saved_buffers(
            state_dict.get("masters"), owned, "master", lambda _: torch.float32,
            "MasterWeightOptimizer",
        )  # fmt: skip

    def _load_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        with torch.no_grad():
            for saved, (param, master) in zip(state_dict["masters"], self._pairs(), strict=True):
                if saved is not None:
                    master.copy_(saved)
                    param.copy_(master)
