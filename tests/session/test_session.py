"""MixedPrecision: one loop for every policy, checked against an fp32 twin and torch's scaler."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixprec import GradScaler, Policy, fp32_islands
from mixprec.checkpoint import CheckpointError
from mixprec.diagnostics import read_metrics
from mixprec.hardware import auto_policy
from mixprec.session import MixedPrecision, needs_loss_scaling

RECIPES = [
    ("fp32", "auto"),
    ("bf16-mixed", "auto"),
    ("fp16-mixed", "auto"),
    ("bf16-pure", "stochastic"),
    ("bf16-pure", "kahan"),
    ("bf16-pure", "nearest"),
    ("p=bf16,master=fp32", "auto"),
]


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 4))


def batches(n, seed=1):
    """A learnable problem: labels from a fixed random linear teacher."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(16, 4, generator=g)
    xs = [torch.randn(8, 16, generator=g) for _ in range(n)]
    return [(x, (x @ teacher).argmax(-1)) for x in xs]


def run(policy, update, steps=30, model=None, **step_kwargs):
    """The user's loop, unchanged for every policy."""
    model = model or make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mp = MixedPrecision(policy, "cpu", backend="emulated", update=update)
    model, optimizer = mp.prepare(model, optimizer)
    losses, reports = [], []
    for x, y in batches(steps):
        with mp.autocast():
            loss = F.cross_entropy(model(x).float(), y)
        mp.backward(loss)
        reports.append(mp.step(optimizer, **step_kwargs))
        optimizer.zero_grad()
        losses.append(loss.item())
    return model, optimizer, mp, losses, reports


@pytest.mark.parametrize(("policy", "update"), RECIPES)
def test_every_policy_trains_through_the_same_loop(policy, update):
    _, _, _, losses, reports = run(policy, update)
    _, _, _, fp32_losses, _ = run("fp32", "auto")
    assert all(r.stepped for r in reports)
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])
    # Close to the fp32 twin fed the same data: 16-bit rounding, not a different training run.
    assert abs(sum(losses[-5:]) - sum(fp32_losses[-5:])) < 0.1 * sum(fp32_losses[-5:])


def test_the_policy_decides_casts_islands_wrappers_and_scaling():
    model, optimizer, mp, _, reports = run("bf16-pure", "auto", steps=1)
    assert model[0].weight.dtype == torch.bfloat16
    assert model[2].weight.dtype == torch.float32  # LayerNorm: an fp32 island
    assert type(optimizer).__name__ == "StochasticRoundingOptimizer"
    assert mp.scaler.strategy == "none" and reports[0].scale == 1.0
    _, optimizer, mp, _, reports = run("fp16-mixed", "auto", steps=1)
    assert isinstance(optimizer, torch.optim.AdamW)  # fp32 params: no wrapper needed
    assert mp.scaler.strategy == "dynamic" and reports[0].scale == 2.0**16
    _, optimizer, _, _, _ = run("p=bf16,master=fp32", "auto", steps=1)
    assert type(optimizer).__name__ == "MasterWeightOptimizer"


def test_fp16_scaling_matches_torch_amp_grad_scaler():
    model = make_model()
    twin = copy.deepcopy(model)
    fp32_islands(twin)  # the same LayerNorm island the session adds
    opt_twin = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    torch_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=3)
    mp = MixedPrecision("fp16-mixed", "cpu", backend="emulated",
                        scaler_options={"init_scale": 2.0**20, "growth_interval": 3})  # fmt: skip
    model, optimizer = mp.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    for i, (x, y) in enumerate(batches(8)):
        for net, region in ((model, mp.autocast()), (twin, mp.autocast())):
            with region:
                loss = F.cross_entropy(net(x).float(), y) * (1e4 if i == 2 else 1.0)
            if net is model:
                mp.backward(loss)
                report = mp.step(optimizer)
                optimizer.zero_grad()
            else:
                torch_scaler.scale(loss).backward()
                torch_scaler.step(opt_twin)
                torch_scaler.update()
                opt_twin.zero_grad()
        assert report.stepped == (torch_scaler.get_scale() >= report.scale)
        assert mp.scaler.get_scale() == torch_scaler.get_scale()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_clipping_reports_the_unscaled_norm():
    model = make_model()
    twin = copy.deepcopy(model)
    mp = MixedPrecision("fp16-mixed", "cpu", backend="emulated")
    model, optimizer = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = batches(1)[0]
    with mp.autocast():
        loss = F.cross_entropy(model(x).float(), y)
    mp.backward(loss)
    report = mp.step(optimizer, max_grad_norm=0.01)
    with mp.autocast():
        F.cross_entropy(twin(x).float(), y).backward()
    want = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.01)
    assert report.grad_norm == pytest.approx(want.item(), rel=1e-3)


