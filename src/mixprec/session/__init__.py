"""The session: :class:`MixedPrecision`, the one object a training loop holds.

``mixed_precision`` holds the class; ``setup`` its checks of device, policy and scaler;
``state`` its checkpoint state (``state_dict``/``save``/``load``); ``state_checks`` the checks a
loaded state passes before anything changes; ``step_report`` what one ``step`` reports.
"""

from mixprec.session.mixed_precision import UPDATE_MODES, MixedPrecision, UpdateMode
from mixprec.session.setup import fp32_attribute_rules, needs_loss_scaling
from mixprec.session.step_report import StepReport

__all__ = [
    "UPDATE_MODES",
    "MixedPrecision",
    "StepReport",
    "UpdateMode",
    "fp32_attribute_rules",
    "needs_loss_scaling",
]
