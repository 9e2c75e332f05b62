"""The prepared model's forward runs under the policy; fp32 state stays fp32; loads across policies.

References: a twin prepared with ``wrap_forward=False`` and called inside ``mp.autocast()`` (the
explicit region, itself tested against ``torch.autocast``), ``torch.autocast`` directly, the fp32
model, and the uncompiled model.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import pytest
import torch
from torch import nn

from mixprec import MixedPrecision
from mixprec.checkpoint import CheckpointError, load_checkpoint
from mixprec.optim import fused

transformers = pytest.importorskip("transformers")


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4))


def twins(policy: str, backend: str = "native") -> tuple[nn.Module, nn.Module, MixedPrecision]:
    """A wrapped model and an unwrapped twin with its session (for the explicit region)."""
    model = MixedPrecision(policy, "cpu", backend=backend).prepare(make_mlp())
    reference = MixedPrecision(policy, "cpu", backend=backend, wrap_forward=False)
    return model, reference.prepare(make_mlp()), reference


@pytest.mark.parametrize(
    ("policy", "backend"), [("bf16-mixed", "native"), ("fp16-mixed", "emulated")]
)
def test_a_call_runs_under_the_policy_and_returns_the_output_format(policy, backend):
    model, twin, reference = twins(policy, backend)
    x = torch.randn(4, 8)
    with reference.autocast():
        expected = twin(x)
    assert expected.dtype in (torch.bfloat16, torch.float16)  # the explicit region is 16-bit
    out = model(x)
    assert out.dtype == torch.float32  # the preset's output=fp32
    assert torch.equal(out, expected.float())
    assert not torch.is_autocast_enabled("cpu")  # the region is left after the call


def test_the_wrapped_forward_matches_torch_autocast():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    reference = copy.deepcopy(plain)
    model = MixedPrecision("bf16-mixed", "cpu", backend="native").prepare(plain)
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(x)
    assert torch.equal(model(x), expected.float())


def test_eval_no_grad_and_a_nested_region_give_the_same_outputs():
    model, twin, reference = twins("bf16-mixed")
    x = torch.randn(4, 8)
    with reference.autocast():
        expected = twin(x).float()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    mp = MixedPrecision("bf16-mixed", "cpu", backend="native")
    nested = mp.prepare(make_mlp())
    with mp.autocast():
        assert torch.equal(nested(x), expected)
        assert torch.is_autocast_enabled("cpu")  # the outer region is still open
    assert not torch.is_autocast_enabled("cpu")


def test_opting_out_leaves_calls_in_fp32():
    fp32 = make_mlp()
    model = MixedPrecision("bf16-mixed", "cpu", wrap_forward=False).prepare(make_mlp())
    x = torch.randn(4, 8)
    assert torch.equal(model(x), fp32(x))


def test_the_region_is_left_when_forward_raises():
    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    model = MixedPrecision("bf16-mixed", "cpu").prepare(Boom())
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(2))
    assert not torch.is_autocast_enabled("cpu")


def test_a_bf16_pure_cnn_runs_without_a_with_block():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    twin = copy.deepcopy(cnn)
    model = MixedPrecision("bf16-pure", "cpu", backend="native").prepare(cnn)
    reference = MixedPrecision("bf16-pure", "cpu", backend="native", wrap_forward=False)
    twin = reference.prepare(twin)
    x = torch.randn(2, 1, 8, 8)
    with reference.autocast():
        expected = twin(x)
    out = model(x)
    assert out.dtype == torch.bfloat16  # bf16-pure says output=bf16
    assert torch.equal(out, expected.to(torch.bfloat16))


@pytest.mark.parametrize("backend", ["native", "emulated"])
def test_a_compiled_model_runs_under_the_policy(backend):
    policy = "bf16-mixed" if backend == "native" else "fp16-mixed"
    model, twin, reference = twins(policy, backend)
    x = torch.randn(4, 8)
    compiled_twin = torch.compile(twin)
    with reference.autocast():
        expected = compiled_twin(x).float()
    out = torch.compile(model)(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)
    assert not torch.is_autocast_enabled("cpu")


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=32, vocab_size=64)
    return transformers.GPT2LMHeadModel(config).eval()


def test_hf_generate_and_outputs_follow_the_policy():
    model = MixedPrecision("bf16-mixed", "cpu", backend="native").prepare(tiny_gpt2())
    reference = MixedPrecision("bf16-mixed", "cpu", backend="native", wrap_forward=False)
    twin = reference.prepare(tiny_gpt2())
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    with reference.autocast():
        expected_logits = twin(ids).logits
        expected_tokens = twin.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    logits = model(ids).logits
    assert logits.dtype == torch.float32
    assert torch.equal(logits, expected_logits.float())
    tokens = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, expected_tokens)


# -- what stays fp32 stays fp32 ------------------------------------------------------------------


class WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 4, 2) / 4))


@pytest.mark.parametrize("policy", ["bf16-pure", "fp16-mixed", "bf16-mixed"])
def test_floating_buffers_keep_their_dtype(policy):
    original = WithBuffer()
    model = copy.deepcopy(original)
    MixedPrecision(policy, "cpu").prepare(model)
    assert model.inv_freq.dtype == torch.float32
    assert torch.equal(model.inv_freq, original.inv_freq)


def test_cast_buffers_casts_them():
    model = WithBuffer()
    MixedPrecision("bf16-pure", "cpu", cast_buffers=True).prepare(model)
    assert model.inv_freq.dtype == model.linear.weight.dtype == torch.bfloat16


def test_llama_rotary_inv_freq_stays_fp32():
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
    )
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config)
    model = copy.deepcopy(reference)
    MixedPrecision("bf16-pure", "cpu", backend="native").prepare(model)
    buffers = dict(reference.named_buffers())
    freqs = {n: b for n, b in model.named_buffers() if n.endswith("inv_freq")}
    assert freqs
    for name, buffer in freqs.items():
        assert buffer.dtype == torch.float32
        assert torch.equal(buffer, buffers[name])
    assert model.lm_head.weight.dtype == torch.bfloat16


def tiny_t5() -> nn.Module:
    config = transformers.T5Config(
        d_model=32,
        d_ff=64,
        num_layers=1,
        num_heads=2,
        vocab_size=64,
        d_kv=16,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(config)


def test_hf_keep_in_fp32_modules_are_fp32_islands():
    model = MixedPrecision("bf16-pure", "cpu", backend="native").prepare(tiny_t5())
    wo = {n: m for n, m in model.named_modules() if n.endswith(".wo")}
    assert wo and all(m.weight.dtype == torch.float32 for m in wo.values())
    assert model.lm_head.weight.dtype == torch.bfloat16
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    for m in wo.values():
        m.register_forward_hook(lambda mod, args, out: seen.append((args[0].dtype, out.dtype)))
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    assert seen and all(pair == (torch.float32, torch.float32) for pair in seen)


def test_a_keep_in_fp32_name_that_matches_nothing_is_refused():
    class Net(nn.Sequential):
        _keep_in_fp32_modules: ClassVar[list[str]] = ["nothing_here"]

    net = Net(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"Net._keep_in_fp32_modules names 'nothing_here'.*'0'"):
        MixedPrecision("bf16-pure", "cpu").prepare(net)


def test_a_module_attribute_the_user_names_is_honoured():
    class Net(nn.Module):
        _stay_fp32: ClassVar[list[str]] = ["head"]

        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))

    model = MixedPrecision("bf16-pure", "cpu", fp32_attributes=("_stay_fp32",)).prepare(Net())
    assert (model.body.weight.dtype, model.head.weight.dtype) == (torch.bfloat16, torch.float32)
    fp32_head = copy.deepcopy(model.head)
    x = torch.randn(3, 4)
    hidden = model.body(x.to(torch.bfloat16))  # what the root's bf16 region computes
    assert torch.equal(model(x), fp32_head(hidden.float()).to(torch.bfloat16))  # output=bf16
    with pytest.raises(TypeError, match=r"fp32_attributes must be a sequence .*'_stay_fp32'"):
        MixedPrecision("bf16-pure", "cpu", fp32_attributes="_stay_fp32")


# -- loading across policies and into compiled models --------------------------------------------


def trained(policy: str):
    mp = MixedPrecision(policy, "cpu", backend="emulated")
    model = make_mlp()
    model, opt = mp.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    mp.backward(model(torch.randn(4, 8)).pow(2).mean())
    mp.step(opt)
    return mp, model, opt


def test_a_checkpoint_of_a_compatible_policy_loads_unless_strict(tmp_path):
    mp, model, opt = trained("bf16-mixed")
    mp.save(tmp_path / "c.pt", model, opt)
    other, target, target_opt = trained("fp16-mixed")
    scale = other.scaler.get_scale()
    with pytest.raises(CheckpointError, match=r"saved with policy .*pass strict=False"):
        other.load(tmp_path / "c.pt", target, target_opt, strict=True)
    other.load(tmp_path / "c.pt", target, target_opt)  # the default: compatible formats load
    for key, value in model.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)
    assert target_opt.state_dict()["state"][0]["exp_avg"].equal(
        opt.state_dict()["state"][0]["exp_avg"]
    )
    assert other.scaler.get_scale() == scale  # a bf16 run had no scale to carry over


def test_a_checkpoint_of_other_weight_formats_is_refused_even_with_strict_false(tmp_path):
    mp, model, opt = trained("bf16-pure")
    mp.save(tmp_path / "c.pt", model, opt)
    other, target, target_opt = trained("fp16-mixed")
    with pytest.raises(CheckpointError, match=r"precision: '0.weight' is .*bfloat16 there"):
        other.load(tmp_path / "c.pt", target, target_opt, strict=False)


def test_a_compiled_model_saves_and_loads_like_the_plain_one(tmp_path):
    mp, model, opt = trained("bf16-mixed")
    compiled = torch.compile(model)
    assert any(key.startswith("_orig_mod.") for key in compiled.state_dict())
    mp.save(tmp_path / "c.pt", compiled, opt)
    other, target, target_opt = trained("bf16-mixed")
    other.load(tmp_path / "c.pt", torch.compile(target), target_opt)
    for key, value in model.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)
    assert not any("_orig_mod" in key for key in load_checkpoint(tmp_path / "c.pt")["model"])


@pytest.mark.parametrize("update", ["master", "stochastic", "kahan"])
def test_a_compiled_model_trains_as_the_eager_one_under_each_16_bit_update(update):
    """bf16 parameters, AdamW wrapped by the update mode (its one-pass kernel where it builds):
    the compiled model's steps give the eager model's weights bit for bit."""
    policy = (
        "params=bf16,compute=bf16,output=bf16,master=fp32" if update == "master" else "bf16-pure"
    )
    x, y = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)), torch.randn(4, 4)
    runs = []
    for compiled in (False, True):
        mp = MixedPrecision(policy, "cpu", backend="emulated", update=update)
        model = make_mlp()
        model, opt = mp.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        for _ in range(3):
            mp.backward((forward(x).float() - y).pow(2).mean())
            mp.step(opt)
            opt.zero_grad()
        runs.append([p.detach().clone() for p in model.parameters()])
        assert opt.last_step_fused > 0 or fused.engine() is None
    assert any(p.dtype == torch.bfloat16 for p in runs[0])  # the LayerNorm island stays fp32
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