def test_gradient_accumulation_matches_one_big_batch():
    (x1, y1), (x2, y2) = batches(2)
    results = []
    for chunks in (((x1, y1), (x2, y2)), ((torch.cat([x1, x2]), torch.cat([y1, y2])),)):
        model = make_model()
        mp = MixedPrecision("fp16-mixed", "cpu", backend="emulated")
        model, optimizer = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        for x, y in chunks:
            with mp.autocast():
                loss = F.cross_entropy(model(x).float(), y, reduction="sum") / 16
            mp.backward(loss)
        mp.step(optimizer)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, atol=2e-3)


@pytest.mark.parametrize(
    ("policy", "update"),
    [
        ("fp16-mixed", "auto"),  # fp32 params: the optimizers are not wrapped
        ("params=fp16,compute=fp16,output=fp16,master=fp32", "master"),
        ("params=fp16,compute=fp16,output=fp16", "stochastic"),
        ("bf16-pure", "stochastic"),
        ("bf16-pure", "kahan"),
        ("bf16-pure", "nearest"),
    ],
)
@pytest.mark.parametrize("inf_in", ["first", "second"])
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("fused", [None, True])
def test_two_optimizers_and_a_skip_in_one_of_them_skips_both(policy, update, inf_in, clip, fused):
    """One skip-or-step decision for all optimizers of mp.step (issue 19 item 9); fused
    optimizers unscale and skip inside their own step."""
    model = make_model()
    mp = MixedPrecision(policy, "cpu", backend="emulated", update=update)
    first = torch.optim.SGD(model[0].parameters(), lr=0.1, fused=fused)
    second = torch.optim.SGD(model[3].parameters(), lr=0.1, fused=fused)
    model, first, second = mp.prepare(model, first, second)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batches(1)[0]
    loss = F.cross_entropy(model(x).float(), y)
    mp.backward(loss)
    layer = model[0] if inf_in == "first" else model[3]
    layer.weight.grad[0, 0] = float("inf")
    scale = mp.scaler.get_scale()
    report = mp.step(first, second, max_grad_norm=clip)
    assert not report.stepped
    if mp.scaler.strategy == "dynamic":
        assert mp.scaler.get_scale() == scale / 2
    assert mp.scaler.step_skipped(first) and mp.scaler.step_skipped(second)
    after = list(model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    optimizers = [getattr(opt, "optimizer", opt) for opt in (first, second)]
    assert all(not opt.state for opt in optimizers)  # no optimizer state was created either


def test_save_and_load_resume_bit_for_bit(tmp_path):
    def loop(mp, model, optimizer, data):
        for x, y in data:
            with mp.autocast():
                loss = F.cross_entropy(model(x).float(), y)
            mp.backward(loss)
            mp.step(optimizer)
            optimizer.zero_grad()

    data = batches(12)
    for policy, update in (
        ("bf16-pure", "stochastic"),
        ("fp16-mixed", "auto"),
        ("bf16-pure", "kahan"),
    ):
        straight = make_model()
        mp = MixedPrecision(policy, "cpu", backend="emulated", update=update)
        straight, opt = mp.prepare(straight, torch.optim.AdamW(straight.parameters(), lr=1e-2))
        loop(mp, straight, opt, data)

        model = make_model()
        mp = MixedPrecision(policy, "cpu", backend="emulated", update=update)
        model, opt = mp.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
        loop(mp, model, opt, data[:5])
        mp.save(tmp_path / "ckpt.pt", model, opt, step=5)
        fresh = make_model(seed=99)
        mp2 = MixedPrecision(policy, "cpu", backend="emulated", update=update)
        fresh, opt2 = mp2.prepare(fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-2))
        assert mp2.load(tmp_path / "ckpt.pt", fresh, opt2) == {"step": 5}
        loop(mp2, fresh, opt2, data[5:])
        for a, b in zip(straight.parameters(), fresh.parameters(), strict=True):
            assert torch.equal(a, b), (policy, update)


