"""The reference training step the benchmarks time: the issue's small transformer.

TinyTransformer with d_model 256, 4 layers, 4 heads, sequence 128, batch 16, vocabulary 96,
AdamW; random tokens (timing only). ``make_step`` returns a function that runs one training step
inside a region (a context-manager factory) and returns its wall time in seconds.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mixprec.tasks.transformer import TinyTransformer

VOCAB = 96
Region = Callable[[], contextlib.AbstractContextManager[object]]


def make_step(
    lr: float = 1e-3, backward_in_region: bool = False
) -> tuple[torch.nn.Module, Callable[[Region], float]]:
    """The model and its timed training step.

    Args:
        lr: AdamW's learning rate.
        backward_in_region: run the backward pass inside the region too (a tracer must see it;
            autocast regions end before backward, as in torch's AMP recipe).
    """
    torch.manual_seed(0)
    model = TinyTransformer(VOCAB, d_model=256, n_layers=4, n_heads=4, seq_len=128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    tokens = torch.randint(0, VOCAB, (16, 128))
    targets = torch.randint(0, VOCAB, (16, 128))

    def step(region: Region) -> float:
        start = time.perf_counter()
        with region():
            logits = model(tokens)
            loss = F.cross_entropy(logits.reshape(-1, VOCAB).float(), targets.reshape(-1))
            if backward_in_region:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
        if not backward_in_region:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return model, step
