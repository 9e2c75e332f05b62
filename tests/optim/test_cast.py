"""cast_module: per-module formats from a policy, buffers, tied weights, reversal of dtypes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mixprec import Policy
from mixprec.optim import cast_module, restore_dtypes


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.body = nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 10)


def test_cast_follows_rules_and_keeps_parameter_identity():
    net = _Net()
    weight = net.body.weight
    weight.grad = torch.ones_like(weight)
    original = net.body.weight.detach().clone()
    changed = cast_module(net, Policy.parse("bf16-pure; class:*Norm* -> fp32; head -> fp16"))
    assert net.body.weight is weight and weight.grad is None
    assert net.body.weight.dtype == net.embed.weight.dtype == torch.bfloat16
    assert net.head.weight.dtype == torch.float16
    assert net.norm.weight.dtype == net.norm.running_mean.dtype == torch.float32
    assert net.norm.num_batches_tracked.dtype == torch.int64
    assert torch.equal(net.body.weight, original.to(torch.bfloat16))  # round to nearest
    assert changed == {
        "embed.weight": torch.float32,
        "body.weight": torch.float32,
        "body.bias": torch.float32,
        "head.weight": torch.float32,
        "head.bias": torch.float32,
    }


def test_restore_dtypes_reverses_dtypes_but_not_lost_bits():
    net = _Net()
    original = net.body.weight.detach().clone()
    changed = cast_module(net, "bf16")
    assert net.norm.running_var.dtype == torch.bfloat16
    restore_dtypes(net, changed)
    assert all(t.dtype == torch.float32 for t in net.state_dict().values() if t.is_floating_point())
    assert torch.equal(net.body.weight, original.to(torch.bfloat16).float())
    assert not torch.equal(net.body.weight, original)


def test_tied_weights_must_agree():
    lm = nn.ModuleDict({"embed": nn.Embedding(10, 4), "head": nn.Linear(4, 10, bias=False)})
    lm["head"].weight = lm["embed"].weight
    cast_module(lm, "bf16")
    assert lm["head"].weight.dtype == torch.bfloat16
    lm2 = nn.ModuleDict({"embed": nn.Embedding(10, 4), "head": nn.Linear(4, 10, bias=False)})
    lm2["head"].weight = lm2["embed"].weight
    with pytest.raises(ValueError, match=r"'embed.weight' is shared with 'head.weight'"):
        cast_module(lm2, "bf16; head -> fp32")
    assert lm2["embed"].weight.dtype == torch.float32  # nothing was cast


def test_errors():
    with pytest.raises(TypeError, match=r"expects an nn.Module, got str"):
        cast_module("model", "bf16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"params in 'fp8_e4m3' are not supported"):
        cast_module(nn.Linear(2, 2), "fp8_e4m3")
    with pytest.raises(ValueError, match=r"unknown precision 'bf17'"):
        cast_module(nn.Linear(2, 2), "bf17")
    with pytest.raises(ValueError, match=r"\['nope'\] are not parameters or buffers"):
        restore_dtypes(nn.Linear(2, 2), {"nope": torch.float32})
