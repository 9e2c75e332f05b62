"""The native 4-bit GEMM path: packed operands against torchao's, the swizzled scale layout
against torchao's ``to_blocked``, the GEMM's CPU model against the emulated layer, the backend
choice, and (on a Blackwell GPU only) the native layer against the emulated one."""

import importlib

import pytest
import torch
from torch import nn

import mixprec.hardware as hardware
from mixprec.blockscaled import nvfp4_tensor_scale
from mixprec.compute.fp4_linear import (
    Fp4Linear,
    _fp4_linear,
    fp4_backend,
    fp4_linear,
    quantize_fp4_operand,
    quantize_fp4_weight,
)
from mixprec.compute.fp4_native import (
    Fp4Operand,
    emulate_gemm,
    gemm_args,
    native_misfit,
    pack_fp4,
    pad_contraction,
    prepare_operand,
    prepare_weight,
    swizzle_scales,
    unpack_fp4,
    unswizzle_scales,
)
from mixprec.fp4_recipes import Fp4Recipe

mx_formats = pytest.importorskip("torchao.prototype.mx_formats")
from torchao.prototype.mx_formats.mx_tensor import MXTensor  # noqa: E402
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor  # noqa: E402
from torchao.prototype.mx_formats.utils import to_blocked  # noqa: E402

