"""Pure 16-bit training without a master copy: stochastic rounding or Kahan summation.

Design note: both wrappers keep only 16-bit weights between steps and do the update in fp32
scratch space. At each step they widen the 16-bit parameters (and gradients, unscaled on the way)
into fp32 tensors that exist only for the duration of ``step``, let the inner optimizer update
those, and then round the result back into 16 bits in one of two ways:

* :class:`StochasticRoundingOptimizer` rounds up or down at random with probabilities that make
  the expected result the exact fp32 update, so updates smaller than half an ulp still move the
  weight on average. The random bits are counter-based (:mod:`mixprec.stochastic`): a hash of
  (seed, stream, step, element), so the same seed gives the same bits on every machine and for
  every chunking, and the state dict only holds the step counter. Since the change from
  ``torch.Generator`` draws, a given seed rounds differently than it did before (same
  distribution, other draws); checkpoints from before cannot continue their stream.
* :class:`KahanOptimizer` rounds to nearest and keeps what rounding lost in a 16-bit compensation
  buffer per parameter, which is added back before the next update (Kahan's compensated
  summation). Deterministic; the weight the optimizer sees is ``param + compensation``.

Cost: stochastic rounding stores nothing extra (12 B/param with fp32 Adam states: 2 params +
2 grads + 8 Adam); Kahan stores 2 B/param of compensation. The fp32 scratch copies of weights and
gradients are only used inside ``step``, like the temporaries of torch's own foreach optimizers.
On CPUs the parameters are stepped in chunks of ``chunk_numel`` elements and the scratch of one
chunk (8 B per element, plus 4 B per two elements of random words) is kept between steps as a
fixed-size workspace: reused, it costs no page faults and stays warm in cache, and it does not
grow with the model (``memory_report`` shows it apart from the per-parameter account; see
:mod:`mixprec.optim.plan`). ``state_dtype=torch.bfloat16`` stores the inner
optimizer's per-element states in 16 bits too (8 B/param with Adam), rounded the same way as the
weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mixprec.formats import resolve_format
from mixprec.optim.quantized_states import StateFormat, attach_storage, make_storage
from mixprec.optim.rules.kahan import Kahan
from mixprec.optim.rules.stochastic import Stochastic, check_seed
from mixprec.optim.wrapper import WrappedOptimizer
from mixprec.quantize import quantize

__all__ = [
    "KahanOptimizer",
    "StochasticRoundingOptimizer",
    "kahan_round",
    "stochastic_round",
]


def stochastic_round(
    x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Round an fp32 tensor to ``dtype`` stochastically (unbiased), returned in ``dtype``.

    Example:
        >>> x = torch.full((10000,), 1.0 + 2.0**-10)  # an eighth of a bf16 ulp above 1
        >>> g = torch.Generator().manual_seed(0)
        >>> round(stochastic_round(x, torch.bfloat16, g).float().mean().item(), 3)
        1.001
    """
    if dtype == torch.float32:
        return x
    return quantize(x, resolve_format(dtype), "stochastic", generator=generator).to(dtype)


