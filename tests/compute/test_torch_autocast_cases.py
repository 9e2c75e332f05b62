"""PyTorch's own CPU autocast tests, run on ``torch.autocast`` and on ``mixprec.autocast``.

Ported from ``test/test_autocast.py`` (``TestAutocastCPU``, the CPU-applicable cases of
``TestAutocastDeviceType``, ``TestTorchAutocast``; the ``custom_fwd``/``custom_bwd`` cases of
``test/test_cuda.py`` and the state a drop-in must share with ``torch.autocast`` are in
``test_torch_autocast_state_cases.py``), by substitution: every case runs under
``torch.autocast`` (the reference: a case that fails there is skipped with the reason) and under
``mixprec.autocast`` with the native and the emulated backend, for bf16 and fp16.

What is asserted is what torch's test asserts — the output dtype, the autocast state, and the value
equal to the op run with autocast disabled on inputs cast as torch's autocast casts them. On the
emulated backend a GEMM-class op promises another value: the fp32 op on the 16-bit inputs, rounded
once to 16 bits (see ``_check_emulated_value``).

Not ported: tests of the deprecated ``torch.cpu.amp.*`` aliases, and accelerator-only cases
(``test_autocast_prioritize`` tests CUDA's ``index_put`` promote rule). The cast-cache cases are
ported for what they say about a region that never caches casts: mixprec's regions run torch's
autocast with its cache off.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import pathlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch_cases import (
    AUTOCAST_KINDS,
    OpCase,
    cast,
    cpu_op_cases,
    emulated_control,
    reference_or_skip,
    region,
    run_case,
    same,
    tensors,
    ulp_distance,
)

import mixprec

DTYPES = [torch.bfloat16, torch.float16]
MIXPREC_KINDS = [k for k in AUTOCAST_KINDS if k != "torch"]


# -- TestAutocastCPU: torch's op lists --------------------------------------------------------

# On the emulated backend: ops that are one aten GEMM primitive (mm, bmm, addmm, baddbmm, addbmm,
# convolution) once decomposed: the fp32 primitive on widened 16-bit inputs, rounded once, is
# exactly the emulation, so the value is bit-exact.
_ONE_PRIMITIVE = {
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "bmm", "mm", "matmul", "baddbmm", "addmm", "addbmm", "linear",
}  # fmt: skip
# One op whose result a tensor core rounds once (a temporal convolution summing its taps in
# fp32): within 1 ulp of the fp32 op rounded once, elementwise.
_ONE_ROUNDING = {"conv_tbc"}
# _addmm_activation is not in these sets: torch's CPU kernel rounds the GEMM to 16 bits and then
# applies the activation (erf GELU or ReLU) to that 16-bit value, and the emulated kernel does the
# same, so the op passes torch's own check (bit-equal to its control) on both backends.
# Five GEMMs and a softmax, each rounded to 16 bits as on hardware: no single rounding is
# promised; within 2 ulps at the scale of each output of the fp32 op rounded once.
_MANY_GEMMS = {"_native_multi_head_attention"}

_EMULATED_FAILURES: dict[str, str] = {}  # op -> why the emulated backend misses it


def _op_params():
    params = []
    for case in cpu_op_cases(DTYPES):
        for kind in AUTOCAST_KINDS:
            marks = ()
            if kind == "emulated" and case.op in _EMULATED_FAILURES:  # none left today
                marks = (pytest.mark.xfail(strict=True, reason=_EMULATED_FAILURES[case.op]),)
            params.append(pytest.param(kind, case, id=f"{kind}-{case.id}", marks=marks))
    return params


def _check_emulated_value(case: OpCase, result) -> None:
    want = emulated_control(case)
    eps = torch.finfo(case.run_as).eps
    for got, ref in zip(tensors(result), tensors(want), strict=True):
        if case.op in _ONE_PRIMITIVE:
            assert torch.equal(got, ref), f"{case.op}: not the fp32 GEMM rounded once"
        elif case.op in _ONE_ROUNDING:
            worst = ulp_distance(got, ref).max().item()
            assert worst <= 1, f"{case.op}: {worst} ulp from the fp32 op rounded once"
        else:
            assert case.op in _MANY_GEMMS, f"{case.op}: no emulated reference declared"
            scale = ref.float().abs().max().item()
            error = (got.float() - ref.float()).abs().max().item()
            assert error <= 2 * eps * scale, f"{case.op}: {error / (eps * scale):.2f} ulps"


def _op_case(kind: str, case: OpCase):
    result, control = run_case(case, lambda: region(kind, case.amp_dtype))
    gemm = case.op in _ONE_PRIMITIVE | _ONE_ROUNDING | _MANY_GEMMS
    if kind == "emulated" and gemm and case.run_as != torch.float32:
        _check_emulated_value(case, result)
    else:  # torch's check: bit-equal to the op on inputs cast as autocast casts them
        assert same(result, control), f"{case.op} does not match its control"
    return result


@pytest.mark.parametrize(("kind", "case"), _op_params())
def test_autocast_op_lists(kind, case):
    """test_autocast_{torch,methods}_expect_builtin_promote, _torch_16, _nn_16, _torch_fp32,
    _nn_fp32 and _torch_need_autocast_promote: one parameter per op, list and dtype."""
    reference_or_skip(kind, _op_case, case)
    if kind != "torch":
        _op_case(kind, case)


def _torchs_cpu_lists() -> dict[str, list[str]]:
    """The op names of each list in the installed torch's ``AutocastCPUTestLists``, read from its
    source (importing it needs torch's test-only dependencies)."""
    spec = importlib.util.find_spec("torch.testing._internal.autocast_test_lists")
    if spec is None or spec.origin is None:
        pytest.skip("this torch install ships no autocast_test_lists")
    tree = ast.parse(pathlib.Path(spec.origin).read_text())
    cls = next(
        n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "AutocastCPUTestLists"
    )
    lists = {}
    for node in ast.walk(cls):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.List):
            target = node.targets[0]
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
                entries = [e.elts[0].value for e in node.value.elts if isinstance(e, ast.Tuple)]
                lists[target.attr] = entries
    return lists


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_op_lists_are_torchs(dtype):
    """The rebuilt lists hold exactly the ops of the installed torch's CPU lists, in order."""
    ours: dict[str, list[str]] = {}
    for case in cpu_op_cases([dtype]):
        ours.setdefault(case.source, []).append(case.op)
    assert ours == _torchs_cpu_lists()


