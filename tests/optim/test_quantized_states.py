"""Optimizer states stored in 8 bits (and bf16) between steps: stored form, accounting, resume."""

from __future__ import annotations

import copy

import pytest
import torch
from optim_helpers import roundtrip
from torch import nn

from mixprec.optim import (
    KahanOptimizer,
    MasterWeightOptimizer,
    StochasticRoundingOptimizer,
    codecs,
    memory_report,
)
from mixprec.optim.quantized_states import (
    ROUNDING_KEY,
    SCALE_SUFFIX,
    Fp8States,
    Int8States,
    StochasticBf16States,
    storage_named,
)
from mixprec.optim.states import Float16States, Fp32States

WRAPPERS = {
    "master": lambda opt, state: MasterWeightOptimizer(opt, state=state),
    "stochastic": lambda opt, state: StochasticRoundingOptimizer(opt, seed=3, state=state),
    "kahan": lambda opt, state: KahanOptimizer(opt, state=state),
}
OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-1, momentum=0.9),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5, centered=True),
    "adadelta": lambda ps: torch.optim.Adadelta(ps, lr=1.0),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=1e-2),
}


def _model(seed: int = 0) -> nn.Module:
    # a (5, 300) weight: ragged rows (256 + 44); a (70, 5) one: rows shorter than a block
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(300, 5), nn.Tanh(), nn.Linear(5, 70)).bfloat16()


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 300, generator=g), torch.randn(16, 70, generator=g)


def _wrap(model: nn.Module, state: str, wrapper: str = "master", optimizer: str = "adamw"):
    opt = WRAPPERS[wrapper](OPTIMIZERS[optimizer](model.parameters()), state)
    if hasattr(opt.storage, "min_numel"):
        opt.storage.min_numel = 0  # quantize the small test parameters too
    return opt


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> float:
    loss = torch.tensor(0.0)
    for step in steps:
        x, y = _data(step)
        loss = (model(x.bfloat16()).float() - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def _inner_states(opt: torch.optim.Optimizer) -> list[dict[str, torch.Tensor]]:
    return [opt.optimizer.state[opt.shadows[p]] for g in opt.param_groups for p in g["params"]]


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if not isinstance(x, torch.Tensor):  # the draws' counter
            assert x == y, key
            continue
        assert x.dtype == y.dtype, key
        if x.dtype == torch.float8_e4m3fn:
            x, y = x.view(torch.uint8), y.view(torch.uint8)
        assert torch.equal(x, y), key


@pytest.mark.parametrize("state,code_dtype", [("int8", torch.uint8), ("fp8", torch.float8_e4m3fn)])
def test_stored_form_and_exact_byte_count(state: str, code_dtype: torch.dtype) -> None:
    model = _model()
    opt = _wrap(model, state)
    _train(model, opt, range(2))
    total = 0
    for p, st in zip(model.parameters(), _inner_states(opt), strict=True):
        if p.ndim < 2:  # biases keep fp32 states
            assert st["exp_avg"].dtype == torch.float32 and ROUNDING_KEY not in st
            total += sum(t.numel() * t.element_size() for t in st.values())
            continue
        rows = p.shape[0]
        blocks = codecs.block_count(p.numel() // rows)
        for key in ("exp_avg", "exp_avg_sq"):
            assert st[key].dtype == code_dtype and st[key].shape == p.shape
            assert st[key + SCALE_SUFFIX].dtype == torch.float32
            assert st[key + SCALE_SUFFIX].shape == (rows, blocks)
            total += p.numel() + 4 * rows * blocks
        total += st["step"].numel() * st["step"].element_size()
        assert st[ROUNDING_KEY].dtype == torch.int64
        total += 16  # the counter of the stochastic draws
    assert memory_report(model, opt).optimizer_state == total


@pytest.mark.parametrize("state", ["int8", "fp8"])
def test_first_step_stores_the_codec_of_the_fp32_states(state: str) -> None:
    """After one step (same inputs in both runs) the stored states decode to exactly the codec's
    round trip (to nearest) of the fp32 states; the second moment through its square root."""
    reference, model = _model(), _model()
    ref_opt, opt = _wrap(reference, "fp32"), _wrap(model, state)
    opt.storage.rounding = "nearest"
    _train(reference, ref_opt, range(1))
    _train(model, opt, range(1))
    storage = opt.storage
    for p, ref_state, st in zip(
        model.parameters(), _inner_states(ref_opt), _inner_states(opt), strict=True
    ):
        if p.ndim < 2:
            continue  # fp32 states
        decoded = dict(st)
        storage.decode([(torch.empty(0), decoded)])
        for key in ("exp_avg", "exp_avg_sq"):
            x = ref_state[key]
            rows = x.reshape(x.shape[0], -1)
            if key == "exp_avg_sq":
                rows = rows.sqrt()
            if state == "int8":
                signed = key == "exp_avg"
                back = codecs.dequantize_int8(*codecs.quantize_int8(rows, signed), signed)
            else:
                back = codecs.dequantize_fp8(*codecs.quantize_fp8(rows))
            if key == "exp_avg_sq":
                back = back * back.abs()
            assert torch.equal(decoded[key], back.view(x.shape)), key


@pytest.mark.parametrize("state", ["int8", "fp8", "bf16"])
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_resume_bit_for_bit(state: str, wrapper: str) -> None:
    model = _model()
    opt = _wrap(model, state, wrapper)
    _train(model, opt, range(4))
    saved_model = roundtrip(copy.deepcopy(model.state_dict()))
    saved_opt = roundtrip(opt.state_dict())
    _train(model, opt, range(4, 8))

    resumed = _model(seed=1)  # other initial weights: everything must come from the checkpoint
    resumed.load_state_dict(saved_model)
    resumed_opt = _wrap(resumed, state, wrapper)
    resumed_opt.load_state_dict(saved_opt)
    _train(resumed, resumed_opt, range(4, 8))
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    for a, b in zip(_inner_states(opt), _inner_states(resumed_opt), strict=True):
        _assert_same_state(a, b)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_elementwise_optimizers_resume_bit_for_bit(optimizer: str) -> None:
    model = _model()
    opt = _wrap(model, "int8", "master", optimizer)
    _train(model, opt, range(3))
    coded = [k for st in _inner_states(opt) for k in st if k.endswith(SCALE_SUFFIX)]
    assert coded  # every one of these optimizers has a per-element state to quantize
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), roundtrip(opt.state_dict())
    _train(model, opt, range(3, 6))
    resumed = _model(seed=1)
    resumed.load_state_dict(saved_model)
    resumed_opt = _wrap(resumed, "int8", "master", optimizer)
    resumed_opt.load_state_dict(saved_opt)
    _train(resumed, resumed_opt, range(3, 6))
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_load_keeps_the_stored_bytes() -> None:
    """torch's load_state_dict widens states to the parameter's dtype; the codes come back."""
    model = _model()
    opt = _wrap(model, "int8")
    _train(model, opt, range(2))
    before = memory_report(model, opt).optimizer_state
    fresh = _wrap(_model(), "int8")
    fresh.load_state_dict(roundtrip(opt.state_dict()))
    for a, b in zip(_inner_states(opt), _inner_states(fresh), strict=True):
        _assert_same_state(a, b)
    assert memory_report(model, fresh).optimizer_state == before


def test_chunking_does_not_change_the_bits() -> None:
    results = []
    for chunk in (None, 64):
        model = _model()
        opt = _wrap(model, "int8")
        opt.chunk_numel = chunk
        _train(model, opt, range(3))
        results.append((model, opt))
    (m1, o1), (m2, o2) = results
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)
    for a, b in zip(_inner_states(o1), _inner_states(o2), strict=True):
        _assert_same_state(a, b)


