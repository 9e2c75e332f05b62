"""The arguments of the one-call C++ kernels for FP8 operands, worked out once per recipe and shape.

On a small model the Python that works out an operand's block, format and scale rule costs more
than the kernel that quantizes it, so :func:`plan_for` keeps each plan; :func:`linear_node` runs
a dynamically scaled emulated layer as one C++ autograd node on the six plans of its operands.
"""

from __future__ import annotations

from typing import Any

import torch

from mixprec.compute import emulate_build
from mixprec.recipes import Fp8Recipe, block_shape
from mixprec.scaled import reduces_over_batch

__all__ = ["KERNEL_DTYPES", "dynamic_plan", "linear_node", "plan_for"]

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PLANS: dict[int, tuple[Fp8Recipe, dict[tuple[Any, ...], Any]]] = {}


def plan_for(r: Fp8Recipe, role: Any, dim: int, gemm: Any, shape: tuple[int, ...]) -> Any:
    """:func:`dynamic_plan`, looked up by the recipe's identity (a layer keeps its recipe):
    hashing the recipe dataclass on every call costs more than the look-up."""
    entry = _PLANS.get(id(r))
    if entry is None or entry[0] is not r:
        if len(_PLANS) > 64:
            _PLANS.clear()
        entry = _PLANS[id(r)] = (r, {})
    key = (role, dim, gemm, shape)
    plans = entry[1]
    if key not in plans:
        if len(plans) > 1024:  # shapes that vary from call to call: keep a bounded few
            plans.clear()
        plans[key] = dynamic_plan(r, role, dim, gemm, shape)
    return plans[key]


def dynamic_plan(
    r: Fp8Recipe, role: Any, dim: int, gemm: Any, shape: tuple[int, ...]
) -> tuple[Any, ...] | None:
    """The arguments :func:`~mixprec.scaled.fp8_fake_quantize` hands the one-call C++ kernel for a
    dynamically scaled operand (block, format, scale rule), worked out once per recipe, role and
    shape: on a small model that Python costs more than the kernel. None where it takes another
    path (an amax all-reduced over ranks, a format wider than 8 bits)."""
    fmt = r.format_of(role)
    if reduces_over_batch(r, role, dim) or fmt.bits > 8 or len(shape) != 2:
        return None
    block = block_shape(r, role, shape, dim, gemm)  # type: ignore[arg-type]
    br, bc = min(block[0], shape[0]) or 1, min(block[1], shape[1]) or 1  # as fake_quantize_blocks
    rule = "e8m0" if r.granularity == "mxfp8" else "pow2" if r.power_of_two else "dynamic"
    return (
        br, bc, fmt.max, fmt.mantissa_bits, fmt.min_exponent,
        emulate_build.SCALE_RULES[rule], fmt.max_exponent,
    )  # fmt: skip


def linear_node(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    recipe: str,
    out_dtype: torch.dtype,
    scales: torch.Tensor | None,
    native: bool,
) -> torch.Tensor | None:
    """The ``mixprec::fp8_linear`` op (its arguments) with its backward as one C++ autograd node
    (``_emulate_fp8.cpp``'s ``fp8_linear_autograd``: the same ATen ops and kernel calls, so the
    same bits), for an emulated, dynamically scaled layer on the CPU whose six operands each take
    the one-call kernel; None elsewhere (the op's Python function runs)."""
    if native or scales is not None or x.numel() == 0 or not (x.is_cpu and weight.is_cpu):
        return None
    if not (x.dtype in KERNEL_DTYPES and weight.dtype in KERNEL_DTYPES):
        return None
    if out_dtype not in KERNEL_DTYPES:  # the output gradient's dtype
        return None
    key = (recipe, x.shape, weight.shape)
    plans = _NODE_PLANS.get(key, _UNPLANNED)
    if plans is _UNPLANNED:
        if len(_NODE_PLANS) > 1024:  # shapes that vary from call to call: keep a bounded few
            _NODE_PLANS.clear()
        plans = _NODE_PLANS[key] = _node_plans(Fp8Recipe.parse(recipe), x.shape, weight.shape)
    ops = None if plans is None else emulate_build.emulate_engine()
    if ops is None:
        return None
    return ops.fp8_linear_autograd(x, weight, bias, plans, out_dtype)  # type: ignore[no-any-return]


_UNPLANNED: Any = object()
_NODE_PLANS: dict[tuple[str, torch.Size, torch.Size], list[float] | None] = {}


def _node_plans(r: Fp8Recipe, x: torch.Size, weight: torch.Size) -> list[float] | None:
    """The six operands' kernel plans, in the order ``fp8_linear_autograd`` takes them, or None
    where a GEMM runs in high precision or an operand takes another path."""
    if r.high_precision & {"output", "grad_input", "grad_weight"}:
        return None
    grad = (x[0], weight[0])
    operands = (
        ("input", 1, "output", x),
        ("weight", 1, "output", weight),
        ("grad_output", 1, "grad_input", grad),
        ("weight", 0, "grad_input", weight),
        ("grad_output", 0, "grad_weight", grad),
        ("input", 0, "grad_weight", x),
    )
    plans = [dynamic_plan(r, role, dim, gemm, tuple(shape)) for role, dim, gemm, shape in operands]
    if any(plan is None for plan in plans):
        return None
    return [float(v) for plan in plans for v in plan]  # type: ignore[union-attr]
