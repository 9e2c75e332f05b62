"""The prepared model's forward hooks: picklable, one policy per model, traceable, and on every
part a model's own code calls (issue 19 items 22, 31, 32, 35).

References: the model called inside an explicit ``mp.autocast()`` region of an unwrapped twin,
the model before pickling, and torch's own ``torch._dynamo.explain`` graph-break count.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import mixprec
from mixprec import MixedPrecision


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4))


# -- item 22: torch.save(model) after prepare ----------------------------------------------------


@pytest.mark.parametrize("policy", ["bf16-mixed", "fp16-mixed", "bf16-pure"])
def test_a_prepared_model_pickles_and_still_runs_under_the_policy(policy):
    mp = MixedPrecision(policy, "cpu", backend="emulated", trace=False)
    model = mp.prepare(make_mlp())
    x = torch.randn(4, 8)
    expected = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    out = loaded(x)
    assert out.dtype == expected.dtype == mp.policy.output.dtype
    assert torch.equal(out, expected)
    assert not torch.is_autocast_enabled("cpu")  # the loaded hooks leave the region again
    assert torch.equal(copy.deepcopy(model)(x), expected)


# -- item 32: preparing a prepared model -----------------------------------------------------------


@pytest.mark.parametrize("second", ["bf16-mixed", "fp16-mixed", "fp32"])
def test_preparing_a_prepared_model_again_is_refused_and_changes_nothing(second):
    model = MixedPrecision("bf16-pure", "cpu", backend="emulated").prepare(make_mlp())
    x = torch.randn(4, 8)
    expected = model(x)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    pre, post = len(model._forward_pre_hooks), len(model._forward_hooks)
    with pytest.raises(RuntimeError, match=r"already prepared.*'params=bf16.*copy\.deepcopy"):
        MixedPrecision(second, "cpu", backend="emulated").prepare(model)
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == (pre, post)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) and state[k].dtype == v.dtype for k, v in weights.items())
    assert torch.equal(model(x), expected)


def test_a_model_holding_a_prepared_part_is_refused():
    part = MixedPrecision("bf16-mixed", "cpu").prepare(make_mlp())
    with pytest.raises(RuntimeError, match=r"submodule '0' with policy"):
        MixedPrecision("fp16-mixed", "cpu").prepare(nn.Sequential(part))


def test_a_deep_copy_made_before_prepare_prepares_under_another_policy():
    model = make_mlp()
    fresh = copy.deepcopy(model)
    MixedPrecision("bf16-mixed", "cpu").prepare(model)
    MixedPrecision("fp16-mixed", "cpu", backend="emulated").prepare(fresh)
    assert fresh(torch.randn(2, 8)).dtype == torch.float32


# -- item 35: compiling after prepare -------------------------------------------------------------


def test_compiled_after_prepare_inside_the_region_has_no_graph_break():
    mp = MixedPrecision("bf16-mixed", "cpu", backend="emulated")
    model = mp.prepare(make_mlp())
    x = torch.randn(4, 8)
    expected = model(x)
    torch._dynamo.reset()
    with mp.autocast():
        explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    with mp.autocast():
        out = compiled(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    assert not torch.is_autocast_enabled("cpu")


def test_compiled_after_prepare_outside_a_region_still_runs_under_the_policy():
    mp = MixedPrecision("bf16-mixed", "cpu", backend="emulated")
    model = mp.prepare(make_mlp())
    x = torch.randn(4, 8)
    expected = model(x)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count <= 1  # the eager region entry, as the README says
    torch._dynamo.reset()
    out = torch.compile(model, backend="aot_eager")(x)
    torch.testing.assert_close(out, expected)
    assert not torch.is_autocast_enabled("cpu")


# -- item 31: what a model's own code calls runs under the policy --------------------------------


def tiny_t5() -> nn.Module:
    transformers = pytest.importorskip("transformers")
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
    return transformers.T5ForConditionalGeneration(config).eval()


@pytest.mark.parametrize("policy", ["bf16-pure", "bf16-mixed"])
def test_t5_generate_runs_the_encoder_under_the_policy(policy):
    model = MixedPrecision(policy, "cpu", backend="native").prepare(tiny_t5())
    reference = MixedPrecision(policy, "cpu", backend="native", wrap_forward=False)
    twin = reference.prepare(tiny_t5())
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    seen: list[torch.dtype] = []
    query = model.encoder.block[0].layer[0].SelfAttention.q
    query.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    with reference.autocast():
        expected = twin.generate(ids, max_new_tokens=4, do_sample=False)
    tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert seen and all(dtype == torch.bfloat16 for dtype in seen)  # the encoder computed in bf16
    assert torch.equal(tokens, expected)
    assert not torch.is_autocast_enabled("cpu")
    encoded = model.get_encoder()(input_ids=ids).last_hidden_state  # called on its own
    assert encoded.dtype == MixedPrecision(policy, "cpu").policy.output.dtype


def test_each_part_that_holds_state_runs_under_the_policy_when_called_on_its_own():
    """A part with parameters or buffers called directly (as ``generate`` calls an encoder) runs
    under the policy; a stateless part (an activation) is not hooked: nobody calls it on its own,
    and a hooked module takes torch's slow call path on every forward."""
    model = MixedPrecision("bf16-mixed", "cpu", backend="emulated").prepare(make_mlp())
    first, act, norm, _ = model
    assert not act._forward_pre_hooks and not act._forward_hooks
    x = torch.randn(2, 8)
    assert first(x).dtype == torch.float32  # the policy's output format
    twin = nn.Linear(8, 16)
    twin.load_state_dict(first.state_dict())
    with mixprec.autocast("cpu", dtype=torch.bfloat16, backend="emulated"):
        expected = twin(x).float()
    assert not torch.equal(twin(x), expected)  # bf16 compute differs from fp32 here
    assert torch.equal(first(x), expected)
    assert norm(torch.randn(2, 16)).dtype == torch.float32
    assert act(x).dtype == torch.float32


# -- item 33: casting a prepared model ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_casting_a_prepared_model_is_a_clear_error(dtype):
    model = MixedPrecision("bf16-mixed", "cpu", backend="emulated").prepare(make_mlp())
    model.to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no hook fails while the error unwinds
        with pytest.raises(RuntimeError, match=r"'2' \(LayerNorm\) is an FP32 island.*weight is "):
            model(torch.randn(2, 8))
    assert not torch.is_autocast_enabled("cpu")
