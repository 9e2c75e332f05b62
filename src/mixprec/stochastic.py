"""Counter-based stochastic rounding: random bits from (seed, stream, step, element).

One entry point rounds: :func:`stochastic_round_` (fp32 into bf16, fp16 or fp32, one tensor or
a run of tensors that are consecutive elements of a stream). :func:`counter_key` makes the key of
a stream at a step; :func:`random_bits` shows the bits themselves. This module sits beside
:mod:`mixprec.quantize` (whose grid rounding it uses for fp16), below the optimizers that call
it. A faster kernel for the same bits (the one-pass C++ kernel of :mod:`mixprec.optim.fused`)
plugs in from above through :func:`register_kernel`, so this layer imports nothing above it.

Design note: stochastic rounding needs one uniform random number per element per step. Drawing
them from a ``torch.Generator`` costs about 5 ns per element on a CPU (a sequential Mersenne
twister), more than the optimizer step it serves, and its state must be saved in checkpoints and
kept in step across ranks. Here the random bits are a *hash* of where and when they are used
instead: the key of a tensor is mixed from ``(seed, parameter index, stream, step)`` in Python
(splitmix64), and each element's bits are a keyed integer hash of its flat index (the
``lowbias32`` mixer of Chris Wellons, with the second key folded in between its rounds), computed
with a dozen in-place int32 torch ops on a buffer that stays in cache. So

* the same seed gives the same bits on any machine, for any chunking of the parameters and any
  number of threads, and a resumed run continues the same stream from the step counter alone;
* nothing but the step counter is state: no generator to save, seed or keep in step per device;
* every element of every parameter at every step gets its own draw, independent of the others
  to the quality of a 32-bit hash (statistical quality, not cryptographic).

One 32-bit hash serves two bf16 elements (16 bits each); fp16 and other formats take 24 bits per
element through the grid rounding of :func:`mixprec.quantize.round_to_grid`. The bits are not the
ones a ``torch.Generator`` with the same seed would give: runs with a given seed round
differently than before this module existed (same distribution, different draws).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch

from mixprec.formats import resolve_format
from mixprec.quantize import round_to_grid

__all__ = [
    "SEED_LIMIT",
    "bf16_words",
    "counter_key",
    "fast_bf16",
    "random_bits",
    "register_kernel",
    "stochastic_round_",
]

Kernel = Callable[[torch.Tensor, torch.Tensor, tuple[int, int], int], bool]
# The registered kernel: rounds (src, out, key, offset) with this module's bits and says whether
# it could (False: it declines those tensors, or it cannot be built).
_kernel: list[Kernel] = []


def register_kernel(kernel: Kernel | None) -> None:
    """Install (or, with None, remove) a kernel that rounds with this module's bits.

    ``kernel(src, out, key, offset)`` rounds fp32 ``src`` into 16-bit ``out`` exactly as
    :func:`stochastic_round_` would (leaving ``src`` as it was) and returns True, or returns
    False for tensors it does not take. :mod:`mixprec.optim.fused` installs its C++ kernel.
    """
    _kernel.clear()
    if kernel is not None:
        _kernel.append(kernel)


def _try_kernel(src: torch.Tensor, out: torch.Tensor, key: tuple[int, int], offset: int) -> bool:
    return bool(_kernel) and _kernel[0](src, out, key, offset)


def stochastic_round_(
    src: torch.Tensor | Sequence[torch.Tensor],
    out: torch.Tensor | Sequence[torch.Tensor],
    key: tuple[int, int],
    offset: int = 0,
    buffers: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Round fp32 ``src`` stochastically into ``out`` (bf16, fp16 or fp32) with the bits of ``key``.

    ``src`` holds elements ``offset, offset + 1, ...`` of the stream; a sequence of tensors is a
    run of consecutive elements (the first tensor's first element is ``offset``). bf16 rounding
    takes 16 bits of word ``e // 2`` for element ``e``; every other format rounds on its grid with
    24-bit uniforms (the top bits of word ``e``) through :func:`mixprec.quantize.round_to_grid`.
    ``src`` may be overwritten (the torch-ops path of contiguous bf16 works in it). ``buffers``:
    two flat int32 work tensors of at least ``bf16_words(offset, numel)`` and ``numel`` elements,
    reused from step to step (see :func:`random_bits`); new ones when None.

    Raises:
        TypeError: a ``src`` tensor is not fp32 or an ``out`` tensor not bf16/fp16/fp32.

    Example:
        >>> w = torch.full((10000,), 1.0 + 2.0**-10)  # an eighth of a bf16 ulp above 1
        >>> out = torch.empty(10000, dtype=torch.bfloat16)
        >>> stochastic_round_(w, out, counter_key(0, 0, 0))
        >>> round(out.float().mean().item(), 3)
        1.001
    """
    if isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor):
        _round_with_key_(src, out, key, offset)
        return
    weights, outs = list(src), list(out)  # type: ignore[arg-type]
    if all(fast_bf16(w, o) for w, o in zip(weights, outs, strict=True)):
        _round_bf16_(weights, outs, key, offset, buffers)
        return
    for w, o in zip(weights, outs, strict=True):
        _round_with_key_(w, o, key, offset)
        offset += w.numel()