def test_loading_another_model_changes_nothing(tmp_path):
    model = make_model()
    mp = MixedPrecision("bf16-mixed", "cpu", backend="emulated")
    model, opt = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    mp.save(tmp_path / "ckpt.pt", model, opt)
    other = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 5))
    before = copy.deepcopy(other.state_dict())
    mp_other = MixedPrecision("bf16-mixed", "cpu", backend="emulated")
    other, opt_other = mp_other.prepare(other, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(CheckpointError, match=r"another model shape or precision: '3.weight'"):
        mp_other.load(tmp_path / "ckpt.pt", other, opt_other)
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k])
    mp_fp16 = MixedPrecision("fp16-mixed", "cpu", backend="emulated")
    with pytest.raises(CheckpointError, match=r"saved with policy 'params=fp32,compute=bf16"):
        mp_fp16.load(
            tmp_path / "ckpt.pt",
            make_model(),
            torch.optim.SGD(make_model().parameters()),
            strict=True,
        )


def test_auto_policy_is_what_the_hardware_recommends():
    choice = auto_policy("cpu")
    mp = MixedPrecision("auto", "cpu")
    assert (mp.policy, mp.backend, mp.reason) == (choice.policy, choice.backend, choice.reason)
    assert mp.reason


def test_scaler_is_a_mixprec_grad_scaler_everywhere():
    for policy in ("fp32", "bf16-mixed", "fp16-mixed"):
        assert isinstance(MixedPrecision(policy, "cpu").scaler, GradScaler)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: MixedPrecision("bf16-mixed", update="sr"),
            ValueError,
            r"unknown update mode 'sr'; valid",
        ),
        (lambda: MixedPrecision("bf17"), ValueError, r"unknown precision 'bf17'"),
        (
            lambda: MixedPrecision("bf16-mixed", scaler_options={"init_scale": 8.0}),
            ValueError,
            r"uses no loss scaling",
        ),
        (lambda: MixedPrecision("fp32").prepare("model"), TypeError, r"prepare needs an nn.Module"),
        (lambda: MixedPrecision("fp32").step(), ValueError, r"step needs at least one optimizer"),
        (lambda: MixedPrecision("fp32", metrics=""), ValueError, r"metrics='' names no folder"),
        (lambda: MixedPrecision("fp32", metrics="  "), ValueError, r"names no folder"),
        (lambda: MixedPrecision("fp32", metrics=3), TypeError, r"metrics must be a folder path"),
        (
            lambda: MixedPrecision("fp32").backward(1.0),
            TypeError,
            r"backward needs the loss tensor",
        ),
    ],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_prepare_twice_is_an_error():
    mp = MixedPrecision("fp32", "cpu")
    mp.prepare(make_model())
    with pytest.raises(RuntimeError, match=r"already prepared"):
        mp.prepare(make_model())


def test_fully_shard_after_prepare_is_refused_with_the_order_that_works():
    mp = MixedPrecision("bf16-mixed", "cpu")
    model = make_model()
    weights = [p.detach().clone() for p in model.parameters()]
    model, _ = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match=r"after prepare.*model = mp\.fully_shard\(model\); opt"):
        mp.fully_shard(model)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))


class Exploding(nn.Module):
    """Multiplies by a huge factor: its fp16 output overflows."""

    def forward(self, x):
        return x * 1e6


def test_skipped_step_names_parameters_and_the_traced_origin(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), Exploding(), nn.Linear(32, 4))
    mp = MixedPrecision("fp16-mixed", "cpu", backend="emulated", trace=True, metrics=tmp_path)
    model, optimizer = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = batches(1)[0]
    with mp.autocast():
        loss = F.cross_entropy(model(x).float(), y)
    mp.backward(loss)
    report = mp.step(optimizer)
    mp.close()
    assert not report.stepped
    assert set(report.nonfinite_params) >= {"2.weight"}
    exploding = next(n for n, m in model.named_modules() if isinstance(m, Exploding))
    assert report.origin is not None
    assert report.origin.splitlines()[0].startswith(f"forward: {exploding} (Exploding): ")
    (line,) = read_metrics(tmp_path / "metrics.jsonl")
    assert line["step"] == 0 and line["skipped"] is True and line["loss_scale"] == 2.0**16
    assert "2.weight" in line["nonfinite_params"]


