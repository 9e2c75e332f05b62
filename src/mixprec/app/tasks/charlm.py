"""``charlm``: a byte-level transformer language model on real text that is already on disk.

Design note: the default corpus is the source code of a fixed list of Python standard library
modules, read from the running interpreter's own installation: real, varied text that every
machine with Python has, so nothing is downloaded or shipped. Its exact bytes depend on the Python
version, so figures are comparable between runs on the same interpreter. ``--data PATH`` trains on
any UTF-8 text file instead. Tokens are bytes (vocabulary 256), so any text works unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mixprec.app.tasks.base import Batch, Task, TaskConfig
from mixprec.app.tasks.transformer import TinyTransformer

__all__ = ["STDLIB_MODULES", "CharLMTask", "load_text", "stdlib_corpus"]

STDLIB_MODULES = (
    "argparse",
    "dataclasses",
    "difflib",
    "fractions",
    "functools",
    "inspect",
    "pathlib",
    "pprint",
    "statistics",
    "textwrap",
    "typing",
    "string",
    "shutil",
    "enum",
)
"""The standard library modules whose source makes the default corpus, in this order."""

VOCAB = 256
_VAL_WINDOWS = 64


def stdlib_corpus(max_bytes: int = 600_000) -> bytes:
    """The default corpus: the source of :data:`STDLIB_MODULES`, joined, up to ``max_bytes``."""
    parts: list[bytes] = []
    for name in STDLIB_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            parts.append(Path(spec.origin).read_bytes())
    corpus = b"\n".join(parts)[:max_bytes]
    if not corpus:
        raise RuntimeError(
            "cannot find the Python standard library's source files; pass --data PATH"
        )
    return corpus


def load_text(path: str | Path, min_bytes: int) -> bytes:
    """Read a UTF-8 text file for training, with a clear error for anything unusable.

    Raises:
        ValueError: the file is missing, a directory, empty, binary (NUL bytes or not UTF-8), or
            shorter than ``min_bytes``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist or is not a file")
    data = path.read_bytes()
    if not data:
        raise ValueError(f"data file {str(path)!r} is empty")
    if b"\x00" in data:
        raise ValueError(f"data file {str(path)!r} looks binary (it contains NUL bytes)")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"data file {str(path)!r} is not UTF-8 text ({err.reason})") from None
    if len(data) < min_bytes:
        raise ValueError(
            f"data file {str(path)!r} has {len(data)} bytes; this configuration needs at least "
            f"{min_bytes} (a batch of windows plus a validation split); use a longer file "
            "(or, in Python, a CharLMTask with a smaller seq_len)"
        )
    return data


class CharLMTask(Task):
    """Next-byte prediction with :class:`~mixprec.app.tasks.transformer.TinyTransformer`.

    Args:
        config: steps, batch size, learning rate, seed (defaults: 250 steps, batch 32, AdamW at
            2e-3).
        data: a text file to train on instead of the standard library corpus.
        d_model, n_layers, n_heads, seq_len: model size (``--model-size`` picks them:
            :mod:`mixprec.app.model_size`).

    Example:
        >>> task = CharLMTask(TaskConfig(steps=1, batch_size=2, lr=1e-3), seq_len=16)
        >>> x, y = task.batch(0)
        >>> torch.equal(x[:, 1:], y[:, :-1])
        True
    """

    name = "charlm"
    meta = False
    """Build the model on the meta device (``--model-size`` sets it): ``MixedPrecision.prepare``
    materializes it in its storage formats with the same values, so a bf16 model never exists
    in fp32. Not part of :meth:`describe`: the run is the same either way."""
    DEFAULT_CONFIG = TaskConfig(steps=250, batch_size=32, lr=2e-3)

    def __init__(
        self,
        config: TaskConfig | None = None,
        data: str | Path | None = None,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        seq_len: int = 64,
    ) -> None:
        self.config = config or self.DEFAULT_CONFIG
        self.d_model, self.n_layers, self.n_heads, self.seq_len = (
            d_model,
            n_layers,
            n_heads,
            seq_len,
        )
        self.source = str(data) if data is not None else "python-stdlib"
        need = 10 * (seq_len + 1) * 2  # validation split and training windows both non-trivial
        text = load_text(data, need) if data is not None else stdlib_corpus()
        # Resuming on other bytes (an edited file, another Python's stdlib) is another run.
        self.data_sha256 = hashlib.sha256(text).hexdigest()[:16]
        tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
        split = len(tokens) * 9 // 10
        self.train_tokens, self.val_tokens = tokens[:split], tokens[split:]
        g = torch.Generator().manual_seed(4321)
        starts = torch.randint(0, len(self.val_tokens) - seq_len - 1, (_VAL_WINDOWS,), generator=g)
        self.val_x, self.val_y = self._windows(self.val_tokens, starts)

    def _windows(self, tokens: torch.Tensor, starts: torch.Tensor) -> Batch:
        offsets = torch.arange(self.seq_len + 1)
        windows = tokens[starts[:, None] + offsets]
        return windows[:, :-1], windows[:, 1:]

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.config.seed)
        with torch.device("meta") if self.meta else contextlib.nullcontext():
            return TinyTransformer(VOCAB, self.d_model, self.n_layers, self.n_heads, self.seq_len)

    def batch(self, step: int) -> Batch:
        return self._sample(step, self.config.batch_size)

    def example_batch(self, size: int) -> Batch:
        return self._sample(0, size)

    def _sample(self, step: int, size: int) -> Batch:
        high = len(self.train_tokens) - self.seq_len - 1
        starts = torch.randint(0, high, (size,), generator=self.generator(step))
        return self._windows(self.train_tokens, starts)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.float().reshape(-1, VOCAB), target.reshape(-1))

    def evaluate(
        self,
        model: nn.Module,
        region: Callable[[], contextlib.AbstractContextManager[object]],
    ) -> dict[str, float]:
        with torch.no_grad(), region():
            logits = model(self.val_x)
        return {"val_loss": self.loss(logits, self.val_y).item()}

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "data": self.source,
            "data_sha256": self.data_sha256,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "seq_len": self.seq_len,
        }
