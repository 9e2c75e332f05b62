"""gpu_check's ``fp8`` and ``fp4`` sections: the native FP8 and block-scaled FP4 GEMM paths
against the emulated ones on the same inputs, and their GEMM speed against bf16 (see
gpu_check.py)."""

from __future__ import annotations

import torch
from gpu_check_base import Section, timed

# -- section fp8 --------------------------------------------------------------------------------


def check_fp8(section: Section, device: torch.device, quick: bool) -> None:
    """The native FP8 path (``torch._scaled_mm``) against the emulated one on the same inputs, and
    FP8 vs bf16 GEMM time at a large shape. Needs compute capability 8.9+; elsewhere it says why
    and only checks that ``auto`` chose the emulated path."""
    from mixprec.compute.fp8_linear import Fp8Linear, fp8_backend

    backend, reason = fp8_backend("auto", device, "tensorwise")
    print(f"  fp8 auto backend: {backend} ({reason})")
    if backend != "native":
        section.record(backend == "emulated", "fp8 auto backend is emulated without FP8 units")
        return
    torch.manual_seed(0)
    for recipe in ("tensorwise", "rowwise"):
        section.check_time(f"fp8 {recipe}")
        base = torch.nn.Linear(1024, 512, device=device)
        layers = {
            kind: Fp8Linear.from_linear(base, recipe, backend=kind)
            for kind in ("native", "emulated")
        }
        x = torch.randn(256, 1024, device=device, requires_grad=True)
        outs, grads = {}, {}
        for kind, layer in layers.items():
            x.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = layer(x)
            out.float().square().mean().backward()
            outs[kind], grads[kind] = out.detach().float(), x.grad.detach().float()
        for what, got in (("output", outs), ("input grad", grads)):
            scale = got["emulated"].abs().max().item() or 1.0
            diff = (got["native"] - got["emulated"]).abs().max().item() / scale
            print(f"  {recipe:<10} {what:<10} native vs emulated max rel diff {diff:.2e}")
            # the same quantized operands; only the fp32 accumulation order differs
            section.record(diff < 1e-2, f"fp8 {recipe} {what} native vs emulated ({diff:.2e})")
    size = 4096 if quick else 8192
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
    one = torch.ones((), device=device)
    a16, b16 = a.bfloat16(), b.bfloat16()

    section.check_time("fp8 GEMM timing")
    fp8 = timed(device, lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16))
    bf16 = timed(device, lambda: a16 @ b16)
    flops = 2 * size**3
    print(
        f"  GEMM {size}x{size}: fp8 {flops / fp8 / 1e12:.0f} TFLOP/s, bf16 "
        f"{flops / bf16 / 1e12:.0f} TFLOP/s, fp8 / bf16 time = {fp8 / bf16:.2f}"
    )
    section.record(fp8 < bf16, f"fp8 GEMM faster than bf16 at {size}^3")


# -- section fp4 --------------------------------------------------------------------------------

FP4_RECIPES = ("nvfp4", "nvfp4:rht=false,sr_grad=false,weight_blocks=1x16", "mxfp4")


def check_fp4(section: Section, device: torch.device, quick: bool) -> None:
    """The native 4-bit path (block-scaled ``torch._scaled_mm``) against the emulated one on the
    same inputs and random draws, and NVFP4 vs bf16 GEMM time. Needs compute capability 10.0+;
    elsewhere it says the section was skipped and why, and checks the backend choice."""
    from mixprec.compute.fp4_linear import Fp4Linear, fp4_backend
    from mixprec.compute.fp4_native import gemm_args, native_gemm, prepare_operand
    from mixprec.fp4_recipes import Fp4Recipe

    backend, reason = fp4_backend("auto", device)
    print(f"  fp4 auto backend: {backend} ({reason})")
    if backend != "native":
        print(f"  fp4 native checks skipped: {reason}")
        section.record(backend == "emulated", "fp4 auto backend is emulated without FP4 units")
        try:
            fp4_backend("native", device)
        except ValueError as err:
            section.record(reason in str(err), f"fp4 native refused with the reason ({err})")
        else:
            section.record(False, "fp4 backend 'native' was not refused without FP4 units")
        return
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(1024, 512).to(device)
    x = (torch.randn(200, 1024, generator=g) * 3).to(device)  # 200 tokens: padded to 224
    for recipe in FP4_RECIPES:
        section.check_time(f"fp4 {recipe}")
        got: dict[str, dict[str, torch.Tensor]] = {}
        for kind in ("native", "emulated"):
            layer = Fp4Linear.from_linear(base, recipe, backend=kind)
            xr = x.clone().requires_grad_()
            base.weight.grad = None
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(1)  # the same stochastic-rounding draws for both
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    out = layer(xr)
                out.float().square().mean().backward()
            got[kind] = {
                "output": out.detach().float(),
                "input grad": xr.grad.detach().float(),
                "weight grad": base.weight.grad.detach().float(),
            }
        print(f"  {recipe}")
        for what in ("output", "input grad", "weight grad"):
            native, emulated = got["native"][what], got["emulated"][what]
            scale = emulated.abs().max().item() or 1.0
            diff = (native - emulated).abs().max().item() / scale
            print(f"    {what:<11} native vs emulated max rel diff {diff:.2e}")
            # the same 4-bit operands; the fp32 additions in another order, and NVFP4's tensor
            # scales applied to the sum: a bf16 ulp or so
            section.record(diff < 1e-2, f"fp4 {recipe} {what} native vs emulated ({diff:.2e})")
    size = 4096 if quick else 8192
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    args = gemm_args(prepare_operand(a, Fp4Recipe("nvfp4")), prepare_operand(b, Fp4Recipe("nvfp4")))
    a16, b16 = a.bfloat16(), b.bfloat16()
    section.check_time("fp4 GEMM timing")
    fp4 = timed(device, lambda: native_gemm(args))
    bf16 = timed(device, lambda: a16 @ b16.t())
    flops = 2 * size**3
    print(
        f"  GEMM {size}x{size}: nvfp4 {flops / fp4 / 1e12:.0f} TFLOP/s, bf16 "
        f"{flops / bf16 / 1e12:.0f} TFLOP/s, nvfp4 / bf16 time = {fp4 / bf16:.2f}"
    )
    section.record(fp4 < bf16, f"nvfp4 GEMM faster than bf16 at {size}^3")
