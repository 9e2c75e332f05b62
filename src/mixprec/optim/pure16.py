"""Pure 16-bit training without a master copy: stochastic rounding or Kahan summation.

Design note: both wrappers keep only 16-bit weights between steps and do the update in fp32
scratch space. At each step they widen the 16-bit parameters (and gradients, unscaled on the way)
into fp32 tensors that exist only for the duration of ``step``, let the inner optimizer update
those, and then round the result back into 16 bits in one of two ways:

* :class:`StochasticRoundingOptimizer` rounds up or down at random with probabilities that make
  the expected result the exact fp32 update, so updates smaller than half an ulp still move the
  weight on average. The random bits are counter-based (:mod:`mixprec.optim.rounding`): a hash of
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
``WrappedOptimizer._step_in_chunks``). ``state_dtype=torch.bfloat16`` stores the inner
optimizer's per-element states in 16 bits too (8 B/param with Adam), rounded the same way as the
weights.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mixprec.formats import resolve_format
from mixprec.optim._shards import (
    empty_of_kind,
    flat_offset,
    local,
    set_tensor,
    wrap_like,
)
from mixprec.optim._wrapper import (
    SIXTEEN_BIT,
    WrappedOptimizer,
    check_saved_buffers,
)
from mixprec.optim.fused import step_fused
from mixprec.optim.rounding import (
    SEED_LIMIT,
    bf16_words,
    counter_key,
    fast_bf16,
    stochastic_round_bf16_,
    stochastic_round_with_key_,
)
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
        return nn.Parameter(empty_of_kind(param), requires_grad=param.requires_grad)

    def _load_weights(self, params: list[torch.Tensor]) -> None:
        widened = [p for p in params if self._shadows[p] is not p]
        shards = [local(p) for p in widened]
        weights = self._scratch.like("weights", shards, self._scratch_limit())
        if widened:
            torch._foreach_copy_(weights, shards)
            self._add_compensation(widened, weights)
        for p, weight in zip(widened, weights, strict=True):
            set_tensor(self._shadows[p], wrap_like(weight, p))
        if self.state_dtype is not None:
            self._widen_states(widened)

    def _copy_grads(
        self, params: list[torch.Tensor], inv_scale: torch.Tensor | float | None
    ) -> None:
        widened = [p for p in params if self._shadows[p] is not p]
        own = [p.grad for p in params if self._shadows[p] is p and p.grad is not None]
        grads = self._scratch.like("grads", [local(p) for p in widened], self._scratch_limit())
        if widened:
            torch._foreach_copy_(grads, [local(p.grad) for p in widened if p.grad is not None])
        self._unscale_in_place(grads + own, inv_scale)
        for p, grad in zip(widened, grads, strict=True):
            self._shadows[p].grad = wrap_like(grad, p)

    def _after_inner_step(self, stepped: list[torch.Tensor], loaded: list[torch.Tensor]) -> None:
        widened = [p for p in loaded if self._shadows[p] is not p]
        if self.state_dtype is not None:
            self._narrow_states(widened)
        rounded = [p for p in stepped if self._shadows[p] is not p]
        self._round_into(rounded, [local(self._shadows[p]) for p in rounded])
        for p in widened:
            shadow = self._shadows[p]
            shadow.grad = None
            set_tensor(shadow, empty_of_kind(p))

    def _add_compensation(self, params: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
        pass

    def _round_into(self, params: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def _round_state(
        self, x: torch.Tensor, dtype: torch.dtype, param: torch.Tensor, name: str
    ) -> torch.Tensor:
        raise NotImplementedError

    def _state_entries(
        self, params: list[torch.Tensor]
    ) -> list[tuple[torch.Tensor, dict[str, Any], str]]:
        """The per-element state tensors of ``params`` (same shape as the parameter, not a step
        counter), as (parameter, state dict, key) triples."""
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
                    entries.append((p, state, key))
        return entries

    def _widen_states(self, params: list[torch.Tensor]) -> None:
        for _, state, key in self._state_entries(params):
            state[key] = state[key].float()

    def _narrow_states(self, params: list[torch.Tensor]) -> None:
        dtype = self.state_dtype
        if dtype is None:
            return
        for param, state, key in self._state_entries(params):
            state[key] = self._round_state(state[key].float(), dtype, param, key)


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
        seed: seed of the counter-based rounding draws, ``0 <= seed < 2**64``. Use the same
            seed on every data-parallel rank so replicas round identically.
        max_grad_norm: clip the fp32 gradients to this total norm inside ``step`` (None: no
            clipping).
        state_dtype: store the inner optimizer's per-element states (Adam's moments) in this dtype
            between steps, rounded stochastically too; None keeps what the optimizer makes (fp32).

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
        if not 0 <= seed < SEED_LIMIT:
            raise ValueError(
                f"seed must be >= 0 and < 2**64, got {seed!r}; pick a seed in that range "
                "(e.g. seed % 2**64)"
            )
        self.seed = seed
        self.rounding_step = 0  # how many steps have rounded: the counter of the draws
        self._offsets: dict[torch.Tensor, int] = {}
        super().__init__(optimizer, max_grad_norm=max_grad_norm, state_dtype=state_dtype)

    def _offset(self, param: torch.Tensor) -> int:
        """Where this rank's elements of ``param`` start in the stream: the sum of the (global)
        sizes of the parameters before it, plus the global position of the local shard's first
        element for a DTensor, so every element draws the bits it draws in one process.

        Raises:
            NotImplementedError: a DTensor whose local shard is not one run of the global order
                (e.g. ``Shard(1)`` of a matrix).
        """
        if len(self._offsets) != len(self._shadows):  # groups only ever get added
            offset, self._offsets = 0, {}
            for p in self._params():
                start = flat_offset(p)
                self._offsets[p] = -1 if start is None else offset + start
                offset += p.numel()
        found = self._offsets[param]
        if found < 0:
            raise NotImplementedError(
                f"stochastic rounding of a DTensor parameter of shape {tuple(param.shape)!r} "
                f"placed as {getattr(param, 'placements', None)!r}: its local shard is not one "
                "run of the global element order, so it cannot draw the one-process bits. "
                "Shard it on dim 0 (FSDP2's layout), or use update='master' or 'kahan'"
            )
        return found

    def _after_step(self) -> None:
        self.rounding_step += 1

    def _step_fused(
        self, params: list[torch.Tensor], inv_scale: torch.Tensor | float | None
    ) -> list[torch.Tensor]:
        if self.state_dtype is not None:
            return params
        key = counter_key(self.seed, 0, self.rounding_step)
        entries = [(p, self._shadows[p], None, self._offset(p)) for p in params]
        return step_fused(self.optimizer, entries, inv_scale, "stochastic", key)

    def _round_into(self, params: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
        key = counter_key(self.seed, 0, self.rounding_step)
        # bf16 tensors that follow each other: (local shard, fp32 weights, parameter)
        run: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

        def flush() -> None:
            if run:
                offset, device = self._offset(run[0][2]), run[0][0].device
                numel = sum(p.numel() for p, _, _ in run)
                count = bf16_words(offset, numel)
                limit = self._scratch_limit()
                buffers = (
                    self._scratch.take("words", count, torch.int32, device, limit),
                    self._scratch.take("tmp", max(count, numel), torch.int32, device, limit),
                )
                stochastic_round_bf16_(
                    [w for _, w, _ in run], [p for p, _, _ in run], key, offset, buffers
                )
                run.clear()

        for param, w in zip(params, weights, strict=True):
            p = local(param)
            if fast_bf16(w, p):
                last = run[-1] if run else None
                if last is not None and (
                    last[0].device != p.device
                    or self._offset(last[2]) + last[0].numel() != self._offset(param)
                ):
                    flush()
                run.append((p, w, param))
            else:
                flush()
                stochastic_round_with_key_(w, p, key, self._offset(param))
        flush()

    def _round_state(
        self, x: torch.Tensor, dtype: torch.dtype, param: torch.Tensor, name: str
    ) -> torch.Tensor:
        out = torch.empty_like(local(x), dtype=dtype)
        stream = 1 + zlib.crc32(name.encode())  # 0 is the weights'
        stochastic_round_with_key_(
            local(x), out, counter_key(self.seed, stream, self.rounding_step), self._offset(param)
        )
        return wrap_like(out, x)

    def _extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed, "generators": {"counter": self.rounding_step}}

    def _check_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        generators = state_dict.get("generators")
        seed = state_dict.get("seed")
        if not isinstance(generators, Mapping) or not isinstance(seed, int):
            raise ValueError(
                "state dict has no rounding generator state ('seed', 'generators'); save it with "
                "StochasticRoundingOptimizer.state_dict()"
            )
        counter = generators.get("counter")
        if isinstance(counter, bool) or not isinstance(counter, int) or counter < 0:
            raise ValueError(
                f"the rounding generator state {dict(generators)!r} has no step counter "
                "('counter': an int >= 0); it was saved by a version that drew from "
                "torch.Generator states, whose stream cannot be continued: resume from a "
                "checkpoint saved by this version, or start the optimizer afresh"
            )
        if not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"the saved seed must be >= 0 and < 2**64, got {seed!r}")

    def _load_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        self.seed = state_dict["seed"]
        self.rounding_step = state_dict["generators"]["counter"]


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

    def _step_fused(
        self, params: list[torch.Tensor], inv_scale: torch.Tensor | float | None
    ) -> list[torch.Tensor]:
        if self.state_dtype is not None:
            return params
        entries = [(p, self._shadows[p], self._compensation.get(p), 0) for p in params]
        return step_fused(self.optimizer, entries, inv_scale, "kahan")

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
        # Widened into scratch first: ops mixing fp32 and 16-bit operands allocate an fp32 copy
        # of the 16-bit one at every call (the same exact widening, and the same fp32 sums).
        compensation = [local(self._compensation[p]) for p in params]
        widened = self._scratch.like("widened", compensation, self._scratch_limit())
        torch._foreach_copy_(widened, compensation)
        torch._foreach_add_(weights, widened)

    def _round_into(self, params: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
        if not params:
            return
        shards = [local(p) for p in params]
        torch._foreach_copy_(shards, weights)  # round to nearest even
        # weights - params is exact in fp32; then the remainder is rounded into the buffer.
        widened = self._scratch.like("widened", shards, self._scratch_limit())
        torch._foreach_copy_(widened, shards)
        torch._foreach_sub_(weights, widened)
        torch._foreach_copy_([local(self._compensation[p]) for p in params], weights)

    def _round_state(
        self, x: torch.Tensor, dtype: torch.dtype, param: torch.Tensor, name: str
    ) -> torch.Tensor:
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
