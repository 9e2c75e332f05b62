"""NonFiniteTracer and nonfinite_grads: injected faults are named, every time."""

from __future__ import annotations

import math

import pytest
import torch
from diag_models import (
    BadGradLinear,
    BadGradWrapper,
    Blowup,
    hook_count,
    lm_loss,
    t5_overflow_model,
    tiny_transformer,
    tokens,
)
from torch import nn

from mixprec.compute import autocast
from mixprec.diagnostics import NonFiniteTracer, nonfinite_grads, tensor_range

POSITIONS = [(0, "fc1"), (1, "qkv"), (1, "fc2"), (2, "proj"), (2, "fc1")]


def step(model, tracer=None):
    x = tokens()
    loss = lm_loss(model(x), x)
    loss.backward()
    return loss


@pytest.mark.parametrize(("block", "layer"), POSITIONS)
def test_forward_fault_is_named_at_every_depth(block, layer):
    model = tiny_transformer()
    setattr(model.blocks[block], layer, Blowup(getattr(model.blocks[block], layer)))
    with NonFiniteTracer(model) as tracer:
        step(model)
    event = tracer.forward
    assert event is not None and event.phase == "forward"
    assert event.module == f"blocks.{block}.{layer}"
    assert event.module_class == "Blowup"
    assert event.problem == "inf"
    assert event.output_absmax == math.inf
    assert 0 < event.input_absmax < math.inf  # the module's input was still fine
    assert tracer.first is event


@pytest.mark.parametrize(("block", "layer"), POSITIONS)
@pytest.mark.parametrize("fill", [math.inf, math.nan], ids=["inf", "nan"])
def test_backward_fault_is_named_at_every_depth(block, layer, fill):
    model = tiny_transformer()
    setattr(model.blocks[block], layer, BadGradWrapper(getattr(model.blocks[block], layer), fill))
    with NonFiniteTracer(model) as tracer:
        step(model)
    assert tracer.forward is None
    event = tracer.backward
    assert event is not None and event.phase == "backward"
    assert event.module == f"blocks.{block}.{layer}"
    assert event.problem == ("inf" if math.isinf(fill) else "nan")
    # the gradients really went bad, and the tracer names where they started, not where they ended
    assert nonfinite_grads(model)


@pytest.mark.parametrize("block", [0, 2])
def test_backward_fault_inside_a_leaf_module_is_named(block):
    model = tiny_transformer()
    old = model.blocks[block].fc2
    bad = BadGradLinear(old.in_features, old.out_features)
    bad.load_state_dict(old.state_dict())
    model.blocks[block].fc2 = bad
    with NonFiniteTracer(model) as tracer:
        step(model)
    assert tracer.backward.module == f"blocks.{block}.fc2"
    assert "input" in tracer.backward.detail and "output was in range" in tracer.backward.detail
    assert f"blocks.{block}.fc2.weight" not in nonfinite_grads(model)


def test_forward_overflow_of_a_t5_block_under_emulated_fp16():
    model = t5_overflow_model(block=1)
    x = tokens()
    with NonFiniteTracer(model) as tracer:
        with autocast("cpu", dtype=torch.float16, backend="emulated"):
            loss = lm_loss(model(x), x)
        loss.backward()
    assert tracer.forward.module == "blocks.1.fc1"
    assert "blocks.1.fc1 -> fp32" in tracer.forward.suggestion
    assert "bf16" in tracer.forward.suggestion


def test_fmt_names_the_module_fp16_would_overflow_in_an_fp32_run():
    model = t5_overflow_model(block=2, reach=7.1e4)
    with NonFiniteTracer(model, fmt="fp16") as tracer:
        step(model)
    event = tracer.forward
    assert event.module == "blocks.2.fc1"
    assert event.output_absmax == pytest.approx(7.1e4, rel=1e-5)
    assert event.suggestion.startswith(
        "blocks.2.fc1 output reached 7.1e+04 > fp16 max 65504: run it in fp32"
    )


