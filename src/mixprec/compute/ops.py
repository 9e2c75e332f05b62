"""The op policy of autocast: which ops run in 16 bits, which stay in fp32, which promote.

Design note: the tables name ops the way users call them (``torch.*``, ``Tensor.*`` and
``torch.nn.functional.*`` names such as ``"linear"``, ``"softmax"``, ``"cross_entropy"``), because
that is the level at which mixprec intercepts them and the level users edit. The defaults follow
torch's own autocast op reference for each device type, so the native backend with an unedited table
behaves exactly as ``torch.autocast``. An :class:`OpTable` is immutable; ``table.with_overrides``
returns an edited copy, which is what an ``autocast(..., ops={...})`` region uses.

Categories:
    ``"lower"``: floating inputs are cast to the autocast dtype (GEMM-class ops).
    ``"fp32"``: floating inputs are cast to fp32 (numerically sensitive ops).
    ``"promote"``: floating inputs are cast to the widest floating dtype among them.
    ``"keep"``: inputs are left as they are (the same as an op missing from the table).
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, get_args

import torch
import torch.nn.functional as F

__all__ = ["GEMM_OPS", "Category", "OpTable", "canonical_op_name", "op_table"]

Category = Literal["lower", "fp32", "promote", "keep"]
_CATEGORIES: tuple[str, ...] = get_args(Category)

GEMM_OPS: frozenset[str] = frozenset(
    {
        "linear",
        "matmul",
        "mm",
        "bmm",
        "addmm",
        "baddbmm",
        "addbmm",
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "scaled_dot_product_attention",
    }
)
"""Ops that the emulated backend computes as tensor cores do: 16-bit inputs, fp32 accumulation,
one rounding of the result to 16 bits."""

_LOWER_CUDA = GEMM_OPS | {"addmv", "addr", "mv", "chain_matmul", "multi_dot", "prelu"}
_FP32_CUDA = frozenset(
    {
        "acos",
        "asin",
        "cosh",
        "erfinv",
        "exp",
        "expm1",
        "log",
        "log10",
        "log2",
        "log1p",
        "reciprocal",
        "rsqrt",
        "sinh",
        "tan",
        "pow",
        "__pow__",
        "__rpow__",
        "__rtruediv__",
        "softplus",
        "layer_norm",
        "group_norm",
        "norm",
        "normalize",
        "cosine_similarity",
        "poisson_nll_loss",
        "cosine_embedding_loss",
        "nll_loss",
        "hinge_embedding_loss",
        "kl_div",
        "l1_loss",
        "smooth_l1_loss",
        "huber_loss",
        "mse_loss",
        "margin_ranking_loss",
        "multilabel_margin_loss",
        "soft_margin_loss",
        "triplet_margin_loss",
        "multi_margin_loss",
        "binary_cross_entropy_with_logits",
        "dist",
        "pdist",
        "cdist",
        "renorm",
        "logsumexp",
        "cumprod",
        "cumsum",
        "prod",
        "sum",
        "softmax",
        "softmin",
        "log_softmax",
        "cross_entropy",
    }
)
_PROMOTE_CUDA = frozenset(
    {"addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "grid_sample", "index_put",
     "scatter_add", "tensordot"}
)  # fmt: skip

_LOWER_CPU = GEMM_OPS | {"prelu"}
_FP32_CPU = frozenset(
    {
        "avg_pool3d",
        "binary_cross_entropy",
        "grid_sample",
        "polar",
        "prod",
        "quantile",
        "nanquantile",
        "stft",
        "cdist",
        "trace",
        "view_as_complex",
        "cholesky",
        "cholesky_inverse",
        "cholesky_solve",
        "inverse",
        "lu_solve",
        "orgqr",
        "ormqr",
        "pinverse",
        "max_pool3d",
        "max_unpool2d",
        "max_unpool3d",
        "adaptive_avg_pool3d",
        "mse_loss",
        "cosine_embedding_loss",
        "nll_loss",
        "hinge_embedding_loss",
        "poisson_nll_loss",
        "smooth_l1_loss",
        "cross_entropy",
        "l1_loss",
        "huber_loss",
        "margin_ranking_loss",
        "soft_margin_loss",
        "triplet_margin_loss",
        "multi_margin_loss",
        "ctc_loss",
        "kl_div",
        "multilabel_margin_loss",
        "binary_cross_entropy_with_logits",
    }
)
_PROMOTE_CPU = frozenset({"stack", "cat", "index_copy"})

_DEFAULTS: Mapping[str, tuple[frozenset[str], frozenset[str], frozenset[str]]] = MappingProxyType(
    {
        "cuda": (_LOWER_CUDA, _FP32_CUDA, _PROMOTE_CUDA),
        "cpu": (_LOWER_CPU, _FP32_CPU, _PROMOTE_CPU),
    }
)
_ALIASES = {"__matmul__": "matmul", "__rmatmul__": "matmul", "cross_entropy_loss": "cross_entropy"}


def canonical_op_name(func: object) -> str:
    """The table name of a torch function, method or ``torch.nn.functional`` function."""
    name = getattr(func, "__name__", None) or repr(func)
    return _ALIASES.get(name, name)


def _is_known_op(name: str) -> bool:
    return name in _ALIASES or any(
        hasattr(namespace, name) for namespace in (torch, torch.Tensor, F, torch.linalg)
    )


def _known_op_names() -> list[str]:
    names = {n for ns in (torch, torch.Tensor, F) for n in dir(ns) if not n.startswith("_")}
    return sorted(names | set(_ALIASES))


@dataclass(frozen=True)
class OpTable(Mapping[str, Category]):
    """An immutable op -> category table for one device type and dtype.

    Example:
        >>> table = op_table("cpu", torch.bfloat16)
        >>> table["linear"], table["cross_entropy"], table["cat"], table["relu"]
        ('lower', 'fp32', 'promote', 'keep')
        >>> table.with_overrides({"softmax": "fp32"})["softmax"]
        'fp32'
    """

    device_type: str
    dtype: torch.dtype
    entries: Mapping[str, Category] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Category:
        return self.entries.get(name, "keep")

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def by_category(self) -> dict[str, list[str]]:
        """The ops of each category, sorted: what ``mixprec doctor --ops`` prints."""
        grouped: dict[str, list[str]] = {c: [] for c in _CATEGORIES if c != "keep"}
        for name, category in sorted(self.entries.items()):
            if category != "keep":
                grouped[category].append(name)
        return grouped

    def with_overrides(self, overrides: Mapping[str, str] | None) -> OpTable:
        """A copy with ``overrides`` (op name -> category) applied.

        Raises:
            ValueError: an op name that is not a torch / Tensor / functional function, or an
                unknown category; the message lists the valid choices.
            TypeError: ``overrides`` is not a mapping.
        """
        if not overrides:
            return self
        if not isinstance(overrides, Mapping):
            raise TypeError(
                f"op overrides must be a mapping of op name to category, got "
                f"{type(overrides).__name__} {overrides!r}; e.g. {{'softmax': 'fp32'}}"
            )
        entries = dict(self.entries)
        for name, category in overrides.items():
            key = _ALIASES.get(name, name)
            if not isinstance(name, str) or not _is_known_op(key):
                close = difflib.get_close_matches(str(name), _known_op_names(), n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise ValueError(
                    f"unknown op {name!r}: valid ops are the names of torch, Tensor and "
                    f"torch.nn.functional functions{hint}"
                )
            if category not in _CATEGORIES:
                raise ValueError(
                    f"unknown op category {category!r} for op {name!r}; valid categories: "
                    f"{', '.join(map(repr, _CATEGORIES))}"
                )
            entries[key] = category  # type: ignore[assignment]
        return OpTable(self.device_type, self.dtype, MappingProxyType(entries))


@functools.cache  # immutable and built for every autocast region
def op_table(device_type: str, dtype: torch.dtype) -> OpTable:
    """The default op table of ``torch.autocast`` for a device type and dtype.

    Device types other than ``"cpu"`` use the CUDA table (torch's accelerators share it).

    Example:
        >>> op_table("cuda", torch.float16)["softmax"]
        'fp32'
        >>> op_table("cpu", torch.bfloat16)["softmax"]
        'keep'
    """
    lower, fp32, promote = _DEFAULTS["cpu" if device_type == "cpu" else "cuda"]
    entries: dict[str, Category] = {}
    for names, category in ((lower, "lower"), (fp32, "fp32"), (promote, "promote")):
        entries.update(dict.fromkeys(names, category))  # type: ignore[arg-type]
    return OpTable(device_type, dtype, MappingProxyType(entries))
