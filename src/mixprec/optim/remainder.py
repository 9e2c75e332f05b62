"""An fp32 master stored as its bf16 rounding plus a remainder: the pure math.

Design note. A bf16 parameter ``p`` is the fp32 master ``m`` rounded to nearest even, and a
bf16 value is the high half of an fp32 bit pattern, so the master differs from ``p`` (widened)
only in its low bits. Reading bit patterns as int32, ``P = bits(p) << 16``, ``M = bits(m)``:

* **Same sign, small distance.** Rounding to nearest keeps the sign (a tiny negative rounds to
  ``-0``), and within one sign fp32 bit patterns are ordered like the values they encode (the
  exponent sits above the mantissa; infinity is the pattern after the largest finite value).
  So ``m`` lying within half a bf16 ulp of ``p`` means ``|M - P| <= 2**15`` as integers, with
  ``2**15`` only at a tie. This holds at the edges too: subnormals (ulps are still ``2**16``
  patterns apart), ``±0`` (``-0`` is ``INT32_MIN``; every master rounding to it lies above it),
  and finite masters above bf16's largest value that round to ``inf`` (``M - P`` is then in
  ``[-2**15, -1]``).
* **One value too many.** The masters rounding to an even ``p`` are the ``2**16 + 1`` patterns
  ``P - 2**15 .. P + 2**15`` (both ties go to the even neighbour), to an odd ``p`` only the
  ``2**16 - 1`` inside them. So no 16-bit code alone can hold every master exactly: for even
  ``p`` one tie has no code. The other tie, ``d = -2**15``, and every ``|d| < 2**15``, are the
  int16 ``d``; the tie ``d = +2**15`` (a master exactly half an ulp *above* an even ``p``,
  rounded down) is stored as the int16 ``-2**15`` plus its index in a short list of ties.
  Ties need the low 16 bits of the master to be exactly ``0x8000``: about one element in
  ``2**17`` carries one at a time, so the list costs next to nothing, and the store is exact.
* **Decoding** is ``M = P + d`` (plus ``2**16`` at the listed ties); the encoding of the
  result is the one stored, so ``join(split(m)) == m`` bit for bit for every non-NaN ``m``.
  A NaN master decodes to a NaN (its payload and sign are not kept: torch rounds every NaN to
  one bf16 NaN, and a NaN master stays NaN through any optimizer step anyway).

Eight-bit remainders (24-bit masters, lossy): ``d`` rounded to a multiple of ``2**8`` and kept
within ``±127 * 2**8``, so the decoded master still rounds to ``p`` (it is off by at most
``2**8`` patterns, ``2**7`` away from the clamp: a relative error of about ``2**-16``).

fp16 parameters are not split: fp16 is not the high half of fp32 (other exponent width), so the
remainder would not be a bit slice; :class:`~mixprec.optim.rules.compressed.CompressedMaster`
refuses them.
"""

from __future__ import annotations

import torch

__all__ = ["join_master", "split_master"]

_TIE = 1 << 15


def _widened_bits(param: torch.Tensor) -> torch.Tensor:
    """The int32 bit patterns of the bf16 ``param`` widened to fp32 (exact)."""
    return param.to(torch.float32).view(torch.int32)


def split_master(
    master: torch.Tensor, param: torch.Tensor, bits: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """The remainder of the fp32 ``master`` beside its bf16 rounding ``param``.

    Args:
        master: fp32 values (any shape), not modified.
        param: ``master`` rounded to nearest even in bf16 (``master.to(torch.bfloat16)``).
        bits: 16 (exact) or 8 (24-bit masters, lossy).

    Returns:
        ``(remainder, ties)``: an int16 (``bits=16``) or int8 tensor shaped like ``master``,
        and the flat indices (int64) where ``master`` lies exactly half an ulp above an even
        ``param`` (always empty for ``bits=8``).

    Example:
        >>> m = torch.tensor([1.0 + 2.0**-10, -3.3e38, 0.0])
        >>> r, ties = split_master(m, m.to(torch.bfloat16))
        >>> torch.equal(join_master(m.to(torch.bfloat16), r, ties), m)
        True
    """
    diff = master.view(torch.int32) - _widened_bits(param)
    diff.masked_fill_(torch.isnan(master), 0)  # any NaN decodes to a NaN
    if bits == 8:
        # Nearest multiple of 2**8, kept inside ±127 so the decoded master rounds to param.
        coarse = torch.div(diff + 128, 256, rounding_mode="floor").clamp_(-127, 127)
        return coarse.to(torch.int8), torch.empty(0, dtype=torch.int64, device=master.device)
    ties = torch.nonzero(diff.view(-1) == _TIE).view(-1)
    return diff.to(torch.int16), ties  # +2**15 wraps to -2**15 (two's complement)


def join_master(
    param: torch.Tensor,
    remainder: torch.Tensor,
    ties: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fp32 master that :func:`split_master` split into ``param`` and ``remainder``.

    Args:
        param: bf16 parameter values.
        remainder: int16 (exact) or int8 (24-bit) remainders shaped like ``param``.
        ties: the flat indices ``split_master`` returned (ignored for int8).
        out: an fp32 tensor shaped like ``param`` to write into (None: a new one).

    Returns:
        The fp32 master (``out`` when given).
    """
    bits = _widened_bits(param)
    step = remainder.to(torch.int32)
    if remainder.dtype == torch.int8:
        step.mul_(256)
    elif ties is not None and ties.numel():
        step.view(-1).index_fill_(0, ties, _TIE)
    bits.add_(step)
    master = bits.view(torch.float32)
    if out is None:
        return master
    return out.copy_(master)