def kahan_round(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Split fp32 ``x`` into a ``dtype`` value rounded to nearest and the ``dtype`` remainder.

    ``x - rounded`` is exact in fp32 (the two are within a factor of two of each other), so the
    remainder only loses what its own rounding to ``dtype`` drops.

    Example:
        >>> hi, lo = kahan_round(torch.tensor([1.0 + 2.0**-10]), torch.bfloat16)
        >>> hi.item(), lo.item() == 2.0**-10
        (1.0, True)
    """
    rounded = x.to(dtype)
    return rounded, (x - rounded.float()).to(dtype)


class StochasticRoundingOptimizer(WrappedOptimizer):
    """Pure 16-bit training: any torch optimizer, updated weights rounded stochastically.

    The inner optimizer updates fp32 copies of the 16-bit weights made inside ``step``; the result
    is rounded to the parameter's dtype up or down at random, with the probability of rounding up
    equal to the distance from the lower neighbour in ulps. The expected weight is the fp32 update,
    so updates far below half an ulp still add up, without storing a master copy. fp32 and
    complex parameters pass through unrounded. With ``step(closure)`` (LBFGS) every evaluation
    sees the weights being tried rounded to nearest; only the step's result is rounded
    stochastically.

    Args:
        optimizer: a ``torch.optim.Optimizer`` over the model's parameters, not stepped yet.
        seed: seed of the counter-based rounding draws, ``0 <= seed < 2**64``. Use the same
            seed on every data-parallel rank so replicas round identically.
        max_grad_norm: clip the fp32 gradients to this total norm inside ``step`` (None: no
            clipping).
        state_dtype: store the inner optimizer's per-element states (Adam's moments) in this dtype
            between steps, rounded stochastically too; None keeps what the optimizer makes (fp32).
        state: the format of the per-element states between steps, by name (instead of
            ``state_dtype``): ``"fp32"``, ``"bf16"`` (rounded stochastically), ``"fp16"``,
            ``"fp8"`` (e4m3, block scales) or ``"int8"`` (block-wise dynamic); see
            :mod:`mixprec.optim.quantized_states`. A mapping of parameter -> format gives each
            parameter its own (:class:`~mixprec.optim.per_param_states.PerParameterStates`).

    Raises:
        TypeError: bad optimizer, seed or dtype types.
        ValueError: a group mixes devices; a seed outside [0, 2**64).
        RuntimeError: the optimizer has already stepped.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(10000, dtype=torch.bfloat16))
        >>> opt = StochasticRoundingOptimizer(torch.optim.SGD([w], lr=1e-4), seed=0)
        >>> for _ in range(100):
        ...     w.grad = torch.ones_like(w)
        ...     opt.step()
        >>> round(w.float().mean().item(), 3)  # fp32 would give 0.99; nearest rounding 1.0
        0.99
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        seed: int = 0,
        max_grad_norm: float | None = None,
        state_dtype: torch.dtype | None = None,
        state: StateFormat | Mapping[torch.Tensor, StateFormat] | None = None,
    ) -> None:
        rule = Stochastic(check_seed(seed))
        storage = make_storage(optimizer, state, state_dtype)
        super().__init__(optimizer, rule, max_grad_norm=max_grad_norm, storage=storage)
        attach_storage(self.storage, self.optimizer)
        self.state_dtype = state_dtype if state_dtype != torch.float32 else None

    @property
    def seed(self) -> int:
        """The seed of the counter-based rounding draws."""
        return self.rule.seed  # type: ignore[attr-defined,no-any-return]

    @seed.setter
    def seed(self, value: int) -> None:
        self.rule.seed = check_seed(value)  # type: ignore[attr-defined]

    @property
    def rounding_step(self) -> int:
        """How many steps have rounded: the counter of the draws."""
        return self.rule.rounding_step  # type: ignore[attr-defined,no-any-return]

    @rounding_step.setter
    def rounding_step(self, value: int) -> None:
        self.rule.rounding_step = value  # type: ignore[attr-defined]


class KahanOptimizer(WrappedOptimizer):
    """Pure 16-bit training: any torch optimizer, with Kahan-compensated weight updates.

    Each 16-bit parameter gets a 16-bit compensation buffer holding the part of the weight that
    rounding to 16 bits lost. The inner optimizer updates ``param + compensation`` in fp32; the
    result is rounded to nearest into the parameter, and the remainder into the buffer. Small
    updates accumulate in the buffer until they move the weight: the sum is carried to about 16
    significant bits instead of 8 (bf16). Deterministic. fp32 and complex parameters pass
    through. With ``step(closure)`` (LBFGS) every evaluation sees the weights being tried
    rounded to nearest.

    Args:
        optimizer: a ``torch.optim.Optimizer`` over the model's parameters, not stepped yet.
        max_grad_norm: clip the fp32 gradients to this total norm inside ``step`` (None: no
            clipping).
        state_dtype: store the inner optimizer's per-element states in this dtype between steps
            (rounded to nearest); None keeps what the optimizer makes (fp32).
        state: the format of the per-element states between steps, by name (instead of
            ``state_dtype``): ``"fp32"``, ``"bf16"``, ``"fp16"``, ``"fp8"`` or ``"int8"``, or a
            mapping of parameter -> format.

    Raises:
        TypeError: bad optimizer or dtype types.
        ValueError: a group mixes devices.
        RuntimeError: the optimizer has already stepped.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
        >>> opt = KahanOptimizer(torch.optim.SGD([w], lr=1e-4))
        >>> for _ in range(100):
        ...     w.grad = torch.ones_like(w)
        ...     opt.step()
        >>> w[0].item(), round(w[0].item() + opt.compensation(w)[0].item(), 3)
        (0.98828125, 0.99)
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_grad_norm: float | None = None,
        state_dtype: torch.dtype | None = None,
        state: StateFormat | Mapping[torch.Tensor, StateFormat] | None = None,
    ) -> None:
        storage = make_storage(optimizer, state, state_dtype)
        super().__init__(optimizer, Kahan(), max_grad_norm=max_grad_norm, storage=storage)
        attach_storage(self.storage, self.optimizer)
        self.state_dtype = state_dtype if state_dtype != torch.float32 else None

    def compensation(self, param: torch.Tensor) -> torch.Tensor:
        """The compensation buffer of a 16-bit parameter (``param + buffer`` is the weight).

        Raises:
            KeyError: ``param`` is not a 16-bit parameter of this optimizer.
        """
        self._take_inner_groups()
        buffers = self.rule.compensation  # type: ignore[attr-defined]
        if param not in buffers:
            raise KeyError(
                f"no compensation buffer for a parameter of shape {tuple(param.shape)!r} and "
                f"dtype {param.dtype}; only the 16-bit parameters of this optimizer have one"
            )
        return buffers[param]  # type: ignore[no-any-return]
