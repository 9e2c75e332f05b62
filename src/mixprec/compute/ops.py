"""The op policy of autocast: which aten ops run in 16 bits, which stay in fp32, which promote.

Design note: the tables name ops as torch's dispatcher does — aten operators with their overload,
``"mm"``, ``"conv2d.padding"``, ``"softmax.int"`` — because the dispatcher is where autocast
works: a composite call such as ``einsum`` or ``F.multi_head_attention_forward`` reaches autocast
as the aten ops it is built from, so a table keyed by Python names would miss them. The defaults
are torch's own lists for the device type: the CPU table is read from the dispatcher (every aten op
with an ``AutocastCPU`` kernel is in it), the CUDA table is written out from torch's CUDA lists and
checked against the ``AutocastCUDA`` kernels by a test, so a torch upgrade that changes a list is
noticed. An :class:`OpTable` is immutable; ``table.with_overrides`` returns an edited copy, which is
what an ``autocast(..., ops={...})`` region uses.

Categories:
    ``"lower"``: floating inputs are cast to the autocast dtype (GEMM-class ops).
    ``"fp32"``: floating inputs are cast to fp32 (numerically sensitive ops).
    ``"promote"``: floating inputs are cast to the widest floating dtype among them and the
    autocast dtype.
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

__all__ = [
    "COMPOSITE_GEMMS",
    "GEMM_OPS",
    "AutocastDeviceError",
    "Category",
    "OpTable",
    "aten_op",
    "autocast_key",
    "check_device_type",
    "op_table",
    "resolve_op_names",
]

Category = Literal["lower", "fp32", "promote", "keep"]
_CATEGORIES: tuple[str, ...] = get_args(Category)

GEMM_OPS: frozenset[str] = frozenset(
    {"mm", "bmm", "addmm", "baddbmm", "addbmm", "_addmm_activation", "conv_tbc", "convolution",
     "_scaled_dot_product_flash_attention_for_cpu"}
)  # fmt: skip
"""The aten primitives the emulated backend computes as tensor cores do: 16-bit inputs, fp32
accumulation, one rounding of the result to 16 bits (see :mod:`mixprec.compute.emulated`)."""

COMPOSITE_GEMMS: frozenset[str] = frozenset(
    {"linear", "matmul", "einsum", "tensordot", "chain_matmul", "linalg_multi_dot",
     "linalg_vecdot", "conv1d", "conv2d", "conv3d", "conv1d.padding", "conv2d.padding",
     "conv3d.padding", "conv_transpose1d", "conv_transpose2d.input", "conv_transpose3d.input",
     "scaled_dot_product_attention", "_native_multi_head_attention"}
)  # fmt: skip
"""Lowered ops that the emulated backend runs by decomposing them into :data:`GEMM_OPS` (their
inputs cast once, as torch's autocast casts them, and no other op inside cast again)."""

_LOWER_CPU = frozenset(
    {"conv1d", "conv1d.padding", "conv2d", "conv2d.padding", "conv3d", "conv3d.padding", "bmm",
     "mm", "linalg_vecdot", "baddbmm", "addmm", "addbmm", "linear", "_convolution.deprecated",
     "matmul", "conv_tbc", "mkldnn_rnn_layer", "conv_transpose1d", "conv_transpose2d.input",
     "conv_transpose3d.input", "prelu", "scaled_dot_product_attention",
     "_native_multi_head_attention", "_addmm_activation"}
)  # fmt: skip
_PROMOTE_CPU = frozenset({"cat", "stack", "index_copy"})

_LOWER_CUDA = frozenset(
    {"_convolution", "_convolution.deprecated", "conv1d", "conv2d", "conv3d", "conv_tbc",
     "conv_transpose1d", "conv_transpose2d.input", "conv_transpose3d.input", "convolution",
     "cudnn_convolution", "cudnn_convolution_transpose", "prelu", "addmm", "addmv", "addr",
     "matmul", "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm",
     "chain_matmul", "linalg_multi_dot", "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell",
     "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
     "_scaled_dot_product_flash_attention", "scaled_dot_product_attention"}
)  # fmt: skip
_FP32_CUDA = frozenset(
    {"acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
     "reciprocal", "rsqrt", "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar",
     "softplus", "layer_norm", "native_layer_norm", "group_norm", "rms_norm", "frobenius_norm.dim",
     "nuclear_norm", "nuclear_norm.dim", "cosine_similarity", "poisson_nll_loss",
     "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div",
     "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss",
     "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
     "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
     "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d",
     "_upsample_nearest_exact2d", "upsample_nearest3d", "_upsample_nearest_exact3d",
     "upsample_linear1d", "upsample_bilinear2d", "_upsample_bilinear2d_aa",
     "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_bicubic2d_aa", "prod",
     "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm",
     "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList", "norm.Scalar",
     "norm.ScalarOpt_dim"}
)  # fmt: skip
_PROMOTE_CUDA = frozenset(
    {"addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler",
     "index_put", "tensordot", "scatter_add"}
)  # fmt: skip
BANNED_CUDA: frozenset[str] = frozenset({"binary_cross_entropy"})
"""Ops torch's CUDA autocast refuses (their fp16 gradients are unsafe); ``target="cuda"`` refuses
them too."""

_ALIASES = {
    "cross_entropy": "cross_entropy_loss",
    "conv_transpose2d": "conv_transpose2d.input",
    "conv_transpose3d": "conv_transpose3d.input",
    "multi_dot": "linalg_multi_dot",
    "grid_sample": "grid_sampler",
    "__matmul__": "matmul",
    "__pow__": "pow",
}

_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA", "xpu": "AutocastXPU", "mps": "AutocastMPS"}


def autocast_key(device_type: str) -> str:
    """The dispatch key of torch's autocast for a device type (``"AutocastCPU"``, ...).

    Raises:
        ValueError: a device type without a mixprec kernel key; the message lists the valid ones.
    """
    try:
        return _KEYS[device_type]
    except KeyError:
        raise ValueError(
            f"mixprec has no autocast kernels for device type {device_type!r}; valid device "
            f"types: {', '.join(map(repr, _KEYS))}"
        ) from None


def aten_op(name: str) -> torch._ops.OpOverload:
    """The aten ``OpOverload`` called ``name`` (``"mm"``, ``"softmax.int"``)."""
    base, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, base), overload or "default")


