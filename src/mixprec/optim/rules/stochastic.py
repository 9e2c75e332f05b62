"""The stochastic-rounding rule: round the stepped fp32 weights up or down at random.

The probability of rounding up is the distance from the lower neighbour in ulps, so the expected
weight is the fp32 update. The bits are counter-based (:mod:`mixprec.stochastic`): a hash of
(seed, stream, step, element), so the state is the step counter alone, and every element draws
by its global position (a DTensor shard by its place in the whole tensor), so any chunking and
any sharding round as one process does. One-pass kernel mode ``"stochastic"``.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import torch

from mixprec.optim.rules.base import Entry
from mixprec.optim.rules.widened import WidenedRule
from mixprec.optim.shards import flat_offset, local, wrap_like
from mixprec.stochastic import SEED_LIMIT, bf16_words, counter_key, fast_bf16, stochastic_round_

__all__ = ["Stochastic"]


def check_seed(seed: object) -> int:
    """``seed`` if it is an int in [0, 2**64).

    Raises:
        TypeError: not an int.
        ValueError: out of range.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(
            f"seed must be >= 0 and < 2**64, got {seed!r}; pick a seed in that range "
            "(e.g. seed % 2**64)"
        )
    return seed


class Stochastic(WidenedRule):
    """Stochastic rounding with counter-based bits.

    Args:
        seed: seed of the draws, ``0 <= seed < 2**64``.

    Attributes:
        rounding_step: how many steps have rounded: the counter of the draws.
    """

    name = "stochastic"
    kind = "stochastic_rounding"
    one_pass_mode = "stochastic"

    def __init__(self, seed: int = 0) -> None:
        self.seed = check_seed(seed)
        self.rounding_step = 0
        self._offsets: dict[torch.Tensor, int] = {}

    def offset(self, param: torch.Tensor) -> int:
        """Where this rank's elements of ``param`` start in the stream: the sum of the (global)
        sizes of the parameters before it, plus the global position of the local shard's first
        element for a DTensor, so every element draws the bits it draws in one process.

        Raises:
            NotImplementedError: a DTensor whose local shard is not one run of the global order
                (e.g. ``Shard(1)`` of a matrix).
        """
        shadows = self.wrapper.shadows
        if len(self._offsets) != len(shadows):  # groups only ever get added
            offset, self._offsets = 0, {}
            for p in self.wrapper.mirror.unique_params():
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

    def one_pass_entry(self, param: torch.Tensor) -> Entry:
        return (param, self.wrapper.shadows[param], None, self.offset(param))

    def one_pass_key(self) -> tuple[int, int]:
        return counter_key(self.seed, 0, self.rounding_step)

    def after_step(self) -> None:
        self.rounding_step += 1

    def round_into(self, params: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
        key = counter_key(self.seed, 0, self.rounding_step)
        wrapper = self.wrapper
        # bf16 tensors that follow each other in the stream: (local shard, fp32 weights, parameter)
        run: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

        def flush() -> None:
            if run:
                offset, device = self.offset(run[0][2]), run[0][0].device
                numel = sum(p.numel() for p, _, _ in run)
                count = bf16_words(offset, numel)
                limit = wrapper.scratch_limit()
                buffers = (
                    wrapper.scratch.take("words", count, torch.int32, device, limit),
                    wrapper.scratch.take("tmp", max(count, numel), torch.int32, device, limit),
                )
                stochastic_round_(
                    [w for _, w, _ in run], [p for p, _, _ in run], key, offset, buffers
                )
                run.clear()

        for param, w in zip(params, weights, strict=True):
            p = local(param)
            if fast_bf16(w, p):
                last = run[-1] if run else None
                if last is not None and (
                    last[0].device != p.device
                    or self.offset(last[2]) + last[0].numel() != self.offset(param)
                ):
                    flush()
                run.append((p, w, param))
            else:
                flush()
                stochastic_round_(w, p, key, self.offset(param))
        flush()

    def round_state(
        self, x: torch.Tensor, dtype: torch.dtype, param: torch.Tensor, name: str
    ) -> torch.Tensor:
        out = torch.empty_like(local(x), dtype=dtype)
        stream = 1 + zlib.crc32(name.encode())  # 0 is the weights'
        key = counter_key(self.seed, stream, self.rounding_step)
        stochastic_round_(local(x), out, key, self.offset(param))
        return wrap_like(out, x)

    # -- state dict ------------------------------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed, "generators": {"counter": self.rounding_step}}

    def check_extra_state(self, state_dict: Mapping[str, Any]) -> None:
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

    def load_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        self.seed = state_dict["seed"]
        self.rounding_step = state_dict["generators"]["counter"]

    def __repr__(self) -> str:
        return f"Stochastic(seed={self.seed})"
