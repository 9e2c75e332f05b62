"""gpu_check's ``autocast`` section: every case of torch's CUDA autocast op lists, mixprec's
native and emulated backends against ``torch.autocast`` (see gpu_check.py)."""

from __future__ import annotations

import ast
import collections
import functools
import importlib.util
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gpu_check_base import Section

import mixprec


def _autocast_lists(device: torch.device) -> Any:
    """torch's ``AutocastTestLists`` for ``device``.

    The module imports torch's test utilities, which need ``expecttest``; where that is missing,
    the class is read from the module's source and run without them (it uses only torch and
    ``TEST_WITH_ROCM``).
    """
    factory: Any
    try:
        from torch.testing._internal.autocast_test_lists import AutocastTestLists as factory
    except ImportError as err:
        print(f"  (importing torch's autocast test lists failed: {err}; reading them from source)")
        spec = importlib.util.find_spec("torch.testing._internal.autocast_test_lists")
        if spec is None or spec.origin is None:
            raise RuntimeError("torch.testing._internal.autocast_test_lists is missing") from err
        tree = ast.parse(Path(spec.origin).read_text())
        classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
        wanted: list[ast.stmt] = [n for n in classes if n.name == "AutocastTestLists"]
        namespace: dict[str, Any] = {
            "torch": torch,
            "collections": collections,
            "TEST_WITH_ROCM": torch.version.hip is not None,
        }
        exec(compile(ast.Module(body=wanted, type_ignores=[]), spec.origin, "exec"), namespace)
        factory = namespace["AutocastTestLists"]
    return factory(device)


@dataclass(frozen=True)
class Case:
    """One op call from torch's lists: ``module.op(*args, **kwargs)`` and/or ``args[0].op(...)``."""

    where: str
    op: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    module: Any


_MODULES = {"nn": torch._C._nn, "linalg": getattr(torch._C, "_linalg", None), "methods": None}


def _cases(lists: Any) -> Iterator[Case]:
    """Every case of the lists torch's CUDA autocast tests run, as torch's tests read them: a
    third element is kwargs (a dict), an expected output dtype, a module, or a skip flag."""
    names = [n for n in vars(lists) if isinstance(getattr(lists, n), list) and n != "banned"]
    for name in sorted(names):
        prefix = name.split("_")[0]
        module = _MODULES.get(prefix, torch)
        for entry in getattr(lists, name):
            op, args, extras = entry[0], entry[1], entry[2:]
            kwargs: dict[str, Any] = {}
            skip = False
            for extra in extras:
                if isinstance(extra, dict):
                    kwargs = extra
                elif isinstance(extra, (torch.dtype, type(torch))):
                    pass  # the expected dtype, or a module: the comparison is against torch
                else:
                    skip = skip or bool(extra)  # TEST_WITH_ROCM, as torch's tests read it
            if not skip and isinstance(args, tuple):
                yield Case(name, op, args, kwargs, module)


def _call(case: Case) -> list[Any]:
    """The outputs of the module function and the Tensor method variants that exist, or the
    exception (as its type) where the call raises."""
    outputs: list[Any] = []
    if case.module is not None and hasattr(case.module, case.op):
        outputs.append(_try(lambda: getattr(case.module, case.op)(*case.args, **case.kwargs)))
    if hasattr(torch.Tensor, case.op) and isinstance(case.args[0], torch.Tensor):
        method = getattr(case.args[0], case.op)
        outputs.append(_try(lambda: method(*case.args[1:], **case.kwargs)))
    return outputs


def _try(call: Callable[[], Any]) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's deprecation notes for listed ops
            return call()
    except Exception as err:  # the comparison is of exception types
        return type(err)


def _mismatch(ref: Any, out: Any, tolerance: float | None) -> str | None:
    """Why ``out`` differs from ``ref`` (None if it does not). ``tolerance`` None means exact;
    else the dtype must match and values agree within ``tolerance`` relative to ``ref``'s
    largest magnitude."""
    if isinstance(ref, type) or isinstance(out, type):
        return None if ref is out else f"torch gives {_name(ref)}, mixprec {_name(out)}"
    if isinstance(ref, torch.Tensor):
        if not isinstance(out, torch.Tensor):
            return f"torch gives a tensor, mixprec {type(out).__name__}"
        if out.dtype != ref.dtype or out.shape != ref.shape:
            return (
                f"torch gives {ref.dtype} {tuple(ref.shape)}, "
                f"mixprec {out.dtype} {tuple(out.shape)}"
            )
        if tolerance is None or not ref.is_floating_point():
            same = torch.equal(ref, out) or bool(
                ref.is_floating_point()
                and torch.equal(ref.isnan(), out.isnan())
                and torch.equal(ref.nan_to_num(), out.nan_to_num())
            )
            return None if same else f"values differ (max {_max_diff(ref, out):.3g})"
        scale = max(ref.float().nan_to_num().abs().max().item(), 1.0)
        diff = _max_diff(ref, out)
        return (
            None
            if diff <= tolerance * scale
            else f"values differ by {diff:.3g} (> {tolerance:.2g} x {scale:.3g})"
        )
    if isinstance(ref, (tuple, list)):
        if not isinstance(out, (tuple, list)) or len(out) != len(ref):
            return f"torch gives {type(ref).__name__} of {len(ref)}, mixprec {type(out).__name__}"
        for r, o in zip(ref, out, strict=True):
            reason = _mismatch(r, o, tolerance)
            if reason:
                return reason
        return None
    return None if ref == out else f"torch gives {ref!r}, mixprec {out!r}"