def test_underflow_tracking_matches_a_direct_count():
    model = make_model()
    mp = MixedPrecision("fp16-mixed", "cpu", backend="emulated", track_underflow=True)
    model, optimizer = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = batches(1)[0]
    with mp.autocast():
        loss = F.cross_entropy(model(x).float(), y) * 1e-6  # tiny gradients
    mp.backward(loss)
    grads = torch.cat([p.grad.flatten().float() / 2.0**16 for p in model.parameters()])
    report = mp.step(optimizer)
    # Direct count: non-zero unscaled gradients that fp16 flushes to zero at the scale used.
    nonzero = grads != 0
    flushed = ((grads * 2.0**16).half() == 0) & nonzero
    assert report.underflow is not None
    assert report.underflow.total.flushed == int(flushed.sum())


def test_metrics_of_a_short_run(tmp_path):
    mp = MixedPrecision("bf16-mixed", "cpu", backend="emulated", metrics=tmp_path)
    model = make_model()
    model, optimizer = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with mp:
        for x, y in batches(3):
            with mp.autocast():
                loss = F.cross_entropy(model(x).float(), y)
            mp.backward(loss)
            report = mp.step(optimizer, max_grad_norm=5.0)
            optimizer.zero_grad()
    lines = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in lines] == [0, 1, 2]
    assert all(r["loss_scale"] == 1.0 and r["skipped"] is False for r in lines)
    assert all(r["grad_norm"] > 0 and r["seconds"] > 0 and r["loss"] > 0 for r in lines)
    assert lines[-1]["loss"] == report.loss and lines[-1]["grad_norm"] == report.grad_norm


def test_the_session_state_alone_resumes_stochastic_rounding_bit_for_bit():
    data = batches(10)

    def loop(mp, model, optimizer, chunk):
        for x, y in chunk:
            with mp.autocast():
                loss = F.cross_entropy(model(x).float(), y)
            mp.backward(loss)
            mp.step(optimizer)
            optimizer.zero_grad()

    def session(seed_model):
        model = make_model(seed_model)
        mp = MixedPrecision("bf16-pure", "cpu", backend="emulated", update="stochastic")
        model, opt = mp.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
        return mp, model, opt

    mp, straight, opt = session(0)
    loop(mp, straight, opt, data)
    mp, model, opt = session(0)
    loop(mp, model, opt, data[:4])
    state = copy.deepcopy(mp.state_dict())
    assert state["optimizers"][0]["generators"]  # the rounding generator is part of it
    weights = copy.deepcopy(model.state_dict())
    mp2, fresh, opt2 = session(5)
    fresh.load_state_dict(weights)
    mp2.load_state_dict(state)  # no separate optimizer.state_dict() needed
    loop(mp2, fresh, opt2, data[4:])
    for a, b in zip(straight.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("policy", "scaled"),
    [
        ("fp32", False),
        ("bf16-mixed", False),
        ("bf16-pure", False),
        ("fp16-mixed", True),
        ("p=fp16,master=fp32", True),
        ("o=fp16", True),
        ("bf16-mixed; 0 -> fp16-mixed", True),
        ("bf16-mixed; class:*Norm* -> fp32; lm_head -> c=fp16", True),
        ("bf16-mixed; 0 -> fp32", False),
        ("p=bf16,master=fp16", False),  # the master holds no gradients
    ],
)
def test_loss_scaling_counts_every_format_of_every_rule(policy, scaled):
    assert needs_loss_scaling(Policy.parse(policy)) is scaled
    strategy = MixedPrecision(policy, "cpu", backend="emulated").scaler.strategy
    assert strategy == ("dynamic" if scaled else "none")


def test_an_fp16_rule_keeps_small_gradients_alive_like_fp32():
    model = make_model()
    twin = copy.deepcopy(model)
    mp = MixedPrecision("bf16-mixed; 0 -> fp16-mixed", "cpu", backend="emulated")
    model, _ = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = batches(1)[0]
    with mp.autocast():
        loss = F.cross_entropy(model(x).float(), y) * 1e-7  # gradients below fp16's subnormals
    mp.backward(loss)
    (F.cross_entropy(twin(x), y) * 1e-7).backward()
    got = model[0].weight.grad.float() / mp.scaler.get_scale()
    want = twin[0].weight.grad
    assert want.abs().max() < 2.0**-24 and bool((got != 0).all())
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ("tf32", r"has params=tf32, which MixedPrecision does not implement"),
        ("p=fp32,c=tf32", r"has compute=tf32, which MixedPrecision does not implement"),
        ("bf16-mixed; 0 -> c=tf32", r"has compute=tf32"),
        ("p=bf16,r=fp8_e4m3", r"reduces gradients in fp8_e4m3, which MixedPrecision does not"),
        ("bf16-mixed; 0 -> p=bf16,r=fp8_e5m2", r"reduces gradients in fp8_e5m2"),
    ],
)
def test_policies_the_session_does_not_implement_are_refused(policy, message):
    with pytest.raises(ValueError, match=message):
        MixedPrecision(policy, "cpu", backend="emulated")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_cuda_device_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"device 'cuda' is not available: .*'cpu' instead"):
        MixedPrecision("bf16-mixed", "cuda")


