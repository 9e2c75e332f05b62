"""The update rules: how a wrapped step keeps, widens and writes back the 16-bit weights.

* :class:`Master`: fp32 masters, rounded to nearest into the parameters.
* :class:`CompressedMaster`: the same masters stored as the bf16 parameter plus a remainder.
* :class:`Stochastic`: fp32 scratch, rounded stochastically (counter-based bits).
* :class:`Kahan`: fp32 scratch, rounded to nearest with a 16-bit compensation buffer.
* :class:`Nearest`: fp32 scratch, rounded to nearest (the plain 16-bit update).

:class:`UpdateRule` (in :mod:`~mixprec.optim.rules.base`) says what a rule provides; a new mode
is a new small subclass, handed to :class:`~mixprec.optim.wrapper.WrappedOptimizer`.
"""

from mixprec.optim.rules.base import UpdateRule
from mixprec.optim.rules.compressed import CompressedMaster
from mixprec.optim.rules.kahan import Kahan
from mixprec.optim.rules.master import Master
from mixprec.optim.rules.nearest import Nearest
from mixprec.optim.rules.stochastic import Stochastic

__all__ = ["CompressedMaster", "Kahan", "Master", "Nearest", "Stochastic", "UpdateRule"]
