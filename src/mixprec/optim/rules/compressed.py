"""The compressed-master rule: fp32 masters kept as the bf16 parameter plus a remainder.

Design note: the fp32 master of a bf16 parameter differs from the parameter only in its low
bits, so it is stored as those bits (:mod:`mixprec.optim.remainder`): a 16-bit remainder is
exact (2 bytes per parameter instead of 4, plus an index for each master that sits exactly on
a rounding tie, about one in ``2**17``), so training is bit for bit that of :class:`Master`; an
8-bit remainder (24-bit masters, 1 byte per parameter) is lossy. For a step the master is
rebuilt into chunk scratch (the rule is a :class:`WidenedRule` like Kahan), the inner optimizer
steps it, the result is rounded to nearest into the parameter and split again.

What it costs: two more memory-bound passes per step (rebuild, split); the one-pass kernel runs
in its master mode on the masters rebuilt into chunk scratch. The state dict holds the compact
form (``remainders`` and ``remainder_ties``), which completes the model's weights: load both
halves of a checkpoint. A state dict of :class:`Master` (full fp32 ``masters``) loads too,
converted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mixprec._dist import is_dtensor
from mixprec.optim.remainder import join_master, split_master
from mixprec.optim.rules.base import check_saved_buffers
from mixprec.optim.rules.widened import WidenedRule
from mixprec.optim.shards import empty_of_kind, local, set_tensor

__all__ = ["REMAINDER_BITS", "CompressedMaster", "saved_ties"]

REMAINDER_BITS = (16, 8)
_NO_TIES = torch.empty(0, dtype=torch.int64)


def saved_ties(state_dict: Mapping[str, Any], count: int) -> list[torch.Tensor | None]:
    """The tie lists of a compressed-master state dict, one per parameter (None: no ties).

    They are saved as ``{parameter index: int64 flat indices}`` for the parameters that have
    ties (not as a list beside the parameters: they are not shaped like them).

    Raises:
        ValueError: not such a dict.
    """
    saved = state_dict.get("remainder_ties")
    if not isinstance(saved, Mapping) or not all(
        isinstance(k, int) and 0 <= k < count and isinstance(v, torch.Tensor)
        and v.dtype == torch.int64 and v.ndim == 1
        for k, v in saved.items()
    ):  # fmt: skip
        raise ValueError(
            "the state dict's 'remainder_ties' is not a dict of parameter index -> 1-D int64 "
            "indices; save it with a wrapper with compressed masters"
        )
    return [saved.get(i) for i in range(count)]


class CompressedMaster(WidenedRule):
    """FP32 masters of bf16 parameters stored as a remainder beside them.

    Args:
        remainder_bits: 16 (default: exact, bit for bit :class:`Master`) or 8 (24-bit masters:
            half the memory again, lossy).

    Raises:
        ValueError: ``remainder_bits`` is not 16 or 8.
        TypeError (when wrapping): an fp16 parameter (fp16 is not the high half of an fp32, so
            its remainder is no bit slice): use :class:`Master` for fp16 models.
    """

    name = "compressed master"
    kind = "master"  # loads Master's state dicts and Master loads these
    one_pass_mode = "nearest"  # on the masters rebuilt into scratch (before_one_pass)

    def __init__(self, remainder_bits: int = 16) -> None:
        if isinstance(remainder_bits, bool) or remainder_bits not in REMAINDER_BITS:
            raise ValueError(
                f"remainder_bits must be 16 (exact masters) or 8 (24-bit masters, lossy), got "
                f"{remainder_bits!r}"
            )
        self.remainder_bits = remainder_bits
        self.dtype = torch.int16 if remainder_bits == 16 else torch.int8
        self.remainders: dict[torch.Tensor, torch.Tensor] = {}
        self.ties: dict[torch.Tensor, torch.Tensor] = {}

    def make_shadow(self, param: torch.Tensor) -> torch.Tensor:
        if param.dtype != torch.bfloat16:
            raise TypeError(
                f"compressed masters need bf16 parameters, got a {param.dtype} parameter of "
                f"shape {tuple(param.shape)!r}: fp16 is not the high half of an fp32, so its "
                "master has no bit-slice remainder. Use full fp32 masters for fp16 models "
                "(update='master' without master_remainder, or MasterWeightOptimizer)"
            )
        if is_dtensor(param):
            placed = getattr(param, "placements", None)
            raise NotImplementedError(
                f"compressed masters of DTensor (FSDP2) parameters are not supported: a "
                f"{tuple(param.shape)!r} parameter placed as {placed!r}; use full fp32 "
                "masters (remainder_bits=None) with fully_shard"
            )
        self.remainders[param] = torch.zeros_like(param, dtype=self.dtype)
        self.ties[param] = _NO_TIES.to(param.device)
        return super().make_shadow(param)

    def before_one_pass(self, params: list[torch.Tensor]) -> None:
        self.widen(params)  # the shadows hold the rebuilt masters: the kernel's fp32 masters

    def after_one_pass(self, done: list[torch.Tensor], offered: list[torch.Tensor]) -> None:
        shadows = self.wrapper.shadows
        for p in self.own(done):  # the kernel wrote the master and its rounding
            self._store(p, local(shadows[p]), local(p))
        for p in self.own(offered):
            set_tensor(shadows[p], empty_of_kind(p))

    def add_compensation(self, params: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
        for p, weight in zip(params, weights, strict=True):
            join_master(local(p), self.remainders[p], self.ties[p], out=weight)

    def round_into(self, params: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
        if not params:
            return
        shards = [local(p) for p in params]
        torch._foreach_copy_(shards, weights)  # round to nearest even, as Master writes
        for p, shard, weight in zip(params, shards, weights, strict=True):
            self._store(p, weight, shard)

    def _store(self, param: torch.Tensor, master: torch.Tensor, shard: torch.Tensor) -> None:
        remainder, ties = split_master(master, shard, self.remainder_bits)
        self.remainders[param].copy_(remainder)
        self.ties[param] = ties

    def masters(self) -> list[torch.Tensor]:
        """The fp32 masters rebuilt (new tensors, local shards), in ``param_groups`` order;
        the parameter itself where it is fp32."""
        return [
            join_master(local(p), self.remainders[p], self.ties[p]) if p in self.remainders else p
            for p in self.wrapper.mirror.params()
        ]

    def refresh(self, params: list[torch.Tensor], trusted: bool) -> None:
        # New weights: the remainders belong to the old ones, so the masters start from the
        # values (what Master does unless the load wrote the very weights it rounds to, which
        # cannot be told apart here). A state-dict load pairs its remainders with the weights.
        if not trusted:
            for p in params:
                self.remainders[p].zero_()
                self.ties[p] = _NO_TIES.to(p.device)

    # -- state dict and memory -------------------------------------------------------------

    def _pairs(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return [(p, self.remainders.get(p)) for p in self.wrapper.mirror.params()]

    def extra_state(self) -> dict[str, Any]:
        pairs = self._pairs()
        return {
            "remainder_bits": self.remainder_bits,
            "remainders": [None if r is None else r.clone() for _, r in pairs],
            "remainder_ties": {
                i: self.ties[p].clone()
                for i, (p, r) in enumerate(pairs)
                if r is not None and self.ties[p].numel()
            },
        }

    def check_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        saver = "a wrapper with masters"
        if "remainders" not in state_dict:  # a full-master state dict: converted on load
            owned = [(p, None if r is None else p) for p, r in self._pairs()]
            check_saved_buffers(
                state_dict.get("masters"), owned, "master", lambda _: torch.float32, saver
            )
            return
        bits = state_dict.get("remainder_bits")
        if bits not in REMAINDER_BITS:
            raise ValueError(f"the state dict's remainder_bits {bits!r} is not 16 or 8")
        dtype = torch.int16 if bits == 16 else torch.int8
        check_saved_buffers(state_dict["remainders"], self._pairs(), "remainder", lambda _: dtype,
                            saver)  # fmt: skip
        saved_ties(state_dict, len(self._pairs()))

    def load_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        pairs = self._pairs()
        with torch.no_grad():
            if state_dict.get("remainder_bits") == self.remainder_bits:
                # Relative to the weights, whichever half of the checkpoint loads first.
                ties = saved_ties(state_dict, len(pairs))
                saved = zip(state_dict["remainders"], ties, strict=True)
                for (param, own), (remainder, tie) in zip(pairs, saved, strict=True):
                    if own is not None:
                        own.copy_(remainder)
                        self.ties[param] = _NO_TIES if tie is None else tie
                        self.ties[param] = self.ties[param].to(own.device)
                return
            if "remainders" in state_dict:  # the other width: through the masters it encodes
                masters = [
                    None if r is None else join_master(local(p), r, t)
                    for (p, _), r, t in zip(
                        pairs,
                        state_dict["remainders"],
                        saved_ties(state_dict, len(pairs)),
                        strict=True,
                    )
                ]
            else:
                masters = state_dict["masters"]
            for master, (param, own) in zip(masters, pairs, strict=True):
                if master is not None and own is not None:
                    shard, value = local(param), local(master).to(torch.float32)
                    shard.copy_(value)  # as Master loads: the parameter is its master rounded
                    self._store(param, value, shard)

    def memory_parts(self) -> dict[str, list[torch.Tensor]]:
        return {"master": list(self.remainders.values()) + list(self.ties.values())}

    def __repr__(self) -> str:
        return f"CompressedMaster(remainder_bits={self.remainder_bits})"
