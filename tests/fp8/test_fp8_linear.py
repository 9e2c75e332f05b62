"""The FP8 linear custom op and module: the definition, delayed scaling, compile, conversion."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from fp8_reference import RECIPE_TABLE, ref_linear, ref_quantize, ref_scale
from torch import nn

from mixprec.compute import autocast
from mixprec.compute.fp8 import Fp8Recipe
from mixprec.compute.fp8_convert import Fp8Plan, convert_to_fp8
from mixprec.compute.fp8_linear import Fp8Linear, fp8_backend, fp8_linear


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a, b)


def inputs(m=48, k=256, n=128, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    w = torch.randn(n, k, generator=g) / 16
    b = torch.randn(n, generator=g)
    grad = (torch.randn(m, n, generator=g) * 1e-3).to(dtype)
    return x, w, b, grad


@pytest.mark.parametrize("recipe", list(RECIPE_TABLE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fp8_linear_is_the_definition_bit_for_bit(recipe, dtype):
    x, w, b, grad = inputs(dtype=dtype)
    b = b.to(dtype)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    out = fp8_linear(xr, wr, br, recipe)
    out.backward(grad)
    want = ref_linear(x, w, b, grad, recipe, dtype)
    for got, ref in zip((out, xr.grad, wr.grad, br.grad), want, strict=True):
        assert bits_equal(got, ref)


def test_output_rounds_once_to_the_compute_dtype_under_autocast():
    x, w, b, _ = inputs()
    layer = Fp8Linear.from_linear(nn.Linear(256, 128), "rowwise")
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    with autocast("cpu", dtype=torch.bfloat16, backend="emulated"):
        out = layer(x)
    want = ref_linear(x.bfloat16(), w, b, torch.zeros(48, 128), "rowwise", torch.bfloat16)[0]
    assert bits_equal(out, want)


def test_high_precision_grad_weight_gemm():
    x, w, _, grad = inputs()
    wr = w.clone().requires_grad_()
    fp8_linear(x, wr, None, "rowwise_with_gw_hp").backward(grad)
    assert bits_equal(wr.grad, grad.T @ x)  # fp32 operands, fp32 accumulate


def test_delayed_scaling_uses_past_amaxes_and_records_this_steps():
    torch.manual_seed(0)
    layer = Fp8Linear.from_linear(
        nn.Linear(64, 32), "tensorwise:scaling=delayed,history=4,margin=1"
    )
    x1, x2 = torch.randn(8, 64) * 5, torch.randn(8, 64)
    g1, g2 = torch.randn(8, 32), torch.randn(8, 32) * 0.1
    layer(x1).backward(g1)
    hist = layer.fp8_amax_history
    assert hist[:, 0].tolist() == [
        x1.abs().max().item(),
        layer.weight.abs().max().item(),
        g1.abs().max().item(),
    ]
    # Step 2 quantizes x2 with the scale of step 1's amax (halved by the margin), so the small
    # x2 is scaled for a larger range than its own: its fp8 values are the reference's at that
    # scale.
    scale = ref_scale(x1.abs().max().item(), "e4m3", "dynamic") / 2
    w_scale = ref_scale(layer.weight.abs().max().item(), "e4m3", "dynamic") / 2
    out = layer(x2)
    xq = ref_quantize(x2, (8, 64), "e4m3", "dynamic", scale=scale)
    wq = ref_quantize(layer.weight.detach(), (32, 64), "e4m3", "dynamic", scale=w_scale)
    assert bits_equal(out, xq @ wq.T + layer.bias.detach())
    out.backward(g2)
    assert hist[0, :2].tolist() == [x2.abs().max().item(), x1.abs().max().item()]
    assert hist[2, :2].tolist() == [g2.abs().max().item(), g1.abs().max().item()]
    assert "fp8_amax_history" in layer.state_dict()
    state = layer.delayed_scaling_state()
    assert state["amax_input"] == x2.abs().max().item()
    next_scale = ref_scale(max(x1.abs().max().item(), x2.abs().max().item()), "e4m3", "dynamic")
    assert state["scale_input"] == next_scale / 2


def test_dynamic_layers_have_no_delayed_state():
    with pytest.raises(RuntimeError, match=r"'rowwise' scales dynamically.*'tensorwise_delayed'"):
        Fp8Linear(8, 8, recipe="rowwise").delayed_scaling_state()


def test_delayed_scaling_first_step_is_dynamic():
    x, w, _, grad = inputs()
    delayed = Fp8Linear.from_linear(nn.Linear(256, 128), "tensorwise_delayed")
    dynamic = Fp8Linear.from_linear(copy.deepcopy(delayed), "tensorwise")
    with torch.no_grad():
        delayed.weight.copy_(w)
        dynamic.weight.copy_(w)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    oa, ob = delayed(xa), dynamic(xb)
    oa.backward(grad)
    ob.backward(grad)
    assert bits_equal(oa, ob) and bits_equal(xa.grad, xb.grad)


def test_compiled_equals_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 16))
    convert_to_fp8(model, "rowwise")
    twin = copy.deepcopy(model)
    x = torch.randn(32, 64)
    eager = model(x)
    eager.square().sum().backward()
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    assert bits_equal(out, eager)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert bits_equal(p.grad, q.grad)


def test_convert_keeps_parameters_and_state_dict_keys():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    params = list(model.parameters())
    keys = list(model.state_dict())
    done = convert_to_fp8(model, "tensorwise")
    assert done.converted == ["0", "2"] and not done.fallbacks
    assert all(isinstance(m, Fp8Linear) for m in (model[0], model[2]))
    assert list(model.parameters()) == params  # the same objects: optimizers keep working
    assert list(model.state_dict()) == keys


def test_plan_rules_and_filter_exclude_layers():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    done = convert_to_fp8(model, "rowwise; 2 -> bf16", module_filter=lambda m, n: n != "0")
    assert done.converted == [] and done.excluded == ["0", "2"]
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear


def test_misfit_layer_falls_back_visibly_or_is_refused():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with pytest.warns(UserWarning, match=r"layer '2' stays in high precision: mxfp8 needs"):
        done = convert_to_fp8(copy.deepcopy(model), "mxfp8")
    assert done.converted == ["0"] and list(done.fallbacks) == ["2"]
    with pytest.raises(
        ValueError,
        match=r"layer '2' \(10x64\) does not fit recipe 'mxfp8'.*"
        r"on_mismatch='fallback'.*'mxfp8; 2 -> bf16'",
    ):
        convert_to_fp8(model, "mxfp8", on_mismatch="error")
    assert type(model[0]) is nn.Linear  # the refused conversion swapped no layer, not even '0'


def test_bad_settings_name_the_choices():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"unknown on_mismatch 'skip'; valid choices: 'fallback'"):
        convert_to_fp8(model, "rowwise", on_mismatch="skip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown fp8 recipe 'rowise'"):
        convert_to_fp8(model, "rowise")
    with pytest.raises(ValueError, match=r"unknown fp8 backend 'gpu'; valid backends: 'auto'"):
        convert_to_fp8(model, "rowwise", backend="gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"malformed fp8 rule 'lm_head -> fp8'"):
        Fp8Plan.parse("rowwise; lm_head -> fp8")


@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9),
    reason="this machine has FP8 tensor cores",
)
def test_native_backend_without_fp8_units_is_refused():
    with pytest.raises(ValueError, match=r"fp8 backend 'native' cannot run here: device 'cpu'"):
        fp8_backend("native", "cpu")
    assert fp8_backend("auto", "cpu") == (
        "emulated",
        "device 'cpu' is not a CUDA GPU with FP8 tensor cores",
    )


needs_fp8_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
    reason="needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+)",
)


@needs_fp8_gpu
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_native_matches_emulated_on_gpu(recipe):
    x, w, b, grad = (t.cuda() for t in inputs(m=64, dtype=torch.bfloat16))
    runs = []
    for backend in ("native", "emulated"):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = fp8_linear(xr, wr, b, recipe, backend=backend)
        out.backward(grad)
        runs.append((out.float(), xr.grad.float(), wr.grad.float()))
    for native, emulated in zip(*runs, strict=True):
        # the same fp8 operands; only the order of the fp32 additions differs
        torch.testing.assert_close(native, emulated, rtol=2**-7, atol=1e-5)


def test_recipe_object_and_string_give_the_same_layer():
    a = Fp8Linear(8, 4, recipe=Fp8Recipe.parse("blockwise:block=4"))
    b = Fp8Linear(8, 4, recipe="blockwise:block=4")
    assert a.recipe == b.recipe and "blockwise:block=4" in repr(a)


def test_training_tracks_an_fp32_twin():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 1))
    twin = copy.deepcopy(model)
    convert_to_fp8(model, "tensorwise_delayed")
    x = torch.randn(128, 32)
    y = x[:, :1] * 2
    with torch.no_grad():
        first = F.mse_loss(twin(x), y).item()
    finals = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for net in (model, twin):
            opt = torch.optim.SGD(net.parameters(), lr=0.05)
            for _ in range(30):
                loss = F.mse_loss(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            finals.append(loss.item())
    fp8_loss, fp32_loss = finals
    assert fp32_loss < first  # the twin learned, and fp8 followed it closely
    assert abs(fp8_loss - fp32_loss) <= 0.1 * fp32_loss
