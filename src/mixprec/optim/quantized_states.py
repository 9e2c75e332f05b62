"""Optimizer states in 8 bits between steps: block-quantized int8 and fp8 state storages.

Design note: :class:`Int8States` and :class:`Fp8States` are state storages
(:class:`~mixprec.optim.states.StateStorage`): around each inner step the wrapper has them decode
the states of the chunk it steps into the fp32 tensors the torch optimizer expects and encode them
back afterwards, so at most one chunk's states are fp32 at once (for SGD, Adam and AdamW the
one-pass kernel steps the codes directly instead, with the same bits:
:mod:`mixprec.optim.fused_codes`). The math is :mod:`mixprec.optim.codecs` (block 256, one
fp32 scale per block); this module decides what is stored where:

* **The stored form** is plain tensors under keys of the parameter's state: ``state[key]`` holds
  the codes (uint8 for int8, ``float8_e4m3fn`` for fp8, the parameter's shape) and
  ``state[key + ".scale"]`` the fp32 block scales. Plain tensors keep ``optimizer.state_dict()``,
  ``torch.save``/``torch.load(weights_only=True)`` and ``torch.distributed.checkpoint`` working
  unchanged, and ``memory_report`` counts exactly them. torch's ``Optimizer.load_state_dict``
  casts every state tensor to the parameter's dtype (fp32 here); codes survive that exactly
  (0..255 and every e4m3 value are fp32 values), and :meth:`BlockQuantizedStates.attach` narrows
  them back right after the load (a later decode would too).
* **The layout**: a state is quantized in rows of its leading dimension, in blocks of 256 within
  a row. For rows whose length is a multiple of 256 this is the flat layout of torchao and
  bitsandbytes; it lets the scales of a DTensor sharded on dim 0 (FSDP2) be a DTensor of the same
  placements, ``(rows, blocks)``, so the stored form is the same in one process and on any
  number of ranks, and a checkpoint reshards like any state (a two-rank test checks each rank's
  codes and scales are its rows of the one-process ones). Rows shorter than a block cost a scale
  each (4 bytes per row). States of other DTensor layouts (``Shard(1)``) stay fp32.
* **Which states**: the elementwise ones (:func:`~mixprec.optim.states.elementwise_keys`) of
  parameters of at least 2 dimensions and ``min_numel`` elements (default 4096, bitsandbytes'
  ``min_8bit_size`` and torchao's rule: small tensors cost little and are the most sensitive).
  Biases and norm scales (1-D) keep fp32 states: few elements, and a sharded 1-D parameter would
  cut blocks at the shard boundary.
* **The second moment**: the non-negative states of torch's optimizers (:data:`SQRT_KEYS`: Adam's
  ``exp_avg_sq``, RMSprop's ``square_avg``, Adagrad's ``sum``...) are stored as their square
  root (int8: with the unsigned map), which keeps twice the decades of small values that storing
  them directly keeps; :mod:`mixprec.optim.codecs` explains why and what it costs. A block of such
  a state that holds a negative value (a user optimizer reusing the name) is stored with the
  signed map of ``sign(x) * sqrt(|x|)`` and marked by a negative scale, so nothing is lost.
* **Rounding** is stochastic by default: an Adam second moment changes by ``1 - beta2`` (0.1%)
  of itself per step, far below half the gap between neighbouring codes (0.4% at best for the
  dynamic map, 6% for e4m3; 0.2% for bf16), so rounding to nearest freezes it where the gradient
  scale drifts slowly, and the first moment likewise; unbiased rounding lets it move on average
  (``benchmarks/bench_states.py`` measures both). The draws are counter-based
  (:mod:`mixprec.stochastic`): each parameter's state keeps ``[salt, rounds]`` under
  :data:`ROUNDING_KEY` (16 bytes), so resume is bit for bit. ``rounding="nearest"`` is torchao's
  and bitsandbytes' choice. ``state="bf16"`` is :class:`StochasticBf16States`, rounded the same
  way under every update rule.

Optimizers whose states are not elementwise (LBFGS's history, Adafactor's factored moments,
SparseAdam's sparse updates) are refused by :func:`make_storage`.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Mapping
from typing import Any, Literal

import torch

from mixprec._dist import is_dtensor
from mixprec.formats import STATE_FORMATS
from mixprec.optim import codecs
from mixprec.optim.shards import flat_offset, local, wrap_like
from mixprec.optim.states import (
    Float16States,
    Fp32States,
    Rounder,
    StateStorage,
    elementwise_keys,
    storage_for,
)
from mixprec.stochastic import SEED_LIMIT, counter_key, random_bits, stochastic_round_

__all__ = [
    "MIN_NUMEL",
    "ROUNDING_KEY",
    "SCALE_SUFFIX",
    "SQRT_KEYS",
    "STATE_FORMATS",
    "BlockQuantizedStates",
    "Fp8States",
    "Int8States",
    "StateFormat",
    "StochasticBf16States",
    "attach_storage",
    "check_elementwise",
    "make_storage",
    "storage_named",
]

StateFormat = Literal["fp32", "bf16", "fp16", "fp8", "int8"]
SCALE_SUFFIX = ".scale"
ROUNDING_KEY = "state_rounding"  # int64 [salt, rounds]: a parameter's stochastic draws
MIN_NUMEL = 4096  # smaller parameters keep fp32 states (bitsandbytes' min_8bit_size)
# Non-negative per-element states of torch's optimizers (second moments and their kin).
SQRT_KEYS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta", "exp_inf"})
# Optimizers whose states are not per element, with what they keep instead.
_NOT_ELEMENTWISE = {
    "LBFGS": "a history of flat direction vectors over all parameters",
    "Adafactor": "row and column factors of the second moment (already compressed)",
    "SparseAdam": "moments updated by sparse gradients only",
}


def _rows(shape: torch.Size) -> int:
    return shape[0] if len(shape) >= 2 else 1


def _row_layout(ref: torch.Tensor) -> bool:
    """Whether a state laid out like ``ref`` can be quantized in rows: a plain tensor, or a
    DTensor of at least 2 dims sharded on dim 0 (or replicated)."""
    if not is_dtensor(ref):
        return True
    from torch.distributed.tensor import Replicate, Shard

    placements: Any = ref.placements  # type: ignore[attr-defined]
    return ref.ndim >= 2 and all(
        isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0) for p in placements
    )


def _wrap_scale(scale: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The local ``scale`` (rows, blocks) as a DTensor laid out like ``ref``'s rows."""
    if not is_dtensor(ref):
        return scale
    from torch.distributed.tensor import DTensor

    spec: Any = ref
    shape = torch.Size((ref.shape[0], scale.shape[1]))
    stride = (scale.shape[1], 1)
    return DTensor.from_local(
        scale, spec.device_mesh, spec.placements, run_check=False, shape=shape, stride=stride
    )


