"""mixprec's kernels in torch's dispatcher, at the ``Autocast*`` keys, for the ops it treats anew.

Design note: a mixprec region *is* a ``torch.autocast`` region: torch's autocast state (enabled,
dtype) is set as ``torch.autocast`` sets it, so ``torch.is_autocast_enabled()``, a nested
``torch.autocast(enabled=False)``, ``custom_fwd`` and activation checkpointing all see and restore
it, and ``torch.compile`` records it in its graphs. What a region changes — the emulated GEMMs, an
edited op table, another device's op list — lives in kernels registered here, at the autocast
dispatch key of the device, for exactly the ops concerned (registered on first use, never at
import). Each kernel first asks whether the running region is a mixprec one; if not, it calls the
kernel torch had registered there before (or, where torch had none, passes the call on), so a plain
``torch.autocast`` region computes what it always did.

Which region is running: mixprec regions run torch's autocast with its cast cache off (a cached
cast goes stale when a weight changes through ``.data``), and their configuration is kept on a
thread-local stack, and process-wide as the last one entered. An autocast-enabled kernel call with
the cache off is a mixprec call; it takes the innermost configuration of its thread, or the last
one entered when its thread has none — which is how the recomputation of a checkpointed forward in
``backward()`` (after the region has closed, perhaps on an autograd worker thread) runs under the
precision of the original forward: ``torch.utils.checkpoint`` restores the autocast state, cache
flag included. The fallback applies only inside ``backward()`` and never while ``torch.compile``
traces (which turns the cache off for every region); its cost: code under a plain
``torch.autocast(cache_enabled=False)`` that runs inside ``backward()`` after a mixprec region
(e.g. a checkpointed plain region) is treated as that mixprec region.

Inside an emulated composite GEMM (``linear``, ``matmul``, ``einsum``, ``conv2d``, attention), the
inputs are cast once and the op is decomposed by the dispatcher with autocast still on, so its
primitive GEMMs reach their emulated kernels; every other op inside passes through uncast, as
inside torch's own lowered ops.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch._C import DispatchKey, DispatchKeySet
from torch.utils._pytree import tree_leaves, tree_map_only

from mixprec.compute import emulated_cpp
from mixprec.compute._eager import plain_eager
from mixprec.compute.emulated import EAGER_GEMMS, EMULATED_OPS
from mixprec.compute.ops import (
    BANNED_CUDA,
    COMPOSITE_GEMMS,
    GEMM_OPS,
    OpTable,
    aten_op,
    autocast_key,
    op_table,
)

__all__ = ["RegionConfig", "active_config", "ensure_kernels", "pop_config", "push_config"]


@dataclass(frozen=True)
class RegionConfig:
    """What a mixprec region changes in torch's autocast: the backend and the effective op table.

    Attributes:
        device_type: the region's device type.
        backend: ``"native"`` (torch's kernels) or ``"emulated"`` (GEMMs as custom ops).
        table: the op table the region applies (a target device's defaults plus edits).
        torch_table: torch's own table for ``device_type`` (what needs no kernel of ours).
        target: the device type whose op list ``table`` starts from.
    """

    device_type: str
    backend: str
    table: OpTable
    torch_table: OpTable
    target: str

    def kernel_ops(self) -> frozenset[str]:
        """The aten ops this region needs a mixprec kernel for."""
        ops = set(self.table.differences(self.torch_table))
        if self.backend == "emulated":
            ops |= GEMM_OPS | COMPOSITE_GEMMS
        if self.target == "cuda" and self.device_type != "cuda":
            ops |= BANNED_CUDA
        return frozenset(ops)


class _Stack(threading.local):
    def __init__(self) -> None:
        self.configs: dict[str, list[RegionConfig]] = {}
        self.inside_lowered = 0
        self.fast_ops = 0  # what this thread last told the C++ autocast kernels


_tls = _Stack()
_last: dict[str, RegionConfig] = {}  # per device type: the last configuration entered anywhere
_registered: dict[str, set[str]] = {}
_kernels: dict[tuple[str, str], Callable[..., Any]] = {}  # (device type, op): its Python kernel
_ensured: dict[str, RegionConfig] = {}  # per device type: the last configuration ensured
_libraries: list[torch.library.Library] = []
_lock = threading.Lock()
# The ops with a C++ autocast kernel on the CPU (_emulate_autocast.cpp: linear_autocast,
# conv_autocast), their bits in its mask, and those installed in this process.
_CPP_KERNELS = {"linear": 1, "conv1d": 2, "conv2d": 4, "conv3d": 8}
_installed: set[str] = set()
_installed_engine: list[Any] = []
_masks: dict[int, tuple[RegionConfig, int]] = {}


def _same_kernels(a: RegionConfig, b: RegionConfig) -> bool:
    """Whether the two configurations make mixprec's kernels do the same thing."""
    if (a.backend, a.target) != (b.backend, b.target):
        return False
    return a.table is b.table or dict(a.table.entries) == dict(b.table.entries)


def _fast_ops(config: RegionConfig) -> int:
    """The C++ autocast kernels' bit mask of the ops ``config`` lets take their shortcut (an
    emulated region lowering them), among those installed; 0 for none."""
    found = _masks.get(id(config))
    if found is not None and found[0] is config:
        return found[1]
    mask = 0
    if config.backend == "emulated":
        for name in _installed:
            if _plan(name, config) == "lower":
                mask |= _CPP_KERNELS[name]
    if len(_masks) > 64:
        _masks.clear()
    _masks[id(config)] = (config, mask)
    return mask


def _set_fast_ops(stack: list[RegionConfig]) -> None:
    """Tell the C++ autocast kernels (when installed) what this thread's innermost region allows."""
    if not _installed:
        return
    mask = _fast_ops(stack[-1]) if stack else 0
    if mask != _tls.fast_ops:
        _tls.fast_ops = mask
        _installed_engine[0].set_fast_autocast(mask)


def push_config(config: RegionConfig) -> None:
    """Make ``config`` the innermost configuration of this thread (a region's entry).

    ``torch.compile`` guards on torch's autocast state but cannot see a configuration, so a
    function compiled under one would be reused under another: when a configuration differs from
    the last one entered for its device, torch.compile's caches are reset and compiled code is
    traced again under the new one.
    """
    previous = _last.get(config.device_type)
    if previous is not None and not _same_kernels(previous, config):
        torch.compiler.reset()
    stack = _tls.configs.setdefault(config.device_type, [])
    stack.append(config)
    _last[config.device_type] = config
    if config.device_type == "cpu":
        _set_fast_ops(stack)


def pop_config(config: RegionConfig, depth: int) -> None:
    """Drop ``config`` and anything above it from this thread's stack (a region's exit)."""
    stack = _tls.configs.get(config.device_type, [])
    del stack[depth:]
    if config.device_type == "cpu":
        _set_fast_ops(stack)


def depth(device_type: str) -> int:
    """How many mixprec configurations this thread has open for ``device_type``."""
    return len(_tls.configs.get(device_type, ()))


def active_config(device_type: str) -> RegionConfig | None:
    """The configuration a kernel call for ``device_type`` runs under, or None outside mixprec."""
    if torch.is_autocast_cache_enabled():
        return None  # a plain torch.autocast region: mixprec regions run with the cache off
    stack = _tls.configs.get(device_type)
    if stack:
        return stack[-1]
    if torch._C._current_graph_task_id() == -1 or torch.compiler.is_compiling():
        return None  # not a recomputation inside backward(): a plain region with its cache off
    return _last.get(device_type)


def ensure_kernels(config: RegionConfig) -> None:
    """Register mixprec's kernel at the device's autocast key for every op ``config`` needs.

    A region entered again (every forward of a prepared model) has the settings of the last one
    ensured, which is checked without recomputing the ops.
    """
    last = _ensured.get(config.device_type)
    if last is not None and _same_kernels(last, config):
        return
    needed = config.kernel_ops()
    done = _registered.setdefault(config.device_type, set())
    engine = _cpp_engine(config)
    # ops whose Python kernel an earlier region (native, or before the build) registered alone
    to_install: frozenset[str] = frozenset()
    if engine is not None:
        to_install = (needed & _CPP_KERNELS.keys()) - _installed
    if needed <= done and not to_install:
        _ensured[config.device_type] = config
        return
    with _lock:
        for kind in ("cpu", "cuda"):  # torch's own lists, read before any kernel of ours exists
            op_table(kind, torch.float16)
        key = autocast_key(config.device_type)
        library = torch.library.Library("aten", "IMPL")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "(?s).*Overriding a previously registered kernel")
            for name in sorted(needed - done):
                kernel = _make_kernel(name, config.device_type, key)
                _kernels[config.device_type, name] = kernel
                if name not in to_install:
                    library.impl(name, kernel, key, with_keyset=True)
                done.add(name)
            for name in sorted(to_install):
                _install_cpp_kernel(engine, name, _kernels[config.device_type, name])
        _libraries.append(library)  # registrations live as long as their library object
    _ensured[config.device_type] = config


def _cpp_engine(config: RegionConfig) -> Any:
    """The C++ library whose autocast kernels take linear and conv layers' shortcut in C++, where
    ``config`` is an emulated CPU region and it builds (or was built already); else None."""
    if config.device_type != "cpu":
        return None
    if _installed_engine:
        return _installed_engine[0]
    if config.backend != "emulated":
        return None  # a native region with edited op lists does not build the C++ kernels
    from mixprec.compute.emulated_cpp import engine

    found = engine("cpu")
    if found is not None:
        _installed_engine.append(found)
    return found


def _install_cpp_kernel(engine: Any, name: str, kernel: Callable[..., Any]) -> None:
    """Put ``name``'s C++ autocast kernel in front of ``kernel`` (the Python one): ``kernel`` is
    registered for the op's twin ``mixprec_emulate::autocast_<name>``, which the C++ kernel
    redispatches to wherever its shortcut does not apply (``_emulate_autocast.cpp``)."""
    library = torch.library.Library("mixprec_emulate", "IMPL")
    library.impl(f"autocast_{name}", kernel, "AutocastCPU", with_keyset=True)
    _libraries.append(library)
    engine.install_autocast(name)
    _installed.add(name)


def _eligible(t: torch.Tensor, device_type: str) -> bool:
    return t.is_floating_point() and t.dtype != torch.float64 and t.device.type == device_type


def _cast(tree: Any, dtype: torch.dtype, device_type: str) -> Any:
    return _map_tensors(tree, lambda t: t.to(dtype) if _eligible(t, device_type) else t)


def _map_tensors(tree: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``tree_map_only(torch.Tensor, fn, tree)`` for an op's ``(args, kwargs)``: tuples, lists
    and dicts walked directly (pytree's generic walk costs more than a small op itself); any
    other container goes to pytree."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    kind = type(tree)
    if kind is tuple or kind is list:
        return kind(_map_tensors(item, fn) for item in tree)
    if kind is dict:
        return {key: _map_tensors(value, fn) for key, value in tree.items()}
    if isinstance(tree, (tuple, list, dict)):  # a namedtuple, an immutable_list, ...
        return tree_map_only(torch.Tensor, fn, tree)
    return tree


def _tensor_leaves(tree: Any) -> list[Any]:
    """``tree_leaves(tree)`` restricted to what :func:`_map_tensors` walks (same order)."""
    kind = type(tree)
    if kind is tuple or kind is list:
        return [leaf for item in tree for leaf in _tensor_leaves(item)]
    if kind is dict:
        return [leaf for value in tree.values() for leaf in _tensor_leaves(value)]
    if isinstance(tree, (tuple, list, dict)):
        return tree_leaves(tree)
    return [tree]


def _promoted(tree: Any, start: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype torch's autocast ``promote`` casts to: fp32 if any eligible input is fp32, else
    the autocast dtype; fp64 inputs are left out."""
    result = start
    for t in _tensor_leaves(tree):
        if not (isinstance(t, torch.Tensor) and _eligible(t, device_type)):
            continue
        if torch.float32 in (result, t.dtype):
            result = torch.float32
        elif t.dtype != result:
            raise RuntimeError(
                f"a promote op got a {t.dtype} input in a {start} autocast region: torch's "
                "autocast promotes 16-bit inputs only to fp32; cast the inputs to one dtype first"
            )
    return result


def _make_kernel(name: str, device_type: str, key: str) -> Callable[..., Any]:
    op = aten_op(name)
    qualified = f"aten::{name}"
    torch_kernel = None
    if torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key):
        torch_kernel = torch.library.get_kernel(op, key)
    below = torch._C._dispatch_keyset_full_after(getattr(DispatchKey, key))
    excluded = DispatchKeySet(getattr(DispatchKey, key))
    emulated = EMULATED_OPS.get(name)
    composite = name in COMPOSITE_GEMMS
    shortcut = _SHORTCUTS.get(name)
    # What a configuration makes this op do, worked out once per configuration: a prepared model
    # enters the same region for every forward, and the table look-ups cost more than small ops.
    plans: dict[int, tuple[RegionConfig, str]] = {}

    def plan_for(config: RegionConfig) -> str:
        found = plans.get(id(config))
        if found is not None and found[0] is config:
            return found[1]
        plan = _plan(name, config)
        if len(plans) > 64:  # configurations come and go (a region per call): keep a few
            plans.clear()
        plans[id(config)] = (config, plan)
        return plan

    def without_autocast(args: Any, kwargs: Any) -> Any:
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*args, **kwargs)

    def as_torch(keyset: Any, args: Any, kwargs: Any) -> Any:
        if torch_kernel is not None:
            return torch_kernel.call_boxed(keyset, *args, **kwargs)
        return op.redispatch(keyset & below, *args, **kwargs)  # torch's kernel is a fallthrough

    def kernel(keyset: Any, *args: Any, **kwargs: Any) -> Any:
        config = active_config(device_type)
        if config is None:
            return as_torch(keyset, args, kwargs)
        emulate = config.backend == "emulated"
        if _tls.inside_lowered:  # an op inside an emulated composite GEMM: inputs are cast
            if emulate and emulated is not None and _all_low((args, kwargs)):
                return emulated(*args, **kwargs)
            return op.redispatch(keyset & below, *args, **kwargs)
        plan = plan_for(config)
        if plan == "torch":
            return as_torch(keyset, args, kwargs)
        if plan == "banned":
            raise RuntimeError(
                f"torch.nn.functional.{name} is unsafe to autocast on CUDA, which target='cuda' "
                "emulates; use binary_cross_entropy_with_logits (or BCEWithLogitsLoss), which is "
                "safe, or leave the op out of the region"
            )
        dtype = torch.get_autocast_dtype(device_type)
        if plan == "lower":
            if shortcut is not None and emulate and not kwargs:
                out = shortcut(args, dtype, device_type)
                if out is not NotImplemented:
                    return out
            args, kwargs = _cast((args, kwargs), dtype, device_type)
            if emulate and not _all_low((args, kwargs)):
                return without_autocast(args, kwargs)  # fp64 stays fp64, as under torch
            if emulate and emulated is not None:
                return emulated(*args, **kwargs)
            if emulate and composite:
                _tls.inside_lowered += 1
                try:
                    return op.redispatch(keyset & below, *args, **kwargs)
                finally:
                    _tls.inside_lowered -= 1
            return without_autocast(args, kwargs)
        if plan == "fp32":
            return without_autocast(*_cast((args, kwargs), torch.float32, device_type))
        if plan == "promote":
            widest = _promoted((args, kwargs), dtype, device_type)
            return without_autocast(*_cast((args, kwargs), widest, device_type))
        if emulate and emulated is not None and _all_low((args, kwargs)):
            return emulated(*args, **kwargs)  # a primitive GEMM torch leaves alone, on 16-bit data
        return op.redispatch(keyset & below, *args, **kwargs)

    kernel.__name__ = f"mixprec_{name.replace('.', '_')}"
    return kernel


def _plan(name: str, config: RegionConfig) -> str:
    """What ``config`` makes op ``name`` do outside an emulated composite GEMM: ``"torch"``
    (torch's own kernel), ``"banned"`` (refused), or its category in the region's table."""
    if name in BANNED_CUDA and config.target == "cuda":
        return "banned"
    category = config.table.category(name)
    emulate = config.backend == "emulated"
    if category == config.torch_table.category(name) and not (emulate and category == "lower"):
        return "torch"
    return category


def _lowered(t: Any, dtype: torch.dtype, device_type: str) -> torch.Tensor | None:
    """``t`` cast to the 16-bit ``dtype`` as autocast casts a GEMM's input, or None where the
    shortcut does not apply (a non-tensor, fp64, another device, a tensor subclass)."""
    if type(t) not in _PLAIN or t.dtype not in _WIDTHS or t.device.type != device_type:
        return None
    return t if t.dtype == dtype else t.to(dtype)


def _linear_shortcut(args: tuple[Any, ...], dtype: torch.dtype, device_type: str) -> Any:
    """``linear`` on a 2-D input (or a contiguous 3-D one, with fp32 parameters), decomposed as
    torch's own kernel decomposes it (``addmm`` with a bias, else ``mm``, on ``weight.t()``, on the
    input's 2-D view) straight onto the emulated GEMMs: the same ops on the
    same values, without the redispatch through the dispatcher and a second kernel call; fp32
    parameters are cast inside the GEMM's node, as the C++ kernel casts them
    (:func:`~mixprec.compute.emulated_cpp.linear`). Only where nobody can observe the
    decomposition (:func:`plain_eager`); NotImplemented elsewhere."""
    if len(args) not in (2, 3) or not plain_eager(args):
        return NotImplemented
    x = _lowered(args[0], dtype, device_type)
    if x is None:
        return NotImplemented
    bias = args[2] if len(args) == 3 else None
    # the C++ kernel's node, as it takes fp32 parameters (a contiguous 3-D input flattened, as
    # torch's linear flattens it); plain_eager has checked that the tensors are plain
    flat = x.view(-1, x.shape[-1]) if x.dim() == 3 and x.is_contiguous() else x
    out = emulated_cpp.linear(flat, args[1], bias)
    if out is not None:
        return out.view(*x.shape[:-1], out.shape[-1]) if flat is not x else out
    weight = _lowered(args[1], dtype, device_type)
    if weight is None or x.dim() != 2 or weight.dim() != 2:
        return NotImplemented
    if bias is None:
        return EAGER_GEMMS["mm"].call_plain(x, weight.t())
    bias = _lowered(bias, dtype, device_type)
    if bias is None:
        return NotImplemented
    return EAGER_GEMMS["addmm"].call_plain(bias, x, weight.t(), 1.0, 1.0)


def _conv_shortcut(args: tuple[Any, ...], dtype: torch.dtype, device_type: str) -> Any:
    """``conv1d``/``conv2d``/``conv3d`` on a batched input, as torch's kernel decomposes it (one
    ``convolution``, not transposed, no output padding) straight onto the emulated convolution
    (fp32 parameters cast inside its node: :func:`~mixprec.compute.emulated_cpp.convolution`);
    NotImplemented where :func:`_linear_shortcut` would give up, or on an unbatched input."""
    if not 2 <= len(args) <= 7 or not plain_eager(args):
        return NotImplemented
    x, weight = _lowered(args[0], dtype, device_type), args[1]
    if x is None or x.dim() != weight.dim() or x.dim() < 3:
        return NotImplemented
    spatial = x.dim() - 2
    # the dispatcher leaves out trailing arguments equal to the schema's defaults
    defaults: tuple[Any, ...] = (None, [1] * spatial, [0] * spatial, [1] * spatial, 1)
    given: tuple[Any, ...] = tuple(args[2:])
    bias, stride, padding, dilation, groups = (*given, *defaults[len(args) - 2 :])
    if not all(isinstance(v, list) and len(v) == spatial for v in (stride, padding, dilation)):
        return NotImplemented
    out = emulated_cpp.convolution(x, weight, bias, stride, padding, dilation, groups)
    if out is not None:  # the C++ kernel's node, as it takes fp32 parameters
        return out
    weight = _lowered(weight, dtype, device_type)
    if weight is None:
        return NotImplemented
    if bias is not None:
        bias = _lowered(bias, dtype, device_type)
        if bias is None:
            return NotImplemented
    convolution = EAGER_GEMMS["convolution"].call_plain
    return convolution(x, weight, bias, stride, padding, dilation, False, [0] * spatial, groups)


_PLAIN = (torch.Tensor, torch.nn.Parameter)
_WIDTHS = (torch.float32, torch.float16, torch.bfloat16)
_SHORTCUTS: dict[str, Callable[[tuple[Any, ...], torch.dtype, str], Any]] = {
    "linear": _linear_shortcut,
    "conv1d": _conv_shortcut,
    "conv2d": _conv_shortcut,
    "conv3d": _conv_shortcut,
}


def _all_low(tree: Any) -> bool:
    """Whether every floating tensor in ``tree`` has one 16-bit dtype (what the emulated GEMMs
    take)."""
    dtypes = {
        t.dtype
        for t in _tensor_leaves(tree)
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    }
    return len(dtypes) == 1 and dtypes <= {torch.float16, torch.bfloat16}