def _generic_twice(kind: str, case: OpCase):
    outputs = []
    for _ in range(2):
        with region(kind, case.amp_dtype):
            outputs.append(getattr(torch, case.op)(*case.args, **case.kwargs))
    assert same(*outputs), f"{case.op} differs between two {kind} regions"
    return outputs[0]


@pytest.mark.parametrize("kind", AUTOCAST_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_generic_autocast(kind, dtype):
    """The torch_16 ops give the same result in two regions, and mixprec's dtypes are torch's."""
    for case in cpu_op_cases([dtype]):
        if case.source != "torch_16":
            continue
        want = reference_or_skip(kind, _generic_twice, case)
        got = _generic_twice(kind, case)
        assert [t.dtype for t in tensors(got)] == [t.dtype for t in tensors(want)], case.op


def _lstm(kind: str, dtype: torch.dtype):
    torch.manual_seed(0)
    x, hx, cx = torch.randn(1, 2, 1), torch.randn(2, 2, 1), torch.randn(2, 2, 1)
    lstm = nn.LSTM(1, 1, 2).to(dtype)
    with pytest.raises(ValueError, match=r"RNN input dtype .* does not match weight dtype"):
        lstm(x, (hx, cx))  # outside autocast: torch refuses fp32 input to 16-bit weights
    with region(kind, dtype):
        out, (h, c) = lstm(x, (hx, cx))
    # An fp32 twin on the same (16-bit) weights and the inputs rounded to 16 bits.
    twin = copy.deepcopy(lstm).float()
    want, (want_h, want_c) = twin(*cast(cast((x, (hx, cx)), dtype), torch.float32))
    want, want_h, want_c = (t.float() for t in (want, want_h, want_c))
    eps = torch.finfo(dtype).eps
    for got, ref in ((out, want), (h, want_h), (c, want_c)):
        assert got.dtype == dtype
        # a few 16-bit roundings per gate and step: 4 ulps at the scale of the output
        scale = ref.abs().max().item()
        assert (got.float() - ref).abs().max().item() <= 4 * eps * scale
    return out, h, c


@pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="torch runs the 16-bit LSTM through oneDNN, which lacks bf16 on this CPU",
)
@pytest.mark.parametrize("kind", AUTOCAST_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autocast_rnn(kind, dtype):
    """A 16-bit LSTM refuses fp32 input outside autocast and runs on it inside."""
    want = reference_or_skip(kind, _lstm, dtype)
    got = _lstm(kind, dtype)
    if kind == "native":
        assert all(map(torch.equal, got, want))  # torch's kernels: torch's values


@pytest.mark.parametrize("kind", AUTOCAST_KINDS)
def test_autocast_disabled_with_fp32_dtype(kind):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch neither warns nor raises here
        with region(kind, torch.float32, enabled=False):
            assert not torch.is_autocast_enabled("cpu")
            assert torch.ones(10).dtype == torch.float32


# -- TestAutocastDeviceType, on the CPU -------------------------------------------------------


@pytest.mark.parametrize("kind", AUTOCAST_KINDS)
def test_autocast_fast_dtype(kind):
    """With no dtype, a region uses torch's autocast dtype for the CPU (bf16)."""
    with region(kind, None):
        inside = torch.get_autocast_dtype("cpu")
    assert inside == torch.get_autocast_dtype("cpu") == torch.bfloat16


def _linear_and_input():
    torch.manual_seed(0)
    return nn.Linear(2, 2), torch.randn(8, 2)


@pytest.mark.parametrize("kind", AUTOCAST_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autocast_nograd_caching(kind, dtype):
    """Leaving no_grad inside a region gives outputs that track gradients again."""
    model, inp = _linear_and_input()
    with region(kind, dtype):
        with torch.no_grad():
            out1 = model(inp)
        assert not out1.requires_grad
        out2 = model(inp)
        assert out2.requires_grad and out2.grad_fn is not None
        out2.float().mean().backward()
    assert model.weight.grad is not None and model.bias.grad is not None


@pytest.mark.parametrize("kind", AUTOCAST_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autocast_inference_mode_interaction(kind, dtype):
    model, inp = _linear_and_input()
    with region(kind, dtype):
        torch.clear_autocast_cache()
        with torch.inference_mode():
            out1 = model(inp)
            assert not out1.requires_grad and out1.dtype == dtype
        out2 = model(inp)
        assert out2.requires_grad
        out2.float().mean().backward()
    with torch.inference_mode():
        with region(kind, dtype):
            out = model(inp)
            assert not out.requires_grad and out.dtype == dtype


@pytest.mark.parametrize("kind", AUTOCAST_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autocast_caching_still_works_with_gradients(kind, dtype):
    model, inp = _linear_and_input()
    with region(kind, dtype):
        outs = [model(inp) for _ in range(3)]
        assert all(o.requires_grad and o.grad_fn is not None for o in outs)
        outs[0].float().mean().backward(retain_graph=True)
        outs[1].float().mean().backward(retain_graph=True)
        outs[2].float().mean().backward()
    # three identical passes accumulate three times one pass's gradient (g + g + g is 3 * g,
    # rounded once, in fp32)
    single, _ = _linear_and_input()
    with region(kind, dtype):
        single(inp).float().mean().backward()
    assert torch.equal(model.weight.grad, 3 * single.weight.grad)


@pytest.mark.parametrize("kind", AUTOCAST_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autocast_mixed_grad_contexts(kind, dtype):
    model, inp = _linear_and_input()
    with region(kind, dtype):
        with torch.no_grad():
            out1 = model(inp)
        out2 = model(inp)
        with torch.no_grad():
            out3 = model(inp)
        out4 = model(inp)
        assert not out1.requires_grad and not out3.requires_grad
        assert out2.requires_grad and out4.requires_grad
        (out2.float().mean() + out4.float().mean()).backward()
    assert model.weight.grad is not None


class _CastCounter(TorchDispatchMode):
    """Counts casts of one tensor to one dtype (``aten._to_copy``), as torch's cache tests do."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight, self.dtype, self.count = weight, dtype, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (
            func is torch.ops.aten._to_copy.default
            and args[0] is self.weight
            and kwargs.get("dtype") is self.dtype
        ):
            self.count += 1
        return func(*args, **kwargs)


def _casts_of_a_weight_used_twice(make_region, dtype: torch.dtype) -> int:
    weight = nn.Parameter(torch.randn(4, 3))
    data = torch.randn(2, 3)
    with _CastCounter(weight, dtype) as counter:
        with make_region():
            F.linear(data, weight)
            F.linear(data, weight)
    return counter.count


@pytest.mark.parametrize("kind", MIXPREC_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cast_cache_mixprec_casts_once_per_use(kind, dtype):
    """test_cast_cache_is_global, for a region that never caches: torch casts a weight used
    twice once (its cache); mixprec casts it once per use, as torch.autocast(cache_enabled=False)
    does, whatever cache_enabled says."""
    cached = _casts_of_a_weight_used_twice(lambda: region("torch", dtype), dtype)
    uncached = _casts_of_a_weight_used_twice(
        lambda: region("torch", dtype, cache_enabled=False), dtype
    )
    # the reference shows what a cache does (the uncached count is one cast per use whether this
    # region runs torch's kernels or, after a mixprec region, mixprec's: see kernels.py)
    assert (cached, uncached) == (1, 2)
    for cache_enabled in (None, True, False):
        got = _casts_of_a_weight_used_twice(
            lambda c=cache_enabled: region(kind, dtype, cache_enabled=c), dtype
        )
        assert got == uncached, f"cache_enabled={cache_enabled}"


class _CustomLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_t):
        ctx.save_for_backward(x, w_t)
        return F.linear(x, w_t)

    @staticmethod
    def backward(ctx, grad_output):
        x, w_t = ctx.saved_tensors
        with torch.autocast(device_type="cpu"):
            grad_x = torch.matmul(grad_output, w_t)
            grad_w = torch.matmul(x.transpose(0, 1), grad_output).transpose(0, 1)
        return grad_x, grad_w


def _casts_of_a_cached_tensor(kind: str) -> int:
    torch.manual_seed(0)
    data, weight = torch.randn(2, 3), nn.Parameter(torch.randn(4, 3))
    try:
        torch._C._set_cached_tensors_enabled(True)
        torch._C._add_cached_tensor(weight)
        with _CastCounter(weight, torch.bfloat16) as counter:
            with region(kind, torch.bfloat16):
                out = _CustomLinear.apply(data, weight)
                total = out.float().sum()
            total.backward()
    finally:
        torch._C._remove_cached_tensor(weight)
        torch._C._set_cached_tensors_enabled(False)
    return counter.count


@pytest.mark.parametrize("kind", AUTOCAST_KINDS)
def test_cache_disabled(kind):
    """A tensor marked as cached is never served from autocast's cache: the forward and the
    backward (an autocast region of its own) each cast it."""
    want = reference_or_skip(kind, _casts_of_a_cached_tensor)
    assert want == 2
    assert _casts_of_a_cached_tensor(kind) == want


# -- TestTorchAutocast ------------------------------------------------------------------------


def _make(kind: str, device_type, **kwargs):
    if kind == "torch":
        return torch.autocast(device_type=device_type, **kwargs)
    return mixprec.autocast(device_type, backend=kind, **kwargs)


@pytest.mark.parametrize("kind", AUTOCAST_KINDS)
def test_invalid_device(kind):
    """torch raises RuntimeError for an unknown device type; mixprec's error is one too."""
    dev = "not a real device"
    message = {
        "torch": rf"Invalid device string: '{dev}'",
    }.get(kind, rf"not available for device type '{dev}'; valid device types: .*'cpu'")
    with pytest.raises(RuntimeError, match=message):
        with _make(kind, dev):
            torch.tensor(1)


@pytest.mark.parametrize("kind", AUTOCAST_KINDS)
def test_non_string_device(kind):
    """A torch.device for device_type is a ValueError in torch; mixprec's error is one too."""
    dev = torch.device("cpu")
    message = {
        "torch": r"Expected `device_type` of type `str`, got: `<class 'torch.device'>`",
    }.get(kind, r"device_type must be a string such as 'cpu' or 'cuda', got device")
    with pytest.raises(ValueError, match=message):
        _make(kind, dev)


_NOT_CALLABLE = (
    "mixprec.autocast.__call__ wraps any object: autocast('cpu')(tensor) returns a function "
    "instead of raising torch's TypeError 'autocast()(func) requires a callable, but got Tensor'"
)


@pytest.mark.parametrize(
    "kind",
    [k for k in AUTOCAST_KINDS],
)
def test_autocast_called_with_non_callable(kind):
    x = torch.randn(2, 3)
    with pytest.raises(TypeError, match=r"requires a callable, but got Tensor"):
        _make(kind, "cpu")(x)