@pytest.mark.parametrize("state", ["int8", "fp8", "bf16"])
def test_training_follows_fp32_states(state: str) -> None:
    reference, model = _model(), _model()
    ref_loss = _train(reference, _wrap(reference, "fp32"), range(30))
    loss = _train(model, _wrap(model, state), range(30))
    assert loss == pytest.approx(ref_loss, rel=0.03)


def test_small_second_moments_are_kept() -> None:
    """A block whose gradients span 5 decades: v spans 10, past the dynamic map's 7 decades.
    Stored as its square root nothing non-zero decodes to 0 (stored directly, 40% would)."""
    g = 10 ** (-5 * torch.rand(1, 4096, generator=torch.Generator().manual_seed(0)))
    v = g.square()
    for storage in (Int8States(), Fp8States()):
        codes, scale = storage.quantize(v, sqrt=True)
        back = storage.dequantize(codes, scale, sqrt=True)
        assert (back > 0).all()
        assert ((back.sqrt() - g).abs() / g).median() < 0.05
    direct = codecs.dequantize_int8(*codecs.quantize_int8(v, False), False)
    assert (direct == 0).float().mean() > 0.3


def test_negative_values_under_a_second_moment_name_survive() -> None:
    """A user optimizer may keep a signed state named like a second moment: the blocks holding
    negative values are stored with the signed map, marked by a negative scale."""
    x = torch.rand(2, 600, generator=torch.Generator().manual_seed(1))
    x[1, 300] = -0.25  # second row, second block
    storage = Int8States()
    codes, scale = storage.quantize(x, sqrt=True)
    assert (scale < 0).tolist() == [[False, False, False], [False, True, False]]
    back = storage.dequantize(codes, scale, sqrt=True)
    assert back[1, 300] < 0
    assert torch.allclose(back, x, rtol=0.1, atol=1e-3)
    clean = storage.dequantize(*storage.quantize(x[:1].contiguous(), sqrt=True), sqrt=True)
    assert torch.equal(back[:1], clean)


