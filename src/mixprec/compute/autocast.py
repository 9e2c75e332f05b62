"""``mixprec.autocast``: a drop-in for ``torch.autocast`` with editable op policies, two backends.

Design note: one ``TorchFunctionMode`` per thread sees every torch call inside a mixprec region and
looks the op up in the region's :class:`~mixprec.compute.ops.OpTable`. The regions form a
thread-local stack (inner regions win, as with ``torch.autocast``), so nesting, decorators and FP32
islands are pushes and pops on that stack, and every exit restores what the entry saw.

* **native** enters ``torch.autocast`` itself; the mode only steps in for ops whose category the
  user changed, and to serve weight casts from mixprec's cache.
* **emulated** leaves torch's autocast off; GEMM-class ops get 16-bit inputs and run through
  :mod:`mixprec.compute.emulated` (fp32 accumulation, one rounding), other ``"lower"`` ops run
  natively on 16-bit tensors, ``"fp32"`` and ``"promote"`` ops are cast as torch would.

The weight-cast cache is keyed by the tensor *and its version counter*: ``torch.autocast``'s own
cache keeps serving the old cast after an in-place update inside the region (an optimizer step
between two forwards), so torch's cache is always off and this one replaces it.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

import torch
from torch.overrides import TorchFunctionMode

from mixprec.compute.emulated import emulated_call
from mixprec.compute.ops import GEMM_OPS, OpTable, canonical_op_name, op_table
from mixprec.formats import resolve_format

__all__ = ["Backend", "autocast", "current_region"]

Backend = Literal["auto", "native", "emulated"]
_BACKENDS: tuple[str, ...] = get_args(Backend)
_LOW_DTYPES = (torch.float16, torch.bfloat16)
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)  # as torch: fp64 is never autocast
_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Region:
    """One active autocast region: what the dispatcher consults for every op."""

    device_type: str
    dtype: torch.dtype
    enabled: bool
    backend: str
    table: OpTable
    defaults: OpTable


class _CastCache:
    """Casts of leaf tensors that require grad (weights), valid while their version is unchanged."""

    def __init__(self) -> None:
        self._entries: dict[tuple[int, torch.dtype], tuple[Any, int, bool, torch.Tensor]] = {}

    def cast(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not (t.is_leaf and t.requires_grad):
            return t.to(dtype)
        key = (id(t), dtype)
        grad_mode = torch.is_grad_enabled()
        entry = self._entries.get(key)
        if entry is not None:
            ref, version, cached_grad_mode, cast = entry
            if ref() is t and version == t._version and cached_grad_mode == grad_mode:
                return cast
        cast = t.to(dtype)
        self._entries[key] = (weakref.ref(t), t._version, grad_mode, cast)
        return cast


class _State(threading.local):
    def __init__(self) -> None:
        self.regions: list[Region] = []
        self.mode: _Dispatch | None = None
        self.cache: _CastCache | None = None


_state = _State()


def current_region() -> Region | None:
    """The innermost active mixprec autocast region of this thread, or None."""
    return _state.regions[-1] if _state.regions else None


@contextmanager
def _torch_autocast_off(device_type: str) -> Iterator[None]:
    previous = torch.is_autocast_enabled(device_type)
    torch.set_autocast_enabled(device_type, False)
    try:
        yield
    finally:
        torch.set_autocast_enabled(device_type, previous)


def _cast(tree: Any, dtype: torch.dtype, cache: _CastCache | None) -> Any:
    if isinstance(tree, torch.Tensor):
        if tree.dtype in _CASTABLE and tree.dtype != dtype:
            return cache.cast(tree, dtype) if cache is not None else tree.to(dtype)
        return tree
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cast(v, dtype, cache) for v in tree)
    if isinstance(tree, dict):
        return {k: _cast(v, dtype, cache) for k, v in tree.items()}
    return tree


def _widest(tree: Any, found: list[torch.dtype]) -> None:
    if isinstance(tree, torch.Tensor) and tree.dtype in _CASTABLE:
        found.append(tree.dtype)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            _widest(v, found)
    elif isinstance(tree, dict):
        for v in tree.values():
            _widest(v, found)


def _device_type_of(tree: Any) -> str | None:
    if isinstance(tree, torch.Tensor):
        return tree.device.type
    if isinstance(tree, (list, tuple)):
        items: Any = tree
    elif isinstance(tree, dict):
        items = tree.values()
    else:
        return None
    for v in items:
        found = _device_type_of(v)
        if found is not None:
            return found
    return None


class _Dispatch(TorchFunctionMode):
    """Applies the innermost region's op table to every torch call."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        call_kwargs: dict[str, Any] = dict(kwargs or {})  # a fresh dict: casting replaces values
        region = current_region()
        if region is None or not region.enabled:
            return func(*args, **call_kwargs)
        name = canonical_op_name(func)
        category = region.table[name]
        if category == "keep":
            return func(*args, **call_kwargs)
        if _device_type_of((args, call_kwargs)) not in (region.device_type, None):
            return func(*args, **call_kwargs)  # as torch: a region only touches its device's ops
        native = region.backend == "native"
        if native and category == region.defaults[name] and category != "lower":
            return func(*args, **call_kwargs)  # torch.autocast does exactly this already
        if category == "lower":
            args, call_kwargs = _cast((args, call_kwargs), region.dtype, _state.cache)
            if not native and name in GEMM_OPS:
                return emulated_call(func, args, call_kwargs, region.dtype)
            if not native or region.defaults[name] == "lower":
                return func(*args, **call_kwargs)
            with _torch_autocast_off(region.device_type):
                return func(*args, **call_kwargs)
        target = torch.float32
        if category == "promote":
            dtypes: list[torch.dtype] = []
            _widest((args, call_kwargs), dtypes)
            if not dtypes:
                return func(*args, **call_kwargs)
            target = max(dtypes, key=lambda d: (d.itemsize, d == torch.float32))
        args, call_kwargs = _cast((args, call_kwargs), target, None)
        with _torch_autocast_off(region.device_type):
            return func(*args, **call_kwargs)


