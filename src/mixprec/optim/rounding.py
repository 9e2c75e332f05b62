"""Old home of the counter-based stochastic rounding, now :mod:`mixprec.stochastic`.

Kept importable under the old names while callers move over; new code calls
:func:`mixprec.stochastic.stochastic_round_`.
"""

from mixprec.stochastic import (
    SEED_LIMIT,
    bf16_words,
    counter_key,
    fast_bf16,
    random_bits,
)
from mixprec.stochastic import _round_bf16_ as stochastic_round_bf16_
from mixprec.stochastic import _round_with_key_ as stochastic_round_with_key_

__all__ = [
    "SEED_LIMIT",
    "bf16_words",
    "counter_key",
    "fast_bf16",
    "random_bits",
    "stochastic_round_bf16_",
    "stochastic_round_with_key_",
]