def _overload_names(base: str) -> list[str]:
    """The functional overloads of ``aten::<base>`` that take tensors: what autocast sees."""
    packet = getattr(torch.ops.aten, base)
    names = []
    for overload in packet.overloads():
        schema = getattr(packet, overload)._schema
        takes_tensor = any("Tensor" in str(arg.type) for arg in schema.arguments)
        if takes_tensor and not schema.is_mutable:
            names.append(base if overload == "default" else f"{base}.{overload}")
    return names


def resolve_op_names(name: object) -> list[str]:
    """The aten overload names an op-table edit for ``name`` applies to.

    ``"softmax"`` means every functional overload of ``aten::softmax``; ``"softmax.int"`` only
    that one; familiar Python names (``"cross_entropy"``) map to their aten op.

    Raises:
        ValueError: ``name`` is not an aten op (the message suggests close names).
        TypeError: ``name`` is not a string.

    Example:
        >>> resolve_op_names("softmax")
        ['softmax.int']
        >>> resolve_op_names("cross_entropy")
        ['cross_entropy_loss']
    """
    if not isinstance(name, str):
        raise TypeError(f"op names are strings such as 'mm' or 'softmax', got {name!r}")
    key = _ALIASES.get(name, name)
    base, dot, overload = key.partition(".")
    try:
        packet = getattr(torch.ops.aten, base) if base.isidentifier() else None
    except (AttributeError, RuntimeError):
        packet = None
    if packet is not None:
        if not dot and _overload_names(base):
            return _overload_names(base)
        if dot and overload in packet.overloads():
            return [key]
    close = difflib.get_close_matches(key, _known_op_names(), n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(
        f"unknown op {name!r}: ops are named as aten operators (torch.ops.aten.*), e.g. 'mm', "
        f"'softmax' or 'softmax.int'{hint}"
    )


@functools.cache
def _known_op_names() -> list[str]:
    return sorted(
        n.removeprefix("aten::")
        for n in torch._C._dispatch_get_all_op_names()
        if n.startswith("aten::") and not n.startswith("aten::_")
    )


@dataclass(frozen=True)
class OpTable(Mapping[str, Category]):
    """An immutable aten op -> category table for one device type and dtype.

    Look-ups take an overload name (``"softmax.int"``) or an op name (``"softmax"``, which
    answers for its first listed overload).

    Example:
        >>> table = op_table("cpu", torch.bfloat16)
        >>> table["linear"], table["cross_entropy_loss"], table["cat"], table["relu"]
        ('lower', 'fp32', 'promote', 'keep')
        >>> table.with_overrides({"softmax": "fp32"})["softmax.int"]
        'fp32'
    """

    device_type: str
    dtype: torch.dtype
    entries: Mapping[str, Category] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Category:
        found = self.entries.get(name)
        if found is not None:
            return found
        prefix = name + "."
        for key, category in self.entries.items():
            if key.startswith(prefix):
                return category
        return "keep"

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def category(self, overload: str) -> Category:
        """The category of exactly this overload name (what a dispatcher kernel asks)."""
        return self.entries.get(overload, "keep")

    def by_category(self) -> dict[str, list[str]]:
        """The ops of each category, sorted: what ``mixprec doctor --ops`` prints."""
        grouped: dict[str, list[str]] = {c: [] for c in _CATEGORIES if c != "keep"}
        for name, category in sorted(self.entries.items()):
            if category != "keep":
                grouped[category].append(name)
        return grouped

    def differences(self, other: OpTable) -> dict[str, Category]:
        """The ops whose category here differs from ``other``'s, with the category here."""
        names = sorted(set(self.entries) | set(other.entries))
        mine, theirs = self.entries, other.entries
        return {
            n: mine.get(n, "keep") for n in names if mine.get(n, "keep") != theirs.get(n, "keep")
        }

    def with_overrides(self, overrides: Mapping[str, str] | None) -> OpTable:
        """A copy with ``overrides`` (aten op name -> category) applied.

        Raises:
            ValueError: an op name that is not an aten op, or an unknown category; the message
                lists the valid choices.
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
            names = resolve_op_names(name)
            if category not in _CATEGORIES:
                raise ValueError(
                    f"unknown op category {category!r} for op {name!r}; valid categories: "
                    f"{', '.join(map(repr, _CATEGORIES))}"
                )
            entries.update(dict.fromkeys(names, category))  # type: ignore[arg-type]
        return OpTable(self.device_type, self.dtype, MappingProxyType(entries))


def _registered(key: str) -> frozenset[str]:
    """The aten overload names with a kernel at dispatch key ``key`` (torch's autocast lists)."""
    names = set()
    for full in torch._C._dispatch_get_all_op_names():
        if full.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(full, key):
            names.add(full.removeprefix("aten::"))
    return frozenset(names)


@functools.cache
def _table_entries(kind: str) -> Mapping[str, Category]:
    if kind == "cpu":
        # torch's CPU lists: the lower and promote ops are few and named; every other op with an
        # AutocastCPU kernel runs in fp32.
        entries: dict[str, Category] = dict.fromkeys(_registered("AutocastCPU"), "fp32")
        entries.update(dict.fromkeys(_LOWER_CPU, "lower"))
        entries.update(dict.fromkeys(_PROMOTE_CPU, "promote"))
    else:
        entries = dict.fromkeys(_LOWER_CUDA, "lower")
        entries.update(dict.fromkeys(_FP32_CUDA, "fp32"))
        entries.update(dict.fromkeys(_PROMOTE_CUDA, "promote"))
    return MappingProxyType(entries)


class AutocastDeviceError(ValueError, RuntimeError, TypeError):
    """A device type autocast cannot run on: catchable as the ``RuntimeError`` (unknown name) or
    ``ValueError`` (not a string) torch raises, and as ``TypeError``."""


def check_device_type(device_type: object) -> str:
    """Return ``device_type`` if torch's autocast runs on it (what autocast and op_table take).

    Raises:
        AutocastDeviceError: not a string, or not a device type torch's autocast supports.
    """
    # Each message starts with torch's own text for the same mistake, so code (and torch's tests)
    # matching torch's message keeps working; mixprec's help follows.
    if not isinstance(device_type, str):
        raise AutocastDeviceError(
            f"Expected `device_type` of type `str`, got: `{type(device_type)}`: device_type must "
            f"be a string such as 'cpu' or 'cuda', got {type(device_type).__name__} "
            f"{device_type!r}"
        )
    try:
        available = torch._C._is_autocast_available(device_type)
        torch_text = f"User specified an unsupported autocast device_type '{device_type}'"
    except RuntimeError as err:  # not even a torch device type: "Invalid device string: ..."
        available, torch_text = False, str(err)
    if not available:
        valid = [d for d in ("cpu", "cuda", "mps", "xpu") if torch._C._is_autocast_available(d)]
        raise AutocastDeviceError(
            f"{torch_text}: autocast is not available for device type {device_type!r}; valid "
            f"device types: {', '.join(map(repr, valid))}"
        )
    return device_type


def op_table(device_type: str, dtype: torch.dtype) -> OpTable:
    """The default op table of ``torch.autocast`` for a device type and dtype (checked).

    Device types other than ``"cpu"`` use the CUDA table (torch's accelerators share it).

    Example:
        >>> op_table("cuda", torch.float16)["softmax"]
        'fp32'
        >>> op_table("cpu", torch.bfloat16)["softmax"]
        'keep'

    Raises:
        AutocastDeviceError: a device type ``autocast`` refuses (``"gpu"``), with the same
            message.
    """
    check_device_type(device_type)
    return _op_table(device_type, dtype)


@functools.cache  # immutable and consulted for every autocast region
def _op_table(device_type: str, dtype: torch.dtype) -> OpTable:
    return OpTable(device_type, dtype, _table_entries("cpu" if device_type == "cpu" else "cuda"))
