"""Helpers for the optimizer-wrapper tests: small parameters, fixed gradients, checkpoints."""

from __future__ import annotations

import io

import torch
from torch import nn

SIXTEEN_BIT = [torch.bfloat16, torch.float16]


def make_params(dtype: torch.dtype, seed: int = 0) -> list[nn.Parameter]:
    """A few parameters of different shapes, values near 1 (where 16-bit ulps are coarse)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 5), (8,), (3, 8), (3,)]
    return [nn.Parameter((1.0 + 0.1 * torch.randn(s, generator=g)).to(dtype)) for s in shapes]


def grads_for(params: list[torch.Tensor], step: int, scale: float = 1e-2) -> list[torch.Tensor]:
    """Deterministic pseudo-random gradients for step ``step``, in fp32."""
    g = torch.Generator().manual_seed(1000 + step)
    return [scale * torch.randn(p.shape, generator=g) for p in params]


def set_grads(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, grad in zip(params, grads, strict=True):
        p.grad = grad.to(p.dtype)


def roundtrip(state_dict: dict) -> dict:
    """Save and load a state dict the way a checkpoint does, with weights_only=True."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)