SEED_LIMIT = 2**64
_MASK64 = (1 << 64) - 1
_LITTLE_ENDIAN = sys.byteorder == "little"  # two bf16 draws per int32 word, low half first

# lowbias32 constants and the golden ratio, as signed int32 (torch multiplies int32 mod 2**32).
_GOLDEN = 0x9E3779B9 - (1 << 32)
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B - (1 << 32)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _signed32(x: int) -> int:
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= 1 << 31 else x


def counter_key(seed: int, stream: int, step: int) -> tuple[int, int]:
    """The two 32-bit keys (signed ints) of one stream's draws at one step.

    Args:
        seed: the run's seed, ``0 <= seed < 2**64``.
        stream: what is rounded (0: the weights; others: optimizer states).
        step: how many rounding steps came before this one.

    Raises:
        TypeError: a part is not an int.
        ValueError: a part is negative or does not fit in 64 bits.

    Example:
        >>> counter_key(0, 0, 0) == counter_key(0, 0, 0) != counter_key(0, 0, 1)
        True
    """
    for name, value in (("seed", seed), ("stream", stream), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        if not 0 <= value < SEED_LIMIT:
            raise ValueError(
                f"{name} must be in [0, 2**64), got {value!r}; take it modulo 2**64 (or pick "
                "a smaller one)"
            )
    x = _splitmix64(seed)
    for part in (stream, step):
        x = _splitmix64(x ^ part)
    return _signed32(x), _signed32(x >> 32)


def _shift_xor_(h: torch.Tensor, tmp: torch.Tensor, shift: int) -> None:
    """``h ^= h >>> shift`` (a logical shift, on int32)."""
    torch.bitwise_right_shift(h, shift, out=tmp)
    tmp.bitwise_and_((1 << (32 - shift)) - 1)
    h.bitwise_xor_(tmp)


def random_bits(
    numel: int,
    key: tuple[int, int],
    offset: int = 0,
    device: torch.device | str = "cpu",
    out: torch.Tensor | None = None,
    tmp: torch.Tensor | None = None,
) -> torch.Tensor:
    """32 uniform random bits for each of the words ``offset .. offset + numel - 1`` of a stream.

    Word ``i`` is a keyed hash of ``i`` alone, so any split of a range into pieces gives the same
    bits as the whole range.

    Args:
        numel: how many words.
        key: two signed 32-bit keys from :func:`counter_key`.
        offset: the index of the first word.
        device: where to compute them (``out``'s device when it is given).
        out, tmp: flat int32 tensors of ``numel`` elements to work in (reused buffers); new ones
            when None.

    Returns:
        ``out`` (or a new int32 tensor of ``numel`` words) holding the bits.

    Example:
        >>> key = counter_key(0, 0, 0)
        >>> torch.equal(random_bits(6, key)[2:], random_bits(4, key, offset=2))
        True
    """
    k1, k2 = key
    if out is None:
        out = torch.empty(numel, dtype=torch.int32, device=device)
    h = torch.arange(numel, dtype=torch.int32, out=out)
    h.mul_(_GOLDEN).add_(_signed32(k1 + offset * _GOLDEN))  # (offset + i) * golden + k1
    tmp = torch.empty_like(h) if tmp is None else tmp
    _shift_xor_(h, tmp, 16)
    h.mul_(_MUL1).bitwise_xor_(k2)
    _shift_xor_(h, tmp, 15)
    h.mul_(_MUL2)
    _shift_xor_(h, tmp, 16)
    return h


def fast_bf16(weight: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether :func:`_round_bf16_` can round ``weight`` into ``out``."""
    return (
        _LITTLE_ENDIAN
        and out.dtype == torch.bfloat16
        and weight.dtype == torch.float32
        and weight.is_contiguous()
        and out.is_contiguous()
    )


def bf16_words(offset: int, numel: int) -> int:
    """How many 32-bit words elements ``offset .. offset + numel - 1`` take, two per word."""
    return ((offset & 1) + numel + 1) // 2


def _round_bf16_(
    weights: list[torch.Tensor],
    out: list[torch.Tensor],
    key: tuple[int, int],
    offset: int,
    buffers: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Round fp32 ``weights`` stochastically into the bf16 tensors ``out``, with bits of ``key``.

    The tensors are consecutive elements ``offset, offset + 1, ...`` of one stream: element ``e``
    takes the low (even ``e``) or high (odd ``e``) 16 bits of word ``e // 2``. bf16 is the top half
    of fp32, so adding a uniform integer below 2**16 to each fp32 bit pattern and clearing the low
    half rounds up with probability equal to the fraction of an ulp that was cut off; the result
    is a bf16 value, which torch's cast then stores exactly. One hash serves all the tensors.
    ``weights`` (contiguous) are overwritten. A NaN whose payload sits only in the low 16 bits can
    come out as inf (arithmetic NaNs keep their quiet bit and stay NaN). ``buffers``: two flat
    int32 tensors to work in, of at least ``bf16_words(offset, total numel)`` and ``total numel``
    elements (see :func:`random_bits`). A registered kernel rounds (the same bits, ``weights``
    left as they were) when it takes the tensors; otherwise a dozen int32 torch passes do.

    Example:
        >>> w = [torch.full((10000,), 1.0 + 2.0**-10)]  # an eighth of a bf16 ulp above 1
        >>> out = [torch.empty(10000, dtype=torch.bfloat16)]
        >>> _round_bf16_(w, out, counter_key(0, 0, 0), offset=0)
        >>> round(out[0].float().mean().item(), 3)
        1.001
    """
    if not weights:
        return
    start = offset
    for index, (w, o) in enumerate(zip(weights, out, strict=True)):
        if not _try_kernel(w, o, key, start):
            _stochastic_round_bf16_torch_(weights[index:], out[index:], key, start, buffers)
            return
        start += w.numel()


def _stochastic_round_bf16_torch_(
    weights: list[torch.Tensor],
    out: list[torch.Tensor],
    key: tuple[int, int],
    offset: int,
    buffers: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """:func:`_round_bf16_` in torch ops (overwrites ``weights``)."""
    sizes = [w.numel() for w in weights]
    first = offset & 1
    count = bf16_words(offset, sum(sizes))
    total = sum(sizes)
    device = weights[0].device
    words_buffer, tmp = (
        (torch.empty(count, dtype=torch.int32, device=device), None) if buffers is None else buffers
    )
    if tmp is None:
        tmp = torch.empty(max(count, total), dtype=torch.int32, device=device)
    words = random_bits(count, key, offset >> 1, device, words_buffer[:count], tmp[:count])
    halves = words.view(torch.int16)[first : first + total]  # uniform on [-2**15, 2**15)
    # Widen the draws into the hash's spare buffer: an int32 op with an int16 operand would
    # allocate an int32 copy of it.
    draws = tmp[:total]
    draws.copy_(halves)
    draws.add_(1 << 15)  # a uniform integer in [0, 2**16)
    for w, piece in zip(weights, draws.split(sizes), strict=True):
        bits = w.view(torch.int32).view(-1)
        bits.add_(piece)
        bits.bitwise_and_(-(1 << 16))  # now a bf16 value: the cast below is exact
    torch._foreach_copy_(out, weights)


def _round_with_key_(
    weight: torch.Tensor, out: torch.Tensor, key: tuple[int, int], offset: int = 0
) -> None:
    """Round fp32 ``weight`` stochastically into ``out`` (bf16, fp16 or fp32), drawing from ``key``.

    ``weight`` holds elements ``offset, offset + 1, ...`` of the stream. bf16 with contiguous
    tensors takes :func:`_round_bf16_` (``weight`` is overwritten); everything else
    rounds on the format's grid with 24-bit uniforms (the top bits of word ``e`` for element
    ``e``) through :func:`mixprec.quantize.round_to_grid`: subnormals, overflow and NaN as
    :func:`mixprec.quantize.quantize` does them. Tensors a registered kernel takes are rounded
    by it (the same bits; ``weight`` unchanged).

    Raises:
        TypeError: ``weight`` is not fp32 or ``out`` not bf16/fp16/fp32.

    Example:
        >>> w = torch.full((10000,), 1.0 + 2.0**-13)  # an eighth of an fp16 ulp above 1
        >>> out = torch.empty(10000, dtype=torch.float16)
        >>> _round_with_key_(w, out, counter_key(0, 0, 0))
        >>> round(out.float().mean().item(), 4)
        1.0001
    """
    if weight.dtype != torch.float32:
        raise TypeError(
            f"weight must be a float32 tensor, got dtype {weight.dtype!r}; widen it first "
            "(weight.float())"
        )
    if out.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(
            f"out must be a bfloat16, float16 or float32 tensor, got dtype {out.dtype!r}; "
            "other formats round with mixprec.quantize(x, fmt, 'stochastic')"
        )
    if out.dtype == torch.float32:
        out.copy_(weight)
    elif _try_kernel(weight, out, key, offset):
        pass
    elif fast_bf16(weight, out):
        _stochastic_round_bf16_torch_([weight], [out], key, offset)
    else:
        _stochastic_round_grid_torch_(weight, out, key, offset)


def _stochastic_round_grid_torch_(
    weight: torch.Tensor, out: torch.Tensor, key: tuple[int, int], offset: int
) -> None:
    """Round on ``out``'s grid with 24-bit uniforms from ``key``, in torch ops."""
    words = random_bits(weight.numel(), key, offset, weight.device)
    words.bitwise_right_shift_(8).bitwise_and_((1 << 24) - 1)
    uniform = words.view(weight.shape).to(torch.float32).mul_(2.0**-24)
    rounded = round_to_grid(weight, resolve_format(out.dtype), "stochastic", uniform=uniform)
    out.copy_(rounded)