RECIPES = [
    "nvfp4",
    "nvfp4:rht=false,sr_grad=false,weight_blocks=1x16",
    "mxfp4",
    "mxfp4:rht=true,sr_grad=true,weight_blocks=32x32",
]
FP4_GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def data(m=40, k=64, seed=0, scale=3.0):
    """Gaussian values with an outlier, a zero block and a tiny block (MX's code-0 scale)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * scale
    x[3, 5] = 40.0 * scale
    x[1, :32] = 0.0
    x[2, 32:] = torch.randn(k - 32, generator=g) * 1e-39
    return x


# -- packing ------------------------------------------------------------------------------------


def test_every_byte_unpacks_and_packs_back():
    every = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    values = unpack_fp4(every)
    assert values.shape == (16, 32)
    assert bits_equal(pack_fp4(values), every)  # -0.0 (code 0b1000) included
    grid = torch.tensor(FP4_GRID + [-v for v in FP4_GRID])
    assert set(values.unique().tolist()) == set(grid.tolist())


def test_pack_order_is_low_nibble_first_as_torch_and_torchao():
    from torchao.prototype.mx_formats.kernels import f32_to_f4_unpacked, pack_uint4

    x = torch.tensor([[0.5, -6.0, 3.0, -0.0, 1.5, 4.0]])
    assert bits_equal(pack_fp4(x), pack_uint4(f32_to_f4_unpacked(x)))
    with pytest.raises(ValueError, match=r"two elements to a byte.*\(1, 3\)"):
        pack_fp4(torch.zeros(1, 3))


@pytest.mark.parametrize("shape", [(40, 64), (128, 256), (3, 16)])
def test_nvfp4_operand_is_torchaos_packed_bytes_and_scales(shape):
    x = data(*shape) if shape[1] >= 64 else torch.randn(shape)
    op = prepare_operand(x, Fp4Recipe("nvfp4"))
    scale = nvfp4_tensor_scale(x.abs().amax())
    ref = NVFP4Tensor.to_nvfp4(x, per_tensor_scale=scale)
    assert bits_equal(op.data, ref.qdata.view(torch.uint8))
    assert bits_equal(op.scales, ref.scale.view(torch.uint8).reshape(op.scales.shape))
    assert bits_equal(op.tensor_scale, scale)
    assert bits_equal(op.dequantize(), ref.dequantize(torch.float32))


@pytest.mark.parametrize("shape", [(40, 64), (128, 256), (3, 32)])
def test_mxfp4_operand_is_torchaos_packed_bytes_and_scales(shape):
    x = data(*shape) if shape[1] >= 64 else torch.randn(shape)
    op = prepare_operand(x, Fp4Recipe("mxfp4"))
    ref = MXTensor.to_mx(x, torch.float4_e2m1fn_x2, 32)
    assert bits_equal(op.data, ref.qdata.view(torch.uint8))
    assert bits_equal(op.scales, ref.scale.view(torch.uint8).reshape(op.scales.shape))
    assert op.tensor_scale is None
    assert bits_equal(op.dequantize(), ref.dequantize(torch.float32))


def test_a_nan_mx_block_is_nan_through_its_scale():
    x = torch.ones(2, 64)
    x[1, 40] = float("nan")
    op = prepare_operand(x, Fp4Recipe("mxfp4"))
    assert op.scales[1].tolist() == [125, 255]  # 2**-2 (amax 1 over e2m1's 2**2), NaN
    out = op.dequantize()
    assert torch.isnan(out[1, 32:]).all() and not torch.isnan(out[:, :32]).any()


# -- the swizzled scale layout ------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (128, 4), (40, 4), (130, 5), (256, 8), (300, 17)])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e8m0fnu])
def test_swizzled_scales_are_torchaos_to_blocked(shape, dtype):
    raw = torch.randint(
        0, 255, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    scales = raw.view(dtype)
    swizzled = swizzle_scales(scales)
    assert swizzled.dtype == dtype and swizzled.is_contiguous()
    assert bits_equal(swizzled.view(torch.uint8), to_blocked(raw))
    assert bits_equal(unswizzle_scales(swizzled, *shape).view(torch.uint8), raw)


# -- the GEMM's CPU model against the emulated layer --------------------------------------------


@pytest.mark.parametrize("spec", RECIPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_from_packed_operands_is_the_emulated_forward_bit_for_bit(spec, dtype):
    r = Fp4Recipe.parse(spec)
    x, w = data(40, 64).to(dtype), torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    b = torch.randn(32)
    args = gemm_args(prepare_operand(x, r), prepare_weight(w, r, "output"))
    assert args.mat_a.dtype == torch.float4_e2m1fn_x2 and args.mat_b.stride() == (1, 32)
    out = (emulate_gemm(args) + b).to(dtype)
    assert bits_equal(out, fp4_linear(x, w, b, spec))


@pytest.mark.parametrize("spec", RECIPES)
@pytest.mark.parametrize("gemm", ["output", "grad_input"])
def test_weight_operands_dequantize_to_the_emulated_weight(spec, gemm):
    r = Fp4Recipe.parse(spec)
    w = data(64, 96, seed=3, scale=0.1)
    emulated = quantize_fp4_weight(w, r, gemm)
    expected = emulated if gemm == "output" else emulated.t()
    assert bits_equal(prepare_weight(w, r, gemm).dequantize(), expected.contiguous())


@pytest.mark.parametrize("spec", ["nvfp4", "mxfp4"])
def test_stochastic_operands_draw_what_the_emulation_draws(spec):
    r, g = Fp4Recipe.parse(spec), data(48, 64, seed=4)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        packed = prepare_operand(g, r, stochastic=True).dequantize()
        torch.manual_seed(7)
        emulated = quantize_fp4_operand(g, r, stochastic=True)
    assert bits_equal(packed, emulated)


def test_padding_the_contraction_adds_zero_blocks_that_change_nothing():
    r = Fp4Recipe("nvfp4")
    a = prepare_operand(data(8, 48, seed=5), r)
    b = prepare_operand(torch.randn(16, 48), r)
    padded = pad_contraction(a)
    assert padded.data.shape == (8, 32) and padded.scales.shape == (8, 4)
    assert bits_equal(padded.dequantize()[:, :48], a.dequantize())
    assert not padded.dequantize()[:, 48:].any()
    reference = torch.mm(a.dequantize(), b.dequantize().t())
    torch.testing.assert_close(emulate_gemm(gemm_args(a, b)), reference, rtol=0, atol=0)


@pytest.mark.parametrize("spec", [*RECIPES, "nvfp4:amax_reduce=true"])
def test_native_op_on_its_cpu_model_matches_the_emulated_op(spec):
    """The whole native path (operands of the three GEMMs, token padding, RHT, SR draws),
    run with the GEMM's CPU model, against the emulated op: the forward bit for bit, the
    gradients within one bf16 ulp (a BLAS may block the token sum, padded to 32 here, in
    another order)."""
    g = torch.Generator().manual_seed(6)
    x, w = data(40, 64), torch.randn(32, 64, generator=g) / 8
    bias, grad = torch.randn(32, generator=g), torch.randn(40, 32, generator=g) * 1e-3
    runs = []
    for native in (True, False):
        xr, wr, br = (t.clone().requires_grad_() for t in (x, w, bias))
        with torch.random.fork_rng():
            torch.manual_seed(0)
            out = _fp4_linear(xr, wr, br, spec, torch.bfloat16, native)
            out.backward(grad.bfloat16())
        runs.append((out, xr.grad, wr.grad, br.grad))
    (out_n, gi_n, gw_n, gb_n), (out_e, gi_e, gw_e, gb_e) = runs
    assert bits_equal(out_n, out_e) and bits_equal(gb_n, gb_e)
    torch.testing.assert_close(gi_n, gi_e, rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(gw_n, gw_e, rtol=2**-7, atol=1e-6)


def test_native_misfit_names_the_feature_count():
    assert native_misfit(64, 32) is None
    assert native_misfit(48, 64) == "out_features 48 is not a multiple of 32 (16 packed bytes)"
    assert isinstance(prepare_operand(torch.ones(1, 16), Fp4Recipe("nvfp4")), Fp4Operand)


# -- which backend ------------------------------------------------------------------------------


def _fake_cuda(monkeypatch, capability):
    """A CUDA device of ``capability`` as the backend choice sees it (no GPU needed)."""
    report = hardware.HardwareReport("cuda:0", "cuda", "a GPU", compute_capability=capability)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hardware, "probe", lambda device=None, measure=True: report)


def test_native_is_refused_on_a_cpu_naming_the_device():
    with pytest.raises(ValueError, match=r"fp4 backend 'native' cannot run here: device 'cpu'.*"
                       r"10\.0\+.*use backend='emulated'"):  # fmt: skip
        fp4_backend("native", "cpu")
    assert fp4_backend("auto", "cpu")[0] == "emulated"
    assert fp4_backend("emulated", "cpu") == ("emulated", "requested")
    with pytest.raises(ValueError, match=r"unknown fp4 backend 'cuda'; valid backends"):
        fp4_backend("cuda", "cpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fp4 backend 'native' cannot run here"):
        Fp4Linear.from_linear(nn.Linear(32, 32), "nvfp4", backend="native")
    layer = Fp4Linear.from_linear(nn.Linear(32, 32), "nvfp4", backend="auto")
    assert layer._native() is False


def test_native_is_refused_below_blackwell_naming_the_capability(monkeypatch):
    _fake_cuda(monkeypatch, (9, 0))
    with pytest.raises(ValueError, match=r"'cuda:0'\) has CUDA compute capability 9\.0, without "
                       r"block-scaled FP4 tensor cores \(compute capability 10\.0\+"):  # fmt: skip
        fp4_backend("native", "cuda:0")
    backend, reason = fp4_backend("auto", "cuda:0")
    assert backend == "emulated" and "9.0" in reason


def test_auto_and_native_are_native_on_blackwell(monkeypatch):
    _fake_cuda(monkeypatch, (10, 0))
    assert fp4_backend("auto", "cuda:0")[0] == "native"
    assert fp4_backend("native", "cuda")[0] == "native"
    assert fp4_backend("emulated", "cuda:0") == ("emulated", "requested")


def test_a_misfit_shape_on_a_native_device_runs_emulated_with_a_warning(monkeypatch):
    module = importlib.import_module("mixprec.compute.fp4_linear")  # (a function's name too)
    monkeypatch.setattr(module, "fp4_backend", lambda backend, device: ("native", "test"))
    layer = Fp4Linear.from_linear(nn.Linear(48, 32), "nvfp4", backend="emulated")
    with pytest.warns(UserWarning, match=r"Fp4Linear \(32x48\) runs its 4-bit GEMMs emulated.*"
                      r"in_features 48 is not a multiple of 32"):  # fmt: skip
        assert layer._native() is False
    base = nn.Linear(64, 32)
    fitting = Fp4Linear.from_linear(base, "nvfp4", backend="emulated")
    assert fitting._native() is True  # on a CPU the packed path runs the GEMM's CPU model
    monkeypatch.undo()
    emulated = Fp4Linear.from_linear(base, "nvfp4", backend="emulated")
    x = data(24, 64)
    assert bits_equal(fitting(x), emulated(x))


def test_native_op_compiles_and_checkpoints_as_the_emulated_one():
    from torch.utils.checkpoint import checkpoint

    g = torch.Generator().manual_seed(8)
    x, w, b = data(24, 64), torch.randn(32, 64, generator=g) / 8, torch.randn(32, generator=g)

    def run(fn):
        wr = w.clone().requires_grad_()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            out = fn(x, wr)
            out.square().sum().backward()
        return out.detach(), wr.grad

    def native(xi, wi):
        return _fp4_linear(xi, wi, b, "nvfp4", torch.float32, True)

    eager = run(native)
    compiled = run(torch.compile(native, backend="aot_eager", fullgraph=True))
    checkpointed = run(lambda xi, wi: checkpoint(native, xi, wi, use_reentrant=False))
    for other in (compiled, checkpointed):
        assert all(bits_equal(a, e) for a, e in zip(other, eager, strict=True))


# -- on a Blackwell GPU -------------------------------------------------------------------------

needs_fp4_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (10, 0)),
    reason="needs a CUDA GPU with block-scaled FP4 tensor cores (compute capability 10.0+)",
)


@needs_fp4_gpu
@pytest.mark.parametrize("spec", RECIPES)
def test_native_layer_matches_the_emulated_one_on_gpu(spec):
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(256, 128).cuda()
    x = (torch.randn(200, 256, generator=g) * 3).cuda()
    grad = (torch.randn(200, 128, generator=g) * 1e-3).cuda()
    runs = []
    for backend in ("native", "emulated"):
        layer = Fp4Linear.from_linear(base, spec, backend=backend)
        assert layer._native() is (backend == "native")
        xr = x.clone().requires_grad_()
        base.weight.grad = None
        with torch.random.fork_rng(devices=[x.device]):
            torch.manual_seed(0)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = layer(xr)
            out.backward(grad.bfloat16())
        runs.append((out.float(), xr.grad.float(), base.weight.grad.float()))
    for native, emulated in zip(*runs, strict=True):
        # the same 4-bit operands; the fp32 additions in another order, tensor scales at the end
        torch.testing.assert_close(native, emulated, rtol=2**-7, atol=1e-5)


@needs_fp4_gpu
def test_native_layer_compiles_on_gpu():
    layer = Fp4Linear.from_linear(nn.Linear(64, 32).cuda(), "nvfp4", backend="native")
    x = torch.randn(16, 64, device="cuda")
    eager = layer(x)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)
