"""mixprec.autocast lives inside torch's autocast: compile, checkpointing, nesting, custom_fwd.

Every reference here is torch's own behaviour: the same code under ``torch.autocast``, the
uncompiled run, the run without checkpointing, or the op on inputs cast by hand.
"""

import threading

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import mixprec
from mixprec.compute import autocast, current_region

DTYPES = [torch.float16, torch.bfloat16]
BACKENDS = ["native", "emulated"]


def _rounded_linear(x, w, b, dtype):
    """What an emulated linear computes: the fp32 GEMM of 16-bit inputs, rounded once."""
    return F.linear(x.to(dtype).float(), w.to(dtype).float(), b.to(dtype).float()).to(dtype)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 4))


# -- torch.compile ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_compiled_function_computes_what_eager_computes(dtype):
    torch._dynamo.reset()
    torch.manual_seed(0)
    x, w, b = torch.randn(4, 8), torch.randn(3, 8), torch.randn(3)
    compiled = torch.compile(lambda x, w, b: F.linear(x, w, b))
    with autocast("cpu", dtype=dtype, backend="emulated"):
        eager, got = F.linear(x, w, b), compiled(x, w, b)
    want = _rounded_linear(x, w, b, dtype)
    assert torch.equal(eager, want) and torch.equal(got, want)


@pytest.mark.parametrize("preset", ["bf16-mixed", "fp16-mixed", "bf16-pure"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_compiled_prepared_model_trains_like_eager(preset, when):
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))

    def losses(compile_when):
        torch._dynamo.reset()
        model = _model()
        if compile_when == "before":
            model = torch.compile(model)
        mp = mixprec.MixedPrecision(preset, backend="emulated")
        model, opt = mp.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
        if compile_when == "after":
            model = torch.compile(model)
        out = []
        for _ in range(3):
            with mp.autocast():
                loss = F.cross_entropy(model(x).float(), y)
            mp.backward(loss)
            mp.step(opt)
            opt.zero_grad()
            out.append(loss.item())
        return out

    eager, compiled = losses(None), losses(when)
    # inductor may reorder fp32 sums (the fused LayerNorm): equal up to 16-bit rounding
    assert compiled == pytest.approx(eager, rel=2 * torch.finfo(torch.bfloat16).eps)


def test_a_region_inside_a_compiled_function_computes_what_eager_computes():
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8)

    def step(x):
        with autocast("cpu", dtype=torch.float16, backend="emulated"):
            return lin(x)

    decorated = autocast("cpu", dtype=torch.bfloat16, backend="emulated")(lambda x: lin(x))
    want = (step(x), decorated(x))
    torch._dynamo.reset()
    got = (torch.compile(step)(x), torch.compile(decorated)(x))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w)
    assert current_region() is None and not torch.is_autocast_enabled("cpu")


