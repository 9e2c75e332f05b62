"""Old home of the counter-based stochastic rounding, now :mod:`mixprec.stochastic`.

Kept importable under the old names while callers move over; new code calls
:func:`mixprec.stochastic.stochastic_round_`. The two old kernels warn (DeprecationWarning) when
they are looked up here.
"""

import warnings
from typing import Any

from mixprec import stochastic
from mixprec.stochastic import (
    SEED_LIMIT,
    bf16_words,
    counter_key,
    fast_bf16,
    random_bits,
)

__all__ = ["SEED_LIMIT", "bf16_words", "counter_key", "fast_bf16", "random_bits"]

_MOVED = {
    "stochastic_round_bf16_": "_round_bf16_",
    "stochastic_round_with_key_": "_round_with_key_",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"mixprec.optim.rounding.{name} is deprecated; call "
            "mixprec.stochastic.stochastic_round_ instead",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(stochastic, _MOVED[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
