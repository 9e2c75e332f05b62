"""Compressed masters: the remainder encoding, and training bit for bit full fp32 masters."""

from __future__ import annotations

import pytest
import torch
from optim_helpers import roundtrip
from torch import nn

from mixprec.optim import CompressedMaster, MasterWeightOptimizer, memory_report
from mixprec.optim.plan import one_pass_refusal
from mixprec.optim.remainder import join_master, split_master


def _patterns() -> torch.Tensor:
    """Every high half (all signs, exponents and bf16 mantissas: ±0, subnormals, the values
    near bf16's max that round to inf, inf, NaN) with the low halves where rounding turns
    (ties, one either side), plus random patterns."""
    high = torch.arange(1 << 16, dtype=torch.int64)
    lows = torch.tensor([0, 1, 0x4000, 0x7FFF, 0x8000, 0x8001, 0xC000, 0xFFFF])
    pat = (high[:, None] << 16 | lows[None, :]).reshape(-1)
    rand = torch.randint(0, 1 << 32, (1 << 18,), generator=torch.Generator().manual_seed(0))
    pat = torch.cat([pat, rand])
    return torch.where(pat >= 1 << 31, pat - (1 << 32), pat).to(torch.int32).view(torch.float32)


def test_sixteen_bit_remainder_rebuilds_every_master_exactly():
    masters = _patterns()
    params = masters.to(torch.bfloat16)  # torch's round to nearest even: the reference
    remainder, ties = split_master(masters, params)
    assert remainder.dtype == torch.int16 and remainder.shape == masters.shape
    assert ties.numel() > 0  # the ties above an even parameter are in the patterns
    rebuilt = join_master(params, remainder, ties)
    nan = torch.isnan(masters)
    assert torch.equal(rebuilt[~nan].view(torch.int32), masters[~nan].view(torch.int32))
    assert torch.isnan(rebuilt[nan]).all()
    assert torch.equal(rebuilt.to(torch.bfloat16).view(torch.int16), params.view(torch.int16))


def test_eight_bit_remainder_keeps_the_rounding_and_24_bits():
    masters = _patterns()
    params = masters.to(torch.bfloat16)
    remainder, ties = split_master(masters, params, bits=8)
    assert remainder.dtype == torch.int8 and ties.numel() == 0
    rebuilt = join_master(params, remainder)
    assert torch.equal(rebuilt.to(torch.bfloat16).view(torch.int16), params.view(torch.int16))
    finite = torch.isfinite(masters) & torch.isfinite(params.float())
    error = (rebuilt[finite].view(torch.int32) - masters[finite].view(torch.int32)).abs()
    assert int(error.max()) <= 256  # 8 more bits than bf16: off by under 2**8 fp32 patterns


def _params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(96, 128), (128,), (17, 96), (5,)]
    params = [nn.Parameter((0.1 * torch.randn(s, generator=g)).to(torch.bfloat16)) for s in shapes]
    return [*params, nn.Parameter(torch.randn(7, generator=g))]  # an fp32 one is its own master


def _grads(step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [(1e-2 * torch.randn(p.shape, generator=g)).to(p.dtype) for p in params]


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
}


def _run(opt, params, steps, start=0):
    for step in range(start, start + steps):
        for p, grad in zip(params, _grads(step, params), strict=True):
            p.grad = grad
        opt.step()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("fused", ["auto", "off"])
