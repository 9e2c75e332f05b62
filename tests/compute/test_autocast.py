"""mixprec.autocast against torch.autocast: dtypes, values, op edits, nesting, state, caches."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixprec
from mixprec.app.tasks.transformer import TinyTransformer
from mixprec.compute import AutocastDeviceError, autocast, current_region, op_table

DTYPES = [torch.bfloat16, torch.float16]


def _no_region_left():
    return (
        current_region() is None
        and not torch.is_autocast_enabled("cpu")
        and torch._C._len_torch_function_stack() == 0
    )


def _op_cases():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 8, generator=g), torch.randn(4, 8, generator=g), torch.randn(4)
    a16 = torch.randn(3, 4, generator=g)
    labels = torch.tensor([0, 1, 3])
    return {
        "linear": lambda: F.linear(x, w, b),
        "matmul": lambda: x @ w.t(),
        "bmm": lambda: torch.bmm(x[None], w.t()[None]),
        "cross_entropy (fp32)": lambda: F.cross_entropy(F.linear(x, w), labels),
        "mse_loss (fp32)": lambda: F.mse_loss(F.linear(x, w), a16),
        "cat (promote)": lambda: torch.cat([F.linear(x, w), a16]),
        "relu (keep)": lambda: F.relu(F.linear(x, w)),
        "softmax (keep on cpu)": lambda: F.softmax(F.linear(x, w), dim=-1),
        "fp32 only": lambda: torch.exp(x),
        "integer": lambda: torch.arange(4) * 2,
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(_op_cases()))
def test_native_backend_matches_torch_autocast(dtype, case):
    fn = _op_cases()[case]
    with torch.autocast("cpu", dtype=dtype):
        want = fn()
    with autocast("cpu", dtype=dtype, backend="native"):
        got = fn()
    assert got.dtype == want.dtype
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(_op_cases()))
def test_emulated_backend_gives_torch_autocasts_dtypes(dtype, case):
    fn = _op_cases()[case]
    with torch.autocast("cpu", dtype=dtype):
        want = fn()
    with autocast("cpu", dtype=dtype, backend="emulated"):
        got = fn()
    assert got.dtype == want.dtype
    tol = torch.finfo(dtype).eps * 4 * want.float().abs().max().clamp(min=1).item()
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_whole_model_emulated_matches_native_forward_and_backward(dtype):
    torch.manual_seed(0)
    model = TinyTransformer(vocab=16, d_model=16, n_layers=2, n_heads=2, seq_len=8)
    tokens = torch.randint(0, 16, (2, 8))
    results = {}
    for backend in ("native", "emulated"):
        model.zero_grad()
        with autocast("cpu", dtype=dtype, backend=backend):
            logits = model(tokens)
            loss = F.cross_entropy(logits.float().reshape(-1, 16), tokens.reshape(-1))
        loss.backward()
        results[backend] = (logits.float(), [p.grad.clone() for p in model.parameters()])
    native, emulated = results["native"], results["emulated"]
    eps = torch.finfo(dtype).eps
    # A few 16-bit ulps at the scale of each tensor: rounding differs only in summation order.
    assert torch.allclose(
        native[0], emulated[0], rtol=0, atol=8 * eps * native[0].abs().max().item()
    )
    for g_native, g_emulated in zip(native[1], emulated[1], strict=True):
        scale = g_native.abs().max().clamp(min=1e-6).item()
        assert torch.allclose(g_native, g_emulated, rtol=0, atol=16 * eps * scale)


@pytest.mark.parametrize("backend", ["native", "emulated"])
def test_op_edits_take_effect_and_are_undone(backend):
    x = torch.randn(4, 8)
    lin = nn.Linear(8, 8)
    with autocast("cpu", dtype=torch.bfloat16, backend=backend):
        assert F.softmax(lin(x), -1).dtype == torch.bfloat16  # CPU default: keep
        with autocast("cpu", dtype=torch.bfloat16, backend=backend, ops={"softmax": "fp32"}):
            assert F.softmax(lin(x), -1).dtype == torch.float32
            assert torch.softmax(lin(x), -1).dtype == torch.float32
        assert F.softmax(lin(x), -1).dtype == torch.bfloat16
    with autocast("cpu", dtype=torch.bfloat16, backend=backend, ops={"linear": "fp32"}):
        out = lin(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, lin(x))  # really computed in fp32
    with autocast("cpu", dtype=torch.bfloat16, backend=backend, ops={"exp": "lower"}):
        assert torch.exp(x).dtype == torch.bfloat16
    assert torch.exp(x).dtype == torch.float32 and _no_region_left()


def test_op_table_is_visible():
    region = autocast("cpu", dtype=torch.bfloat16, ops={"softmax": "fp32", "cat": "keep"})
    table = region.op_table
    assert table["linear"] == "lower" and table["softmax"] == "fp32" and table["cat"] == "keep"
    assert op_table("cpu", torch.bfloat16)["softmax"] == "keep"  # the default is untouched
    assert "softmax.int" in op_table("cuda", torch.float16).by_category()["fp32"]


def test_nesting_and_disable():
    lin = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with autocast("cpu", backend="emulated"):
        assert lin(x).dtype == torch.bfloat16
        with autocast("cpu", enabled=False):
            assert lin(x).dtype == torch.float32
            with autocast("cpu", dtype=torch.float16, backend="emulated"):
                assert lin(x).dtype == torch.float16
            assert lin(x).dtype == torch.float32
        assert lin(x).dtype == torch.bfloat16
    assert lin(x).dtype == torch.float32 and _no_region_left()


@pytest.mark.parametrize("backend", ["native", "emulated"])
def test_state_is_restored_after_an_exception(backend):
    lin = nn.Linear(4, 4)
    with pytest.raises(ZeroDivisionError):
        with autocast("cpu", backend=backend):
            with autocast("cpu", ops={"softmax": "fp32"}):
                lin(torch.randn(2, 4))
                1 / 0  # noqa: B018
    assert _no_region_left()
    assert lin(torch.randn(2, 4)).dtype == torch.float32


def test_works_as_a_decorator_and_reenters():
    lin = nn.Linear(4, 4)

    @autocast("cpu", dtype=torch.float16, backend="emulated")
    def forward(x, depth=0):
        return forward(x, depth + 1) if depth < 2 else lin(x)

    assert forward(torch.randn(2, 4)).dtype == torch.float16
    assert _no_region_left()


def test_regions_leave_other_devices_alone():
    lin = nn.Linear(4, 4)
    with autocast("cuda", dtype=torch.float16, backend="emulated"):  # CPU tensors: untouched
        assert lin(torch.randn(2, 4)).dtype == torch.float32


@pytest.mark.parametrize("backend", ["native", "emulated"])
def test_no_stale_cast_after_an_in_place_update(backend):
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    x = torch.randn(4, 8)
    with autocast("cpu", backend=backend):
        lin(x).float().sum().backward()
        opt.step()  # an in-place update inside the region
        second = lin(x)
    with autocast("cpu", backend=backend):
        fresh = lin(x)
    assert torch.equal(second, fresh)


@pytest.mark.parametrize("backend", ["native", "emulated"])
@pytest.mark.parametrize(
    "change",
    [
        lambda p: p.data.mul_(2),
        lambda p: setattr(p, "data", p.data * 2),
        lambda p: p.detach().mul_(2),
    ],
    ids=["data-in-place", "data-assignment", "detached-in-place"],
)
def test_no_stale_cast_however_a_weight_changes(backend, change):
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8)
    with autocast("cpu", backend=backend, cache_enabled=True):
        lin(x)
        change(lin.weight)
        second = lin(x)
    with autocast("cpu", backend=backend):
        fresh = lin(x)
    assert torch.equal(second, fresh)


def test_auto_backend_is_visible_and_consistent_with_the_probe():
    region = autocast("cpu", dtype=torch.bfloat16)
    report = mixprec.hardware.probe("cpu", measure=False)
    assert region.backend == ("native" if report.has_fast_gemm("bf16") else "emulated")
    assert region.reason
    assert "backend=" in repr(region)


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"device_type": "tpu"}, ValueError, r"not available for device type 'tpu'; valid .*cpu"),
        ({"device_type": 0}, TypeError, r"device_type must be a string .* got int 0"),
        ({"device_type": 0}, ValueError, r"device_type must be a string"),  # torch's type
        ({"device_type": "tpu"}, RuntimeError, r"not available for device type 'tpu'"),  # torch's
        ({"dtype": 16}, TypeError, r"dtype must be a torch.dtype or a format name"),
        ({"dtype": "fp8"}, ValueError, r"unknown number format 'fp8'"),
        ({"backend": "fast"}, ValueError, r"unknown autocast backend 'fast'; valid .*'emulated'"),
        (
            {"ops": {"sofmax": "fp32"}},
            ValueError,
            r"unknown op 'sofmax'.*did you mean .*'softmax.int'",
        ),
        ({"ops": {"softmax": "fp64"}}, ValueError, r"unknown op category 'fp64' for op 'softmax'"),
        ({"ops": ["softmax"]}, TypeError, r"op overrides must be a mapping"),
        ({"enabled": "yes"}, TypeError, r"enabled must be a bool \(True or False\), got str 'yes'"),
        ({"cache_enabled": "no"}, TypeError, r"cache_enabled must be a bool .*got str 'no'"),
        ({"target": "tpu"}, ValueError, r"unknown target 'tpu'.*valid targets: 'cpu', 'cuda'"),
        (
            {"target": "cuda", "backend": "native"},
            ValueError,
            r"target='cuda' with backend='native' on 'cpu'.*use backend='emulated'",
        ),
        (
            {"ops": {"__rtruediv__": "fp32"}},
            ValueError,
            r"unknown op '__rtruediv__': ops are named as aten",
        ),
    ],
)
def test_bad_arguments(kwargs, error, message):
    kwargs = {"device_type": "cpu", **kwargs}
    with pytest.raises(error, match=message):
        autocast(**kwargs)


def test_float32_warns_and_disables_as_torch_does():
    dtype = torch.float32
    with pytest.warns(UserWarning, match="not supported. Disabling autocast"):
        torch_region = torch.autocast("cpu", dtype=dtype)
    with pytest.warns(UserWarning, match="not supported. Disabling autocast"):
        region = autocast("cpu", dtype=dtype)
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with torch_region:
        want = (torch.is_autocast_enabled("cpu"), torch.mm(x, w.t()).dtype)
    with region:
        got = (torch.is_autocast_enabled("cpu"), torch.mm(x, w.t()).dtype)
    assert got == want == (False, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.bool, "int8"], ids=str)
def test_a_dtype_autocast_cannot_compute_in_is_refused_as_a_dtype_or_a_name(dtype):
    # torch warns and runs fp32 for these: a region that silently computes nothing in low
    # precision is refused instead, the dtype and the name alike (issue 19, item 25).
    with pytest.warns(UserWarning, match="not supported. Disabling autocast"):
        torch.autocast("cpu", dtype=torch.int8 if dtype == "int8" else dtype)
    with pytest.raises(ValueError, match=r"int8|float64|bool") as refused:
        autocast("cpu", dtype=dtype)
    if isinstance(dtype, str):
        return
    assert "not supported" in str(refused.value) and "torch.bfloat16" in str(refused.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with autocast("cpu", dtype=dtype, enabled=False):  # off takes any dtype, as torch's
            assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, "bf16"])
def test_disabled_accepts_any_dtype(dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enabled=False never warns, as torch's
        region = autocast("cpu", dtype=dtype, enabled=False)
    with region:
        assert not torch.is_autocast_enabled("cpu")


def test_the_op_tables_name_exactly_the_ops_torch_autocasts():
    # In a fresh process (no mixprec kernel registered yet): the CPU table is torch's CPU list, and
    # the hand-written CUDA table names every op torch registers a CUDA autocast kernel for (in
    # every build), so a torch upgrade that changes a list shows up here.
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from mixprec.compute.ops import BANNED_CUDA, _registered, op_table\n"
        "assert set(op_table('cpu', torch.bfloat16)) == _registered('AutocastCPU')\n"
        "assert set(op_table('cuda', torch.float16)) | BANNED_CUDA == _registered('AutocastCUDA')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("device_type", ["gpu", "not a real device", 1])
def test_op_table_refuses_a_device_autocast_refuses(device_type):
    with pytest.raises(AutocastDeviceError) as refused:
        autocast(device_type)
    with pytest.raises(AutocastDeviceError) as table:
        op_table(device_type, torch.float16)
    assert str(table.value) == str(refused.value)


@pytest.mark.parametrize(
    "dtype",
    [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, "e4m3"],
    ids=str,
)
@pytest.mark.parametrize("backend", ["native", "emulated"])
def test_an_fp8_dtype_is_refused_pointing_to_the_fp8_recipes(dtype, backend):
    # It used to construct and run fp32 with only torch's "not supported" warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before torch's warning
        with pytest.raises(ValueError, match=r"autocast does not compute in .*fp8.*compute=fp8:"):
            autocast("cpu", dtype=dtype, backend=backend)
        with autocast("cpu", dtype=dtype, enabled=False):  # disabled: any dtype, as torch
            assert not torch.is_autocast_enabled("cpu")
