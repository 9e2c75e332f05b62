"""The eager fast path of the emulated GEMMs equals their custom ops, bit for bit.

Plain eager calls skip torch.library's per-call machinery (``mixprec.compute._eager``) and run
``mm``/``addmm`` as one C++ call each way; under a dispatch mode the custom ops run as before. The
reference is the custom-op path itself: the same model, inputs and gradients under a mode that
only passes ops through.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from unittest.mock import ANY

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import mixprec
from mixprec.app.probes import activation_bytes
from mixprec.compute import emulate_build, kernels
from mixprec.compute.fp4_linear import fp4_linear
from mixprec.compute.fp8_linear import _operand, fp8_linear
from mixprec.recipes import RECIPES
from mixprec.scaled import fp8_fake_quantize

DTYPES = (torch.bfloat16, torch.float16)


class _PassThrough(TorchDispatchMode):
    """Observes every op (so the custom ops run as ops) and changes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _run(fn, inputs, observed: bool):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    if observed:
        with _PassThrough() as mode:
            out = fn(*leaves)
            out.float().square().sum().backward()
        assert any(op.startswith("mixprec.") for op in mode.ops)  # the custom ops ran
    else:
        out = fn(*leaves)
        out.float().square().sum().backward()
    return out.detach(), [t.grad for t in leaves]


def _emulated(dtype, fn):
    def run(*args):
        with mixprec.autocast("cpu", dtype=dtype, backend="emulated"):
            return fn(*args)

    return run


