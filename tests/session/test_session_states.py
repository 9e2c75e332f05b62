"""The policy's ``state`` in a session: each parameter's optimizer states in its module's format
(issue 21 item 1, the session side), against the wrappers built by hand as the reference."""

import copy

import pytest
import torch
from torch import nn

from mixprec.optim import StochasticRoundingOptimizer, cast_module, memory_report
from mixprec.optim.quantized_states import SCALE_SUFFIX, Int8States
from mixprec.session import MixedPrecision


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 128)  # 8192 elements: quantized unless a rule says fp32
        self.fc = nn.Linear(128, 64)  # 8192 + a bias (1-D: fp32 states)
        self.out = nn.Linear(64, 4)  # 256 elements: below min_numel, fp32 states

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(self.emb(tokens)))).float()


def batches(count, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (8,), generator=gen) for _ in range(count)]


def train_session(policy, steps, seed=0, optimizer=torch.optim.AdamW, **options):
    torch.manual_seed(seed)
    model = Net()
    mp = MixedPrecision(policy, "cpu", backend="emulated", **options)
    model, opt = mp.prepare(model, optimizer(model.parameters(), lr=1e-2))
    run(mp, model, opt, batches(steps))
    return mp, model, opt


def run(mp, model, opt, data):
    for tokens in data:
        mp.backward(model(tokens).pow(2).mean())
        mp.step(opt)
        opt.zero_grad()


def test_bf16_lean_steps_like_the_stochastic_wrapper_with_int8_states():
    _mp, model, opt = train_session("bf16-lean", steps=3)
    torch.manual_seed(0)
    twin = Net()
    cast_module(twin, "bf16-pure")
    ref = StochasticRoundingOptimizer(
        torch.optim.AdamW(twin.parameters(), lr=1e-2), seed=0, state="int8"
    )
    for tokens in batches(3):
        with torch.autocast("cpu", torch.bfloat16):
            loss = twin(tokens).pow(2).mean()
        loss.backward()
        ref.step()
        ref.zero_grad()
    assert isinstance(opt, StochasticRoundingOptimizer)
    for got, want in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(got, want)
    inner = opt.optimizer.state[opt.shadows[model.fc.weight]]
    assert inner["exp_avg"].dtype == torch.uint8 and "exp_avg" + SCALE_SUFFIX in inner


def test_a_rule_keeps_the_embedding_states_fp32_and_the_rest_int8():
    _mp, model, opt = train_session("bf16-lean; class:Embedding -> state=fp32", steps=2)
    state = opt.optimizer.state
    emb = state[opt.shadows[model.emb.weight]]
    fc = state[opt.shadows[model.fc.weight]]
    assert emb["exp_avg"].dtype == torch.float32 and "exp_avg" + SCALE_SUFFIX not in emb
    assert fc["exp_avg"].dtype == torch.uint8 and fc["exp_avg_sq"].dtype == torch.uint8
    assert model.emb.weight.dtype == torch.bfloat16  # the rule changed the states only
    without_rule = train_session("bf16-lean", steps=2)
    assert (
        without_rule[2]
        .optimizer.state[without_rule[2].shadows[without_rule[1].emb.weight]]["exp_avg"]
        .dtype
        == torch.uint8
    )


def test_fp32_params_get_compressed_states_equal_to_quantizing_a_plain_optimizer():
    """params=fp32 with state=int8: the session wraps only to store the states; the reference is
    plain AdamW whose states go through Int8States' encode and decode after every step."""
    policy = "params=fp32,compute=bf16,output=fp32,state=int8"
    _mp, model, opt = train_session(policy, steps=3)
    torch.manual_seed(0)
    twin = Net()
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    storage = Int8States()
    for tokens in batches(3):
        with torch.autocast("cpu", torch.bfloat16):
            loss = twin(tokens).pow(2).mean()
        loss.backward()
        for p in twin.parameters():  # the stored form is what the step reads
            storage.decode([(p, ref.state[p])] if p in ref.state else [])
        ref.step()
        ref.zero_grad()
        storage.encode([(p, ref.state[p]) for p in twin.parameters()], None)
    for got, want in zip(model.parameters(), twin.parameters(), strict=True):
        assert got.dtype == torch.float32 and torch.equal(got, want)
    assert opt.optimizer.state[model.fc.weight]["exp_avg"].dtype == torch.uint8
    plain = train_session("bf16-mixed", steps=3)
    fp32_states = memory_report(plain[1], plain[2]).optimizer_state
    saved = fp32_states - memory_report(model, opt).optimizer_state
    assert saved > 0.7 * 2 * 3 * 8192 * 4 / 2  # the two big matrices' moments: ~4x smaller


