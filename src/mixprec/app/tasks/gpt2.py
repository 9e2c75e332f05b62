"""``gpt2``: the Hugging Face GPT-2 architecture, from a small config, on the ``charlm`` text.

Design note: the model is ``transformers.GPT2LMHeadModel`` built from a config (random init,
nothing is downloaded) with a byte vocabulary, trained on exactly the windows
:class:`~mixprec.app.tasks.charlm.CharLMTask` draws, so its losses compare with ``charlm``'s.
It is a real model family with what the tiny transformer lacks: tied input/output embeddings, HF's
``Conv1D`` projections, learned positions and a ``ModelOutput`` return value. A thin wrapper
returns the logits, so the task's loop is the same as every other task's. ``transformers`` is an
optional dependency (``pip install 'mixprec[transformers]'``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mixprec.app.tasks.base import TaskConfig
from mixprec.app.tasks.charlm import VOCAB, CharLMTask

__all__ = ["GPT2Task", "LogitsOf"]


class LogitsOf(nn.Module):
    """Call a Hugging Face causal LM on token ids and return its logits tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens).logits


def _gpt2() -> tuple[type, type]:
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as err:
        raise ImportError(
            "the gpt2 task needs the transformers package; install it with "
            "`pip install 'mixprec[transformers]'`, or use --task charlm (the same text on "
            "mixprec's own tiny transformer)"
        ) from err
    return GPT2Config, GPT2LMHeadModel


class GPT2Task(CharLMTask):
    """Next-byte prediction with HF GPT-2 (``n_embd=d_model``, ``n_layer``, ``n_head``).

    Args:
        config: steps, batch size, learning rate, seed (defaults: 150 steps, batch 32, AdamW at
            1e-3).
        data: a text file to train on instead of the standard library corpus.
        d_model, n_layers, n_heads, seq_len: model size (``seq_len`` is also ``n_positions``).

    Raises:
        ImportError: ``transformers`` is not installed (the message says how to install it).

    Example:
        >>> task = GPT2Task(TaskConfig(steps=1, batch_size=2, lr=1e-3), d_model=16, seq_len=8)
        >>> x, _ = task.batch(0)
        >>> tuple(task.build_model()(x).shape)
        (2, 8, 256)
    """

    name = "gpt2"
    DEFAULT_CONFIG = TaskConfig(steps=150, batch_size=32, lr=1e-3)

    def __init__(
        self,
        config: TaskConfig | None = None,
        data: str | Path | None = None,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        seq_len: int = 64,
    ) -> None:
        _gpt2()  # refuse before reading the corpus when transformers is missing
        super().__init__(config or self.DEFAULT_CONFIG, data, d_model, n_layers, n_heads, seq_len)

    def build_model(self) -> nn.Module:
        gpt2_config, gpt2_model = _gpt2()
        torch.manual_seed(self.config.seed)
        config = gpt2_config(
            vocab_size=VOCAB,
            n_positions=self.seq_len,
            n_embd=self.d_model,
            n_layer=self.n_layers,
            n_head=self.n_heads,
            resid_pdrop=0.0,  # deterministic like the other tasks: runs differ only by precision
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        return LogitsOf(gpt2_model(config))