@pytest.mark.parametrize("chunk_numel", [None, 4096])
def test_training_is_bit_for_bit_full_masters_over_50_steps(name, fused, chunk_numel):
    full_params, params = _params(), _params()
    full = MasterWeightOptimizer(OPTIMIZERS[name](full_params))
    full.fused = fused  # the full masters' one-pass kernel where it applies
    compressed = MasterWeightOptimizer(OPTIMIZERS[name](params), remainder_bits=16)
    compressed.fused = fused
    compressed.chunk_numel = chunk_numel
    _run(full, full_params, 50)
    _run(compressed, params, 50)
    # The one-pass kernel steps the rebuilt masters where it steps full ones.
    assert compressed.last_step_fused == full.last_step_fused
    assert (full.last_step_fused > 0) == (
        fused == "auto"
        and one_pass_refusal(full.optimizer, "auto", False, full.rule, full.storage) is None
    )
    for p, q in zip(full_params, params, strict=True):
        assert torch.equal(p, q)
    for m, n in zip(full.master_params(), compressed.master_params(), strict=True):
        assert torch.equal(m.view(torch.int32), n.view(torch.int32))
    states = full.optimizer.state_dict()["state"], compressed.optimizer.state_dict()["state"]
    for a, b in zip(states[0].values(), states[1].values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_ties_happen_in_training_and_stay_exact():
    # A master exactly half an ulp above an even bf16 value (the tie the int16 cannot hold).
    full_params, params = _params(), _params()
    full = MasterWeightOptimizer(torch.optim.SGD(full_params, lr=0.0))
    compressed = MasterWeightOptimizer(torch.optim.SGD(params, lr=0.0), remainder_bits=16)
    state = full.state_dict()
    even = state["masters"][0].to(torch.bfloat16)
    even.view(torch.int16).bitwise_and_(~1)
    tie = (even.float().view(torch.int32) + 0x8000).view(torch.float32)
    state["masters"][0] = tie
    full.load_state_dict(state)
    compressed.load_state_dict(state)  # a full-master state dict, converted
    assert compressed.rule.ties[params[0]].numel() == params[0].numel()
    assert torch.equal(compressed.master_params()[0].view(torch.int32), tie.view(torch.int32))
    saved = roundtrip(compressed.state_dict())
    assert set(saved["remainder_ties"]) == {0}  # only the parameter that has ties
    again = MasterWeightOptimizer(torch.optim.SGD(_params(), lr=0.0), remainder_bits=16)
    with torch.no_grad():
        for p, q in zip(again.param_groups[0]["params"], params, strict=True):
            p.copy_(q)
    again.load_state_dict(saved)
    assert torch.equal(again.master_params()[0].view(torch.int32), tie.view(torch.int32))
    with pytest.raises(ValueError, match="'remainder_ties' is not a dict of parameter index"):
        again.load_state_dict({**saved, "remainder_ties": [None] * 5})
    full.param_groups[0]["lr"] = compressed.param_groups[0]["lr"] = 1e-3
    _run(full, full_params, 5)
    _run(compressed, params, 5)
    for m, n in zip(full.master_params(), compressed.master_params(), strict=True):
        assert torch.equal(m.view(torch.int32), n.view(torch.int32))


@pytest.mark.parametrize("bits", [16, 8])
def test_resume_is_bit_for_bit(bits):
    params = _params()
    straight = MasterWeightOptimizer(torch.optim.AdamW(params, lr=1e-3), remainder_bits=bits)
    _run(straight, params, 30)
    first = _params()
    opt = MasterWeightOptimizer(torch.optim.AdamW(first, lr=1e-3), remainder_bits=bits)
    _run(opt, first, 12)
    saved, weights = roundtrip(opt.state_dict()), [p.detach().clone() for p in first]
    assert all(r is None or r.dtype == opt.rule.dtype for r in saved["remainders"])
    assert "masters" not in saved  # the compact form
    resumed = _params(seed=1)
    again = MasterWeightOptimizer(torch.optim.AdamW(resumed, lr=1e-3), remainder_bits=bits)
    again.load_state_dict(saved)  # optimizer half first, weights after: either order works
    with torch.no_grad():
        for p, w in zip(resumed, weights, strict=True):
            p.copy_(w)
    _run(again, resumed, 18, start=12)
    for p, q in zip(params, resumed, strict=True):
        assert torch.equal(p, q)


def test_full_masters_load_a_compressed_state_dict():
    params = _params()
    opt = MasterWeightOptimizer(torch.optim.SGD(params, lr=0.05, momentum=0.9), remainder_bits=16)
    _run(opt, params, 10)
    masters = [m.clone() for m in opt.master_params()]
    full = MasterWeightOptimizer(torch.optim.SGD(params, lr=0.05, momentum=0.9))
    full.load_state_dict(roundtrip(opt.state_dict()))
    for m, n in zip(masters, full.master_params(), strict=True):
        assert torch.equal(m.view(torch.int32), n.view(torch.int32))


@pytest.mark.parametrize(("bits", "per_param"), [(16, 2), (8, 1)])
def test_memory_report_counts_the_remainders(bits, per_param):
    params = _params()
    model = nn.ParameterList(params)
    opt = MasterWeightOptimizer(torch.optim.AdamW(params, lr=1e-3), remainder_bits=bits)
    _run(opt, params, 3)
    sixteen = sum(p.numel() for p in params if p.dtype == torch.bfloat16)
    ties = sum(t.numel() for t in opt.rule.ties.values())
    assert memory_report(model, opt).master == per_param * sixteen + 8 * ties
    full = MasterWeightOptimizer(torch.optim.AdamW(_params(), lr=1e-3))
    assert memory_report(model, full).master == 4 * sixteen


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"remainder_bits must be 16 .* got 12"):
        CompressedMaster(12)
    with pytest.raises(ValueError, match="keep_grad_buffers=True"):
        MasterWeightOptimizer(
            torch.optim.SGD(_params(), lr=0.1), keep_grad_buffers=True, remainder_bits=16
        )
    fp16 = [nn.Parameter(torch.ones(3, dtype=torch.float16))]
    with pytest.raises(
        TypeError,
        match=r"compressed masters need bf16 parameters, got a "
        r"torch.float16",
    ):
        MasterWeightOptimizer(torch.optim.SGD(fp16, lr=0.1), remainder_bits=16)


def test_with_int8_states_it_is_still_bit_for_bit_full_masters():
    full_params, params = _params(), _params()
    full = MasterWeightOptimizer(torch.optim.AdamW(full_params, lr=1e-3), state="int8")
    compressed = MasterWeightOptimizer(
        torch.optim.AdamW(params, lr=1e-3), state="int8", remainder_bits=16
    )
    _run(full, full_params, 10)
    _run(compressed, params, 10)
    for m, n in zip(full.master_params(), compressed.master_params(), strict=True):
        assert torch.equal(m.view(torch.int32), n.view(torch.int32))