class _Draws:
    """Counter-based random draws for rounding the states of one parameter (resumable).

    A parameter's state holds an int64 tensor ``[salt, rounds]`` under :data:`ROUNDING_KEY`
    (a tensor, so that DCP loads it in place like the states): ``salt`` tells its
    draws from other parameters' (given in the order parameters are first stored), ``rounds``
    counts the times its states were stored. The bits are :func:`mixprec.stochastic.random_bits`
    of (seed, stream of salt and state name, rounds), element by its global position, so any
    chunking or sharding draws the same bits, and a resumed run the same as one that went on.
    """

    def __init__(self, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        self.seed = seed
        self._next_salt = 0

    def seen(self, state: dict[str, Any]) -> None:
        """Note a (loaded) state's salt so that new parameters get other ones."""
        rounding = state.get(ROUNDING_KEY)
        if isinstance(rounding, torch.Tensor) and rounding.numel() == 2:
            self._next_salt = max(self._next_salt, int(rounding[0].item()) + 1)

    def uniform(
        self, state: dict[str, Any], key: str, x: torch.Tensor, param: torch.Tensor
    ) -> torch.Tensor:
        """Draws in [0, 1) (multiples of 2**-24) of ``x``'s shape for state ``key``."""
        bits = random_bits(x.numel(), self.key(state, key), _offset(param), x.device)
        return (torch.bitwise_right_shift(bits, 8) & 0xFFFFFF).float().mul_(2.0**-24).view(x.shape)

    def key(self, state: dict[str, Any], key: str) -> tuple[int, int]:
        """The counter key of this round of state ``key``'s draws."""
        salt, rounds = self._counter(state)
        stream = (salt << 32) | zlib.crc32(key.encode())
        return counter_key(self.seed, stream, rounds)

    def advance(self, state: dict[str, Any]) -> None:
        salt, rounds = self._counter(state)
        state[ROUNDING_KEY] = torch.tensor([salt, rounds + 1], dtype=torch.int64)

    def _counter(self, state: dict[str, Any]) -> tuple[int, int]:
        rounding = state.get(ROUNDING_KEY)
        if rounding is None:
            rounding = state[ROUNDING_KEY] = torch.tensor([self._next_salt, 0], dtype=torch.int64)
            self._next_salt += 1
        # (torch's load_state_dict widens it to fp32: exact below 2**24 steps)
        salt, rounds = rounding.tolist()
        return int(salt), int(rounds)


def _warn_kept(storage: StateStorage, state: dict[str, Any], param: torch.Tensor) -> None:
    """Warn once per storage about tensor states that are not per element (kept as they are)."""
    if getattr(storage, "_warned", False):
        return
    kept = [
        key
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
        and value.ndim > 0
        and key not in (ROUNDING_KEY,)
        and not str(key).endswith(SCALE_SUFFIX)
        and value.shape != param.shape
    ]
    if kept:
        storage._warned = True  # type: ignore[attr-defined]
        warnings.warn(
            f"state={storage.name!r}: the optimizer keeps states {kept!r} that are not per "
            f"element (shapes {[tuple(state[k].shape) for k in kept]!r} for a parameter of shape "
            f"{tuple(param.shape)!r}); they stay as the optimizer makes them",
            stacklevel=2,
        )


def _offset(param: torch.Tensor) -> int:
    """The global position of this rank's first element of ``param`` (0 where not one run)."""
    return flat_offset(param) or 0


class StochasticBf16States(Float16States):
    """Per-element states in bf16 between steps, always rounded stochastically (whatever the
    update rule), with counter-based draws kept in the state (:data:`ROUNDING_KEY`), so resume
    is bit for bit. ``state="bf16"``.

    Args:
        seed: seed of the draws, in [0, 2**64).
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__(torch.bfloat16)
        self.draws = _Draws(seed)

    def decode(self, entries: list[tuple[torch.Tensor, dict[str, Any]]]) -> None:
        for _, state in entries:
            self.draws.seen(state)
        super().decode(entries)

    def encode(self, entries: list[tuple[torch.Tensor, dict[str, Any]]], rounder: Rounder) -> None:
        for param, state in entries:
            _warn_kept(self, state, param)
            keys = elementwise_keys(state, param)
            for key in keys:
                value = state[key]
                x = local(value).float().contiguous()
                out = torch.empty_like(x, dtype=torch.bfloat16)
                stochastic_round_(x, out, self.draws.key(state, key), _offset(param))
                state[key] = wrap_like(out, value)
            if keys:
                self.draws.advance(state)

    def __repr__(self) -> str:
        return f"StochasticBf16States(seed={self.draws.seed})"


class BlockQuantizedStates(StateStorage):
    """Elementwise states stored as 8-bit codes with an fp32 scale per block (see the module).

    Args:
        block_size: elements per block within a row (default 256).
        min_numel: parameters with fewer elements keep fp32 states (default 4096).
        rounding: ``"stochastic"`` (default: unbiased, so that a moment whose update is below
            half a code's gap still moves on average) or ``"nearest"`` (torchao's and
            bitsandbytes' rounding).
        seed: seed of the stochastic draws, in [0, 2**64).
        sqrt_second_moment: store the states of :data:`SQRT_KEYS` as their square root (default);
            False stores them directly, as torchao and bitsandbytes do.

    Raises:
        ValueError: ``block_size`` not a positive int, ``min_numel`` a negative int, another
            ``rounding``, a bad seed.
    """

    one_pass = True  # the kernels step the codes in place (mixprec.optim.fused_codes)
    code_dtype: torch.dtype = torch.uint8

    def __init__(
        self,
        block_size: int = codecs.BLOCK_SIZE,
        min_numel: int = MIN_NUMEL,
        rounding: Literal["stochastic", "nearest"] = "stochastic",
        seed: int = 0,
        sqrt_second_moment: bool = True,
    ) -> None:
        if rounding not in ("stochastic", "nearest"):
            raise ValueError(f"rounding must be 'stochastic' or 'nearest', got {rounding!r}")
        self.rounding = rounding
        self.draws = _Draws(seed)
        self.sqrt_keys = SQRT_KEYS if sqrt_second_moment else frozenset()
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
            raise ValueError(
                f"min_numel must be an int >= 0 (0 quantizes every state), got {min_numel!r}"
            )
        self.block_size = block_size
        self.min_numel = min_numel

    # -- the codec of one state (local tensors) ------------------------------------------------

    def quantize(
        self, x: torch.Tensor, sqrt: bool, uniform: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (``x``'s shape) and scales (rows, blocks) of the fp32 local state ``x``
        (rounded stochastically with ``uniform`` draws of ``x``'s shape, else to nearest)."""
        raise NotImplementedError

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, sqrt: bool) -> torch.Tensor:
        """The fp32 state (``codes``' shape) of :meth:`quantize`'s result."""
        raise NotImplementedError

    # -- the storage ---------------------------------------------------------------------------

    def quantizes(self, param: torch.Tensor) -> bool:
        """Whether the states of ``param`` are stored quantized (else fp32)."""
        return (
            param.ndim >= 2
            and param.numel() >= self.min_numel
            and param.numel() > 0
            and _row_layout(param)
        )

    def decode(self, entries: list[tuple[torch.Tensor, dict[str, Any]]]) -> None:
        for _, state in entries:
            self.draws.seen(state)
            for key in [k for k in state if self._is_coded(state, k)]:
                codes, scale = state[key], state.pop(key + SCALE_SUFFIX)
                values = self.dequantize(
                    self._narrow(local(codes)), local(scale), key in self.sqrt_keys
                )
                state[key] = wrap_like(values, codes)

    def encode(self, entries: list[tuple[torch.Tensor, dict[str, Any]]], rounder: Rounder) -> None:
        for param, state in entries:
            if not self.quantizes(param):
                continue
            _warn_kept(self, state, param)
            keys = [k for k in elementwise_keys(state, param) if not self._is_coded(state, k)]
            for key in keys:  # (fp8 codes are floating tensors of the parameter's shape too)
                value = state[key]
                x = local(value).float()
                uniform = None
                if self.rounding == "stochastic":
                    uniform = self.draws.uniform(state, key, x, param)
                codes, scale = self.quantize(x, key in self.sqrt_keys, uniform)
                state[key] = wrap_like(codes, value)
                state[key + SCALE_SUFFIX] = _wrap_scale(scale, value)
            if keys and self.rounding == "stochastic":
                self.draws.advance(state)

    def attach(self, inner: torch.optim.Optimizer) -> None:
        """Narrow the codes back after ``inner.load_state_dict`` (which widens every state to
        the parameter's dtype), so a loaded state takes the stored bytes at once."""

        def narrow(optimizer: torch.optim.Optimizer) -> None:
            for state in optimizer.state.values():
                for key in [k for k in state if self._is_coded(state, k)]:
                    codes = state[key]
                    state[key] = wrap_like(self._narrow(local(codes)), codes)
                if isinstance(state.get(ROUNDING_KEY), torch.Tensor):
                    state[ROUNDING_KEY] = state[ROUNDING_KEY].to(torch.int64)

        inner.register_load_state_dict_post_hook(narrow)

    @staticmethod
    def _is_coded(state: dict[str, Any], key: object) -> bool:
        return (
            isinstance(key, str)
            and not key.endswith(SCALE_SUFFIX)
            and (key + SCALE_SUFFIX) in state
        )

    def _narrow(self, codes: torch.Tensor) -> torch.Tensor:
        # exact: the widened values are the codes themselves (0..255, or e4m3 values)
        return codes if codes.dtype == self.code_dtype else codes.to(self.code_dtype)

    def _as_rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(_rows(x.shape), -1)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(block_size={self.block_size}, min_numel={self.min_numel}, "
            f"rounding={self.rounding!r})"
        )


class Int8States(BlockQuantizedStates):
    """States as block-wise dynamic int8 codes (the dynamic map of :func:`codecs.dynamic_map`),
    1 byte per element plus an fp32 absmax per block; second moments as their square root with
    the unsigned map. See :mod:`mixprec.optim.quantized_states`."""

    name = "int8"
    code_dtype = torch.uint8

    def quantize(
        self, x: torch.Tensor, sqrt: bool, uniform: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._as_rows(x)
        u = None if uniform is None else self._as_rows(uniform)
        if not sqrt:
            codes, scale = codecs.quantize_int8(rows, True, self.block_size, u)
            return codes.view(x.shape), scale
        codes, scale = codecs.quantize_int8(rows.sqrt(), False, self.block_size, u)
        negative = rows < 0
        if bool(negative.any()):  # not a torch second moment: signed blocks, marked by -scale
            signed_root = rows.sign() * rows.abs().sqrt()
            s_codes, s_scale = codecs.quantize_int8(signed_root, True, self.block_size, u)
            blocks = self._block_mask(negative, scale.shape)
            codes = torch.where(self._per_element(blocks, rows.shape[1]), s_codes, codes)
            scale = torch.where(blocks, -s_scale, scale)
        return codes.view(x.shape), scale

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, sqrt: bool) -> torch.Tensor:
        rows = self._as_rows(codes)
        if not sqrt:
            return codecs.dequantize_int8(rows, scale, True, self.block_size).view(codes.shape)
        signed = scale < 0
        root = codecs.dequantize_int8(rows, scale.abs(), False, self.block_size)
        if bool(signed.any()):
            s_root = codecs.dequantize_int8(rows, scale.abs(), True, self.block_size)
            root = torch.where(self._per_element(signed, rows.shape[1]), s_root, root)
            return (root * root.abs()).view(codes.shape)
        return root.square().view(codes.shape)

    def _block_mask(self, elements: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        pad = shape[1] * self.block_size - elements.shape[1]
        padded = torch.nn.functional.pad(elements, (0, pad))
        return padded.view(shape[0], shape[1], self.block_size).any(-1)

    def _per_element(self, blocks: torch.Tensor, cols: int) -> torch.Tensor:
        return blocks.repeat_interleave(self.block_size, dim=1)[:, :cols]


class Fp8States(BlockQuantizedStates):
    """States as fp8 e4m3 codes with an fp32 scale per block (absmax / 448), 1 byte per element
    plus 4 per block; second moments as their (sign-keeping) square root. See
    :mod:`mixprec.optim.quantized_states`."""

    name = "fp8"
    code_dtype = codecs.FP8_DTYPE

    def quantize(
        self, x: torch.Tensor, sqrt: bool, uniform: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._as_rows(x)
        if sqrt:
            rows = rows.sign() * rows.abs().sqrt()  # the sign is free in e4m3
        u = None if uniform is None else self._as_rows(uniform)
        codes, scale = codecs.quantize_fp8(rows, self.block_size, u)
        return codes.view(x.shape), scale

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, sqrt: bool) -> torch.Tensor:
        root = codecs.dequantize_fp8(self._as_rows(codes), scale, self.block_size)
        return (root * root.abs() if sqrt else root).view(codes.shape)


def storage_named(state: str) -> StateStorage:
    """The storage of a ``state`` format name: ``"fp32"``, ``"bf16"``, ``"fp16"``, ``"fp8"``
    (e4m3, block scales) or ``"int8"`` (block-wise dynamic).

    Raises:
        ValueError: another name (``"fp8_e5m2"`` and ``"tf32"`` are refused with the reason).
    """
    if state == "fp32":
        return Fp32States()
    if state == "bf16":
        return StochasticBf16States()
    if state == "fp16":
        return Float16States(torch.float16)
    if state in ("fp8", "fp8_e4m3"):
        return Fp8States()
    if state == "int8":
        return Int8States()
    why = {
        "tf32": "tf32 is a matmul mode, not a storage format (its tensors are fp32)",
        "fp8_e5m2": "e5m2 keeps 2 fraction bits, too few for moments under block scales",
    }.get(state, "not a state format")
    raise ValueError(f"state={state!r}: {why}; choose one of {', '.join(map(repr, STATE_FORMATS))}")


def check_elementwise(optimizer: torch.optim.Optimizer, state: object) -> None:
    """Refuse a compressed ``state`` format for an optimizer whose states are not per element.

    Raises:
        ValueError: ``optimizer`` is LBFGS, Adafactor or SparseAdam (or a subclass).
    """
    for cls in type(optimizer).__mro__:
        if cls.__module__.startswith("torch.optim") and cls.__name__ in _NOT_ELEMENTWISE:
            option = "state" if isinstance(state, str) else "state_dtype"
            raise ValueError(
                f"{option}={state!r} stores per-element optimizer states, but "
                f"{type(optimizer).__name__} keeps {_NOT_ELEMENTWISE[cls.__name__]}; use "
                "state='fp32' with it, or an optimizer with elementwise states (SGD, Adam, "
                "AdamW, RMSprop, NAdam, ...) for state='bf16', 'fp8' or 'int8'"
            )


def make_storage(
    optimizer: torch.optim.Optimizer,
    state: str | torch.dtype | Mapping[torch.Tensor, str] | None = None,
    state_dtype: torch.dtype | None = None,
) -> StateStorage:
    """The storage of a wrapper's ``state`` option (or its older ``state_dtype``), checked
    against ``optimizer`` (the wrapper then calls :func:`attach_storage`). A mapping of
    parameter -> format name gives each parameter its own format
    (:class:`~mixprec.optim.per_param_states.PerParameterStates`; fp32 for those it omits).

    Raises:
        TypeError: ``state`` is neither a format name, a torch.dtype, a mapping nor None.
        ValueError: both options given; an unknown format; an optimizer whose states are not
            elementwise with a compressed format.
    """
    if state is not None and state_dtype is not None:
        raise ValueError(
            f"give state={state!r} or state_dtype={state_dtype!r}, not both; state is the "
            "newer name (state='bf16' is state_dtype=torch.bfloat16)"
        )
    if state is not None and not isinstance(state, (str, torch.dtype, Mapping)):
        raise TypeError(
            f"state must be one of {', '.join(map(repr, STATE_FORMATS))} (or a torch.dtype), "
            f"got {type(state).__name__} {state!r}"
        )
    if isinstance(state, Mapping):  # parameter -> format: each parameter in its own
        from mixprec.optim.per_param_states import PerParameterStates

        per_param = PerParameterStates(state)
        compressed = sorted(set(per_param.formats.values()) - {"fp32"})
        if compressed:
            check_elementwise(optimizer, compressed[0])
        return per_param
    if isinstance(state, str):
        storage = storage_named(state)
    else:  # a dtype, by either name: torch.float32, bfloat16 or float16
        storage = storage_for(state if state is not None else state_dtype)
    if not isinstance(storage, Fp32States):
        check_elementwise(optimizer, state if state is not None else state_dtype)
    return storage


def attach_storage(storage: StateStorage, inner: torch.optim.Optimizer) -> None:
    """Let ``storage`` see ``inner``'s loads (:meth:`BlockQuantizedStates.attach`); a wrapper
    calls it once it has accepted ``inner``."""
    attach = getattr(storage, "attach", None)
    if callable(attach):
        attach(inner)
