"""``activation_bytes`` counts what a forward keeps for backward, against torch.autocast."""

from __future__ import annotations

import torch

from mixprec.app.probes import activation_bytes


def test_the_cast_of_an_input_that_is_a_leaf_is_an_activation_not_a_weight_copy():
    """Autocast's 16-bit copy of a leaf input that needs a gradient is kept for the weight's
    gradient: an activation. Only the casts of the model's parameters are weight copies."""
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)  # a leaf, as a model's input can be
    with torch.autocast("cpu", dtype=torch.bfloat16):
        counted = activation_bytes(layer, lambda: layer(x))
    assert counted == x.numel() * 2  # its bf16 copy; the weight's copy is left out
