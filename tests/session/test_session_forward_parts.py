"""A part of a prepared model called inside the model's call: its hook finds the region the
model's hook entered and does nothing (the common case, answered from the region's identity);
called where torch's autocast was turned off or another region is innermost, it enters the
session's region again, as a part called on its own does (``session/forward.py``).

References: the same part called on its own (outside any region), and the region's settings
read from torch.
"""

from __future__ import annotations

import torch
from torch import nn

import mixprec
from mixprec import MixedPrecision


class Net(nn.Module):
    """Calls its parts under the model's region, with torch's autocast off, and under
    another mixprec region, and records what each returned."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.seen: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        self.seen["inside"] = h
        self.seen["state"] = torch.tensor(
            [torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu") == torch.bfloat16]
        )
        with torch.autocast("cpu", enabled=False):
            self.seen["torch off"] = self.b(h.float())
            self.seen["off after"] = torch.tensor(torch.is_autocast_enabled("cpu"))
        with mixprec.autocast("cpu", dtype=torch.float16, backend="emulated"):
            self.seen["fp16 region"] = self.b(h.float())
        return self.b(h)


def test_parts_inside_the_call_and_where_the_region_is_not_innermost() -> None:
    mp = MixedPrecision("bf16-mixed", "cpu", backend="emulated")
    model = mp.prepare(Net())
    x = torch.randn(4, 8)
    out = model(x)
    seen = dict(model.seen)
    assert out.dtype == torch.float32  # the model's call: cast to the output format
    # inside the model's call: the part ran in the open region, its output not cast
    assert seen["inside"].dtype == torch.bfloat16
    assert seen["state"].all()
    # where torch's autocast was off, and under another region, the part entered the
    # session's region as on its own: the same bits as the part called outside any region
    alone = model.b(seen["inside"].float())
    assert alone.dtype == torch.float32
    for key in ("torch off", "fp16 region"):
        assert seen[key].dtype == torch.float32, key
        assert torch.equal(seen[key], alone), key
    assert not seen["off after"]  # and left it again: torch's off state was back
    assert not torch.is_autocast_enabled("cpu")
    # the same numbers in a second call (the region object is reused)
    again = model(x)
    assert torch.equal(again, out)
    assert torch.equal(model.seen["torch off"], seen["torch off"])
