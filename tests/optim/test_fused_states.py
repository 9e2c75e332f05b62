"""The one-pass kernel on int8/fp8 block-quantized states against the reference path.

The reference path decodes the states, lets torch's optimizer step them and encodes them
(``fused="off"``); the kernel must leave the same bits: weights, masters, compensation, codes,
scales and the draws' counters, over several steps, for SGD with momentum, Adam and AdamW under
the three update rules, on ragged block layouts (rows not a multiple of 256, rows shorter than a
block), in chunks, and whatever the thread count.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mixprec.optim import (
    KahanOptimizer,
    MasterWeightOptimizer,
    StochasticRoundingOptimizer,
    fused,
    plan,
)
from mixprec.optim.quantized_states import Fp8States, Int8States, StochasticBf16States

WRAPPERS = {
    "master": lambda inner, state: MasterWeightOptimizer(inner, state=state),
    "stochastic": lambda inner, state: StochasticRoundingOptimizer(inner, seed=5, state=state),
    "kahan": lambda inner, state: KahanOptimizer(inner, state=state),
}
INNER = {
    "sgd-momentum": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.01
    ),
    "adam-wd": lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
}
# Ragged rows (700 = 2 blocks + 188), rows shorter than a block (20), a numel that is not a
# multiple of 256 (5 x 51), 3-D (rows of 3000), and a 1-D bias (fp32 states, the fp32 kernel).
SHAPES = ((8, 700), (600, 20), (5, 51), (3, 100, 30), (40,))


@pytest.fixture(scope="module", autouse=True)
def _engine():
    if fused.engine() is None:
        pytest.skip(f"the fused kernels cannot be built here: {fused.engine_error()}")


def _params(shapes=SHAPES, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(1)
    return [nn.Parameter(torch.randn(*s, generator=g).to(dtype)) for s in shapes]


def _run(wrapper, inner, state, mode, steps=3, shapes=SHAPES, chunk_numel=None, **storage):
    params = _params(shapes)
    opt = WRAPPERS[wrapper](INNER[inner](params), state)
    opt.storage.min_numel = 0
    for name, value in storage.items():
        setattr(opt.storage, name, value)
    opt.fused = mode
    opt.chunk_numel = chunk_numel
    g = torch.Generator().manual_seed(2)
    counts = []
    for _ in range(steps):
        for p in params:  # gradient scales that differ by block, so that scales differ too
            p.grad = (torch.randn(p.shape, generator=g) * 10 ** -torch.rand(1, generator=g)).to(
                p.dtype
            )
        opt.step()
        counts.append(opt.last_step_fused)
    return params, opt, counts


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _assert_same(ref, got):
    (ref_params, ref_opt, _), (params, opt, _) = ref, got
    for a, b in zip(ref_params, params, strict=True):
        assert torch.equal(a, b)
    for p, q in zip(ref_opt.optimizer.state, opt.optimizer.state, strict=True):
        a, b = ref_opt.optimizer.state[p], opt.optimizer.state[q]
        assert list(a) == list(b)  # the same keys, in the same order
        for key in a:
            assert a[key].dtype == b[key].dtype, key
            assert torch.equal(_bits(a[key]), _bits(b[key])), key
    for name in ("compensation", "masters"):
        for a, b in zip(_extra(ref_opt, name), _extra(opt, name), strict=True):
            assert torch.equal(a, b)


def _extra(opt, name):
    if name == "masters":
        if not isinstance(opt, MasterWeightOptimizer):
            return []
        return [s for p, s in opt.mirror.shadows.items() if s is not p]
    return list(getattr(opt.rule, "compensation", {}).values())


@pytest.mark.parametrize("state", ["int8", "fp8"])
@pytest.mark.parametrize("inner", list(INNER))
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_coded_states_step_in_one_pass_with_the_reference_bits(wrapper, inner, state):
    ref = _run(wrapper, inner, state, "off")
    got = _run(wrapper, inner, state, "auto")
    assert ref[2] == [0, 0, 0] and got[2] == [5, 5, 5]
    states = got[1].optimizer.state.values()
    assert sum(f"{next(iter(k for k in s if k != 'step'))}.scale" in s for s in states) == 4
    _assert_same(ref, got)


@pytest.mark.parametrize(
    "storage",
    [{"rounding": "nearest"}, {"sqrt_second_moment": False}, {"block_size": 100}],
    ids=["nearest", "v", "block-100"],
)
@pytest.mark.parametrize("state", ["int8", "fp8"])
def test_storage_options_in_one_pass(state, storage):
    if "sqrt_second_moment" in storage:
        storage = {"sqrt_keys": frozenset()}
    got = _run("stochastic", "adamw", state, "auto", **storage)
    assert got[2] == [5, 5, 5]
    _assert_same(_run("stochastic", "adamw", state, "off", **storage), got)


def test_chunks_do_not_change_the_bits():
    ref = _run("master", "adamw", "int8", "off")
    for chunk_numel in (600, 5000):
        _assert_same(ref, _run("master", "adamw", "int8", "auto", chunk_numel=chunk_numel))


@pytest.mark.parametrize("state", ["int8", "fp8"])
def test_coded_kernel_bits_do_not_depend_on_the_thread_count(state):
    shapes = ((300, 600),)  # 900 blocks: several tasks per thread
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run("stochastic", "adamw", state, "auto", steps=2, shapes=shapes)
        torch.set_num_threads(2)
        two = _run("stochastic", "adamw", state, "auto", steps=2, shapes=shapes)
    finally:
        torch.set_num_threads(threads)
    assert one[2] == two[2] == [1, 1]
    _assert_same(one, two)


def test_resume_in_one_pass_continues_bit_for_bit():
    """A state dict loaded into a new wrapper (codes widened by torch, narrowed back) steps on
    in one pass as the run that went on."""
    ref = _run("stochastic", "adam-wd", "int8", "auto", steps=4)
    params, opt, _ = _run("stochastic", "adam-wd", "int8", "auto", steps=2)
    saved = opt.state_dict()
    fresh = _params()
    for p, q in zip(fresh, params, strict=True):
        p.data.copy_(q.data)
    resumed = WRAPPERS["stochastic"](INNER["adam-wd"](fresh), "int8")
    resumed.storage.min_numel = 0
    resumed.load_state_dict(saved)
    g = torch.Generator().manual_seed(2)
    for _ in range(2):  # the draws of the first two steps' gradients
        for p in fresh:
            torch.randn(p.shape, generator=g), torch.rand(1, generator=g)
    counts = []
    for _ in range(2):
        for p in fresh:
            p.grad = (torch.randn(p.shape, generator=g) * 10 ** -torch.rand(1, generator=g)).to(
                p.dtype
            )
        resumed.step()
        counts.append(resumed.last_step_fused)
    assert counts == [5, 5]
    _assert_same(ref, (fresh, resumed, counts))


def test_a_signed_second_moment_block_takes_the_reference_path():
    """An int8 second moment holding a negative block (a user's state under that name) is left
    to the reference path, which stores it with the signed map."""
    runs = []
    for mode in ("off", "auto"):
        params, opt, _ = _run("master", "adamw", "int8", mode, steps=1, shapes=((4, 300),))
        state = next(iter(opt.optimizer.state.values()))
        storage = opt.storage
        values = storage.dequantize(state["exp_avg_sq"], state.pop("exp_avg_sq.scale"), True)
        values[1, 5] = -1e-4
        codes, scale = storage.quantize(values, True)
        state["exp_avg_sq"], state["exp_avg_sq.scale"] = codes, scale
        params[0].grad = torch.ones_like(params[0])
        opt.step()
        runs.append((params, opt, [opt.last_step_fused]))
    assert runs[1][2] == [0]
    _assert_same(runs[0], runs[1])


def test_sixteen_bit_states_still_decline_with_the_reason():
    params = _params(((4, 8),))
    inner = torch.optim.AdamW(params)
    opt = StochasticRoundingOptimizer(inner, state="bf16")
    assert isinstance(opt.storage, StochasticBf16States)
    why = plan.one_pass_refusal(inner, "auto", False, opt.rule, opt.storage)
    assert why is not None and "stored as bfloat16" in why
    for storage in (Int8States(), Fp8States()):
        assert plan.one_pass_refusal(inner, "auto", False, opt.rule, storage) is None


@pytest.fixture
def one_rank():
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("state", ["int8", "fp8"])
def test_fsdp2_shards_step_their_coded_states_in_one_pass(one_rank, state):
    """DTensor codes and scales (FSDP2, one rank) are stepped through their local shards, and
    stay DTensors, as on the reference path."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    def run(mode):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(300, 70), nn.Linear(70, 600)).bfloat16()
        fully_shard(model)
        opt = WRAPPERS["stochastic"](INNER["adamw"](list(model.parameters())), state)
        opt.storage.min_numel = 0
        opt.fused = mode
        g = torch.Generator().manual_seed(1)
        for _ in range(2):
            model(torch.randn(8, 300, generator=g).bfloat16()).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
        return model, opt

    (ref, ref_opt), (model, opt) = run("off"), run("auto")
    assert opt.last_step_fused == 4
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        assert torch.equal(a.full_tensor(), b.full_tensor())
    for a, b in zip(ref_opt.optimizer.state.values(), opt.optimizer.state.values(), strict=True):
        assert list(a) == list(b)
        for key in a:
            assert type(a[key]) is type(b[key]), key
            if isinstance(a[key], DTensor):
                assert a[key].placements == b[key].placements
                assert torch.equal(_bits(a[key].to_local()), _bits(b[key].to_local())), key
            else:
                assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("wrapper", ["stochastic", "master"])
def test_per_parameter_formats_step_in_one_pass_with_the_reference_bits(wrapper):
    # A policy's per-module state formats (PerParameterStates): the kernel must find each
    # parameter's own storage, store int8/fp8 codes where they are named and fp32 elsewhere.
    def run(mode):
        params = _params(((64, 128), (96, 64), (64,)))
        formats = {params[0]: "int8", params[1]: "fp8"}
        opt = WRAPPERS[wrapper](INNER["adamw"](params), formats)
        opt.fused = mode
        g = torch.Generator().manual_seed(2)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
            opt.step()
        return params, opt, opt.last_step_fused

    ref, got = run("off"), run("auto")
    assert got[2] > 0  # the kernel ran
    _assert_same(ref, got)  # (params, optimizer, count): the count is not compared
    kinds = [s["exp_avg"].dtype for s in got[1].optimizer.state.values()]
    assert kinds == [torch.uint8, torch.float8_e4m3fn, torch.float32]