def _check_device_type(device_type: object) -> str:
    if not isinstance(device_type, str):
        raise TypeError(
            f"device_type must be a string such as 'cpu' or 'cuda', got "
            f"{type(device_type).__name__} {device_type!r}"
        )
    try:
        available = torch._C._is_autocast_available(device_type)
    except RuntimeError:  # not even a torch device type
        available = False
    if not available:
        valid = [
            d for d in ("cpu", "cuda", "mps", "xpu", "hpu") if torch._C._is_autocast_available(d)
        ]
        raise ValueError(
            f"autocast is not available for device type {device_type!r}; valid device types: "
            f"{', '.join(valid)}"
        )
    return device_type


def _check_dtype(dtype: object, device_type: str) -> torch.dtype:
    if dtype is None:
        return torch.get_autocast_dtype(device_type)
    resolved = resolve_format(dtype).dtype if isinstance(dtype, str) else dtype  # type: ignore[arg-type]
    if resolved not in _LOW_DTYPES:
        raise ValueError(
            f"autocast dtype {dtype!r} is not supported; valid dtypes: torch.float16, "
            "torch.bfloat16 (for fp32 everywhere, pass enabled=False)"
        )
    return resolved  # type: ignore[return-value]


class autocast:  # lower case: named as torch.autocast, which it replaces
    """A drop-in for ``torch.autocast`` with editable op policies and an emulated backend.

    Args:
        device_type: ``"cpu"``, ``"cuda"``, ... as for ``torch.autocast``.
        dtype: the 16-bit dtype (``torch.float16``/``torch.bfloat16`` or ``"fp16"``/``"bf16"``);
            default: torch's autocast dtype for the device (bf16 on CPU, fp16 on CUDA).
        enabled: ``False`` makes the region (and any region it encloses) run in fp32.
        cache_enabled: reuse weight casts inside the region (cast once per weight version).
        backend: ``"native"`` (``torch.autocast``), ``"emulated"`` (fp32 GEMMs with 16-bit
            numerics) or ``"auto"`` (native where the hardware has fast 16-bit GEMMs for ``dtype``,
            emulated where it does not). The choice and its reason are in :attr:`backend` and
            :attr:`reason`.
        ops: op-table edits for this region, op name -> ``"lower"``, ``"fp32"``, ``"promote"`` or
            ``"keep"``, e.g. ``{"softmax": "fp32", "baddbmm": "fp32"}``.

    Raises:
        ValueError: unknown device type, unsupported dtype, unknown backend or op name.
        TypeError: wrong argument types.

    Example:
        >>> model = torch.nn.Linear(8, 8)
        >>> with autocast("cpu", dtype=torch.bfloat16, backend="emulated"):
        ...     y = model(torch.randn(2, 8))
        >>> y.dtype
        torch.bfloat16
    """

    def __init__(
        self,
        device_type: str,
        dtype: torch.dtype | str | None = None,
        enabled: bool = True,
        cache_enabled: bool | None = None,
        *,
        backend: Backend = "auto",
        ops: Mapping[str, str] | None = None,
    ) -> None:
        self.device_type = _check_device_type(device_type)
        self.dtype = _check_dtype(dtype, self.device_type)
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__} {enabled!r}")
        self.enabled = enabled
        self.cache_enabled = True if cache_enabled is None else bool(cache_enabled)
        if backend not in _BACKENDS:
            raise ValueError(
                f"unknown autocast backend {backend!r}; valid backends: "
                f"{', '.join(map(repr, _BACKENDS))}"
            )
        from mixprec.hardware import choose_backend  # the probe is cached after its first run

        self.backend, self.reason = choose_backend(self.device_type, self.dtype, backend)
        defaults = op_table(self.device_type, self.dtype)
        table = defaults.with_overrides(ops)  # validates ops
        self._ops = dict(ops) if ops else None
        self._region = Region(
            self.device_type,
            self.dtype,
            enabled,
            self.backend,
            table,
            defaults,
        )
        self._saved: list[tuple[int, Any]] = []

    @property
    def op_table(self) -> OpTable:
        """The effective op table of this region (defaults plus ``ops`` edits)."""
        return self._region.table

    def __enter__(self) -> autocast:
        depth = len(_state.regions)
        native = torch.autocast(
            self.device_type,
            dtype=self.dtype,
            enabled=self.enabled and self.backend == "native",
            cache_enabled=False,
        )
        native.__enter__()
        _state.regions.append(self._region)
        if depth == 0:
            _state.cache = _CastCache() if self.cache_enabled else None
            _state.mode = _Dispatch()
            _state.mode.__enter__()
        self._saved.append((depth, native))
        return self

    def __exit__(self, *exc_info: object) -> None:
        depth, native = self._saved.pop()
        del _state.regions[depth:]  # also drops regions an exception left open inside
        if depth == 0 and _state.mode is not None:
            _state.mode.__exit__(None, None, None)
            _state.mode = None
            _state.cache = None
        native.__exit__(*exc_info)

    def __call__(self, func: _F) -> _F:
        """Use as a decorator: every call of ``func`` runs inside a fresh region like this one."""

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self._copy():
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    def _copy(self) -> autocast:
        return autocast(
            self.device_type,
            self.dtype,
            self.enabled,
            self.cache_enabled,
            backend=self.backend,  # type: ignore[arg-type]
            ops=self._ops,
        )

    def __repr__(self) -> str:
        return (
            f"mixprec.autocast({self.device_type!r}, dtype={self.dtype}, enabled={self.enabled}, "
            f"backend={self.backend!r})"
        )