class Parent(nn.Module):
    """Produces inf in its own code, between two submodules."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.a(x) * 1e30 * 1e30)


def test_fault_in_a_modules_own_code_names_that_module():
    model = nn.Sequential(nn.Linear(4, 4), Parent())
    with NonFiniteTracer(model) as tracer:
        model(torch.randn(3, 4)).sum().backward()
    assert tracer.forward.module == "1"
    assert "own code" in tracer.forward.detail


def test_non_finite_batch_is_blamed_on_the_data():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    x = torch.randn(3, 4)
    x[1, 2] = math.nan
    with NonFiniteTracer(model) as tracer:
        model(x)
    assert tracer.forward.module == ""
    assert "batch" in tracer.forward.detail


def test_overflowing_loss_is_blamed_on_the_loss():
    model = tiny_transformer(n_layers=1)
    x = tokens()
    with NonFiniteTracer(model) as tracer:
        loss = lm_loss(model(x), x)
        (loss * torch.tensor(3e38) * 4).backward()  # as a loss scale that is far too large
    assert tracer.forward is None
    assert tracer.backward.module == ""
    assert "loss" in tracer.backward.detail


def test_clean_step_finds_nothing():
    model = tiny_transformer(n_layers=1)
    with NonFiniteTracer(model) as tracer:
        step(model)
    assert tracer.first is None
    assert "no module" in tracer.summary()


def test_no_hooks_when_disabled_or_after_exit_even_after_an_exception():
    model = tiny_transformer(n_layers=2)
    before = hook_count(model)
    tracer = NonFiniteTracer(model, enabled=False)
    with tracer:
        assert hook_count(model) == before and tracer.hooks_registered == 0
        step(model)
    assert tracer.first is None
    tracer = NonFiniteTracer(model)
    with pytest.raises(KeyError), tracer:
        assert hook_count(model) > before
        raise KeyError("inside")
    assert hook_count(model) == before and tracer.hooks_registered == 0


def test_events_persist_until_reset_and_attach_twice_is_an_error():
    model = nn.Sequential(Blowup(nn.Linear(4, 4)))
    tracer = NonFiniteTracer(model).attach()
    with pytest.raises(RuntimeError, match="already attached"):
        tracer.attach()
    model(torch.ones(2, 4))
    tracer.detach()
    assert tracer.forward.module == "0"
    tracer.reset()
    assert tracer.first is None


def test_wrong_shape_batch_raises_the_models_own_error_unchanged():
    model = tiny_transformer(n_layers=1)
    bad = torch.zeros(2, 3, 4, 5, dtype=torch.long)
    with pytest.raises(Exception) as direct:
        model(bad)
    before = hook_count(model)
    with pytest.raises(type(direct.value)) as traced, NonFiniteTracer(model):
        model(bad)
    assert str(traced.value) == str(direct.value)
    assert hook_count(model) == before


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"needs a model with parameters.*ReLU"):
        NonFiniteTracer(nn.ReLU())
    with pytest.raises(TypeError, match=r"needs an nn\.Module, got str 'model'"):
        NonFiniteTracer("model")
    with pytest.raises(ValueError, match="unknown number format 'fp12'"):
        NonFiniteTracer(nn.Linear(2, 2), fmt="fp12")
    with pytest.raises(TypeError, match="enabled must be a bool, got str 'yes'"):
        NonFiniteTracer(nn.Linear(2, 2), enabled="yes")


def test_nonfinite_grads_against_a_direct_check():
    model = tiny_transformer(n_layers=2)
    step(model)
    with torch.no_grad():
        model.blocks[1].fc1.weight.grad[0, 0] = math.inf
        model.embed.weight.grad[3, 1] = math.nan
        model.lm_head.bias.grad.fill_(3e38)  # finite, although the sum overflows
    expected = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert expected == ["embed.weight", "blocks.1.fc1.weight"]
    assert nonfinite_grads(model) == expected
    assert nonfinite_grads(dict(model.named_parameters())) == expected
    assert nonfinite_grads(nn.Linear(2, 2)) == []  # no gradients yet


def test_tensor_range():
    assert tensor_range([torch.tensor([-2.0, 1.0]), torch.tensor([0.5, math.inf])]) == (
        math.inf,
        True,
        False,
    )
    assert tensor_range([torch.tensor([1, 2])]) == (0.0, False, False)  # integers are skipped


def test_hooks_on_a_leaf_input_are_removed_on_exit():
    model = nn.Sequential(Blowup(nn.Linear(4, 4)))
    x = torch.randn(2, 4, requires_grad=True)
    with NonFiniteTracer(model) as tracer:
        model(x).sum().backward()
        assert x._backward_hooks
    assert not x._backward_hooks
    assert tracer.forward.module == "0" and x.grad is not None
