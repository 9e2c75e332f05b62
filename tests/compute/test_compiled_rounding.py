"""Under torch.compile, an emulated fp16 region rounds where eager rounds: overflows are caught."""

from __future__ import annotations

import torch
from torch import nn

from mixprec.compute import autocast


class _TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = h + self.conv2(self.bn(h))  # a residual block
        return self.fc(h.mean((2, 3)))


def _grads(compiled: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = _TinyResNet()
    x, y = torch.randn(8, 3, 8, 8) * 64, torch.arange(8) % 10
    run = torch.compile(model) if compiled else model
    with autocast("cpu", dtype=torch.float16, backend="emulated"):
        loss = nn.functional.cross_entropy(run(x), y)
    (loss * 65536.0).backward()  # torch's GradScaler's initial scale
    return {name: p.grad for name, p in model.named_parameters()}


def test_a_compiled_fp16_overflow_is_caught_as_in_eager():
    # Inductor used to keep fused intermediates in fp32: conv1.weight.grad was a finite 161361
    # compiled (above fp16's 65504) where eager had inf, so the step was not skipped.
    eager = _grads(compiled=False)
    torch._dynamo.reset()
    compiled = _grads(compiled=True)
    torch._dynamo.reset()
    assert not torch.isfinite(eager["conv1.weight"]).all()  # the case: an fp16 overflow
    for name, grad in eager.items():
        assert torch.isfinite(compiled[name]).all() == torch.isfinite(grad).all(), name
    for name in ("conv2.weight", "conv2.bias", "fc.bias"):  # GEMM gradients: rounded to fp16
        grad = compiled[name]
        assert torch.equal(grad, grad.half().float()), f"{name} was not rounded to fp16"