def test_master_and_kahan_updates_take_the_state_format_too():
    for update in ("master", "kahan", "nearest"):
        _mp, model, opt = train_session("bf16-lean", steps=1, update=update)
        inner = opt.optimizer.state[opt.shadows[model.fc.weight]]
        assert inner["exp_avg"].dtype == torch.uint8, update


def test_lbfgs_with_compressed_states_is_refused_at_prepare_and_changes_nothing():
    torch.manual_seed(0)
    model = Net()
    before = copy.deepcopy(model.state_dict())
    mp = MixedPrecision("bf16-lean", "cpu", backend="emulated")
    with pytest.raises(ValueError, match=r"state.*int8.*LBFGS keeps a history.*state='fp32'"):
        mp.prepare(model, torch.optim.LBFGS(model.parameters()))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())


def test_lbfgs_works_where_rules_keep_every_state_fp32():
    torch.manual_seed(0)
    model = Net()
    policy = "bf16-lean; class:Embedding -> state=fp32; class:Linear -> state=fp32"
    mp = MixedPrecision(policy, "cpu", backend="emulated")
    model, opt = mp.prepare(model, torch.optim.LBFGS(model.parameters()))
    assert isinstance(opt, StochasticRoundingOptimizer)


def test_resume_is_bit_for_bit_with_int8_states(tmp_path):
    policy = "bf16-lean; class:Embedding -> state=fp32"
    mp, model, opt = train_session(policy, steps=2)
    path = tmp_path / "ckpt.pt"
    mp.save(path, model, opt)
    saved = torch.load(path, weights_only=True)
    inner = saved["optimizers"][0]["optimizer"]["state"]
    assert any(s.get("exp_avg", torch.zeros(())).dtype == torch.uint8 for s in inner.values())
    rest = batches(3, seed=7)
    run(mp, model, opt, rest)

    mp2, model2, opt2 = train_session(policy, steps=0, seed=5)  # other initial weights
    mp2.load(path, model2, opt2)
    fc_state = opt2.optimizer.state[opt2.shadows[model2.fc.weight]]
    assert fc_state["exp_avg"].dtype == torch.uint8  # narrowed back at load
    run(mp2, model2, opt2, rest)
    for got, want in zip(model2.parameters(), model.parameters(), strict=True):
        assert torch.equal(got, want)
    a, b = opt.state_dict()["optimizer"]["state"], opt2.state_dict()["optimizer"]["state"]
    for key in a:
        for name, value in a[key].items():
            assert torch.equal(b[key][name].to(value.dtype), value), name


def test_memory_report_splits_the_states_by_stored_kind():
    _, model, opt = train_session("bf16-lean; class:Embedding -> state=fp32", steps=1)
    report = memory_report(model, opt)
    parts = dict(report.state_parts)
    assert sum(parts.values()) == report.optimizer_state
    fc = model.fc.weight  # the one quantized matrix: a code per moment element, a scale per row
    assert parts["int8 codes"] == 2 * fc.numel()
    assert parts["block scales"] == 2 * fc.shape[0] * 4
    assert parts["draw counters"] == 16
    assert parts["fp32"] == 2 * 4 * (report.num_params - fc.numel())
    assert "int8 codes" in str(report)


def test_modules_a_model_keeps_in_fp32_keep_fp32_states():
    class Kept(Net):
        _keep_in_fp32_modules = ("fc",)  # as Hugging Face models declare it

    torch.manual_seed(0)
    model = Kept()
    mp = MixedPrecision("bf16-lean", "cpu", backend="emulated")
    model, opt = mp.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    run(mp, model, opt, batches(1))
    assert model.fc.weight.dtype == torch.float32
    assert opt.optimizer.state[opt.shadows[model.fc.weight]]["exp_avg"].dtype == torch.float32
    assert opt.optimizer.state[opt.shadows[model.emb.weight]]["exp_avg"].dtype == torch.uint8
