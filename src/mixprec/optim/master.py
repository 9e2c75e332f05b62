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
:mod:`mixprec.optim.plan`): the fp32 gradients of one chunk live in a buffer that is
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

import torch

from mixprec.optim.quantized_states import StateFormat, attach_storage, make_storage
from mixprec.optim.rules.compressed import CompressedMaster
from mixprec.optim.rules.master import Master
from mixprec.optim.wrapper import WrappedOptimizer

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
        state: the format the inner optimizer's per-element states are stored in between steps:
            ``"fp32"`` (None, the default: as torch makes them), ``"bf16"``/``"fp16"`` (rounded
            to nearest under this rule), ``"fp8"`` (e4m3, block scales) or ``"int8"``
            (block-wise dynamic); see :mod:`mixprec.optim.quantized_states`. A mapping of
            parameter -> format gives each parameter its own (fp32 for those it omits, fp32
            parameters included: :class:`~mixprec.optim.per_param_states.PerParameterStates`).
        remainder_bits: store the masters of bf16 parameters compressed, as the parameter plus
            a remainder (:class:`~mixprec.optim.rules.CompressedMaster`): 16 is exact (2 bytes
            per parameter instead of 4, training bit for bit that of full masters), 8 keeps
            24-bit masters (1 byte, lossy). None (default): full fp32 masters. Not with fp16
            parameters, nor with ``keep_grad_buffers``.

    Raises:
        TypeError: ``optimizer`` is not a torch optimizer, is already wrapped, or has parameters
            that are not fp16/bf16/fp32/complex; ``keep_grad_buffers`` is not a bool; an fp16
            parameter with ``remainder_bits``.
        ValueError: a param group mixes devices, or ``max_grad_norm`` is not positive; an unknown
            ``state`` format, or a compressed one for an optimizer whose states are not
            elementwise (LBFGS); ``remainder_bits`` is not None, 16 or 8, or comes with
            ``keep_grad_buffers``.
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

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_grad_norm: float | None = None,
        keep_grad_buffers: bool = False,
        state: StateFormat | Mapping[torch.Tensor, StateFormat] | None = None,
        remainder_bits: int | None = None,
    ) -> None:
        rule: Master | CompressedMaster
        if remainder_bits is None:
            rule = Master(keep_grad_buffers)
        elif keep_grad_buffers is not False:
            raise ValueError(
                f"keep_grad_buffers={keep_grad_buffers!r} keeps the fp32 gradients of full "
                f"masters; remainder_bits={remainder_bits!r} stores compressed ones, stepped in "
                "chunk scratch. Drop one of them"
            )
        else:
            rule = CompressedMaster(remainder_bits)
        storage = make_storage(optimizer, state) if state is not None else None
        super().__init__(optimizer, rule, max_grad_norm=max_grad_norm, storage=storage)
        attach_storage(self.storage, self.optimizer)

    @property
    def keep_grad_buffers(self) -> bool:
        """Whether whole-model fp32 gradient buffers are kept between steps."""
        return getattr(self.rule, "keep_grad_buffers", False)

    @property
    def remainder_bits(self) -> int | None:
        """16 or 8 where the masters are stored compressed, else None."""
        return getattr(self.rule, "remainder_bits", None)

    def master_params(self) -> list[torch.Tensor]:
        """The tensors the inner optimizer steps, in ``param_groups`` order: the fp32 master of
        each 16-bit parameter, the parameter itself where it is fp32 or complex."""
        self._take_inner_groups()
        if isinstance(self.rule, CompressedMaster):
            return self.rule.masters()  # rebuilt: writing into them changes nothing
        return [self.shadows[p] for p in self.mirror.params()]
