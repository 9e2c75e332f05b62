"""Pure 16-bit training without a master copy: stochastic rounding or Kahan summation.

Design note: both wrappers keep only 16-bit weights between steps and do the update in fp32
scratch space. At each step they widen the 16-bit parameters (and gradients, unscaled on the way)
into fp32 tensors that exist only for the duration of ``step``, let the inner optimizer update
those, and then round the result back into 16 bits in one of two ways:

* :class:`StochasticRoundingOptimizer` rounds up or down at random with probabilities that make
  the expected result the exact fp32 update, so updates smaller than half an ulp still move the
  weight on average. Seeded (one generator per device) and saved in the state dict: the same seed
  gives the same bits.
* :class:`KahanOptimizer` rounds to nearest and keeps what rounding lost in a 16-bit compensation
  buffer per parameter, which is added back before the next update (Kahan's compensated
  summation). Deterministic; the weight the optimizer sees is ``param + compensation``.

Cost: stochastic rounding stores nothing extra (12 B/param with fp32 Adam states: 2 params +
2 grads + 8 Adam); Kahan stores 2 B/param of compensation. The fp32 scratch copies of weights and
gradients (8 B per stepped parameter) live only inside ``step``, like the temporaries of torch's
own foreach optimizers. ``state_dtype=torch.bfloat16`` stores the inner optimizer's per-element
states in 16 bits too (8 B/param with Adam), rounded the same way as the weights.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mixprec.formats import resolve_format
from mixprec.optim._wrapper import SIXTEEN_BIT, WrappedOptimizer, check_saved_buffers
from mixprec.quantize import quantize

__all__ = [
    "KahanOptimizer",
    "StochasticRoundingOptimizer",
    "kahan_round",
    "stochastic_round",
    "stochastic_round_bf16_",
]

_EMPTY_SHAPE = (0,)
_LITTLE_ENDIAN = sys.byteorder == "little"  # the bf16 fast path reads the high half of fp32


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


def stochastic_round_bf16_(
    weights: list[torch.Tensor], out: list[torch.Tensor], generator: torch.Generator | None = None
) -> None:
    """Round fp32 ``weights`` stochastically into the bf16 tensors ``out``, all at once.

    bf16 is the top half of fp32, so adding a uniform random integer below 2**16 to each fp32 bit
    pattern and keeping the top 16 bits rounds up with probability equal to the fraction of an
    ulp that was cut off: the same distribution as :func:`stochastic_round`. Done with one random
    draw for all tensors and foreach ops, it costs a handful of kernels however many parameters
    there are. ``weights`` (contiguous fp32 scratch on one device) are overwritten. A NaN whose
    payload sits only in the low 16 bits can come out as inf (arithmetic NaNs keep their quiet
    bit and stay NaN).

    Example:
        >>> w = [torch.full((10000,), 1.0 + 2.0**-10)]  # an eighth of a bf16 ulp above 1
        >>> out = [torch.empty(10000, dtype=torch.bfloat16)]
        >>> stochastic_round_bf16_(w, out, torch.Generator().manual_seed(0))
        >>> round(out[0].float().mean().item(), 3)
        1.001
    """
    if not weights:
        return
    sizes = [w.numel() for w in weights]
    draws = torch.empty(sum(sizes), dtype=torch.int32, device=weights[0].device)
    draws.random_(0, 1 << 16, generator=generator)
    bits = [w.view(torch.int32).view(-1) for w in weights]
    torch._foreach_add_(bits, list(draws.split(sizes)))
    high_halves = [w.view(torch.int16).view(-1, 2)[:, 1] for w in weights]  # little-endian
    torch._foreach_copy_([o.view(torch.int16).view(-1) for o in out], high_halves)


def _contiguous(*tensors: torch.Tensor) -> bool:
    return all(t.is_contiguous() for t in tensors)


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


class _Pure16Optimizer(WrappedOptimizer):
    """Shared step of the two pure 16-bit wrappers: widen, step the inner optimizer, round back."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_grad_norm: float | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        if state_dtype is not None and not isinstance(state_dtype, torch.dtype):
            raise TypeError(
                f"state_dtype must be a torch.dtype or None, got {type(state_dtype).__name__} "
                f"{state_dtype!r}"
            )
        if state_dtype is not None and state_dtype not in (*SIXTEEN_BIT, torch.float32):
            raise ValueError(
                f"state_dtype must be torch.bfloat16, torch.float16, torch.float32 or None, "
                f"got {state_dtype!r}"
            )
        self.state_dtype = None if state_dtype == torch.float32 else state_dtype
        super().__init__(optimizer, max_grad_norm=max_grad_norm)

    def _make_shadow(self, param: torch.Tensor) -> torch.Tensor:
        # An fp32 leaf the inner optimizer keys its state on; its data exists only inside step().
        return nn.Parameter(
            torch.empty(_EMPTY_SHAPE, device=param.device), requires_grad=param.requires_grad
        )

    def _load_weights(self, params: list[torch.Tensor]) -> None:
        widened = [p for p in params if self._shadows[p] is not p]
        weights = [torch.empty_like(p, dtype=torch.float32) for p in widened]
        if widened:
            torch._foreach_copy_(weights, widened)
            self._add_compensation(widened, weights)
        for p, weight in zip(widened, weights, strict=True):
            self._shadows[p].data = weight
        if self.state_dtype is not None:
            self._widen_states(widened)

    def _copy_grads(
        self, params: list[torch.Tensor], inv_scale: torch.Tensor | float | None
    ) -> None:
        widened = [p for p in params if self._shadows[p] is not p]
        own = [p.grad for p in params if self._shadows[p] is p and p.grad is not None]
        grads = [torch.empty_like(self._shadows[p]) for p in widened]
        if widened:
            torch._foreach_copy_(grads, [p.grad for p in widened if p.grad is not None])
        self._unscale_in_place(grads + own, inv_scale)
        for p, grad in zip(widened, grads, strict=True):
            self._shadows[p].grad = grad

    def _after_inner_step(self, stepped: list[torch.Tensor], loaded: list[torch.Tensor]) -> None:
        widened = [p for p in loaded if self._shadows[p] is not p]
        if self.state_dtype is not None:
            self._narrow_states(widened)
        rounded = [p for p in stepped if self._shadows[p] is not p]
        self._round_into(rounded, [self._shadows[p].data for p in rounded])
        for p in widened:
            shadow = self._shadows[p]
            shadow.grad = None
            shadow.data = torch.empty(_EMPTY_SHAPE, device=shadow.device)

    def _add_compensation(self, params: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
        pass

    def _round_into(self, params: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def _round_state(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def _state_entries(self, params: list[torch.Tensor]) -> list[tuple[dict[str, Any], str]]:
        """The per-element state tensors of ``params`` (same shape as the parameter, not a step
        counter), as (state dict, key) pairs."""
        entries = []
        for p in params:
            state = self.optimizer.state.get(self._shadows[p], {})
            for key, value in state.items():
                if (
                    key != "step"
                    and isinstance(value, torch.Tensor)
                    and value.is_floating_point()
                    and value.shape == p.shape
                ):
                    entries.append((state, key))
        return entries

    def _widen_states(self, params: list[torch.Tensor]) -> None:
        for state, key in self._state_entries(params):
            state[key] = state[key].float()

    def _narrow_states(self, params: list[torch.Tensor]) -> None:
        assert self.state_dtype is not None  # only called when set
        for state, key in self._state_entries(params):
            state[key] = self._round_state(state[key].float(), self.state_dtype)


class StochasticRoundingOptimizer(_Pure16Optimizer):
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
        seed: seed of the rounding generators (one per device). Use the same seed on every
            data-parallel rank so replicas round identically.
        max_grad_norm: clip the fp32 gradients to this total norm inside ``step`` (None: no
            clipping).
        state_dtype: store the inner optimizer's per-element states (Adam's moments) in this dtype
            between steps, rounded stochastically too; None keeps what the optimizer makes (fp32).

    Raises:
        TypeError: bad optimizer, seed or dtype types.
        ValueError: a group mixes devices; a negative seed.
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

    _kind = "stochastic_rounding"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        seed: int = 0,
        max_grad_norm: float | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed!r}")
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        super().__init__(optimizer, max_grad_norm=max_grad_norm, state_dtype=state_dtype)

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def _round_into(self, params: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
        fast: dict[torch.device, list[int]] = {}  # bf16 fast path, one batch per device
        rest = []
        for i, (p, w) in enumerate(zip(params, weights, strict=True)):
            if _LITTLE_ENDIAN and p.dtype == torch.bfloat16 and _contiguous(p, w):
                fast.setdefault(p.device, []).append(i)
            else:
                rest.append(i)
        for device, index in fast.items():
            stochastic_round_bf16_(
                [weights[i] for i in index], [params[i] for i in index], self._generator(device)
            )
        rounded = [
            stochastic_round(weights[i], params[i].dtype, self._generator(weights[i].device))
            for i in rest
        ]
        if rounded:
            torch._foreach_copy_([params[i] for i in rest], rounded)

    def _round_state(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return stochastic_round(x, dtype, self._generator(x.device))

    def _extra_state(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "generators": {k: g.get_state() for k, g in self._generators.items()},
        }

    def _check_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        generators = state_dict.get("generators")
        if not isinstance(generators, Mapping) or not isinstance(state_dict.get("seed"), int):
            raise ValueError(
                "state dict has no rounding generator states ('seed', 'generators'); save it with "
                "StochasticRoundingOptimizer.state_dict()"
            )
        for key, value in generators.items():
            if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
                raise ValueError(f"generator state for device {key!r} is not a uint8 tensor")

    def _load_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        self.seed = state_dict["seed"]
        self._generators = {}
        for key, value in state_dict["generators"].items():
            self._generator(torch.device(key)).set_state(value.clone())


class KahanOptimizer(_Pure16Optimizer):
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

    _kind = "kahan"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_grad_norm: float | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        self._compensation: dict[torch.Tensor, torch.Tensor] = {}
        super().__init__(optimizer, max_grad_norm=max_grad_norm, state_dtype=state_dtype)

    def _make_shadow(self, param: torch.Tensor) -> torch.Tensor:
        self._compensation[param] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return super()._make_shadow(param)

    def compensation(self, param: torch.Tensor) -> torch.Tensor:
        """The compensation buffer of a 16-bit parameter (``param + buffer`` is the weight).

        Raises:
            KeyError: ``param`` is not a 16-bit parameter of this optimizer.
        """
        self._adopt_inner_groups()
        if param not in self._compensation:
            raise KeyError(
                f"no compensation buffer for a parameter of shape {tuple(param.shape)!r} and "
                f"dtype {param.dtype}; only the 16-bit parameters of this optimizer have one"
            )
        return self._compensation[param]

    def _add_compensation(self, params: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
        torch._foreach_add_(weights, [self._compensation[p] for p in params])

    def _round_into(self, params: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
        if not params:
            return
        torch._foreach_copy_(params, weights)  # round to nearest even
        # weights - params is exact in fp32; then the remainder is rounded into the buffer.
        torch._foreach_sub_(weights, [p.float() for p in params])
        torch._foreach_copy_([self._compensation[p] for p in params], weights)

    def _round_state(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.to(dtype)

    def _pairs(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return [(p, self._compensation.get(p)) for p in self._params()]

    def _extra_state(self) -> dict[str, Any]:
        return {"compensation": [None if c is None else c.clone() for _, c in self._pairs()]}

    def _check_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        check_saved_buffers(
            state_dict.get("compensation"), self._pairs(), "compensation buffer",
            lambda param: param.dtype, "KahanOptimizer",
        )  # fmt: skip

    def _load_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        with torch.no_grad():
            for buffer, (_, own) in zip(state_dict["compensation"], self._pairs(), strict=True):
                if buffer is not None and own is not None:
                    own.copy_(buffer)

    def _tensors_by_part(self) -> dict[str, list[torch.Tensor]]:
        parts = super()._tensors_by_part()
        parts["compensation"] = list(self._compensation.values())
        return parts