def test_one_decorated_function_runs_in_two_threads_at_once():
    barrier = threading.Barrier(2)
    results = []

    @autocast("cpu", dtype=torch.bfloat16, backend="emulated")
    def work():
        barrier.wait()  # both threads are inside the same region object
        out = torch.mm(torch.ones(2, 2), torch.ones(2, 2))
        barrier.wait()
        return out.dtype

    threads = [threading.Thread(target=lambda: results.append(work())) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [torch.bfloat16, torch.bfloat16]


def _graph_breaks(model, x, region):
    torch._dynamo.reset()
    with region:
        return torch._dynamo.explain(model)(x).graph_break_count


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_more_graph_breaks_than_torch_autocast(backend):
    x = torch.randn(8, 16)
    model = _model()
    want = _graph_breaks(model, x, torch.autocast("cpu", dtype=torch.bfloat16))
    with mixprec.compute.fp32_islands(model):  # the islands' hooks are traced, not broken on
        got = _graph_breaks(model, x, autocast("cpu", dtype=torch.bfloat16, backend=backend))
    assert got == want == 0


def test_a_compiled_island_runs_in_fp32():
    model = _model()
    x = torch.randn(8, 16)
    with mixprec.compute.fp32_islands(model):
        with autocast("cpu", dtype=torch.bfloat16, backend="emulated"):
            eager = model[1](model[0](x))
            torch._dynamo.reset()
            compiled = torch.compile(lambda x: model[1](model[0](x)))(x)
    assert eager.dtype == compiled.dtype == torch.float32
    assert torch.allclose(eager, compiled, rtol=1e-5, atol=1e-5)  # fp32: inductor's LayerNorm


# -- activation checkpointing -------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_checkpointing_recomputes_under_the_forwards_precision(backend, reentrant, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    seen = []

    def block(t):
        out = lin(t)
        seen.append((out.dtype, torch.is_autocast_enabled("cpu")))
        return out

    def grads(use_checkpoint):
        x.grad = lin.weight.grad = None
        with autocast("cpu", dtype=dtype, backend=backend):
            y = checkpoint(block, x, use_reentrant=reentrant) if use_checkpoint else block(x)
        y.float().square().sum().backward()  # after the region closed, as training loops do
        return y, x.grad.clone(), lin.weight.grad.clone()

    plain = grads(False)
    seen.clear()
    checked = grads(True)
    assert checked[0].dtype == dtype
    # forward and (where torch recomputes) recomputation under the same precision
    assert seen and set(seen) == {(dtype, True)}
    for got, want in zip(checked, plain, strict=True):
        assert torch.equal(got, want)


# -- torch's autocast API inside a region -------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_autocast_state_and_nesting_behave_as_under_torch(backend, dtype):
    x, w = torch.randn(4, 8), torch.randn(3, 8)

    def probe(region):
        with region:
            outer = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
            lowered = torch.mm(x, w.t()).dtype
            with torch.autocast("cpu", enabled=False):
                off = (torch.is_autocast_enabled("cpu"), torch.mm(x, w.t()).dtype)
            back = torch.mm(x, w.t()).dtype
        return outer, lowered, off, back, torch.is_autocast_enabled("cpu")

    want = probe(torch.autocast("cpu", dtype=dtype))
    assert probe(autocast("cpu", dtype=dtype, backend=backend)) == want
    assert want == ((True, dtype), dtype, (False, torch.float32), dtype, False)


class _Square(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        ctx.inside = (torch.is_autocast_enabled("cpu"), a.dtype, torch.mm(a, b).dtype)
        return torch.mm(a, b)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        ctx.backward_autocast = torch.is_autocast_enabled("cpu")
        return grad @ b.t(), a.t() @ grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_fwd_and_custom_bwd_behave_as_under_torch(backend):
    def run(region):
        a = torch.randn(3, 3, requires_grad=True)
        b = torch.randn(3, 3, requires_grad=True)
        with region:
            out = _Square.apply(a.half(), b.half())
            fn = out.grad_fn
        out.sum().backward()
        return out.dtype, fn._forward_cls, a.grad.dtype

    ctx_seen = []
    original = _Square.forward

    want = run(torch.autocast("cpu", dtype=torch.float16))
    got = run(autocast("cpu", dtype=torch.float16, backend=backend))
    assert got == want and want[0] == torch.float32
    del ctx_seen, original


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_fwd_sees_fp32_inside(backend):
    seen = {}

    class Probe(torch.autograd.Function):
        @staticmethod
        @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
        def forward(ctx, a):
            seen["inside"] = (torch.is_autocast_enabled("cpu"), a.dtype, torch.mm(a, a).dtype)
            return a

        @staticmethod
        @torch.amp.custom_bwd(device_type="cpu")
        def backward(ctx, grad):
            return grad

    with torch.autocast("cpu", dtype=torch.float16):
        Probe.apply(torch.randn(2, 2).half())
    want = seen.pop("inside")
    with autocast("cpu", dtype=torch.float16, backend=backend):
        Probe.apply(torch.randn(2, 2).half())
    assert seen["inside"] == want == (False, torch.float32, torch.float32)


# -- op lists, composites, mixed dtypes ---------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_composite_ops_get_torchs_dtypes(backend, dtype):
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    q = torch.randn(2, 5, 8)
    calls = {
        "einsum": lambda: torch.einsum("bij,bjk->bik", a, b),
        "tensordot": lambda: torch.tensordot(a, b.transpose(0, 1), dims=([2, 0], [0, 1])),
        "mha-fast-path": lambda: mha(q, q, q, need_weights=False)[0],
        "addmm-activation": lambda: torch._addmm_activation(a[0, :, :3], a[0], b[0, :, :3]),
    }
    for name, call in calls.items():
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            want = call()
        with torch.no_grad(), autocast("cpu", dtype=dtype, backend=backend):
            got = call()
        assert got.dtype == want.dtype == dtype, name
        if backend == "native":
            assert torch.equal(got, want), name
        else:
            assert torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtype_cat_promotes_as_torch_does(backend):
    half, bf16, fp32 = (torch.tensor([v], dtype=d) for v, d in [
        (1.0, torch.float16), (2.0, torch.bfloat16), (70144.0, torch.float32)])  # fmt: skip
    for dtype in DTYPES:
        for inputs in ([half, fp32], [bf16, fp32], [half, bf16], [half, half]):
            try:
                with torch.autocast("cpu", dtype=dtype):
                    want = torch.cat(inputs)
            except RuntimeError:  # torch refuses 16-bit inputs of the other 16-bit dtype
                with pytest.raises(RuntimeError):
                    with autocast("cpu", dtype=dtype, backend=backend):
                        torch.cat(inputs)
                continue
            with autocast("cpu", dtype=dtype, backend=backend):
                got = torch.cat(inputs)
            assert got.dtype == want.dtype and torch.equal(got, want)


def test_target_cuda_applies_the_cuda_op_list_on_a_cpu():
    # GPT-2's tanh GELU computes x**3: at x = 50 that overflows fp16 under CPU rules, where pow
    # stays 16-bit; CUDA's list computes pow (and exp, softmax) in fp32.
    def run(**kwargs):
        lin = nn.Linear(3, 3)
        with torch.no_grad():
            lin.weight.copy_(torch.eye(3))
            lin.bias.zero_()
        with autocast("cpu", dtype=torch.float16, **kwargs) as region:
            h = lin(torch.full((2, 3), 50.0))  # a 16-bit activation
            cube = torch.pow(h, 3.0)
            dtypes = (torch.exp(h).dtype, cube.dtype, torch.softmax(h, 0).dtype)
        return region, dtypes, cube

    region, cuda_dtypes, cuda_cube = run(target="cuda")
    assert region.backend == "emulated"
    assert cuda_dtypes == (torch.float32, torch.float32, torch.float32)
    _, cpu_dtypes, cpu_cube = run(backend="emulated")
    assert cpu_dtypes == (torch.float16, torch.float16, torch.float16)
    assert torch.equal(cuda_cube, torch.full((2, 3), 125000.0)) and torch.isinf(cpu_cube).all()


def test_target_cuda_refuses_what_cuda_autocast_refuses():
    p = torch.rand(4)
    with autocast("cpu", dtype=torch.float16, target="cuda"):
        with pytest.raises(RuntimeError, match="binary_cross_entropy is unsafe to autocast"):
            F.binary_cross_entropy(p.half(), p.half())


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_edits_are_aten_ops_and_apply_inside_composites(backend):
    q = torch.randn(1, 2, 4, 8)
    with autocast("cpu", dtype=torch.bfloat16, backend=backend, ops={"softmax": "fp32"}):
        attn = torch.softmax(q @ q.transpose(-1, -2), -1)
        mm = torch.mm(q[0, 0], q[0, 0].t())
    assert attn.dtype == torch.float32 and mm.dtype == torch.bfloat16
    with autocast("cpu", dtype=torch.bfloat16, backend=backend, ops={"mm": "keep"}):
        assert torch.mm(q[0, 0], q[0, 0].t()).dtype == torch.float32


def test_a_rule_island_inherits_the_emulated_backend():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    x = torch.randn(4, 8)
    with mixprec.compute.fp32_islands(model, "bf16-mixed; 1 -> fp16-mixed"):
        with autocast("cpu", dtype=torch.bfloat16, backend="emulated"):
            out = model(x)
    hidden = _rounded_linear(x, model[0].weight, model[0].bias, torch.bfloat16)
    want = _rounded_linear(hidden.float(), model[1].weight, model[1].bias, torch.float16)
    assert torch.equal(out, want.float())  # the rule's output format is fp32


# -- what mixprec must not change --------------------------------------------------------------


def test_plain_torch_autocast_is_unchanged_after_a_mixprec_region():
    torch.manual_seed(0)
    x, w, b = torch.randn(4, 8), torch.randn(3, 8), torch.randn(3)
    with autocast("cpu", dtype=torch.bfloat16, backend="emulated", ops={"relu": "fp32"}):
        F.linear(x, w, b).relu()  # registers mixprec's kernels for linear, mm, relu, ...
    assert current_region() is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = F.linear(x, w, b).relu()
    want = F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()).relu()  # torch's native kernel
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_another_threads_torch_autocast_is_unchanged_during_a_mixprec_region():
    torch.manual_seed(0)
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    results = {}

    def other():
        with torch.autocast("cpu", dtype=torch.float16):
            results["other"] = torch.mm(x, w.t())

    with autocast("cpu", dtype=torch.float16, backend="emulated"):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        results["mine"] = torch.mm(x, w.t())
    assert torch.equal(results["other"], torch.mm(x.half(), w.half().t()))  # torch's kernel
    assert torch.equal(results["mine"], torch.mm(x.half().float(), w.half().float().t()).half())


def test_exiting_a_region_from_another_thread_is_refused():
    region = autocast("cpu", dtype=torch.bfloat16, backend="emulated")
    region.__enter__()
    errors = []

    def exit_elsewhere():
        try:
            region.__exit__(None, None, None)
        except RuntimeError as error:
            errors.append(str(error))

    thread = threading.Thread(target=exit_elsewhere)
    thread.start()
    thread.join()
    assert errors and "another thread entered it" in errors[0]
    assert "must be exited by the thread that entered it" in errors[0]
    assert torch.is_autocast_enabled("cpu")  # the owner's region is still open...
    region.__exit__(None, None, None)
    assert not torch.is_autocast_enabled("cpu") and current_region() is None  # ...and closes


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_stays_fp64_as_under_torch(backend):
    x, w, b = torch.randn(4, 8, dtype=torch.float64), torch.randn(3, 8), torch.randn(3)
    for call in (lambda: torch.mm(x, x.t()), lambda: F.linear(x, w.double(), b.double())):
        with torch.autocast("cpu", dtype=torch.float16):
            want = call()
        with autocast("cpu", dtype=torch.float16, backend=backend):
            got = call()
        assert got.dtype == want.dtype == torch.float64 and torch.equal(got, want)


def test_a_function_compiled_under_one_backend_is_retraced_under_another():
    torch.manual_seed(0)
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, w: F.linear(x, w))
    with autocast("cpu", dtype=torch.float16, backend="native"):
        native = compiled(x, w)
    with autocast("cpu", dtype=torch.float16, backend="emulated"):
        emulated = compiled(x, w)
    with torch.autocast("cpu", dtype=torch.float16):
        plain = compiled(x, w)
    assert torch.equal(emulated, F.linear(x.half().float(), w.half().float()).half())
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.equal(native, F.linear(x, w)) and torch.equal(plain, F.linear(x, w))


