"""What the wrapper last wrote into each 16-bit parameter, to see writes from outside.

Design note: between steps a user may write the model's weights directly, most often with
``model.load_state_dict(pretrained)`` right after ``prepare``. A rule that keeps something
derived from the weights (an fp32 master, Kahan's compensation) would then step the old weights
and overwrite the loaded ones. Every in-place write to a tensor bumps its version counter
(``tensor._version``, what autograd checks saved tensors with), so noting the counters after the
wrapper's own writes and comparing them before the next step finds such writes for the cost of
reading an integer per parameter; the rule then takes the new values on
(:meth:`~mixprec.optim.rules.base.UpdateRule.refresh`). A write that bypasses the counter
(``param.data.copy_(...)``) is not seen. A state-dict load of the wrapper marks the weights as
they come next as belonging to its buffers (the two halves of one checkpoint, loaded in either
order), for one step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["WriteRecord"]


class WriteRecord:
    """The version counters of parameters as the wrapper left them.

    Attributes:
        trusted: a state dict was loaded since the last step: its buffers belong with the
            weights, whatever was written into them.
    """

    def __init__(self) -> None:
        self._versions: dict[torch.Tensor, int] = {}
        self.trusted = False

    def note(self, params: Iterable[torch.Tensor]) -> None:
        """Note the counters of ``params``, forgetting every other parameter."""
        self._versions = {p: p._version for p in params}

    def note_new(self, params: Iterable[torch.Tensor]) -> None:
        """Note the counters of the ``params`` not noted yet (just adopted)."""
        for p in params:
            if p not in self._versions:
                self._versions[p] = p._version

    def changed(self) -> list[torch.Tensor]:
        """The noted parameters written since they were noted."""
        return [p for p, version in self._versions.items() if p._version != version]
