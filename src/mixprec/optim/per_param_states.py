"""Optimizer states stored per parameter: each parameter's states in the format its module's rule
gives (a policy's ``state``, per module).

Design note: a wrapper has one state storage (:mod:`mixprec.optim.states`); a policy such as
``"bf16-lean; class:Embedding -> state=fp32"`` needs several, one per format, each for the
parameters its rule covers (bitsandbytes keeps embeddings' states in 32 bits for the same reason:
rare tokens' rows get few, large updates). :class:`PerParameterStates` is that storage: it holds
one storage per format (:func:`~mixprec.optim.quantized_states.storage_named`) and hands each
its parameters' entries. A parameter missing from the mapping has fp32 states.

Unlike a single storage it also stores the states of parameters that are their own shadow
(:attr:`~mixprec.optim.states.StateStorage.own_shadows`): the states of an fp32 parameter (a
``bf16-mixed``-style policy with ``state=int8``) shrink as well, since the user asked for fewer
bytes, not for fewer bytes only where the weights are 16-bit.

The storages share one stream of stochastic draws (the salts of :data:`ROUNDING_KEY`), so
parameters in different formats never draw the same bits. Loading: the block-quantized storages
narrow loaded codes back at once (:meth:`BlockQuantizedStates.attach`); where both int8 and fp8
are in use, the codes of both are widened alike by torch's load and only the first decode of
each parameter narrows them (exact either way), as the inner optimizer's own states are keyed by
the shadows, not the parameters the mapping names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mixprec.formats import resolve_state_format
from mixprec.optim.quantized_states import BlockQuantizedStates, storage_named
from mixprec.optim.states import Rounder, StateStorage

__all__ = ["PerParameterStates"]

Entries = list[tuple[torch.Tensor, dict[str, Any]]]


class PerParameterStates(StateStorage):
    """Each parameter's optimizer states in its own format.

    Args:
        formats: parameter -> state format name (:data:`~mixprec.formats.STATE_FORMATS`);
            parameters not in it keep fp32 states.
        seed: seed of the stochastic draws of the bf16 and 8-bit storages.

    Raises:
        TypeError: ``formats`` is not a mapping of tensors to names.
        ValueError: an unknown format name.

    Example:
        >>> emb, fc = torch.nn.Embedding(8, 4), torch.nn.Linear(4, 4)
        >>> storage = PerParameterStates({emb.weight: "fp32", fc.weight: "int8"})
        >>> storage.format_of(fc.weight), storage.format_of(fc.bias)
        ('int8', 'fp32')
    """

    own_shadows = True

    def __init__(self, formats: Mapping[torch.Tensor, str], seed: int = 0) -> None:
        if not isinstance(formats, Mapping):
            raise TypeError(
                f"formats must map parameters to state format names, got "
                f"{type(formats).__name__} {formats!r}"
            )
        self.formats: dict[torch.Tensor, str] = {}
        for param, name in formats.items():
            if not isinstance(param, torch.Tensor):
                raise TypeError(
                    f"formats must be keyed by parameters (tensors), got {type(param).__name__}"
                )
            self.formats[param] = resolve_state_format(name)
        self.storages: dict[str, StateStorage] = {}
        draws = None
        for name in ("fp32", *sorted(set(self.formats.values()) - {"fp32"})):
            storage = storage_named(name)
            if hasattr(storage, "draws"):
                storage.draws = draws = draws or type(storage.draws)(seed)  # type: ignore[attr-defined]
            self.storages[name] = storage
        used = [name for name in self.storages if name != "fp32"]
        self.name = "+".join(used) + " (fp32 elsewhere)" if used else "fp32"
        self.one_pass = all(s.one_pass for s in self.storages.values())

    def format_of(self, param: torch.Tensor) -> str:
        """The state format of ``param`` (fp32 where the mapping does not name it)."""
        return self.formats.get(param, "fp32")

    def storage_of(self, param: torch.Tensor) -> StateStorage:
        """The storage that keeps ``param``'s states."""
        return self.storages[self.format_of(param)]

    def _split(self, entries: Entries) -> dict[str, Entries]:
        groups: dict[str, Entries] = {}
        for param, state in entries:
            groups.setdefault(self.format_of(param), []).append((param, state))
        return groups

    def decode(self, entries: Entries) -> None:
        for name, group in self._split(entries).items():
            self.storages[name].decode(group)

    def encode(self, entries: Entries, rounder: Rounder) -> None:
        for name, group in self._split(entries).items():
            self.storages[name].encode(group, rounder)

    def attach(self, inner: torch.optim.Optimizer) -> None:
        """Let the block-quantized storage narrow loaded codes at once (one 8-bit kind only:
        see the module's note)."""
        block = [s for s in self.storages.values() if isinstance(s, BlockQuantizedStates)]
        if len(block) == 1:
            block[0].attach(inner)

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for name in self.formats.values():
            counts[name] = counts.get(name, 0) + 1
        return f"PerParameterStates({counts})"
