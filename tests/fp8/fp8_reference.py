"""A straightforward reference for FP8 scaled quantization: one Python loop over the blocks.

Each block's amax, scale and cast are computed on their own with Python floats for the scale
arithmetic (float64, as the recipes define it) and torch's saturating cast; nothing is shared with
``mixprec.compute.fp8`` but the definitions written in the recipe table below.
"""

from __future__ import annotations

import math

import torch

FMT = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
EMAX = {"e4m3": 8, "e5m2": 15}

# recipe -> (scale rule, formats by role, block rule); the block rule maps
# (role, shape, contraction dim, gemm) -> block shape, written out from the recipes' definitions.
RECIPE_TABLE = {
    "tensorwise": ("dynamic", {"input": "e4m3", "weight": "e4m3", "grad_output": "e5m2"}),
    "rowwise": ("pow2", {"input": "e4m3", "weight": "e4m3", "grad_output": "e4m3"}),
    "rowwise_with_gw_hp": ("pow2", {"input": "e4m3", "weight": "e4m3", "grad_output": "e4m3"}),
    "blockwise": ("dynamic", {"input": "e4m3", "weight": "e4m3", "grad_output": "e4m3"}),
    "mxfp8": ("e8m0", {"input": "e4m3", "weight": "e4m3", "grad_output": "e4m3"}),
}


def ref_block(recipe: str, role: str, shape: tuple[int, int], dim: int, gemm: str) -> tuple:
    along = (lambda n: (1, n)) if dim == 1 else (lambda n: (n, 1))
    if recipe == "tensorwise":
        return shape
    if recipe == "rowwise_with_gw_hp" and role == "weight" and gemm == "grad_input":
        return shape  # tensorwise weight in the grad_input GEMM
    if recipe.startswith("rowwise"):
        return along(shape[dim])
    if recipe == "blockwise":
        return (128, 128) if role == "weight" else along(128)
    return along(32)  # mxfp8


def ref_scale(amax: float, fmt: str, rule: str) -> float:
    fmax = torch.finfo(FMT[fmt]).max
    if rule == "e8m0":
        if not math.isfinite(amax):
            return math.nan
        shared = -127 if amax == 0 else math.frexp(amax)[1] - 1 - EMAX[fmt]
        return 2.0 ** -max(-127, min(127, shared))
    if math.isnan(amax):
        return math.nan
    scale = torch.tensor(fmax / max(amax, 1e-12), dtype=torch.float64).float().item()
    if rule == "pow2" and 0 < scale < math.inf:
        scale = 2.0 ** (math.frexp(scale)[1] - 1)
    return scale


def ref_quantize(
    x: torch.Tensor, block: tuple, fmt: str, rule: str, scale: float | None = None
) -> torch.Tensor:
    """Dequantized values (fp32) of ``x`` quantized blockwise; ``scale`` overrides every block's."""
    x = x.float()
    out = torch.empty_like(x)
    fmax = torch.finfo(FMT[fmt]).max
    br, bc = block
    for i in range(0, x.shape[0], br):
        for j in range(0, x.shape[1], bc):
            tile = x[i : i + br, j : j + bc]
            s = scale if scale is not None else ref_scale(tile.abs().max().item(), fmt, rule)
            s_t = torch.tensor(s, dtype=torch.float32)
            data = torch.clamp(tile * s_t, -fmax, fmax).to(FMT[fmt])
            out[i : i + br, j : j + bc] = data.float() / s_t
    return out


def ref_operand(x, recipe: str, role: str, dim: int, gemm: str, scale=None) -> torch.Tensor:
    rule, formats = RECIPE_TABLE[recipe]
    block = ref_block(recipe, role, tuple(x.shape), dim, gemm)
    return ref_quantize(x, block, formats[role], rule, scale)


def ref_linear(x, w, b, g, recipe: str, out_dtype):
    """Output, grad_input, grad_weight, grad_bias of an FP8 linear layer, from the definitions."""
    hp_gw = recipe == "rowwise_with_gw_hp"
    out = (
        ref_operand(x, recipe, "input", 1, "output")
        @ ref_operand(w, recipe, "weight", 1, "output").T
    )
    if b is not None:
        out = out + b.float()
    gi = ref_operand(g, recipe, "grad_output", 1, "grad_input") @ ref_operand(
        w, recipe, "weight", 0, "grad_input"
    )
    if hp_gw:
        gw = g.float().T @ x.float()
    else:
        gw = ref_operand(g, recipe, "grad_output", 0, "grad_weight").T @ ref_operand(
            x, recipe, "input", 0, "grad_weight"
        )
    gb = None if b is None else g.sum(0).to(b.dtype)
    return (
        out.to(out_dtype),
        gi.to(out_dtype).to(x.dtype),
        gw.to(out_dtype).to(w.dtype),
        gb,
    )
