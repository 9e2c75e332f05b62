"""Block-wise 8-bit codecs for optimizer states: dynamic int8 and fp8 e4m3, pure functions.

Design note, the layout: a state is quantized as a 2-D tensor ``(rows, cols)`` in blocks of
``block_size`` (256) consecutive elements of a row, each block with one fp32 scale. The storage
(:mod:`mixprec.optim.quantized_states`) hands a parameter's state in as rows of its leading
dimension, so that the scales shard with the rows under FSDP2; a single row is the flat block
layout of torchao's ``AdamW8bit``/``AdamWFp8`` and of bitsandbytes' blockwise 8-bit optimizers,
and so is any layout whose rows are a multiple of 256 long. A ragged row (``cols`` not a
multiple of the block) ends in a shorter block: it is padded with zeros for the reduction, which
changes no absmax, and the padding is never stored.
Memory: 1 byte per element plus 4 bytes per block (1.016 B/element at 256).

Design note, int8 (:func:`quantize_int8`): *dynamic* quantization (Dettmers et al., "8-bit
optimizers via block-wise quantization", 2110.02861): a block is divided by its absmax and each
value stored as the index of the nearest entry of a 256-entry map (:func:`dynamic_map`) whose
entries are spread over seven decades (a dynamic exponent, then a linear fraction), so a block
keeps values down to about 1e-7 of its absmax, with about 2-3 significant digits near the top and
fewer further down. The signed map serves signed states (Adam's first moment, momentum), the
unsigned one, with twice the entries per decade, non-negative states. The map, the rounding rule
(the lower neighbour unless the residual reaches half the gap) and the ``1e-12`` floor of the
scale are those of torchao 0.18 (``create_dynamic_map``, ``quantize_8bit_with_qmap``,
``scale_tensor``), so on the same block layout the codes and scales are bit for bit torchao's;
``tests/optim/test_codecs.py`` checks it, at every point where the code changes. The nearest
entry is not found by a binary search over the map (eight dependent passes) but by two reads of a
table indexed by the upper 16 bits of the scaled value: the code of the bucket's smallest value
and the one rounding threshold inside the bucket, if any (the map's entries are further apart
than a bucket is wide). The thresholds are computed once from torchao's rule, so the codes stay
bit for bit its codes, about five times faster on a CPU.

Design note, fp8 (:func:`quantize_fp8`): each block is scaled so that its absmax maps to e4m3's
largest finite value (448) and cast to ``torch.float8_e4m3fn`` (round to nearest even), as
torchao's ``AdamWFp8`` does; the scale is ``absmax / 448`` (absmax floored at ``1e-12``).

Design note, the second moment (what the storage feeds these codecs): Adam's update divides by
``sqrt(v) + eps``, so a second-moment value that quantizes to zero while its first moment does
not turns into a step of ``m / eps`` — the failure of 8-bit states. ``v`` is the square of a
gradient scale, so a block of ``v`` spans twice the decades its gradients span: a block whose
gradients range over 1e4 has ``v`` ranging over 1e8, past the dynamic map's 1e-7 (torchao and
bitsandbytes store ``v`` itself with the unsigned map and lose those values) and far past fp8's
``2**-9 / 448`` (about 4e-6: torchao's ``AdamWFp8`` flushes them). The storage therefore stores
``sqrt(v)`` (with the unsigned map for int8): the range in decades is halved, so everything a
gradient block spans is kept, and the quantity the update uses, ``sqrt(v)``, is what carries the
error, which is no larger for the values near the block's top. The cost is a square root on
encode and a square on decode, inside the same chunked pass. The figures of
``benchmarks/bench_states.py`` (relative error of ``sqrt(v)`` and the fraction of non-zero
values flushed to zero on log-uniform blocks) back the choice.

Non-finite values: a block holding an inf or a NaN gets a NaN scale, so the whole block decodes
to NaN. A poisoned state stays visibly poisoned instead of decoding to arbitrary finite values
(what the bare arithmetic would give: ``x / inf`` is 0). The wrappers skip steps whose gradients
are not finite, so finite states only meet this after a step that went wrong anyway.
"""

from __future__ import annotations

import functools

import torch

from mixprec.formats import resolve_format
from mixprec.quantize import round_to_grid

__all__ = [
    "BLOCK_SIZE",
    "FP8_DTYPE",
    "block_count",
    "dequantize_fp8",
    "dequantize_int8",
    "dynamic_map",
    "quantize_fp8",
    "quantize_int8",
]

BLOCK_SIZE = 256
FP8_DTYPE = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
_E4M3 = resolve_format(FP8_DTYPE)
_SCALE_FLOOR = 1e-12  # torchao's: an all-zero block divides by this, not by 0


