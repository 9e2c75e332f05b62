"""Measuring what a forward saves for backward frees it afterwards: the probes' saved-tensor
hooks must not keep a forward's activations alive (a saved output that holds itself is a
reference cycle through autograd's C++ graph, which Python's collector cannot see)."""

from __future__ import annotations

import gc
import weakref

import torch
from torch import nn

import mixprec
from mixprec.app.probes import activation_bytes

_outputs: list[weakref.ref[torch.Tensor]] = []


class _SavesItsOutput(nn.Module):
    """sigmoid and exp save their outputs for backward; the module keeps weak references."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.sigmoid(self.lin(x))
        z = torch.exp(y)
        _outputs.extend((weakref.ref(y), weakref.ref(z)))
        return z


def _alive() -> int:
    gc.collect()
    return sum(ref() is not None for ref in _outputs)


def test_activation_bytes_frees_the_forward_it_measured() -> None:
    _outputs.clear()
    model = _SavesItsOutput()
    x = torch.randn(4, 8)
    saved = activation_bytes(model, lambda: model(x))
    assert saved >= 2 * 4 * 8 * 4  # it did see the two saved outputs
    assert _outputs and _alive() == 0


def test_explain_frees_the_forward_it_measured() -> None:
    _outputs.clear()
    model = _SavesItsOutput()
    mixprec.explain(model, "bf16-mixed", torch.randn(4, 8), backend="emulated")
    assert _outputs and _alive() == 0
