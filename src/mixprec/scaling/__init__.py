"""Loss scaling: pure update rules and a GradScaler that is a drop-in for torch.amp's."""

from mixprec.scaling._checks import parse_state_dict
from mixprec.scaling.clip import clip_coefficient, global_norm, unscale_and_clip_
from mixprec.scaling.errors import (
    LossScaleAtMinimumError,
    ScalerCallOrderError,
    ScalerInputError,
    ScalerStateError,
    ScalerValueError,
)
from mixprec.scaling.grad_scaler import GradScaler
from mixprec.scaling.rules import (
    SCALE_FLOOR,
    DynamicScaling,
    ScaleState,
    Strategy,
    dynamic_update,
    initial_state,
    no_scaling_update,
    overflow_at_minimum,
    static_update,
    update_scale,
)

__all__ = [
    "SCALE_FLOOR",
    "DynamicScaling",
    "GradScaler",
    "LossScaleAtMinimumError",
    "ScaleState",
    "ScalerCallOrderError",
    "ScalerInputError",
    "ScalerStateError",
    "ScalerValueError",
    "Strategy",
    "clip_coefficient",
    "dynamic_update",
    "global_norm",
    "initial_state",
    "no_scaling_update",
    "overflow_at_minimum",
    "parse_state_dict",
    "static_update",
    "unscale_and_clip_",
    "update_scale",
]
