"""Models with faults put in on purpose, for the diagnostics tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixprec.app.tasks.transformer import TinyTransformer

VOCAB, SEQ = 32, 16


class Blowup(nn.Module):
    """Runs ``inner`` and multiplies its output by a factor that overflows fp32 (forward fault)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 1e30 * 1e30


class _BadBackward(torch.autograd.Function):
    """Identity forward; the backward returns ``fill`` everywhere (inf or nan)."""

    @staticmethod
    def forward(ctx, x, fill):
        ctx.fill = fill
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, ctx.fill), None


class BadGradWrapper(nn.Module):
    """Runs ``inner``; the gradient flowing back through this module becomes ``fill``."""

    def __init__(self, inner: nn.Module, fill: float) -> None:
        super().__init__()
        self.inner = inner
        self.fill = fill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _BadBackward.apply(self.inner(x), self.fill)


class BadGradLinear(nn.Linear):
    """A Linear whose gradient w.r.t. its input becomes inf (its parameters' stay finite)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_BadBackward.apply(x, float("inf")), self.weight, self.bias)


def tiny_transformer(n_layers: int = 3, seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer(vocab=VOCAB, d_model=32, n_layers=n_layers, n_heads=4, seq_len=SEQ)


def tokens(batch: int = 4, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, SEQ), generator=generator)


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), target.reshape(-1))


def t5_overflow_model(block: int = 1, reach: float = 2e5) -> TinyTransformer:
    """A transformer whose block ``block`` has MLP activations of ``reach`` (> fp16's 65504).

    As in T5: fc1's weights and bias are scaled up by ``c`` and fc2's weights down by ``c``, so
    the hidden activations are huge while the block's output stays normal. ``c`` is measured in
    fp32, so the activations' abs-max is ``reach`` on :func:`tokens`.
    """
    model = tiny_transformer()
    seen: dict[str, float] = {}
    fc1 = model.blocks[block].fc1
    handle = fc1.register_forward_hook(lambda m, a, out: seen.update(amax=out.abs().max().item()))
    with torch.no_grad():
        model(tokens())
    handle.remove()
    c = reach / seen["amax"]
    with torch.no_grad():
        fc1.weight.mul_(c)
        fc1.bias.mul_(c)
        model.blocks[block].fc2.weight.div_(c)
    return model


def hook_count(model: nn.Module) -> int:
    """Module forward (pre-)hooks and parameter hooks currently registered on ``model``."""
    modules = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )
    params = sum(len(p._backward_hooks or {}) for p in model.parameters())
    return modules + params