def block_count(cols: int, block_size: int = BLOCK_SIZE) -> int:
    """How many blocks a row of ``cols`` elements takes (the last one may be short)."""
    return -(-cols // block_size)


@functools.cache
def _map_values(signed: bool) -> tuple[float, ...]:
    # Seven decades 1e-7..1 of linear fractions; decade i has 2**i fractions (signed, one sign
    # each) or 2**(i + 1) (unsigned), placed at the midpoints of a linspace(0.1, 1) of fp32
    # values, as bitsandbytes' create_dynamic_map does (the arithmetic is kept, since the map is
    # part of the stored format); 0 and 1 complete the 256 entries.
    decades = 7
    values: list[float] = [0.0, 1.0]
    for i in range(decades):
        count = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1, count + 1)
        means = (edges[:-1] + edges[1:]) / 2.0
        magnitude = 10 ** (-(decades - 1) + i)
        values += (magnitude * means).tolist()  # the product in fp32, as bitsandbytes
        if signed:
            values += (-magnitude * means).tolist()
    if len(values) != 256:  # pragma: no cover - a property of the construction
        raise AssertionError(f"the dynamic map has {len(values)} entries, not 256")
    return tuple(sorted(values))


def dynamic_map(signed: bool, device: torch.device | str | None = None) -> torch.Tensor:
    """The 256 sorted fp32 values of the dynamic quantization map, in ``[-1, 1]`` or ``[0, 1]``.

    Example:
        >>> m = dynamic_map(signed=False)
        >>> m.shape, m[0].item(), m[-1].item()
        (torch.Size([256]), 0.0, 1.0)
    """
    return torch.tensor(_map_values(signed), dtype=torch.float32, device=device)


def _order_key(bits: torch.Tensor) -> torch.Tensor:
    """fp32 bit patterns (int64 of the int32 view) -> integers in the floats' order (an
    involution: applied to such integers it gives the patterns back)."""
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _from_key(key: torch.Tensor) -> torch.Tensor:
    return _order_key(key).to(torch.int32).view(torch.float32)


@functools.cache
def _rounding_thresholds(signed: bool) -> torch.Tensor:
    """The 255 smallest fp32 values that round up to each map entry after the first, by the
    rule of torchao's ``quantize_8bit_with_qmap`` (between entries ``lo < hi``: ``hi`` where
    ``y - lo >= (hi - lo) * 0.5`` in fp32), so that ``code(y) = #(thresholds <= y)``. Found by
    bisection over the fp32 values between neighbouring entries (the rule is monotone in y)."""
    qmap = dynamic_map(signed)
    lo, hi = qmap[:-1], qmap[1:]
    half_gap = (hi - lo) * 0.5
    low = _order_key(lo.view(torch.int32).long())  # rule false here (or at most here)
    high = _order_key(hi.view(torch.int32).long())  # rule true here
    while bool((high - low > 1).any()):
        mid = (low + high) // 2
        up = (_from_key(mid) - lo) >= half_gap
        high, low = torch.where(up, mid, high), torch.where(up, low, mid)
    at_low = (_from_key(low) - lo) >= half_gap  # only where lo == hi - 1 ulp, or lo itself
    return torch.where(at_low, _from_key(low), _from_key(high))


