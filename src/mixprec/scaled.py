"""Scaled FP8 tensors in blocks: quantize with a scale per block, dequantize, as pure functions.

Design note: every FP8 recipe (:mod:`mixprec.recipes`) is one choice of block shape per GEMM
operand, so one blocked quantizer (:func:`quantize_blocks`) serves all of them, and
:func:`fp8_quantize` is that quantizer driven by a recipe. The scale convention is torchao's:
``data = fp8(clamp(x * scale, -max, max))``, dequantized as ``data / scale``; the scales come from
:mod:`mixprec.recipes` (:func:`~mixprec.recipes.dynamic_scale` and its kin).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mixprec.formats import Format, FormatLike, resolve_format
from mixprec.recipes import Fp8Recipe, Gemm, Role, block_shape, dynamic_scale, e8m0_scale

__all__ = [
    "Scaled",
    "dequantize",
    "fake_quantize_blocks",
    "fp8_fake_quantize",
    "fp8_quantize",
    "quantize_blocks",
    "quantize_with_scale",
    "reduce_amax",
    "use_kernels",
]


class Scaled(NamedTuple):
    """An fp8 tensor in blocks: ``data`` (fp8 dtype, the 2-D shape of the source), ``scale``
    (fp32, one per block, shape ``(rows // br, 1, cols // bc, 1)`` with partial blocks rounded up)
    and ``block`` ``(br, bc)``. The dequantized value is ``data / scale`` blockwise."""

    data: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int]


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor, fmt: FormatLike) -> torch.Tensor:
    """``fp8(clamp(x.float() * scale, -max, max))``: the saturating scaled cast.

    Example:
        >>> quantize_with_scale(torch.tensor([1.0, 1e4]), torch.tensor(2.0), "e5m2").tolist()
        [2.0, 20480.0]
    """
    fmt = resolve_format(fmt)
    scaled = x.float() * scale  # always a new tensor: clamped in place
    return scaled.clamp_(-fmt.max, fmt.max).to(fmt.dtype)


def quantize_blocks(
    x: torch.Tensor,
    block: tuple[int, int],
    fmt: FormatLike,
    scale_rule: Literal["dynamic", "pow2", "e8m0"] = "dynamic",
    scale: torch.Tensor | None = None,
    amax_reduce: bool = False,
) -> Scaled:
    """Quantize a 2-D tensor in ``block = (br, bc)`` blocks, each with its own scale.

    A dimension that is not a multiple of its block length ends in a partial block (its amax is
    over the elements it has).

    Args:
        x: a 2-D float tensor (fp32, bf16 or fp16).
        block: block shape; ``(rows, cols)`` of ``x`` is tensorwise, ``(1, cols)`` rowwise.
        fmt: the fp8 format.
        scale_rule: ``"dynamic"`` (:func:`dynamic_scale`), ``"pow2"`` (rounded down to a power of
            two) or ``"e8m0"`` (:func:`e8m0_scale`).
        scale: use these scales (shape as :attr:`Scaled.scale`, or 0-D) instead.
        amax_reduce: take the block amaxes over all ranks (:func:`reduce_amax`) before the
            scales are computed from them; the blocks must be the same on every rank.

    Returns:
        The :class:`Scaled` tensor.
    """
    fmt = resolve_format(fmt)
    rows, cols = x.shape
    br, bc = min(block[0], rows) or 1, min(block[1], cols) or 1
    padded = _pad_to(x.float(), br, bc)
    view = padded.view(padded.shape[0] // br, br, padded.shape[1] // bc, bc)
    if scale is None:
        scale = _scales(view, fmt, scale_rule, amax_reduce)
    data = quantize_with_scale(view, scale, fmt).view(padded.shape)[:rows, :cols]
    return Scaled(data, scale, (br, bc))


def _scales(
    view: torch.Tensor, fmt: Format, rule: Literal["dynamic", "pow2", "e8m0"], amax_reduce: bool
) -> torch.Tensor:
    """The scale of each block of a ``(rows/br, br, cols/bc, bc)`` view (any float dtype: the
    amax is exact in each, and is widened to fp32 before anything else reads it)."""
    amax = _block_amax(view).float()
    if amax_reduce:
        amax = reduce_amax(amax)
    if rule == "e8m0":
        return e8m0_scale(amax, fmt)
    return dynamic_scale(amax, fmt, power_of_two=rule == "pow2")


_KERNELS: dict[str, Callable[..., torch.Tensor | None]] = {
    "given": lambda *args: None,
    "dynamic": lambda *args: None,
}


def use_kernels(
    given: Callable[..., torch.Tensor | None], dynamic: Callable[..., torch.Tensor | None]
) -> None:
    """Install the one-pass kernels :func:`fake_quantize_blocks` calls (each returns None where
    it does not apply). :mod:`mixprec.compute.emulate_build` installs its C++ kernels when it is
    imported (``compute`` is a layer above this module); until then the torch-ops path runs."""
    _KERNELS["given"], _KERNELS["dynamic"] = given, dynamic


def fake_quantize_blocks(
    x: torch.Tensor,
    block: tuple[int, int],
    fmt: FormatLike,
    scale_rule: Literal["dynamic", "pow2", "e8m0"] = "dynamic",
    scale: torch.Tensor | None = None,
    amax_reduce: bool = False,
) -> torch.Tensor:
    """``dequantize(quantize_blocks(x, ...))``, bit for bit, without the fp8 tensor: the fp32
    values an emulated GEMM multiplies. One amax pass and one quantize-and-scale pass (the
    kernel of :mod:`mixprec.compute.emulate_build`) where the kernel is built; the torch-ops path
    otherwise (see :func:`use_kernels`). Arguments as :func:`quantize_blocks`.

    Example:
        >>> x = torch.tensor([[1.0, -3.0], [0.1, 2.0]])
        >>> torch.equal(fake_quantize_blocks(x, (1, 2), "e4m3"),
        ...             dequantize(quantize_blocks(x, (1, 2), "e4m3")))
        True
    """
    fmt = resolve_format(fmt)
    rows, cols = x.shape
    br, bc = min(block[0], rows) or 1, min(block[1], cols) or 1
    if scale is None and not amax_reduce:  # amax, scale and quantization in one kernel call
        out = _KERNELS["dynamic"](x, (br, bc), fmt, scale_rule)
        if out is not None:
            return out
    if scale is None:
        padded = _pad_to(x, br, bc)
        view = padded.view(padded.shape[0] // br, br, padded.shape[1] // bc, bc)
        scale = _scales(view, fmt, scale_rule, amax_reduce)
    out = _KERNELS["given"](x, scale, (br, bc), fmt)
    if out is None:
        return dequantize(quantize_blocks(x, (br, bc), fmt, scale_rule, scale))
    return out


def _block_amax(view: torch.Tensor) -> torch.Tensor:
    """max |x| per block of a ``(rows/br, br, cols/bc, bc)`` view, shaped ``(., 1, ., 1)``.

    Whole-tensor and whole-row blocks take one min/max pass (no ``abs`` copy); NaN propagates.
    """
    n_rows, _, n_cols, _ = view.shape  # blocks along rows, along columns
    if n_rows == 1 and n_cols == 1:
        lo, hi = torch.aminmax(view)
        return torch.maximum(-lo, hi).reshape(1, 1, 1, 1)
    if n_cols == 1:  # one block per row group: reduce the flattened block
        lo, hi = torch.aminmax(view.reshape(n_rows, -1), dim=1, keepdim=True)
        return torch.maximum(-lo, hi).reshape(n_rows, 1, 1, 1)
    if n_rows == 1 and view.shape[3] == 1:  # one block per column
        lo, hi = torch.aminmax(view.reshape(view.shape[1], -1), dim=0, keepdim=True)
        return torch.maximum(-lo, hi).reshape(1, 1, n_cols, 1)
    return view.abs().amax(dim=(1, 3), keepdim=True)


def reduce_amax(amax: torch.Tensor) -> torch.Tensor:
    """The elementwise max of ``amax`` over all ranks of the default process group (one
    ``all_reduce``); ``amax`` itself without a process group or with one rank.

    A NaN on any rank gives NaN on every rank (gloo's MAX may drop a NaN), so a step that one
    rank would skip is skipped by all.

    Example:
        >>> reduce_amax(torch.tensor([1.0, float("nan")])).tolist()  # no process group
        [1.0, nan]
    """
    if amax_ranks() == 1:
        return amax
    nan = torch.isnan(amax)
    both = torch.stack([torch.where(nan, torch.zeros_like(amax), amax), nan.to(amax.dtype)])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return torch.where(both[1] > 0, torch.full_like(amax, float("nan")), both[0])


def amax_ranks() -> int:
    """How many ranks :func:`reduce_amax` takes the maximum over: the default process group's
    size, 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def records_amax(t: torch.Tensor, recipe: Fp8Recipe) -> bool:
    """Whether a delayed-scaling layer records ``t``'s amax in its history: when ``t`` has
    elements, or when ``amax_reduce`` over several ranks gave a rank without rows the others'
    amax (so every rank keeps the same history). An empty batch alone observes nothing."""
    return bool(t.numel()) or (recipe.amax_reduce and amax_ranks() > 1)


def empty_operand(
    x: torch.Tensor, recipe: Fp8Recipe, role: Role, contraction_dim: int
) -> torch.Tensor:
    """An operand without rows (an empty batch, an MoE expert without tokens) as an FP8 GEMM
    takes it: ``x`` itself, nothing to scale, after its part in the amax all-reduce.

    The ranks that have rows reduce their amaxes with every rank's (``amax_reduce``): this one
    must take part, or they wait for it forever. It gives zeros, the identity of MAX, shaped as
    their block amaxes (one block along the batch, the same blocks along the columns).
    """
    if x.numel() or x.dim() != 2 or not reduces_over_batch(recipe, role, contraction_dim):
        return x
    cols = x.shape[1]
    _, bc = block_shape(recipe, role, (1, cols), contraction_dim, "output")
    bc = min(bc, cols) or 1
    reduce_amax(torch.zeros(1, 1, -(-cols // bc), 1, device=x.device))
    return x


def reduces_over_batch(recipe: Fp8Recipe, role: Role, contraction_dim: int) -> bool:
    """Whether an operand's block amaxes are taken over the whole batch dimension (dim 0), so
    that ``amax_reduce`` must reduce them over the ranks: activations and gradients (never
    weights, which every data-parallel rank holds whole) scaled tensorwise, or rowwise along
    dim 0 (the weight-gradient GEMM's contraction). Rowwise blocks along dim 1 are per sample,
    and blockwise and MX blocks along the batch are fixed-length: on a rank whose batch is a
    multiple of the block length they are the blocks one process has, so neither is reduced."""
    if not recipe.amax_reduce or role == "weight":
        return False
    return recipe.granularity == "tensorwise" or (
        recipe.granularity == "rowwise" and contraction_dim == 0
    )


def dequantize(q: Scaled) -> torch.Tensor:
    """``data / scale`` blockwise, in fp32, with ``q.data``'s shape.

    The fp8 values are decoded by a 256-entry table built from torch's own cast, indexed by the
    fp8 bit pattern: the same values as ``data.float()``, several times faster on CPUs, whose
    fp8-to-fp32 cast is not vectorized. A single scale is folded into the table (256 divisions
    instead of one per element; the same quotients).

    Example:
        >>> x = torch.tensor([[1.0, -3.0], [0.0, 2.0]])
        >>> torch.equal(dequantize(quantize_blocks(x, (1, 2), "e4m3", "pow2")), x)
        True
    """
    rows, cols = q.data.shape
    br, bc = q.block
    if q.scale.numel() == 1:
        return _decode(q.data, _table(q.data.dtype, q.data.device) / q.scale.reshape(()))
    padded = _pad_to(_decode(q.data, _table(q.data.dtype, q.data.device)), br, bc)
    view = padded.view(padded.shape[0] // br, br, padded.shape[1] // bc, bc)
    return (view / q.scale).view(padded.shape)[:rows, :cols]


_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every value of an fp8 dtype in fp32, indexed by its bit pattern."""
    key = (dtype, device)
    if key not in _TABLES:
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
        _TABLES[key] = codes.view(dtype).to(torch.float32).to(device)
    return _TABLES[key]


def _decode(data: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    codes = data.contiguous().view(torch.uint8).reshape(-1).to(torch.int32)
    return table.index_select(0, codes).view(data.shape)


def _pad_to(x: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    pad_rows, pad_cols = -x.shape[0] % br, -x.shape[1] % bc
    if pad_rows or pad_cols:
        return F.pad(x, (0, pad_cols, 0, pad_rows))
    return x


def fp8_quantize(
    x: torch.Tensor,
    recipe: Fp8Recipe,
    role: Role,
    contraction_dim: int,
    gemm: Gemm,
    scale: torch.Tensor | None = None,
) -> Scaled:
    """Quantize one 2-D GEMM operand exactly as ``recipe`` prescribes for it.

    Args:
        x: the operand (2-D, high precision).
        recipe: the recipe.
        role: ``"input"``, ``"weight"`` or ``"grad_output"`` (picks the format).
        contraction_dim: the dim of ``x`` the GEMM sums over.
        gemm: which GEMM the operand feeds.
        scale: a precomputed (delayed) scale for tensorwise recipes.

    Example:
        >>> from mixprec.recipes import RECIPES
        >>> q = fp8_quantize(torch.ones(4, 64), RECIPES["mxfp8"], "input", 1, "output")
        >>> q.block, tuple(q.scale.shape)
        ((1, 32), (4, 1, 2, 1))
    """
    block = block_shape(recipe, role, tuple(x.shape), contraction_dim, gemm)  # type: ignore[arg-type]
    rule = _rule(recipe)
    reduce = reduces_over_batch(recipe, role, contraction_dim)
    return quantize_blocks(x, block, recipe.format_of(role), rule, scale, reduce)


def fp8_fake_quantize(
    x: torch.Tensor,
    recipe: Fp8Recipe,
    role: Role,
    contraction_dim: int,
    gemm: Gemm,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dequantize(fp8_quantize(...))`` in fp32, bit for bit, in one pass where the kernel is
    built (:func:`fake_quantize_blocks`): the operand of an emulated FP8 GEMM.

    Example:
        >>> from mixprec.recipes import RECIPES
        >>> x = torch.randn(4, 64)
        >>> q = fp8_quantize(x, RECIPES["mxfp8"], "input", 1, "output")
        >>> torch.equal(fp8_fake_quantize(x, RECIPES["mxfp8"], "input", 1, "output"),
        ...             dequantize(q))
        True
    """
    block = block_shape(recipe, role, tuple(x.shape), contraction_dim, gemm)  # type: ignore[arg-type]
    reduce = reduces_over_batch(recipe, role, contraction_dim)
    return fake_quantize_blocks(x, block, recipe.format_of(role), _rule(recipe), scale, reduce)


def _rule(recipe: Fp8Recipe) -> Literal["dynamic", "pow2", "e8m0"]:
    if recipe.granularity == "mxfp8":
        return "e8m0"
    return "pow2" if recipe.power_of_two else "dynamic"