def test_plain_torch_autocast_compiled_after_a_mixprec_region_uses_torchs_kernels():
    from torch._dynamo.backends.common import aot_autograd

    targets = []

    def record(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes)
        return gm.forward

    with autocast("cpu", dtype=torch.float16, backend="emulated"):
        pass  # the last mixprec configuration entered: emulated
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, w: F.linear(x, w), backend=aot_autograd(fw_compiler=record))
    with torch.autocast("cpu", dtype=torch.float16):
        compiled(torch.randn(4, 8), torch.randn(3, 8))
    assert "aten.mm.default" in targets and not any("mixprec" in t for t in targets)


def test_an_overload_gets_its_own_category_not_its_siblings():
    # the CPU list lowers _convolution.deprecated, not _convolution (reached inside convolution)
    x, w = torch.randn(1, 8, 4, 4), torch.randn(8, 8, 1, 1)
    args = (x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
    with autocast("cpu", dtype=torch.float16, target="cuda"):  # registers kernels for both
        assert torch.convolution(*args).dtype == torch.float16  # CUDA lowers convolution
    with torch.autocast("cpu", dtype=torch.float16):
        want = torch.convolution(*args)
    with autocast("cpu", dtype=torch.float16, backend="emulated"):
        got = torch.convolution(*args)
    assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)
