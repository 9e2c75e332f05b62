"""Hugging Face's activation checkpointing under mixprec regions: the same loss and gradients as
the same model run without checkpointing."""

import pytest
import torch

from mixprec.compute import autocast

transformers = pytest.importorskip("transformers")  # a test dependency: installed by '.[test]'


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32)
    return transformers.GPT2LMHeadModel(config).train()  # dropout on: the RNG must be replayed


def _loss_and_grads(model, ids, backend, dtype, checkpointing):
    model.zero_grad()
    if checkpointing is None:
        model.gradient_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
        )
    torch.manual_seed(1)
    with autocast("cpu", dtype=dtype, backend=backend):
        out = model(ids, labels=ids, use_cache=False)
    out.loss.backward()  # the recomputation runs here, after the region closed
    return out.loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("checkpointing", ["reentrant", "non-reentrant"])
@pytest.mark.parametrize("backend", ["native", "emulated"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gradient_checkpointing_enable_recomputes_in_the_same_precision(
    gpt2, checkpointing, backend, dtype
):
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    plain = _loss_and_grads(gpt2, ids, backend, dtype, None)
    checked = _loss_and_grads(gpt2, ids, backend, dtype, checkpointing)
    assert torch.equal(checked[0], plain[0])
    for got, want in zip(checked[1], plain[1], strict=True):
        assert torch.equal(got, want)
