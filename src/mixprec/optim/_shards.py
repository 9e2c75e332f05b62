"""Old home of :mod:`mixprec.optim.shards`, kept importable while callers move over."""

from mixprec.optim.shards import (
    empty_of_kind,
    flat_offset,
    is_dtensor,
    local,
    local_numel,
    set_tensor,
    wrap_like,
)

__all__ = [
    "empty_of_kind",
    "flat_offset",
    "is_dtensor",
    "local",
    "local_numel",
    "set_tensor",
    "wrap_like",
]