def test_small_parameters_keep_fp32_states_by_default() -> None:
    model = _model()
    opt = MasterWeightOptimizer(torch.optim.AdamW(model.parameters()), state="int8")
    assert opt.storage.min_numel == 4096
    _train(model, opt, range(1))
    for st in _inner_states(opt):
        assert st["exp_avg"].dtype == torch.float32 and len(st) == 3


def test_bf16_states_are_rounded_stochastically_under_master_weights() -> None:
    """state='bf16' rounds stochastically whatever the rule: each stored value is one of the two
    bf16 neighbours of the fp32 twin's state, and not always the nearest one."""
    reference, model = _model(), _model()
    ref_opt, opt = _wrap(reference, "fp32"), _wrap(model, "bf16")
    assert isinstance(opt.storage, StochasticBf16States)
    _train(reference, ref_opt, range(1))
    _train(model, opt, range(1))
    not_nearest = 0
    for ref_state, st in zip(_inner_states(ref_opt), _inner_states(opt), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            x, stored = ref_state[key], st[key]
            assert stored.dtype == torch.bfloat16
            down = torch.where(
                x.bfloat16().float() > x,
                torch.nextafter(x.bfloat16(), torch.tensor(-1.0, dtype=torch.bfloat16)),
                x.bfloat16(),
            )
            up = torch.where(
                down.float() < x,
                torch.nextafter(down, torch.tensor(1e9, dtype=torch.bfloat16)),
                down,
            )
            assert ((stored == down) | (stored == up)).all()
            not_nearest += int((stored != x.bfloat16()).sum())
    assert not_nearest > 0
    assert isinstance(storage_named("fp16"), Float16States)
    assert isinstance(storage_named("fp32"), Fp32States)


def test_stochastic_rounding_of_states_is_unbiased() -> None:
    """Many equal values between two codes: their stored mean is the value, not the nearest."""
    x = torch.full((1, 1 << 16), 0.2003)
    x[:, ::256] = 1.0  # each block's absmax
    uniform = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    for storage in (Int8States(), Fp8States()):
        nearest = storage.dequantize(*storage.quantize(x, sqrt=False), sqrt=False)
        stochastic = storage.dequantize(*storage.quantize(x, False, uniform), sqrt=False)
        body = x != 1.0
        assert nearest[body].unique().numel() == 1 and nearest[body][0] != x[body][0]
        assert stochastic[body].unique().numel() == 2
        assert stochastic[body].mean().item() == pytest.approx(0.2003, rel=2e-4)


def test_non_elementwise_optimizer_is_refused() -> None:
    model = _model()
    lbfgs = torch.optim.LBFGS(model.parameters())
    with pytest.raises(ValueError, match=r"state='int8'.*LBFGS keeps a history.*SGD, Adam"):
        MasterWeightOptimizer(lbfgs, state="int8")
    with pytest.raises(ValueError, match=r"state='bf16'.*LBFGS"):
        StochasticRoundingOptimizer(lbfgs, state="bf16")
    assert not lbfgs.state and not lbfgs._optimizer_load_state_dict_post_hooks
    MasterWeightOptimizer(lbfgs, state="fp32")  # fp32 states are what LBFGS makes


@pytest.mark.parametrize(
    "state,match",
    [
        ("fp8_e5m2", r"state='fp8_e5m2': e5m2 keeps 2 fraction bits.*'fp8', 'int8'"),
        ("tf32", r"state='tf32': tf32 is a matmul mode.*'fp32', 'bf16'"),
        ("int4", r"state='int4': not a state format; choose one of 'fp32'"),
    ],
)
def test_bad_state_format_is_refused(state: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MasterWeightOptimizer(torch.optim.AdamW(_model().parameters()), state=state)  # type: ignore[arg-type]


def test_bad_state_option_types_and_conflicts() -> None:
    params = list(_model().parameters())
    with pytest.raises(TypeError, match=r"state must be one of 'fp32'.*got int 8"):
        MasterWeightOptimizer(torch.optim.AdamW(params), state=8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        StochasticRoundingOptimizer(
            torch.optim.AdamW(params), state="int8", state_dtype=torch.bfloat16
        )
    with pytest.raises(ValueError, match="min_numel must be an int >= 0"):
        Int8States(min_numel=-1)


def test_dcp_round_trip_single_process(tmp_path) -> None:
    """The compressed state goes through torch.distributed.checkpoint like any other."""
    sharded = pytest.importorskip("mixprec.distributed.checkpoint")
    model = _model()
    opt = _wrap(model, "int8")
    _train(model, opt, range(3))
    sharded.save(tmp_path / "ckpt", model, [opt])
    _train(model, opt, range(3, 5))
    resumed = _model(seed=1)
    resumed_opt = _wrap(resumed, "int8")
    sharded.load(tmp_path / "ckpt", resumed, [resumed_opt])
    _train(resumed, resumed_opt, range(3, 5))
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    for a, b in zip(_inner_states(opt), _inner_states(resumed_opt), strict=True):
        _assert_same_state(a, b)


# -- FSDP2: 2 gloo ranks -------------------------------------------------------------------------


def _fsdp_rank(rank: int, port: int, out: str) -> None:
    import datetime
    import faulthandler
    import gc
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from mixprec.distributed import checkpoint as sharded

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    faulthandler.enable(all_threads=True)  # a rank killed by a signal prints where it was
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    try:

        def sharded_run():
            model = _model()
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer)  # bf16 parameters, gradients reduced in bf16
            fully_shard(model)
            return model, _wrap(model, "int8")

        model, opt = sharded_run()
        _train(model, opt, range(3))
        states = [
            {k: (v.to_local() if hasattr(v, "to_local") else v).clone() for k, v in st.items()}
            for st in _inner_states(opt)
        ]
        sharded.save(os.path.join(out, "ckpt"), model, [opt])
        _train(model, opt, range(3, 5))
        continued = [p.full_tensor() for p in model.parameters()]
        resumed, resumed_opt = sharded_run()
        sharded.load(os.path.join(out, "ckpt"), resumed, [resumed_opt])
        _train(resumed, resumed_opt, range(3, 5))
        result = {
            "states": states,
            "continued": continued,
            "resumed": [p.full_tensor() for p in resumed.parameters()],
        }
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        # Both ranks are done with their collectives and nothing holds tensors of pending gloo
        # work before the group's threads are torn down (as tests/distributed/dist_spawn.py).
        del model, opt, resumed, resumed_opt
        dist.barrier()
        gc.collect()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_states_match_one_process_and_resume_bit_for_bit(tmp_path) -> None:
    """Two gloo ranks under FSDP2 (rows sharded): each rank's int8 codes and scales are its rows
    of the one-process states (the same draws, the same blocks), and a DCP checkpoint resumes
    bit for bit."""
    mp = pytest.importorskip("torch.multiprocessing")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the bf16 GEMMs' sums then run in the same order
    try:
        model = _model()
        opt = _wrap(model, "int8")
        _train(model, opt, range(3))
    finally:
        torch.set_num_threads(threads)
    one = _inner_states(opt)
    mp.spawn(_fsdp_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for index, whole in enumerate(one):
        for key, value in whole.items():
            parts = [r["states"][index][key] for r in ranks]
            if key in ("step", ROUNDING_KEY):  # the same on every rank
                assert torch.equal(parts[0], parts[1]), (index, key)
                value_ = parts[0]
            else:
                value_ = torch.cat(parts)  # dim 0 split over the ranks
            if value.dtype == torch.float8_e4m3fn:
                value, value_ = value.view(torch.uint8), value_.view(torch.uint8)
            assert value_.dtype == value.dtype, (index, key)
            assert torch.equal(value_, value), (index, key)
    for continued, resumed in zip(ranks[0]["continued"], ranks[0]["resumed"], strict=True):
        assert torch.equal(continued, resumed)


class _FlatHistory(torch.optim.SGD):
    """An SGD that also keeps a flat (not per-element) tensor per parameter."""

    def step(self, closure=None):  # type: ignore[no-untyped-def]
        out = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["history"] = p.grad.detach().reshape(-1)[:3].clone()
        return out


def test_states_that_are_not_per_element_are_kept_with_a_warning() -> None:
    model = _model()
    opt = MasterWeightOptimizer(
        _FlatHistory(model.parameters(), lr=0.1, momentum=0.9), state="int8"
    )
    opt.storage.min_numel = 0
    with pytest.warns(UserWarning, match=r"state='int8'.*\['history'\] that are not per element"):
        _train(model, opt, range(2))
    for p, st in zip(model.parameters(), _inner_states(opt), strict=True):
        assert st["history"].dtype == torch.float32
        if p.ndim >= 2:
            assert st["momentum_buffer"].dtype == torch.uint8
