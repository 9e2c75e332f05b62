"""A wrapper's state dict in the layout of a plain torch optimizer's, and back.

Design note: frameworks save ``optimizer.state_dict()`` and may resume it into a plain torch
optimizer (a plain ``transformers.Trainer`` resuming a mixprec checkpoint). Exporting the inner
optimizer's ``state`` and ``param_groups`` at the top level lets such a reader load them and ignore
the rest, while the wrapper's own entries ride along under one key, so a wrapper takes the whole
back. The cost is one extra key in the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["EXPORT_KEY", "export_plain", "import_plain"]

EXPORT_KEY = "mixprec_wrapper"
"""Where :func:`export_plain` keeps a wrapper's own state beside the inner optimizer's."""


def export_plain(state: Mapping[str, Any]) -> dict[str, Any]:
    """A wrapper's :meth:`~mixprec.optim.WrappedOptimizer.state_dict` laid out as a plain torch
    optimizer's: the inner optimizer's ``state`` and ``param_groups`` at the top, the wrapper's
    own entries under :data:`EXPORT_KEY`. A state without a wrapper passes unchanged.

    Example:
        >>> export_plain({"wrapper": "W", "shapes": [], "optimizer": {"state": {}, "param_groups": []}})
        {'state': {}, 'param_groups': [], 'mixprec_wrapper': {'wrapper': 'W', 'shapes': []}}
    """  # noqa: E501
    if "optimizer" not in state or "wrapper" not in state:
        return dict(state)
    own = {key: value for key, value in state.items() if key != "optimizer"}
    return {**state["optimizer"], EXPORT_KEY: own}


def import_plain(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """The wrapper state dict :func:`export_plain` was given; other states unchanged.

    Example:
        >>> plain = export_plain({"wrapper": "W", "optimizer": {"state": {}, "param_groups": []}})
        >>> import_plain(plain) == {"wrapper": "W", "optimizer": {"state": {}, "param_groups": []}}
        True
    """
    own = state.get(EXPORT_KEY)
    if not isinstance(own, Mapping) or "optimizer" in state:
        return state
    return {**own, "optimizer": {k: v for k, v in state.items() if k != EXPORT_KEY}}
