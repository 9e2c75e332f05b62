"""Old home of the wrapper machinery, kept importable while callers move over.

New code imports :class:`mixprec.optim.WrappedOptimizer` (:mod:`mixprec.optim.wrapper`), the
plan's constants from :mod:`mixprec.optim.plan` and the scratch from :mod:`mixprec.optim.scratch`.
"""

from mixprec.optim.groups import hyperparameters
from mixprec.optim.plan import CPU_CHUNK_NUMEL, SEPARABLE_OPTIMIZERS, SIXTEEN_BIT
from mixprec.optim.rules.base import check_saved_buffers
from mixprec.optim.scratch import Scratch
from mixprec.optim.wrapper import WrappedOptimizer, inverse_scale

__all__ = [
    "CPU_CHUNK_NUMEL",
    "SEPARABLE_OPTIMIZERS",
    "SIXTEEN_BIT",
    "Scratch",
    "WrappedOptimizer",
    "check_saved_buffers",
    "hyperparameters",
    "inverse_scale",
]