@functools.cache
def _code_table(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per upper 16 bits of an fp32 value: the code of the smallest value with those bits, and
    the one threshold above it within those bits (+inf if none): the map's entries are at
    least 0.7% apart, wider than the 0.4% such a bucket spans, so a bucket holds at most one."""
    thresholds = _rounding_thresholds(signed)
    top = torch.arange(1 << 16, dtype=torch.int64) << 16
    top = torch.where(top >= 1 << 31, top - (1 << 32), top)  # as int32 patterns
    first = torch.where(top < 0, top | 0xFFFF, top)  # the bucket's smallest value
    last = torch.where(top < 0, top, top | 0xFFFF)
    as_float = lambda bits: bits.to(torch.int32).view(torch.float32)  # noqa: E731
    code_first = torch.bucketize(as_float(first), thresholds, right=True).clamp(max=255)
    code_last = torch.bucketize(as_float(last), thresholds, right=True).clamp(max=255)
    finite = torch.isfinite(as_float(first)) & torch.isfinite(as_float(last))
    if bool(((code_last - code_first > 1) & finite).any()):  # pragma: no cover - by the map
        raise AssertionError("two rounding thresholds in one 16-bit bucket")
    next_threshold = thresholds[code_first.clamp(max=254)]
    inf = torch.tensor(float("inf"))
    threshold = torch.where(finite & (code_last > code_first), next_threshold, inf)
    return code_first.to(torch.uint8).to(device), threshold.to(device)


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x`` (rows, cols) as fp32 (rows, blocks, block_size), the last block padded with zeros."""
    if x.ndim != 2:
        raise ValueError(f"the codecs take a 2-D (rows, cols) tensor, got shape {tuple(x.shape)!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    rows, cols = x.shape
    pad = block_count(cols, block_size) * block_size - cols
    x = x.float()
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(rows, -1, block_size)


def _absmax(blocks: torch.Tensor) -> torch.Tensor:
    """Per-block absmax floored at 1e-12, NaN for a block with a non-finite value."""
    absmax = blocks.abs().amax(-1)
    finite = torch.isfinite(blocks).all(-1)
    return torch.where(finite, absmax.clamp(min=_SCALE_FLOOR), float("nan"))


def _unblock(blocks: torch.Tensor, cols: int) -> torch.Tensor:
    rows = blocks.shape[0]
    return blocks.reshape(rows, -1)[:, :cols]


def quantize_int8(
    x: torch.Tensor,
    signed: bool = True,
    block_size: int = BLOCK_SIZE,
    uniform: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise dynamic 8-bit quantization of a 2-D tensor.

    Each block of ``block_size`` elements of a row is divided by its absmax and every value
    becomes the index of the nearest entry of :func:`dynamic_map` (ties and near-ties as
    torchao: the upper entry when the residual reaches half the gap).

    Args:
        x: the values, (rows, cols), any floating dtype (computed in fp32).
        signed: use the signed map; False for non-negative values (negative ones clip to 0).
        block_size: elements per block.
        uniform: draws in [0, 1) of ``x``'s shape for stochastic rounding between the two map
            entries around each value (up with probability its fraction of the gap); None
            rounds to nearest.

    Returns:
        ``(codes, scale)``: uint8 codes of ``x``'s shape, fp32 absmax per block (rows, blocks);
        NaN for a block holding a non-finite value.

    Example:
        >>> codes, scale = quantize_int8(torch.tensor([[0.5, -1.0, 0.0]]))
        >>> dequantize_int8(codes, scale).tolist()
        [[0.5, -1.0, 0.0]]
    """
    cols = x.shape[-1] if x.ndim == 2 else 0
    blocks = _blocks(x, block_size)
    scale = _absmax(blocks)
    y = blocks / scale.unsqueeze(-1)
    # The code is #(rounding thresholds <= y): looked up by y's upper 16 bits, plus one where y
    # reaches the bucket's threshold (two table reads instead of a binary search).
    base, threshold = _code_table(signed, x.device)
    bucket = (y.view(torch.int32) >> 16).long() & 0xFFFF
    codes = base[bucket] + (y >= threshold[bucket]).to(torch.uint8)
    if uniform is not None:
        codes = _round_between(
            y, codes, dynamic_map(signed, x.device), _blocks(uniform, block_size)
        )
    return _unblock(codes, cols), scale


def _round_between(
    y: torch.Tensor, nearest: torch.Tensor, qmap: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """Stochastic codes: the entry below ``y`` or the one above, up with probability
    ``(y - below) / (above - below)``."""
    nearest = nearest.long()
    low = torch.where(qmap[nearest] > y, nearest - 1, nearest).clamp_(0, 255)
    high = (low + 1).clamp_(max=255)
    below = qmap[low]
    up = uniform * (qmap[high] - below) < y - below
    return torch.where(up, high, low).to(torch.uint8)


def dequantize_int8(
    codes: torch.Tensor, scale: torch.Tensor, signed: bool = True, block_size: int = BLOCK_SIZE
) -> torch.Tensor:
    """The fp32 values of :func:`quantize_int8`'s ``codes`` and ``scale``: map entry × absmax."""
    cols = codes.shape[-1]
    qmap = dynamic_map(signed, device=codes.device)
    values = _blocks(qmap[codes.int()], block_size) * scale.unsqueeze(-1)
    return _unblock(values, cols)


def quantize_fp8(
    x: torch.Tensor, block_size: int = BLOCK_SIZE, uniform: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise fp8 e4m3 quantization of a 2-D tensor: ``x / scale`` cast to e4m3 (nearest
    even, or stochastically with ``uniform`` draws in [0, 1) of ``x``'s shape that are
    multiples of 2**-24), with ``scale = absmax / 448`` per block.

    Returns:
        ``(codes, scale)``: ``torch.float8_e4m3fn`` codes of ``x``'s shape and fp32 scales
        (rows, blocks); NaN for a block holding a non-finite value.

    Example:
        >>> codes, scale = quantize_fp8(torch.tensor([[448.0, -1.0, 0.0]]))
        >>> dequantize_fp8(codes, scale).tolist()
        [[448.0, -1.0, 0.0]]
    """
    cols = x.shape[-1] if x.ndim == 2 else 0
    blocks = _blocks(x, block_size)
    scale = _absmax(blocks) / _FP8_MAX
    y = blocks / scale.unsqueeze(-1)
    if uniform is not None:  # |y| <= 448: rounding up never passes the largest value
        y = round_to_grid(y, _E4M3, "stochastic", uniform=_blocks(uniform, block_size))
    codes = y.to(FP8_DTYPE)
    return _unblock(codes, cols), scale


def dequantize_fp8(
    codes: torch.Tensor, scale: torch.Tensor, block_size: int = BLOCK_SIZE
) -> torch.Tensor:
    """The fp32 values of :func:`quantize_fp8`'s ``codes`` and ``scale``: code × scale."""
    cols = codes.shape[-1]
    values = _blocks(codes.float(), block_size) * scale.unsqueeze(-1)
    return _unblock(values, cols)