def test_prepare_refuses_an_optimizer_of_other_parameters():
    model = make_model()
    other = make_model(seed=1)
    mp = MixedPrecision("bf16-mixed", "cpu", backend="emulated")
    count = len(list(other.parameters()))
    with pytest.raises(
        RuntimeError, match=rf"optimizer 0 given to prepare \(AdamW\) holds {count} "
    ):
        mp.prepare(model, torch.optim.AdamW(other.parameters()))


def one_backward(mp, model):
    x, y = batches(1)[0]
    with mp.autocast():
        loss = F.cross_entropy(model(x).float(), y)
    mp.backward(loss)


def test_stepping_the_optimizer_prepare_wrapped_is_refused():
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mp = MixedPrecision("p=bf16,master=fp32", "cpu", backend="emulated")
    model, wrapped = mp.prepare(model, inner)
    before = copy.deepcopy(model.state_dict())
    one_backward(mp, model)
    with pytest.raises(RuntimeError, match=r"step got the AdamW that prepare wrapped in a Master"):
        mp.step(inner)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert mp.step(wrapped).stepped  # the right optimizer still steps, and changes the model
    assert not torch.equal(model[0].weight, before["0.weight"])


def test_stepping_an_optimizer_of_another_model_is_refused():
    model = make_model()
    mp = MixedPrecision("fp32", "cpu")
    model = mp.prepare(model)
    one_backward(mp, model)
    other = make_model()
    count = len(list(other.parameters()))
    with pytest.raises(RuntimeError, match=rf"the optimizer \(SGD\) holds {count} parameter\(s\)"):
        mp.step(torch.optim.SGD(other.parameters(), lr=0.1))
    assert mp.step(torch.optim.SGD(model.parameters(), lr=0.1)).stepped  # its own: fine


def test_step_without_backward_or_gradients_is_refused():
    model = make_model()
    mp = MixedPrecision("fp16-mixed", "cpu", backend="emulated")
    model, optimizer = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match=r"step was called without a backward"):
        mp.step(optimizer)
    one_backward(mp, model)
    mp.step(optimizer)
    with pytest.raises(RuntimeError, match=r"without a backward since the last step"):
        mp.step(optimizer)  # the gradients are still there, but were applied already
    one_backward(mp, model)
    optimizer.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match=r"none of the optimizers' parameters has a gradient"):
        mp.step(optimizer)


def test_accumulated_step_reports_the_loss_of_the_whole_batch(tmp_path):
    (x1, y1), (x2, y2) = batches(2)
    model = make_model()
    twin = copy.deepcopy(model)
    mp = MixedPrecision("fp32", "cpu", metrics=tmp_path)
    model, optimizer = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with mp:
        for x, y in ((x1, y1), (x2, y2)):
            with mp.autocast():
                loss = F.cross_entropy(model(x), y) / 2
            mp.backward(loss)
        report = mp.step(optimizer)
    whole = F.cross_entropy(twin(torch.cat([x1, x2])), torch.cat([y1, y2])).item()
    assert report.micro_batches == 2
    assert report.loss == pytest.approx(whole, rel=1e-6)
    (line,) = read_metrics(tmp_path / "metrics.jsonl")
    assert line["loss"] == report.loss and line["micro_batches"] == 2


def test_a_policy_rule_matching_no_module_is_named_in_a_warning():
    """A misspelt rule is not silently ignored (issue 19 item 13)."""
    model = make_model()
    mp = MixedPrecision("bf16-pure; lm_haed -> fp32; 3 -> fp32", "cpu", backend="emulated")
    with pytest.warns(UserWarning, match=r"'lm_haed -> params=fp32.*matches no module") as seen:
        mp.prepare(model)
    assert not any("'3 -> " in str(w.message) for w in seen)  # the rule that matches: no warning
    assert model[3].weight.dtype == torch.float32


def test_rules_that_match_warn_nothing(recwarn):
    mp = MixedPrecision("bf16-pure; class:Linear -> fp32", "cpu", backend="emulated")
    mp.prepare(make_model())
    assert not [w for w in recwarn if "matches no module" in str(w.message)]
