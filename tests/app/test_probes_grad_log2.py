"""The gradient-magnitude probe: every magnitude, or a seeded sample of them, one gradient
upcast at a time."""

import torch
from torch import nn

from mixprec.app.probes import grad_log2


def _model_with_grads() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20), nn.Linear(20, 5)).to(torch.bfloat16)
    model(torch.randn(8, 30, dtype=torch.bfloat16)).float().pow(2).sum().backward()
    model[0].weight.grad[0, :4] = 0  # zeros are left out
    model[1].bias.grad[0] = float("inf")  # and so are non-finite values
    return model


def _reference(model: nn.Module, scale: float) -> torch.Tensor:
    flat = torch.cat([p.grad.float().flatten() for p in model.parameters()]).abs() / scale
    return torch.log2(flat[(flat > 0) & torch.isfinite(flat)])


def test_all_magnitudes_when_few():
    model = _model_with_grads()
    assert grad_log2(model, 4.0) == _reference(model, 4.0).tolist()


def test_a_seeded_sample_of_the_magnitudes_when_many():
    model = _model_with_grads()
    reference = set(_reference(model, 1.0).tolist())
    sample = grad_log2(model, 1.0, sample=100)
    assert len(sample) == 100 and set(sample) <= reference
    assert grad_log2(model, 1.0, sample=100) == sample


def test_no_gradients():
    assert grad_log2(nn.Linear(2, 2), 1.0) == []
