"""PyTorch's CPU autocast op lists, rebuilt for mixprec's tests, and the checks torch runs on them.

torch ships these lists in ``torch.testing._internal.autocast_test_lists.AutocastCPUTestLists``
(read by ``test/test_autocast.py``), but that module needs torch's test-only dependencies, so the
same ops, argument shapes and dtypes are written out here. Each case says which of torch's lists it
comes from; ``autocast_kinds`` names the three autocast implementations the cases run under.

The check is torch's ``_run_autocast_outofplace``: inside the region autocast is enabled; the
``torch.*`` (or ``torch._C._nn.*``) form and the ``Tensor.*`` form give the expected dtype and the
same values; those values equal the op run with autocast disabled on the inputs cast as autocast
casts them ("the control"). On the emulated backend a GEMM-class op has another control: the fp32
op on the 16-bit inputs, its result rounded once to 16 bits (see :func:`emulated_control`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import mixprec

N = 8  # torch's lists use 8 elements per dimension

AUTOCAST_KINDS = ("torch", "native", "emulated")
"""``torch``: ``torch.autocast`` itself, the reference; ``native``/``emulated``: mixprec's
backends."""


def region(
    kind: str, dtype: torch.dtype | None, **kwargs: Any
) -> contextlib.AbstractContextManager:
    """An autocast region of ``kind`` (one of :data:`AUTOCAST_KINDS`) on the CPU."""
    if kind == "torch":
        return torch.autocast("cpu", dtype=dtype, **kwargs)
    return mixprec.autocast("cpu", dtype=dtype, backend=kind, **kwargs)


@dataclass(frozen=True)
class OpCase:
    """One entry of one of torch's lists, for one autocast dtype.

    Attributes:
        source: torch's list name (``"torch_16"``, ``"nn_fp32"``, ...).
        op: the attribute name, on ``module`` and/or on ``torch.Tensor``.
        args: positional arguments (tensors, nested tuples of tensors, scalars).
        kwargs: keyword arguments.
        amp_dtype: the autocast dtype of the region.
        run_as: the dtype the op's floating inputs are cast to by autocast.
        out_type: the expected output dtype (``run_as`` unless the op returns another).
        module: where the function form lives (``torch``, ``torch._C._nn``), or None for
            method-only cases.
    """

    source: str
    op: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    amp_dtype: torch.dtype = torch.bfloat16
    run_as: torch.dtype = torch.bfloat16
    out_type: torch.dtype | None = None
    module: Any = torch

    @property
    def id(self) -> str:
        return f"{self.source}-{self.op}-{str(self.amp_dtype).removeprefix('torch.')}"

    @property
    def expected_dtype(self) -> torch.dtype:
        return self.out_type if self.out_type is not None else self.run_as


def cast(value: Any, dtype: torch.dtype) -> Any:
    """Cast floating tensors in ``value`` (nested tuples/lists included) to ``dtype``, as torch's
    test does to build its control."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(cast(v, dtype) for v in value)
    return value


def same(first: Any, second: Any) -> bool:
    """torch's comparison: tensors bit-equal (``torch.equal``), containers element-wise."""
    if isinstance(first, torch.Tensor):
        return isinstance(second, torch.Tensor) and torch.equal(first, second)
    if isinstance(first, (tuple, list)):
        return len(first) == len(second) and all(map(same, first, second))
    return first == second


def tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of an op's output (a tensor or a tuple of tensors), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors(v)]
    return []


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of their (common 16-bit) dtype lie between ``a`` and ``b``:
    0 for equal values (+0 and -0 are equal), 1 for neighbours."""
    if a.dtype != b.dtype or a.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(
            f"ulp_distance compares two fp16 or two bf16 tensors, got {a.dtype}, {b.dtype}"
        )

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()


def call(case: OpCase, args: tuple[Any, ...]) -> Any:
    """The op on ``args``: its function form where ``case.module`` has one, else the method."""
    if case.module is not None and hasattr(case.module, case.op):
        return getattr(case.module, case.op)(*args, **case.kwargs)
    return getattr(args[0], case.op)(*args[1:], **case.kwargs)


def run_case(case: OpCase, enter: Callable[[], contextlib.AbstractContextManager]) -> Any:
    """torch's ``_run_autocast_outofplace`` checks for ``case`` in the region ``enter()`` makes.

    Returns the op's output in the region (the function form where there is one) and its
    control, computed in the region under a nested ``torch.autocast("cpu", enabled=False)``.

    Raises:
        AssertionError: a check torch's test makes failed; the message says which.
    """
    assert not torch.is_autocast_enabled("cpu"), "autocast enabled before the region"
    with enter():
        assert torch.is_autocast_enabled("cpu"), "autocast not enabled inside the region"
        output = method_output = None
        if case.module is not None and hasattr(case.module, case.op):
            output = getattr(case.module, case.op)(*case.args, **case.kwargs)
            if isinstance(output, torch.Tensor):
                assert output.dtype == case.expected_dtype, (
                    f"{case.op} gave {output.dtype}, torch's list says {case.expected_dtype}"
                )
        if hasattr(torch.Tensor, case.op):
            method_output = getattr(case.args[0], case.op)(*case.args[1:], **case.kwargs)
            if isinstance(method_output, torch.Tensor):
                assert method_output.dtype == case.expected_dtype, (
                    f"Tensor.{case.op} gave {method_output.dtype}, torch's list says "
                    f"{case.expected_dtype}"
                )
        assert output is not None or method_output is not None, f"{case.op} not found"
        if output is not None and method_output is not None:
            assert type(output) is type(method_output)
            assert same(output, method_output), f"torch.{case.op} and Tensor.{case.op} differ"
        result = output if output is not None else method_output
        with torch.autocast("cpu", enabled=False):
            assert not torch.is_autocast_enabled("cpu"), "a nested enabled=False was ignored"
            control = call(case, cast(case.args, case.run_as))
        assert torch.is_autocast_enabled("cpu"), "autocast not restored after enabled=False"
    assert not torch.is_autocast_enabled("cpu"), "autocast left enabled after the region"
    assert type(result) is type(control)
    return result, control


def emulated_control(case: OpCase) -> Any:
    """The emulated backend's promise for a GEMM-class op: the op in fp32 on the inputs rounded to
    16 bits, its floating outputs rounded once to 16 bits."""
    widened = cast(cast(case.args, case.run_as), torch.float32)
    with torch.autocast("cpu", enabled=False):
        out = call(case, widened)
    if isinstance(out, torch.Tensor):
        return out.to(case.run_as)
    return type(out)(t.to(case.run_as) if t.is_floating_point() else t for t in out)


# -- the lists --------------------------------------------------------------------------------


def _lists(dtype: torch.dtype) -> dict[str, list[tuple[Any, ...]]]:
    """torch's CPU lists, with 16-bit inputs in ``dtype``: list name -> (op, args[, kwargs])."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int, dt: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(shape, generator=g).to(dt)

    def rand(*shape: int, dt: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.rand(shape, generator=g).to(dt)

    n = N
    low0, low1 = randn(n, dt=dtype), randn(n, dt=dtype)
    f0, f1 = randn(n), randn(n)
    m0, m1, m2, m3 = randn(n, n), randn(n, n), randn(n, n), randn(n, n)
    # the fp32-list cases take bf16 inputs for both autocast dtypes, as torch's lists do
    b0, b1, b2 = (randn(n, n, dt=torch.bfloat16) for _ in range(3))
    conv = [(randn(*(n,) * d), randn(*(n,) * d)) for d in (3, 4, 5)]
    builtin = [(op, (f0, low1)) for op in ("eq", "ge", "gt", "le", "lt", "ne", "add", "div", "mul")]
    mean = torch.nn._reduction.get_enum("mean")
    return {
        "torch_expect_builtin_promote": builtin,
        "methods_expect_builtin_promote": [(f"__{op}__", args) for op, args in builtin],
        "torch_16": [
            ("conv1d", conv[0]),
            ("conv2d", conv[1]),
            ("conv3d", conv[2]),
            ("bmm", (randn(n, n, n), randn(n, n, n))),
            ("mm", (m0, m1)),
            ("matmul", (m0, m1)),
            ("baddbmm", (randn(n, n, n), randn(n, n, n), randn(n, n, n))),
            ("addmm", (m1, m2, m3)),
            ("_addmm_activation", (m1, m2, m3), {"beta": 1, "alpha": 1, "use_gelu": True}),
            ("addbmm", (m0, randn(n, n, n), randn(n, n, n))),
            ("conv_tbc", (randn(10, 7, 3), randn(5, 3, 5), randn(5), 0)),
            ("conv_transpose1d", conv[0]),
            ("conv_transpose2d", conv[1]),
            ("conv_transpose3d", conv[2]),
            ("prelu", (f0, randn(1))),
            (
                "_native_multi_head_attention",
                (
                    randn(n, n, n),
                    randn(n, n, n),
                    randn(n, n, n),
                    n,
                    4,
                    randn(3 * n, n),
                    randn(3 * n),
                    randn(n, n),
                    randn(n),
                ),
            ),
        ],
        "nn_16": [("linear", (m0, m1), {})],
        "torch_fp32": [
            ("poisson_nll_loss", (b0, b1, True, False, 1.0e-8, mean)),
            (
                "cosine_embedding_loss",
                (
                    torch.tensor([[1.0, 2, 3]]).bfloat16(),
                    torch.tensor([[1.0, 3, 4]]).bfloat16(),
                    torch.tensor([1], dtype=torch.int),
                ),
            ),
            ("hinge_embedding_loss", (b0, torch.ones(n, dtype=torch.int))),
            ("margin_ranking_loss", (b0, b1, torch.ones(n).bfloat16())),
            ("triplet_margin_loss", (b0, b1, b2)),
            ("binary_cross_entropy_with_logits", (b0, rand(n, n, dt=torch.bfloat16))),
        ],
        "nn_fp32": [
            (
                "avg_pool3d",
                (randn(n, n, n, n, dt=torch.bfloat16),),
                {"kernel_size": (3, 3, 3), "stride": (1, 1, 1)},
            ),
            (
                "binary_cross_entropy",
                (rand(n, n, dt=torch.bfloat16), rand(n, n, dt=torch.bfloat16)),
            ),
            ("reflection_pad1d", (randn(n, n, n, dt=torch.bfloat16),), {"padding": (3, 3)}),
            ("nll_loss", (rand(n, n, dt=torch.bfloat16), torch.zeros(n, dtype=torch.long))),
            (
                "nll_loss2d",
                (rand(n, n, n, n, dt=torch.bfloat16), torch.zeros((n, n, n), dtype=torch.long)),
            ),
            ("l1_loss", (b0, b1)),
            ("smooth_l1_loss", (b0, b1)),
            ("mse_loss", (b0, b1)),
            ("multilabel_margin_loss", (b0, torch.ones((n, n), dtype=torch.long))),
            ("soft_margin_loss", (b0, torch.ones((n, n), dtype=torch.long))),
            ("multi_margin_loss", (b0, torch.ones(n, dtype=torch.long))),
            ("huber_loss", (b0, b1)),
        ],
        "torch_need_autocast_promote": [("cat", ((low0, f1),)), ("stack", ((low0, f1),))],
    }


_OUT_TYPES = {op: torch.bool for op in ("eq", "ge", "gt", "le", "lt", "ne")}


def cpu_op_cases(dtypes: Iterable[torch.dtype] = (torch.bfloat16, torch.float16)) -> list[OpCase]:
    """Every case of torch's CPU lists, for each autocast dtype, as torch's test runs them."""
    cases = []
    for dtype in dtypes:
        for source, entries in _lists(dtype).items():
            for op, args, *rest in entries:
                kwargs = rest[0] if rest else {}
                lower = source.endswith("_16")
                module: Any = torch._C._nn if source.startswith("nn_") else torch
                if source.startswith("methods_"):
                    module = None
                out_type = (
                    _OUT_TYPES.get(op.strip("_"), torch.float32) if "builtin" in source else None
                )
                cases.append(
                    OpCase(
                        source,
                        op,
                        args,
                        kwargs,
                        amp_dtype=dtype,
                        run_as=dtype if lower else torch.float32,
                        out_type=out_type,
                        module=module,
                    )
                )
    return cases


_REFERENCE: dict[tuple[str, str], tuple[bool, Any]] = {}  # torch's outcomes, run once


def _key(arg: object) -> str:
    return arg.id if isinstance(arg, OpCase) else str(arg)


def reference_or_skip(kind: str, check, *args):
    """``check("torch", *args)``: the reference run, under ``torch.autocast`` (once per test
    session). Skips the test if torch fails it: for mixprec's kinds there is nothing to match."""
    key = (check.__name__, ",".join(map(_key, args)))
    if key not in _REFERENCE:
        try:
            _REFERENCE[key] = (True, check("torch", *args))
        except (AssertionError, RuntimeError, ValueError, TypeError) as error:
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            _REFERENCE[key] = (False, first_line)
    passed, outcome = _REFERENCE[key]
    if not passed:
        pytest.skip(f"fails on torch.autocast itself ({kind} not compared): {outcome}")
    return outcome
