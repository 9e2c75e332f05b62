"""``mixprec.autocast``: ``torch.autocast`` plus an emulated backend, edited op lists and targets.

Design note: a region enters ``torch.autocast`` itself (with torch's cast cache off), so for torch
and for every library asking torch it *is* an autocast region: ``torch.is_autocast_enabled()``,
``get_autocast_dtype()``, a nested ``torch.autocast(enabled=False)``, ``custom_fwd`` and activation
checkpointing behave exactly as under ``torch.autocast``, and ``torch.compile`` sees the autocast
state it knows. What mixprec adds is a :class:`~mixprec.compute.kernels.RegionConfig` — backend,
op table, target device — pushed for the region's lifetime and read by mixprec's dispatcher kernels
(:mod:`mixprec.compute.kernels`), which are registered for the ops a region changes the first time
such a region is entered. A native region with torch's op list changes nothing: its ops run on
torch's own kernels.

Inside a function that ``torch.compile`` compiles, a region's construction, entry and exit run
eagerly (each a graph break) and the code inside is compiled under the region; a region entered
outside compiled code (the usual loop: ``with mp.autocast(): loss = compiled_model(x)``) adds no
graph break, nor do the FP32 islands' hooks inside the model. ``torch.compile`` cannot see a
region's backend or op table, so entering a region whose settings differ from the last region's
resets its caches (compiled code is traced again under the new settings): with compile, keep one
setting per process where you can.

Casts are not cached: a cast cache keyed by tensor cannot see a weight changed through ``.data``
(``p.data.mul_(2)``, EMA swaps), and torch's own serves the stale cast then. ``cache_enabled`` is
accepted for compatibility and leaves torch's cache off; the cost is one cast per use of a weight
(a weight used once per forward, the usual case, is cast once either way).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, get_args

import torch

from mixprec.compute.kernels import RegionConfig, depth, ensure_kernels, pop_config, push_config
from mixprec.compute.ops import AutocastDeviceError, OpTable, check_device_type, op_table
from mixprec.formats import resolve_format

__all__ = ["AutocastDeviceError", "Backend", "autocast", "current_region"]

Backend = Literal["auto", "native", "emulated"]
_BACKENDS: tuple[str, ...] = get_args(Backend)
_TARGETS = ("cpu", "cuda")
_LOW_DTYPES = (torch.float16, torch.bfloat16)
_F = TypeVar("_F", bound=Callable[..., Any])


class _Open(threading.local):
    def __init__(self) -> None:
        self.regions: list[autocast] = []


_open = _Open()


def current_region() -> autocast | None:
    """The innermost mixprec autocast region this thread has open, or None."""
    return _open.regions[-1] if _open.regions else None


def _check_bool(name: str, value: object, allow_none: bool = False) -> None:
    if isinstance(value, bool) or (allow_none and value is None):
        return
    raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")


def _check_dtype(dtype: object, device_type: str) -> torch.dtype:
    if dtype is None:
        return torch.get_autocast_dtype(device_type)
    if isinstance(dtype, str):
        return resolve_format(dtype).dtype
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"dtype must be a torch.dtype or a format name such as 'bf16', got "
            f"{type(dtype).__name__} {dtype!r}"
        )
    return dtype


def _is_sub_16_bit_float(dtype: torch.dtype) -> bool:
    return str(dtype).startswith(("torch.float8", "torch.float4"))


def _check_target(target: object, device_type: str, requested_backend: str) -> str:
    if target is None:
        return device_type if device_type in _TARGETS else "cuda"
    if target not in _TARGETS:
        raise ValueError(
            f"unknown target {target!r}: a target names the device whose autocast op list the "
            f"region applies; valid targets: {', '.join(map(repr, _TARGETS))}"
        )
    if target != device_type and requested_backend == "native":
        raise ValueError(
            f"target={target!r} with backend='native' on {device_type!r}: another device's op "
            "list is emulated; use backend='emulated' (or 'auto', which then emulates)"
        )
    return target  # type: ignore[return-value]


def _keep_16_bit_casts_compiled() -> None:
    """Make inductor round where a 16-bit cast is, as eager does, from the first region on.

    By default inductor keeps a fused chain of elementwise ops in fp32 and drops the
    ``x.to(fp16).to(fp32)`` pairs between them, so a compiled fp16 backward can hold 141600 where
    eager holds inf, and the step that should be skipped is taken. ``emulate_precision_casts``
    makes it round at each cast. It is set, not patched for the region: the backward graph is
    compiled at the first ``backward()``, after the region has exited. Plain ``torch.autocast``
    code compiled later in the process gets eager's roundings too (what eager computes).
    """
    if not _INDUCTOR_CONFIG:  # imported once: an import statement per region costs ~10 us
        import torch._inductor.config as config

        _INDUCTOR_CONFIG.append(config)
    config = _INDUCTOR_CONFIG[0]
    if getattr(config, "emulate_precision_casts", True) is False:
        config.emulate_precision_casts = True


_INDUCTOR_CONFIG: list[Any] = []


class autocast:  # lower case: named as torch.autocast, which it replaces
    """A drop-in for ``torch.autocast`` with an emulated backend, editable op lists and targets.

    Args:
        device_type: ``"cpu"``, ``"cuda"``, ... as for ``torch.autocast``.
        dtype: the 16-bit dtype (``torch.float16``/``torch.bfloat16`` or ``"fp16"``/``"bf16"``);
            default: torch's autocast dtype for the device (bf16 on CPU, fp16 on CUDA). A dtype
            the device's autocast does not support warns and disables the region, as torch does.
        enabled: ``False`` makes the region (and any region it encloses) run in fp32.
        cache_enabled: accepted for compatibility; casts are never cached (see the module note).
        backend: ``"native"`` (torch's kernels), ``"emulated"`` (GEMMs in fp32 on 16-bit inputs,
            one rounding: 16-bit numerics at fp32 speed) or ``"auto"`` (native where the hardware
            has fast 16-bit GEMMs for ``dtype``, else emulated). See :attr:`backend` and
            :attr:`reason`.
        ops: op-table edits, aten op name -> ``"lower"``, ``"fp32"``, ``"promote"`` or ``"keep"``,
            e.g. ``{"softmax": "fp32", "baddbmm": "fp32"}``.
        target: the device type whose op list to apply (``"cpu"`` or ``"cuda"``; default: the
            device's own). ``target="cuda"`` on a CPU predicts what a GPU fp16 run does (CUDA puts
            ``exp``, ``pow``, ``softmax`` in fp32); it runs on the emulated backend.

    Raises:
        AutocastDeviceError: unknown device type (a ``RuntimeError`` and a ``ValueError``).
        ValueError: unknown backend, target or op name, or a target with ``backend="native"``;
            an fp8/fp4 dtype in an enabled region (FP8 compute is a recipe, not a region); a
            dtype that is no float (``torch.int8``) or ``torch.float64`` in an enabled region
            (torch would warn and run fp32; ``torch.float32`` still does that, as in torch).
        TypeError: wrong argument types.

    Example:
        >>> model = torch.nn.Linear(8, 8)
        >>> with autocast("cpu", dtype=torch.float16, backend="emulated"):
        ...     y = model(torch.randn(2, 8))
        ...     with torch.autocast("cpu", enabled=False):
        ...         z = model(torch.randn(2, 8))
        >>> y.dtype, z.dtype
        (torch.float16, torch.float32)
    """

    @torch._dynamo.disable  # validation and the hardware choice run eagerly, never traced
    def __init__(
        self,
        device_type: str,
        dtype: torch.dtype | str | None = None,
        enabled: bool = True,
        cache_enabled: bool | None = None,
        *,
        backend: Backend = "auto",
        ops: Mapping[str, str] | None = None,
        target: str | None = None,
    ) -> None:
        self.device_type = check_device_type(device_type)
        _check_bool("enabled", enabled)
        _check_bool("cache_enabled", cache_enabled, allow_none=True)
        if backend not in _BACKENDS:
            raise ValueError(
                f"unknown autocast backend {backend!r}; valid backends: "
                f"{', '.join(map(repr, _BACKENDS))}"
            )
        self.dtype = _check_dtype(dtype, self.device_type)
        if enabled and (not self.dtype.is_floating_point or self.dtype == torch.float64):
            # torch would warn and run fp32 (issue: accepted and not applied), so refuse, as a
            # format name that is no autocast dtype is refused.
            raise ValueError(
                f"In {self.device_type} autocast, but the target dtype {self.dtype} is not "
                "supported: an autocast region computes in torch.bfloat16 or torch.float16 "
                "(torch.float32 disables it, as torch's autocast does). Pass one of those, or "
                "enabled=False for a region that changes nothing"
            )
        if enabled and _is_sub_16_bit_float(self.dtype):
            # torch would warn and run fp32; a user asking for FP8 numerics gets none, so refuse.
            raise ValueError(
                f"autocast does not compute in {self.dtype} (fp8/fp4): its regions compute in "
                "fp16 or bf16. FP8 compute is a recipe on the linear layers: "
                "MixedPrecision('fp8-mixed') or a policy with compute=fp8:<recipe> (e.g. "
                "'compute=fp8:tensorwise'); or pass dtype=torch.bfloat16/torch.float16 here"
            )
        self.cache_enabled = cache_enabled
        self.target = _check_target(target, self.device_type, backend)
        torch_table = op_table(self.device_type, self.dtype)
        table = op_table(self.target, self.dtype).with_overrides(ops)  # validates ops
        if enabled and self.dtype not in _LOW_DTYPES:
            # torch decides, with its own warning text: an unsupported dtype disables the region
            enabled = torch.autocast(self.device_type, dtype=self.dtype)._enabled
        self.enabled = enabled
        if not enabled:
            self.backend, self.reason = "native", "disabled: fp32 everywhere"
        elif self.target != self.device_type and backend == "auto":
            self.backend, self.reason = "emulated", f"emulates the {self.target} op list"
        else:
            from mixprec.hardware import choose_backend  # the probe is cached after its first run

            self.backend, self.reason = choose_backend(self.device_type, self.dtype, backend)
        self._config = RegionConfig(self.device_type, self.backend, table, torch_table, self.target)
        self._entered: dict[int, list[tuple[torch.autocast, int]]] = {}  # per thread: reentrant

    @property
    def op_table(self) -> OpTable:
        """The effective op table of this region (the target's defaults plus ``ops`` edits)."""
        return self._config.table

    @torch._dynamo.disable
    def __enter__(self) -> autocast:
        native = torch.autocast(
            self.device_type, dtype=self.dtype, enabled=self.enabled, cache_enabled=False
        )
        if self.enabled:  # a disabled region turns autocast off: no kernel of ours runs inside
            ensure_kernels(self._config)
            _keep_16_bit_casts_compiled()
        native.__enter__()
        self._entered.setdefault(threading.get_ident(), []).append(
            (native, depth(self.device_type))
        )
        if self.enabled:
            push_config(self._config)
        _open.regions.append(self)
        return self

    @torch._dynamo.disable
    def __exit__(self, *exc_info: object) -> None:
        entered = self._entered.get(threading.get_ident())
        if not entered:
            where = "another thread" if self._entered else "no thread"
            raise RuntimeError(
                f"{self!r} was exited by thread {threading.get_ident()}, but {where} entered it: "
                "autocast state is per thread, so a region must be exited by the thread that "
                "entered it"
            )
        native, config_depth = entered.pop()
        if not entered:
            del self._entered[threading.get_ident()]
        if self.enabled:
            pop_config(self._config, config_depth)
        if self in _open.regions:
            del _open.regions[_open.regions.index(self) :]
        native.__exit__(*exc_info)

    def __call__(self, func: _F) -> _F:
        """Use as a decorator: every call of ``func`` runs inside a region like this one."""
        if not callable(func):
            raise TypeError(
                f"autocast()(func) requires a callable, but got {type(func).__name__}; use "
                "`with autocast(...):` to run a block of code"
            )

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self:
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    def __repr__(self) -> str:
        target = "" if self.target == self.device_type else f", target={self.target!r}"
        return (
            f"mixprec.autocast({self.device_type!r}, dtype={self.dtype}, enabled={self.enabled}, "
            f"backend={self.backend!r}{target})"
        )
