"""The default dynamic rule's update as one ``torch._amp_update_scale_`` kernel (a per-step
shortcut in ``ScalerState.apply_rule``) must move the state exactly as the rule's own ops do,
also from a tracker past the growth interval (a loaded or assigned state)."""

import random
import warnings

import pytest
import torch

from mixprec.scaling._state import ScalerState
from mixprec.scaling.rules import DynamicScaling


@pytest.mark.parametrize("seed", range(6))
def test_kernel_update_equals_the_rule(seed):
    rng = random.Random(seed)
    interval = rng.choice([1, 2, 3, 2000])
    rule = DynamicScaling(rng.choice([2.0, 1.5]), rng.choice([0.5, 0.3]), interval)
    init = rng.choice([65536.0, 2.0**-100, 3e38])
    fast = ScalerState(init, rule, "dynamic", "continue")
    slow = ScalerState(init, rule, "dynamic", "continue")
    slow._torch_rule_applies = lambda found_inf: False  # the rule's own tensor ops
    used = []
    applies = fast._torch_rule_applies
    fast._torch_rule_applies = lambda found_inf: used.append(applies(found_inf)) or used[-1]
    tracker = rng.choice([0, interval - 1, interval, interval + 5])
    for state in (fast, slow):
        state.set_init("growth_tracker", tracker)
        state.materialize(torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an overflow at the floor warns, on both sides alike
        for _ in range(40):
            found_inf = torch.tensor(float(rng.random() < 0.3))
            fast.apply_rule(found_inf.clone())
            slow.apply_rule(found_inf.clone())
            for name, tensor in slow._tensors.items():
                assert torch.equal(fast._tensors[name], tensor), name
            assert fast._low == slow._low
    assert any(used)  # the kernel ran