CASES = {
    "linear+bias": (lambda x, w, b: F.linear(x, w, b), [(16, 24), (8, 24), (8,)]),
    "linear": (lambda x, w: F.linear(x, w), [(16, 24), (8, 24)]),
    "linear x transposed": (lambda x, w, b: F.linear(x.t(), w, b), [(24, 16), (8, 24), (8,)]),
    "linear 3-d": (lambda x, w, b: F.linear(x, w, b), [(2, 5, 24), (8, 24), (8,)]),
    "linear 3-d, no bias": (lambda x, w: F.linear(x, w), [(2, 5, 24), (8, 24)]),
    "linear 3-d, strided": (lambda x, w, b: F.linear(x.mT, w, b), [(2, 24, 5), (8, 24), (8,)]),
    "linear 4-d": (lambda x, w, b: F.linear(x, w, b), [(2, 3, 5, 24), (8, 24), (8,)]),
    "matmul": (lambda a, b: a @ b, [(3, 16, 24), (24, 8)]),
    "bmm": (lambda a, b: torch.bmm(a, b), [(3, 16, 24), (3, 24, 8)]),
    "addmm scaled": (
        lambda c, a, b: torch.addmm(c, a, b, beta=0.5, alpha=2.0),
        [(16, 8), (16, 24), (24, 8)],
    ),
    "conv2d": (lambda x, w, b: F.conv2d(x, w, b, padding=1), [(2, 3, 6, 6), (4, 3, 3, 3), (4,)]),
    "conv2d strided": (
        lambda x, w: F.conv2d(x, w, None, (2, 1), 1, 2, 2),
        [(2, 4, 7, 7), (6, 2, 3, 3)],
    ),
    "conv2d channels-last": (
        lambda x, w, b: F.conv2d(
            x.contiguous(memory_format=torch.channels_last),
            w.contiguous(memory_format=torch.channels_last),
            b,
            padding=1,
        ),
        [(2, 3, 6, 6), (4, 3, 3, 3), (4,)],
    ),
    "conv2d unbatched": (lambda x, w, b: F.conv2d(x, w, b), [(3, 6, 6), (4, 3, 3, 3), (4,)]),
    "conv1d": (lambda x, w, b: F.conv1d(x, w, b, 2), [(2, 3, 9), (4, 3, 3), (4,)]),
    "conv3d": (lambda x, w: F.conv3d(x, w, padding=1), [(1, 2, 4, 4, 4), (3, 2, 3, 3, 3)]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_path_equals_the_custom_ops(case, dtype):
    fn, shapes = CASES[case]
    torch.manual_seed(0)
    inputs = [torch.randn(s) * 3 for s in shapes]
    fast, fast_grads = _run(_emulated(dtype, fn), inputs, observed=False)
    ref, ref_grads = _run(_emulated(dtype, fn), inputs, observed=True)
    assert fast.dtype == ref.dtype == dtype
    assert torch.equal(fast, ref)
    for got, want in zip(fast_grads, ref_grads, strict=True):
        assert got is not None and want is not None
        assert got.dtype == want.dtype and torch.equal(got, want)
        assert got.stride() == want.stride()


FP8_CASES = [
    *(f"{name}/bf16" for name in sorted(RECIPES)),
    "tensorwise/fp32",
    "rowwise/fp32",
    "mxfp8/fp16",
    "rowwise/bf16/no bias",
    "tensorwise:amax_reduce=true/bf16",  # reduces over ranks: the Python path
    "tensorwise:scaling=delayed/bf16",  # delayed scales: the Python path
]


@pytest.mark.parametrize("case", FP8_CASES)
def test_fp8_linear_fast_path_equals_the_custom_op(case):
    """The eager fast path (a dynamically scaled emulated layer: one C++ autograd node) equals
    the custom ops: output and every gradient, bit for bit."""
    recipe, dtype_name, *rest = case.split("/")
    dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype_name])
    torch.manual_seed(0)
    inputs = [(torch.randn(48, 64) * 3).to(dtype), torch.randn(40, 64)]
    if not rest:
        inputs.append(torch.randn(40))
    scales = torch.tensor([0.5, 2.0, 0.0]) if "delayed" in recipe else None

    def fn(x, w, b=None):
        return fp8_linear(x, w, b, recipe=recipe, out_dtype=dtype, scales=scales)

    fast, fast_grads = _run(fn, inputs, observed=False)
    ref, ref_grads = _run(fn, inputs, observed=True)
    assert fast.dtype == ref.dtype == dtype
    assert torch.equal(fast, ref)
    for got, want in zip(fast_grads, ref_grads, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize(
    "recipe", ["nvfp4", "nvfp4:rht=false", "nvfp4:sr_grad=false,weight_blocks=1x16", "mxfp4"]
)
def test_fp4_linear_fast_path_equals_the_custom_op(recipe):
    """The 4-bit layer's eager fast path (a plain autograd.Function around the ops' own
    functions) equals its custom ops, stochastic rounding's draws included."""
    torch.manual_seed(0)
    inputs = [(torch.randn(48, 64) * 3).to(torch.bfloat16), torch.randn(32, 64), torch.randn(32)]

    def fn(x, w, b):
        torch.manual_seed(1)  # the same draws on both paths
        return fp4_linear(x, w, b, recipe=recipe, out_dtype=torch.bfloat16)

    fast, fast_grads = _run(fn, inputs, observed=False)
    ref, ref_grads = _run(fn, inputs, observed=True)
    assert torch.equal(fast, ref)
    for got, want in zip(fast_grads, ref_grads, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    x, w = (t.detach().requires_grad_() for t in inputs[:2])
    assert fp4_linear(x, w).grad_fn.next_functions[0][0].name().startswith("EagerBackwardFor")


@pytest.mark.parametrize("scales", [None, torch.tensor([0.5, 2.0, 0.0])], ids=["node", "python"])
def test_a_double_backward_through_an_fp8_layer_warns_on_either_path(scales):
    """The gradient GEMMs have no autograd: a gradient penalty gets no second-order term through
    an FP8 layer, and says so (the C++ node as the op's Python function does)."""
    x = torch.randn(16, 32, requires_grad=True)
    w = torch.randn(8, 32, requires_grad=True)
    recipe = "tensorwise" if scales is None else "tensorwise:scaling=delayed"
    out = torch.tanh(fp8_linear(x, w, recipe=recipe, scales=scales).float())
    with pytest.warns(UserWarning, match="autograd"):
        (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        (g.square().sum() + 0 * x.sum()).backward()  # a penalty also through other terms


def test_a_dynamic_fp8_layer_is_one_cpp_node_and_others_keep_the_python_function():
    if emulate_build.emulate_engine() is None:
        pytest.skip("the C++ kernels did not build here")
    x = torch.randn(16, 32, requires_grad=True)
    w = torch.randn(8, 32, requires_grad=True)

    def node(**kwargs) -> str:
        view = fp8_linear(x, w, out_dtype=torch.bfloat16, **kwargs).grad_fn  # the reshape
        return view.next_functions[0][0].name()

    assert "Fp8Linear" in node(recipe="rowwise") and "Python" not in node(recipe="rowwise")
    assert node(recipe="rowwise", scales=torch.ones(3)).startswith("EagerBackwardFor")
    assert node(recipe="tensorwise:hp=grad_weight").startswith("EagerBackwardFor")
    with torch.no_grad():  # no autograd: the op's function
        assert fp8_linear(x, w, recipe="rowwise").grad_fn is None


def test_no_grad_fast_path_equals_the_custom_op():
    torch.manual_seed(0)
    x, w, b = torch.randn(16, 24), torch.randn(8, 24), torch.randn(8)
    region = mixprec.autocast("cpu", dtype=torch.float16, backend="emulated")
    with torch.no_grad(), region:
        fast = F.linear(x, w, b)
        with _PassThrough():
            ref = F.linear(x, w, b)
    assert torch.equal(fast, ref)


@pytest.mark.filterwarnings("error")  # torch warns when it backprops through an op without autograd
@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_double_backward_equals_the_custom_ops(layer):
    """A gradient penalty (create_graph=True) differentiates the emulated backward again."""
    torch.manual_seed(0)
    if layer == "linear":
        module, x = torch.nn.Linear(12, 6), torch.randn(8, 12)
    else:
        module, x = torch.nn.Conv2d(2, 3, 3, padding=1), torch.randn(2, 2, 5, 5)

    def penalty(observed: bool) -> list[torch.Tensor]:
        net = copy.deepcopy(module)
        inp = x.clone().requires_grad_()
        mode = _PassThrough() if observed else contextlib.nullcontext()
        with mode:
            with mixprec.autocast("cpu", dtype=torch.bfloat16, backend="emulated"):
                out = torch.tanh(net(inp).float())
            (g,) = torch.autograd.grad(out.sum(), inp, create_graph=True)
            g.square().sum().backward()
        return [inp.grad, *(p.grad for p in net.parameters())]

    got, want = penalty(False), penalty(True)
    if emulate_build.emulate_engine() is not None:
        # The layer's node casts the fp32 weight itself, so the weight's two second-order
        # contributions (through the forward's GEMM and the backward's) meet in fp32 at
        # the weight, where under autocast they meet at its 16-bit copy and are added there:
        # rounded to bf16, the fp32 sum is autocast's 16-bit sum.
        weight = 1
        assert torch.equal(got[weight].bfloat16().float(), want[weight])
        assert not torch.equal(got[weight], want[weight])  # the sum was taken in fp32
        got, want = got[:weight] + got[weight + 1 :], want[:weight] + want[weight + 1 :]
    for g, w in zip(got, want, strict=True):
        assert w is not None and torch.equal(g, w)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_fp8_operands_equal_fp8_fake_quantize(name):
    """The fp8 GEMM's operands, from the kernel arguments worked out once per shape, equal
    ``fp8_fake_quantize``'s (which works them out on every call)."""
    recipe = RECIPES[name]
    torch.manual_seed(0)
    x = torch.randn(64, 96) * 5
    x[3, 7] = 1e-30  # far below the block's amax: rounds to zero or a subnormal
    for role, dim, gemm in [
        ("input", 1, "output"),
        ("weight", 1, "output"),
        ("grad_output", 1, "grad_input"),
        ("weight", 0, "grad_input"),
        ("grad_output", 0, "grad_weight"),
        ("input", 0, "grad_weight"),
    ]:
        for t in (x, x.bfloat16()):
            got = _operand(t, recipe, role, dim, gemm, None, False)
            want = fp8_fake_quantize(t, recipe, role, dim, gemm)
            assert torch.equal(got, want), (role, dim, gemm, t.dtype)


def _mixprec_python_calls(fn) -> list[str]:
    """The mixprec Python functions that run while ``fn()`` runs."""
    calls: list[str] = []

    def profiler(frame, event, arg):
        if event == "call" and "mixprec" in frame.f_code.co_filename:
            calls.append(frame.f_code.co_name)

    sys.setprofile(profiler)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_and_conv_layers_run_no_python_in_an_emulated_region(dtype):
    """On the CPU, an emulated region's linear and conv layers go from torch's dispatcher to the
    C++ autocast kernels (_emulate_autocast.cpp): no mixprec Python runs, forward or backward. A
    plain torch.autocast region (its cast cache off, as a mixprec region's) still reaches
    mixprec's Python kernel, which hands the call to torch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(48, 5, bias=False)
    )
    x = torch.randn(4, 2, 6, 6)
    edited = {"linear": "fp32", "conv2d": "fp32"}
    with mixprec.autocast("cpu", dtype=dtype, backend="native", ops=edited):
        model(x)  # the first region to need the ops registers their Python kernels alone
    region = mixprec.autocast("cpu", dtype=dtype, backend="emulated")
    with region:
        model(x)  # puts the C++ kernels in front
    if not kernels._installed_engine:
        pytest.skip("the C++ kernels did not build here")

    outputs = []
    with region:
        assert _mixprec_python_calls(lambda: outputs.append(model(x))) == []
    assert _mixprec_python_calls(lambda: outputs[0].float().sum().backward()) == []
    with torch.autocast("cpu", dtype=dtype, cache_enabled=False):
        assert "kernel" in _mixprec_python_calls(lambda: model(x))


def _graph_nodes(out: torch.Tensor) -> list[str]:
    names, todo = [], [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None:
            names.append(fn.name())
            todo.extend(f for f, _ in fn.next_functions)
    return names


def _saved(model: torch.nn.Module, x: torch.Tensor, region) -> list[tuple[torch.dtype, int]]:
    saved: list[tuple[torch.dtype, int]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((t.dtype, t.untyped_storage().data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), region:
        model(x)
    return saved


LAYERS = {
    "linear": (lambda: torch.nn.Linear(8, 4), (3, 8), "Linear16Function"),
    "linear 3-d": (lambda: torch.nn.Linear(8, 4), (2, 3, 8), "Linear16Function"),
    "conv2d": (lambda: torch.nn.Conv2d(2, 3, 3), (1, 2, 5, 5), "Convolution16Function"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_a_layer_casts_its_fp32_parameters_inside_its_node(layer, dtype):
    """The C++ linear (on a 2-D or contiguous 3-D input) and convolution nodes take the fp32
    weight and bias and cast them themselves, where torch.autocast records two
    ``ToCopyBackward0`` and saves a 16-bit weight copy: they save the 16-bit input and the weight
    itself, so the activations the probes count are torch.autocast's, and the values are the
    custom ops' (bit for bit: ``test_fast_path_equals_the_custom_ops``)."""
    if emulate_build.emulate_engine() is None:
        pytest.skip("the C++ kernels did not build here")
    make, shape, node = LAYERS[layer]
    torch.manual_seed(0)
    module = make()
    x = torch.randn(shape, requires_grad=True)
    emulated = mixprec.autocast("cpu", dtype=dtype, backend="emulated")
    native = torch.autocast("cpu", dtype=dtype)
    with emulated:
        nodes = _graph_nodes(module(x))
    with native:
        native_nodes = _graph_nodes(module(x))
    assert any(node in name for name in nodes) and nodes.count("ToCopyBackward0") == 1  # input
    assert native_nodes.count("ToCopyBackward0") == 3

    weight = module.weight.untyped_storage().data_ptr()
    saved = _saved(module, x, emulated)
    assert len(saved) == 2 and (torch.float32, weight) in saved and (dtype, ANY) in saved
    forward = lambda: module(x)  # noqa: E731
    with native:
        want = activation_bytes(module, forward)
    with emulated:
        assert activation_bytes(module, forward) == want == x.numel() * 2


def test_a_weight_computed_in_the_forward_keeps_torchs_cast():
    """A weight that is no leaf (a parametrization: weight normalization here) is cast by torch,
    whose node saves its 16-bit copy: the node taking it in fp32 would keep the fp32 tensor
    alive, twice the activation memory torch.autocast keeps for it."""
    if emulate_build.emulate_engine() is None:
        pytest.skip("the C++ kernels did not build here")
    layer = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(8, 4))
    x = torch.randn(3, 8, requires_grad=True) * 1.0
    forward = lambda: layer(x)  # noqa: E731
    with mixprec.autocast("cpu", dtype=torch.bfloat16, backend="emulated"):
        assert _graph_nodes(layer(x)).count("ToCopyBackward0") == 3  # input, weight, bias
        got = activation_bytes(layer, forward)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert got == activation_bytes(layer, forward)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_layer_nodes_round_the_parameters_as_torchs_cast_at_the_edges(dtype):
    """Values that overflow, fall below the 16-bit normals or are NaN: the parameters and their
    gradients, rounded inside the node, equal torch's casts around the GEMM node (inf where the
    16-bit format overflows, in the forward and in the weight's gradient)."""
    ops = emulate_build.emulate_engine()
    if ops is None:
        pytest.skip("the C++ kernels did not build here")
    torch.manual_seed(0)
    big = torch.finfo(dtype).max
    weight = torch.randn(8, 24)
    weight[0, :4] = torch.tensor([big * 1.01, -big * 4, 1e-6, float("nan")])
    weight[1, :3] = torch.tensor([3e-8, -1e-30, -0.0])
    bias = torch.randn(8) * big / 4
    x = (torch.randn(16, 24) * 64).to(dtype)
    x[0, 0] = big / 2  # the weight gradient's first column overflows
    grad = torch.randn(16, 8).to(dtype)
    grad[0] = 4.0

    def run(fold: bool) -> list[torch.Tensor]:
        w, b, a = (t.clone().requires_grad_() for t in (weight, bias, x))
        if fold:
            out = ops.linear16_autograd(a, w, b)
        else:
            out = ops.gemm16_autograd(b.to(dtype), a, w.to(dtype).t(), 1.0, 1.0)
        return [out, *torch.autograd.grad(out, (a, w, b), grad)]

    got, want = run(True), run(False)
    assert torch.isinf(got[2]).any() and torch.isnan(got[0]).any()  # the edges were reached
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("input_grad", [True, False])
def test_a_parameter_changed_between_forward_and_backward_is_refused_as_in_fp32(input_grad):
    """The linear node saves the fp32 weight itself where torch's fp32 linear saves it (for the
    input's gradient), so autograd's check of saved tensors holds an emulated region to fp32's
    rule: an in-place change of the weight before backward is refused where fp32 refuses it."""
    if emulate_build.emulate_engine() is None:
        pytest.skip("the C++ kernels did not build here")
    layer = torch.nn.Linear(8, 4)
    outcomes = []
    for region in (contextlib.nullcontext(), mixprec.autocast("cpu", backend="emulated")):
        x = torch.randn(3, 8, requires_grad=input_grad)
        with region:
            out = layer(x)
        with torch.no_grad():
            layer.weight.add_(1.0)
        try:
            out.float().sum().backward()
            outcomes.append("ran")
        except RuntimeError as error:
            assert "modified by an inplace operation" in str(error)
            outcomes.append("refused")
    assert outcomes == ["refused" if input_grad else "ran"] * 2


WEIGHTS = ("fp32", "bf16", "computed", "strided", "frozen")


def _weight(kind: str, layer: str) -> torch.Tensor:
    shape = (4, 8) if layer == "linear" else (4, 2, 2, 2)
    w = torch.randn(shape)
    if kind == "bf16":
        return w.bfloat16().requires_grad_()
    if kind == "computed":
        return w.requires_grad_() * 2.0
    if kind == "strided":  # a leaf that is not contiguous: transposed, or channels-last
        if layer == "linear":
            return torch.randn(8, 4).t().requires_grad_()
        return w.contiguous(memory_format=torch.channels_last).requires_grad_()
    return w if kind == "frozen" else w.requires_grad_()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("layer", ["linear", "linear 3-d", "conv2d"])
def test_the_python_shortcuts_build_the_c_plus_plus_kernels_graph(layer, weight, bias):
    """Where an emulated region's C++ autocast kernel steps aside (a checkpoint's recomputation
    inside backward), mixprec's Python kernel takes the call: its shortcut must build the same
    node on the same saved tensors, or non-reentrant checkpointing refuses the recomputation."""
    if emulate_build.emulate_engine() is None:
        pytest.skip("the C++ kernels did not build here")
    torch.manual_seed(0)
    op = layer.split()[0]
    w = _weight(weight, op)
    shape = {"linear": (3, 8), "linear 3-d": (2, 3, 8), "conv2d": (1, 2, 5, 5)}[layer]
    x = torch.randn(shape, requires_grad=True) * 1.0
    args = (x, w, torch.randn(4, requires_grad=True)) if bias else (x, w)

    def graph(run) -> tuple[list[str], list[tuple[torch.dtype, tuple[int, ...]]]] | None:
        saved: list[tuple[torch.dtype, tuple[int, ...]]] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append((t.dtype, tuple(t.shape)))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run()
        return None if out is NotImplemented else (_graph_nodes(out), saved)

    with mixprec.autocast("cpu", dtype=torch.bfloat16, backend="emulated"):
        fast = graph(lambda: getattr(F, op)(*args))
    python = graph(lambda: kernels._SHORTCUTS[op](args, torch.bfloat16, "cpu"))
    assert fast is not None
    folded = weight in ("fp32", "frozen") or (weight == "strided" and op == "conv2d")
    nodes = ("Linear16Function", "Convolution16Function")
    assert any(node in name for node in nodes for name in fast[0]) == folded
    if python is None:  # the Python kernel's general path, where the C++ kernel sends it too
        assert layer == "linear 3-d" and not folded
    else:
        assert fast == python
