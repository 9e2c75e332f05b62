"""Where the update happens: fp32 master weights, pure 16-bit updates, and a memory account.

The parts, one concept per module: :class:`WrappedOptimizer` (:mod:`~mixprec.optim.wrapper`, the
step skeleton) composed of an update rule (:mod:`~mixprec.optim.rules`: ``Master``,
``Stochastic``, ``Kahan``, ``Nearest``), a state storage (:mod:`~mixprec.optim.states`), the group
mirror (:mod:`~mixprec.optim.groups`) and the stepping plan (:mod:`~mixprec.optim.plan`: chunks,
and when the one-pass kernel of :mod:`~mixprec.optim.fused` declines). The public classes:

* :class:`MasterWeightOptimizer` keeps fp32 masters for the 16-bit parameters of any
  ``torch.optim`` optimizer.
* :class:`StochasticRoundingOptimizer` and :class:`KahanOptimizer` train 16-bit parameters without a
  master copy, rounding updates stochastically or carrying the rounding error in a 16-bit buffer.
* :func:`memory_report` counts the bytes per parameter of params, grads, masters, optimizer state
  and compensation (and, apart, the fixed workspace the wrappers keep between steps on CPUs).
* :mod:`mixprec.stochastic` holds the counter-based random bits of stochastic rounding.
* :mod:`mixprec.optim.shards` is the wrappers' view of DTensor parameters (local shards).
* :mod:`mixprec.optim.fused` updates SGD, Adam and AdamW parameters in one pass under all three
  wrappers (a C++ kernel built on first use; the wrappers' ``fused="off"`` opts out).
* :func:`cast_module` casts a model's parameters and buffers by a :class:`~mixprec.Policy`.

Example:
    >>> import torch
    >>> from mixprec.optim import MasterWeightOptimizer, cast_module, memory_report
    >>> model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.LayerNorm(256))
    >>> _ = cast_module(model, "bf16-pure; class:*Norm* -> fp32")
    >>> opt = MasterWeightOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    >>> model(torch.randn(8, 256, dtype=torch.bfloat16)).float().sum().backward()
    >>> opt.step()
    >>> round(memory_report(model, opt).per_param["total"])
    16
"""

from mixprec.optim.cast import cast_module, restore_dtypes
from mixprec.optim.master import MasterWeightOptimizer
from mixprec.optim.memory import MemoryReport, memory_report
from mixprec.optim.pure16 import (
    KahanOptimizer,
    StochasticRoundingOptimizer,
    kahan_round,
    stochastic_round,
)
from mixprec.optim.rules import CompressedMaster, Kahan, Master, Nearest, Stochastic, UpdateRule
from mixprec.optim.states import Float16States, Fp32States, StateStorage
from mixprec.optim.wrapper import WrappedOptimizer

__all__ = [
    "CompressedMaster",
    "Float16States",
    "Fp32States",
    "Kahan",
    "KahanOptimizer",
    "Master",
    "MasterWeightOptimizer",
    "MemoryReport",
    "Nearest",
    "StateStorage",
    "Stochastic",
    "StochasticRoundingOptimizer",
    "UpdateRule",
    "WrappedOptimizer",
    "cast_module",
    "kahan_round",
    "memory_report",
    "restore_dtypes",
    "stochastic_round",
]
