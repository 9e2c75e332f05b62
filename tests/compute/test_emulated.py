"""Emulated GEMMs against the definition (fp32 GEMM on the rounded inputs, rounded once)."""

import pytest
import torch
import torch.nn.functional as F

from mixprec.compute import autocast, emulated_linear, emulated_matmul

DTYPES = [torch.bfloat16, torch.float16]


def close_in_ulps(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, ulps: float = 1) -> bool:
    """|a - b| within `ulps` units in the last place of `dtype` (plus its smallest subnormal)."""
    info = torch.finfo(dtype)
    a, b = a.float(), b.float()
    scale = torch.maximum(a.abs(), b.abs())
    return bool(torch.all((a - b).abs() <= ulps * info.eps * scale + info.smallest_normal * 2**-10))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_is_the_fp32_gemm_rounded_once(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 33, generator=g).to(dtype)
    w = torch.randn(9, 33, generator=g).to(dtype)
    b = torch.randn(9, generator=g).to(dtype)
    got = emulated_linear(x, w, b)
    want = F.linear(x.float(), w.float(), b.float()).to(dtype)
    assert got.dtype == dtype
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matmul_is_the_fp32_gemm_rounded_once(dtype):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 4, 6, 17, generator=g).to(dtype)
    b = torch.randn(4, 17, 5, generator=g).to(dtype)  # broadcast batch dims
    got = emulated_matmul(a, b)
    assert torch.equal(got.view(torch.int16), (a.float() @ b.float()).to(dtype).view(torch.int16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["linear", "matmul"])
def test_backward_is_fp32_autograd_on_rounded_values_rounded_once(dtype, op):
    g = torch.Generator().manual_seed(2)
    if op == "linear":
        inputs = [torch.randn(2, 6, 16, generator=g), torch.randn(8, 16, generator=g)]
        inputs.append(torch.randn(8, generator=g))
        emulated, reference = emulated_linear, F.linear
    else:
        inputs = [torch.randn(3, 6, 16, generator=g), torch.randn(16, 4, generator=g)]
        emulated, reference = emulated_matmul, torch.matmul
    narrow = [t.to(dtype).requires_grad_() for t in inputs]
    wide = [t.detach().float().requires_grad_() for t in narrow]
    out = emulated(*narrow)
    grad_out = torch.randn(out.shape, generator=g).to(dtype)
    out.backward(grad_out)
    reference(*wide).backward(grad_out.float())
    for got, want in zip(narrow, wide, strict=True):
        assert got.grad.dtype == dtype
        assert close_in_ulps(got.grad, want.grad.to(dtype), dtype, ulps=1)


def _ops(dtype):
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    return [
        ("conv1d", F.conv1d, (r(2, 3, 9), r(4, 3, 3), r(4)), {"padding": 1}),
        ("conv2d", F.conv2d, (r(2, 3, 6, 6), r(4, 3, 3, 3)), {"stride": 2}),
        ("conv3d", F.conv3d, (r(1, 2, 4, 4, 4), r(3, 2, 2, 2, 2)), {}),
        ("conv_transpose2d", F.conv_transpose2d, (r(2, 3, 4, 4), r(3, 2, 3, 3)), {}),
        ("bmm", torch.bmm, (r(3, 4, 5), r(3, 5, 2)), {}),
        ("mm", torch.mm, (r(4, 5), r(5, 2)), {}),
        ("addmm", torch.addmm, (r(4, 2), r(4, 5), r(5, 2)), {}),
        ("baddbmm", torch.baddbmm, (r(3, 4, 2), r(3, 4, 5), r(3, 5, 2)), {"alpha": 0.5}),
        ("addbmm", torch.addbmm, (r(4, 2), r(3, 4, 5), r(3, 5, 2)), {"beta": 0.5}),
        ("conv_tbc", torch.conv_tbc, (r(7, 2, 3), r(3, 3, 4), r(4)), {"pad": 1}),
        (
            "addmm_activation",
            torch._addmm_activation,
            (r(4, 2), r(4, 5), r(5, 2)),
            {"use_gelu": True, "alpha": 2.0},
        ),
        (
            "sdpa",
            F.scaled_dot_product_attention,
            (r(2, 2, 5, 8), r(2, 2, 5, 8), r(2, 2, 5, 8)),
            {"is_causal": True},
        ),
    ]


def _fp32_reference(name, op, dtype):
    """The fp32 op whose result, rounded to ``dtype``, is the emulated one (and whose gradient is
    the emulated backward's). torch has no derivative for ``_addmm_activation``: its reference is
    the unfused pair as torch's CPU kernel computes it, the GEMM rounded to 16 bits, then torch's
    16-bit GELU and its 16-bit backward (rounding's gradient is the identity)."""
    if name == "addmm_activation":
        return lambda b, m1, m2, use_gelu, alpha: F.gelu(
            torch.addmm(b, m1, m2, alpha=alpha).to(dtype)
        ).float()
    return op


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_gemm_class_op_runs_emulated_forward_and_backward(dtype):
    for name, op, inputs, kwargs in _ops(dtype):
        leaves = [t.clone().requires_grad_() for t in inputs]
        with autocast("cpu", dtype=dtype, backend="emulated"):
            out = op(*leaves, **kwargs)
        assert out.dtype == dtype, name
        rounded = [t.detach().to(dtype).float().requires_grad_() for t in inputs]
        want = _fp32_reference(name, op, dtype)(*rounded, **kwargs)
        assert torch.equal(out, want.to(dtype)), name
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
        out.backward(grad)
        want.backward(grad.float())
        for leaf, ref in zip(leaves, rounded, strict=True):
            # fp32 leaves get the 16-bit gradient widened: the rounding of the GEMM's result.
            assert leaf.grad.dtype == torch.float32, name
            want_grad = ref.grad.to(dtype).float()
            if name == "sdpa":  # flash attention's backward reads the 16-bit output, as on a GPU
                eps = torch.finfo(dtype).eps
                assert torch.allclose(leaf.grad, want_grad, atol=4 * eps * want_grad.abs().max())
            else:
                assert torch.equal(leaf.grad, want_grad), name


def test_fp16_overflow_and_underflow_happen_as_on_hardware():
    big = torch.full((1, 4), 200.0)
    w = torch.full((2, 4), 100.0)  # 4 * 200 * 100 = 80000 > 65504
    tiny = torch.full((1, 4), 2.0**-14)
    with autocast("cpu", dtype=torch.float16, backend="emulated"):
        overflow = F.linear(big, w)
        underflow = F.linear(tiny, torch.full((2, 4), 2.0**-14))  # 4 * 2**-28 = 2**-26 < 2**-25
    assert torch.isinf(overflow).all()
    assert torch.equal(underflow, torch.zeros(1, 2, dtype=torch.float16))
    with torch.autocast("cpu", dtype=torch.float16):  # native agrees (tiny shapes only)
        assert torch.isinf(F.linear(big, w)).all()
        assert torch.equal(F.linear(tiny, torch.full((2, 4), 2.0**-14)).float(), underflow.float())


def test_fp16_gradient_overflow_in_backward():
    x = torch.full((1, 4), 1.0, requires_grad=True)
    w = torch.full((2, 4), 300.0, requires_grad=True)
    with autocast("cpu", dtype=torch.float16, backend="emulated"):
        out = F.linear(x, w)
    out.backward(torch.full((1, 2), 200.0, dtype=torch.float16))  # dx = 2 * 200 * 300 = 120000
    assert torch.isinf(x.grad).all()
    assert torch.isfinite(w.grad).all()


@pytest.mark.parametrize("shape", [(4, 8), (2, 4, 8)], ids=["2-d", "3-d"])
def test_activations_are_saved_in_16_bits(shape):
    """What the GEMM saves is 16-bit, but for the fp32 weight itself where the linear node casts
    it (a 2-D input): a parameter, no activation, and no copy of it."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(shape, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast("cpu", dtype=torch.bfloat16, backend="emulated"):
            F.linear(x, w).sum()
    weights = [t for t in saved if t.untyped_storage().data_ptr() == w.data_ptr()]
    activations = [t for t in saved if t.untyped_storage().data_ptr() != w.data_ptr()]
    assert activations and all(t.dtype == torch.bfloat16 for t in activations)
    assert all(t.dtype == torch.float32 for t in weights)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("use_gelu", [True, False])
@pytest.mark.parametrize(("beta", "alpha"), [(1.0, 1.0), (0.5, 2.0), (0.0, -1.5)])
def test_addmm_activation_matches_torchs_cpu_kernel(dtype, use_gelu, beta, alpha):
    # torch's CPU kernel rounds the GEMM to 16 bits, then applies erf GELU (or ReLU) to that
    # value; the emulated kernel used to apply GELU before its one rounding (1 ulp off).
    g = torch.Generator().manual_seed(1)
    bias, a, b = (torch.randn(24, 24, generator=g) * 3 for _ in range(3))
    with torch.autocast("cpu", enabled=False):
        want = torch._addmm_activation(
            bias.to(dtype), a.to(dtype), b.to(dtype), beta=beta, alpha=alpha, use_gelu=use_gelu
        )
    with autocast("cpu", dtype=dtype, backend="emulated"):
        got = torch._addmm_activation(bias, a, b, beta=beta, alpha=alpha, use_gelu=use_gelu)
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_addmm_activation_compiled_matches_torchs_cpu_kernel(dtype):
    """Compiled (the custom op's fake kernel in the graph, its eager body at run time), the same
    bits as torch's own 16-bit kernel: the GEMM rounded, then torch's 16-bit GELU."""
    g = torch.Generator().manual_seed(1)
    bias, a, b = (torch.randn(24, 24, generator=g) * 3 for _ in range(3))
    with torch.autocast("cpu", enabled=False):
        want = torch._addmm_activation(bias.to(dtype), a.to(dtype), b.to(dtype), use_gelu=True)

    def fused(bias, a, b):
        return torch._addmm_activation(bias, a, b, use_gelu=True)

    torch._dynamo.reset()
    with autocast("cpu", dtype=dtype, backend="emulated"):  # entered eagerly, as in training
        got = torch.compile(fused, backend="aot_eager", fullgraph=True)(bias, a, b)
    torch._dynamo.reset()
    assert got.dtype == dtype
    assert torch.equal(got, want)