def _name(value: Any) -> str:
    return value.__name__ if isinstance(value, type) else type(value).__name__ + " result"


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float().nan_to_num() - b.float().nan_to_num()).abs().max().item()


def _not_reproducible(case: Case, ref: list[Any], device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch.autocast itself gives another result when ``case`` runs again."""
    with torch.autocast(device_type, dtype=dtype):
        again = _call(case)
    return _mismatch(ref, again, None) is not None


def _no_less_accurate(case: Case, ref: list[Any], out: list[Any]) -> bool:
    """Whether emulated outputs of ``case`` are as close as torch's to an fp64 control run of
    the op on the same rounded inputs (some of torch's 16-bit kernels, e.g. CPU fp16
    convolutions, accumulate in 16 bits; the emulated GEMM accumulates in fp32)."""
    tensors = [r for r in ref if isinstance(r, torch.Tensor)]
    if len(tensors) != len(ref) or not tensors or _mismatch(ref, out, float("inf")):
        return False  # not all tensors, or dtypes/shapes differ: no excuse
    low = tensors[0].dtype

    def wide(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(low).double()
        if isinstance(value, (tuple, list)):
            return type(value)(wide(v) for v in value)
        return value

    wide_case = Case(case.where, case.op, wide(case.args), case.kwargs, case.module)
    control = _call(wide_case)
    if len(control) != len(ref) or any(isinstance(c, type) for c in control):
        return False
    return all(
        _max_diff(o, c) <= _max_diff(r, c) for r, o, c in zip(ref, out, control, strict=True)
    )


def check_autocast(section: Section, device: torch.device, quick: bool) -> None:
    """Native regions equal torch.autocast; emulated ones give its dtypes and close values."""
    with torch.backends.cudnn.flags(enabled=True, deterministic=True):  # as torch's tests run
        _check_autocast(section, device, quick)


def _check_autocast(section: Section, device: torch.device, quick: bool) -> None:
    lists = _autocast_lists(device)
    cases = list(_cases(lists))
    dtypes = (torch.float16,) if quick else (torch.float16, torch.bfloat16)
    print(f"  {len(cases)} cases from torch's lists, dtypes {', '.join(map(str, dtypes))}")
    for dtype in dtypes:
        tolerance = 4 * torch.finfo(dtype).eps
        counts = {"native": 0, "emulated": 0}
        for case in cases:
            section.check_time(f"{case.op} in {dtype}")
            with torch.autocast(device.type, dtype=dtype):
                ref = _call(case)
            for backend in ("native", "emulated"):
                with mixprec.autocast(device.type, dtype=dtype, backend=backend):
                    out = _call(case)
                reason = _mismatch(ref, out, None if backend == "native" else tolerance)
                if (
                    reason
                    and backend == "native"
                    and _not_reproducible(case, ref, device.type, dtype)
                ):
                    reason = _mismatch(ref, out, tolerance)  # e.g. atomics: no exact answer
                if reason and backend == "emulated" and _no_less_accurate(case, ref, out):
                    reason = None  # torch's own kernel is the less accurate one
                section.record(
                    reason is None, f"{case.where} {case.op} {dtype} {backend}: {reason}"
                )
                counts[backend] += reason is None
        for op, args, module in getattr(lists, "banned", []):
            call = functools.partial(getattr(module, op), *args)
            with torch.autocast(device.type, dtype=dtype):
                ref = [_try(call)]
            for backend in ("native", "emulated"):
                with mixprec.autocast(device.type, dtype=dtype, backend=backend):
                    out = [_try(call)]
                reason = _mismatch(ref, out, None if backend == "native" else tolerance)
                section.record(reason is None, f"banned {op} {dtype} {backend}: {reason}")
        print(
            f"  {dtype}: native equal to torch.autocast in {counts['native']}/{len(cases)} cases, "
            f"emulated within {tolerance:.1e} in {counts['emulated']}/{len(cases)}"
        )
