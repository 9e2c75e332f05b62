"""What the framework adapters share: the session they build, the loss check, its figures.

No framework is imported here, so each adapter imports only its own framework.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mixprec.optim import (
    KahanOptimizer,
    MasterWeightOptimizer,
    StochasticRoundingOptimizer,
    WrappedOptimizer,
)
from mixprec.policy import Policy
from mixprec.session import MixedPrecision, UpdateMode

__all__ = ["SessionFigures", "check_loss", "is_wrapped", "managed", "session_of"]


def check_loss(loss: object) -> None:
    """Raise unless ``loss`` is a floating-point scalar tensor, the only thing one can scale.

    Args:
        loss: what the loss computation returned.

    Raises:
        TypeError: not a tensor, or not a floating-point one.
        ValueError: a tensor with more than one element.

    Example:
        >>> check_loss(torch.tensor(1.5))
        >>> check_loss(torch.ones(4))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: the loss must be a scalar tensor, got shape (4,); reduce it first ...
    """
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"the loss must be a scalar tensor, got {type(loss).__name__} {loss!r}; return the "
            "loss tensor (e.g. outputs.loss), not a number or the model's outputs"
        )
    if not loss.is_floating_point():
        raise TypeError(f"the loss must be a floating-point tensor, got dtype {loss.dtype!r}")
    if loss.dim() != 0 and loss.numel() != 1:
        raise ValueError(
            f"the loss must be a scalar tensor, got shape {tuple(loss.shape)!r}; reduce it "
            "first (loss.mean() or loss.sum() / num_items_in_batch) before it is scaled"
        )


def session_of(
    precision: object,
    device: torch.device | None,
    update: UpdateMode,
    backend: str,
    scaler_options: Mapping[str, Any] | None,
) -> MixedPrecision:
    """The adapter's session: ``precision`` itself if it is one, else a new one built from it.

    Raises:
        TypeError: session options together with a ready session, or a ``precision`` of
            another type.
    """
    if isinstance(precision, MixedPrecision):
        if update != "auto" or backend != "auto" or scaler_options is not None:
            raise TypeError(
                "update=, backend= and scaler_options= configure a new session; pass them to "
                "MixedPrecision(...) when you give a ready session as precision="
            )
        return precision
    if not isinstance(precision, (str, Policy)):
        raise TypeError(
            f"precision must be a preset or policy string, a mixprec.Policy or a "
            f"mixprec.MixedPrecision, got {type(precision).__name__} {precision!r}"
        )
    return MixedPrecision(
        precision, device, backend=backend, update=update, scaler_options=scaler_options
    )


def managed(session: MixedPrecision) -> None:
    """Tell ``session`` that a framework adapter drives its loop (scaling and stepping through
    the session's scaler and wrappers), so its prepared model does not warn that it trains
    without the session."""
    session._clock.managed = True


_WRAPPERS = (MasterWeightOptimizer, StochasticRoundingOptimizer, KahanOptimizer, WrappedOptimizer)


def is_wrapped(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is already one of mixprec's 16-bit update wrappers."""
    return isinstance(optimizer, _WRAPPERS)


class SessionFigures:
    """The session's loss-scaling figures, for an adapter holding ``self.mixed_precision``."""

    mixed_precision: MixedPrecision

    @property
    def loss_scale(self) -> float:
        """The session's current loss scale (1.0 for policies without fp16)."""
        return self.mixed_precision.scaler.get_scale()

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for non-finite gradients since training began (resumed too)."""
        return self.mixed_precision.scaler.skipped_steps
