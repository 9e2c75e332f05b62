"""The reference training step the benchmarks time: the issue's small transformer.

TinyTransformer with d_model 256, 4 layers, 4 heads, sequence 128, batch 16, vocabulary 96,
AdamW; random tokens (timing only). ``make_step`` returns a function that runs one training step
inside a region (a context-manager factory) and returns its wall time in seconds. Every call with
the same arguments builds the same model, optimizer and batch (seeded), so two calls give twins
that must train alike. The sizes can be shrunk for smoke runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mixprec.app.tasks.transformer import TinyTransformer

VOCAB = 96
Region = Callable[[], contextlib.AbstractContextManager[object]]


def make_step(
    lr: float = 1e-3,
    backward_in_region: bool = False,
    *,
    d_model: int = 256,
    n_layers: int = 4,
    n_heads: int = 4,
    seq_len: int = 128,
    batch: int = 16,
    losses: list[float] | None = None,
) -> tuple[torch.nn.Module, Callable[[Region], float]]:
    """The model and its timed training step.

    Args:
        lr: AdamW's learning rate.
        backward_in_region: run the backward pass inside the region too (a tracer must see it;
            autocast regions end before backward, as in torch's AMP recipe).
        d_model, n_layers, n_heads, seq_len, batch: the model and batch sizes (defaults: the
            reference sizes above).
        losses: if given, each step appends its loss (a float, read after the timing stops).
    """
    torch.manual_seed(0)
    model = TinyTransformer(
        VOCAB, d_model=d_model, n_layers=n_layers, n_heads=n_heads, seq_len=seq_len
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    tokens = torch.randint(0, VOCAB, (batch, seq_len))
    targets = torch.randint(0, VOCAB, (batch, seq_len))

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
        elapsed = time.perf_counter() - start
        if losses is not None:
            losses.append(float(loss.detach()))
        return elapsed

    return model, step
