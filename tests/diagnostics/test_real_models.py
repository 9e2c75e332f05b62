"""The diagnostics on real model families: tiny HF GPT-2 and BERT, dict batches, tied weights.

References: the model's own fp32 loss, a prepared ``MixedPrecision`` session's loss on the same
batch, the parameter's actual gradient, and an independent re-measurement with ``compare_layers``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixprec import MixedPrecision
from mixprec.diagnostics import NonFiniteTracer, advise, compare_layers
from mixprec.hardware import HardwareReport, tensor_core_formats

transformers = pytest.importorskip("transformers")

V100 = HardwareReport(
    device="cuda:0",
    kind="cuda",
    name="Tesla V100",
    compute_capability=(7, 0),
    tensor_core_formats=tensor_core_formats("cuda", (7, 0), frozenset()),
)
CPU_WITHOUT_16_BIT_UNITS = HardwareReport("cpu", "cpu", "test CPU", cpu_flags=frozenset({"avx2"}))
VOCAB = 64


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertForMaskedLM(config).eval()


def hf_batch(rows: int = 2, seq: int = 12) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


def hf_loss(output):
    return output.loss


def module_snr(comparison, name):
    layer = next(layer for layer in comparison.layers if layer.name == name)
    return min(v for v in (layer.output_snr_db, layer.grad_input_snr_db) if v is not None)


def test_dict_and_tensor_batches_run_the_model_as_it_is_called():
    model, batch = gpt2(), hf_batch()
    with torch.no_grad():
        expected = model(**batch).loss.item()
        logits_loss = model(batch["input_ids"]).logits.square().mean().item()
    by_dict = compare_layers(model, batch, hf_loss, "bf16-mixed", backend="emulated")
    assert by_dict.reference_loss == expected
    by_pair = compare_layers(model, (batch, None), hf_loss, "bf16-mixed", backend="emulated")
    assert by_pair.policy_loss == by_dict.policy_loss
    by_tensor = compare_layers(
        model, batch["input_ids"], lambda out: out.logits.square().mean(), "bf16-mixed"
    )
    assert by_tensor.reference_loss == pytest.approx(logits_loss, rel=1e-6)


def test_a_loss_fn_that_returns_no_loss_is_explained():
    model, batch = gpt2(), hf_batch()
    del batch["labels"]
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar tensor, got 'NoneType'"):
        compare_layers(model, batch, hf_loss, "bf16-mixed")


@pytest.mark.parametrize("make", [gpt2, bert], ids=["gpt2", "bert"])
def test_bf16_pure_comparison_runs_what_a_session_runs(make):
    model, batch = make(), hf_batch()
    result = compare_layers(model, batch, hf_loss, "bf16-pure", backend="emulated")
    mp = MixedPrecision("bf16-pure", "cpu", backend="emulated")
    twin = mp.prepare(copy.deepcopy(model))
    norms = [m for m in twin.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    with torch.no_grad(), mp.autocast():
        expected = twin(**batch).loss.item()
    assert result.policy_loss == expected
    assert result.policy_loss != result.reference_loss  # bf16 weights do change the numbers


def test_advice_applies_to_a_session_without_copying_by_hand():
    model, batch = gpt2(), hf_batch()
    advice = advise(model, batch, hf_loss, hardware=V100, backend="emulated")
    assert advice.init_scale is not None
    assert advice.scaler_options == {"init_scale": advice.init_scale}
    mp = MixedPrecision(device="cpu", **{**advice.session_kwargs(), "backend": "emulated"})
    assert mp.scaler.get_scale() == advice.init_scale
    assert str(mp.policy) == str(MixedPrecision(advice.policy, "cpu").policy)
    bf16 = advise(model, batch, hf_loss, hardware=CPU_WITHOUT_16_BIT_UNITS, backend="emulated")
    assert bf16.init_scale is None and bf16.scaler_options == {}


def test_tracer_names_both_owners_of_a_tied_weight():
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    for name, param in model.named_parameters():
        param.requires_grad_(name == "transformer.wte.weight")  # prompt-tuning style
    ids = hf_batch(rows=8, seq=16)["input_ids"]
    with NonFiniteTracer(model, fmt="fp16") as tracer:
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="sum")
        (loss * 2.0**13).backward()
    grad_max = model.lm_head.weight.grad.abs().max().item()
    assert grad_max > 65504  # the reference: the tied weight's actual gradient overflows fp16
    event = tracer.backward
    assert event.parameters == ("transformer.wte.weight", "lm_head.weight")
    assert event.module == "lm_head"
    assert f"abs-max {grad_max:.3g}" in event.detail and "tied" in event.detail
    assert "'transformer.wte -> fp32', 'lm_head -> fp32'" in event.suggestion


def test_a_nan_embedding_row_is_blamed_on_the_weights_not_on_precision():
    model, batch = gpt2(), hf_batch()
    row = int(batch["input_ids"][0, 3])
    with torch.no_grad():
        model.transformer.wte.weight[row, 5] = math.nan
    bad_rows = torch.isnan(model.transformer.wte.weight).any(dim=1).nonzero().flatten().tolist()
    with NonFiniteTracer(model) as tracer, torch.no_grad():
        model(**batch)
    event = tracer.forward
    assert event.module == "transformer.wte" and event.cause == "weights"
    assert f"({len(bad_rows)} rows: {row})" in event.detail
    assert "-> fp32" not in event.suggestion
    with pytest.raises(ValueError, match=r"bad data, not precision: parameter 'transformer.wte"):
        advise(model, batch, hf_loss, backend="emulated")


def test_a_non_finite_batch_is_bad_data():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    x = torch.randn(3, 4)
    x[1, 2] = math.inf
    with NonFiniteTracer(model) as tracer:
        model(x)
    assert tracer.forward.cause == "data" and "bad data" in tracer.forward.suggestion
    with pytest.raises(ValueError, match=r"bad data, not precision: batch\[0\]"):
        advise(model, (x, None), lambda out: out.sum(), backend="emulated")


def test_an_island_that_does_not_raise_the_snr_is_dropped():
    # BERT's attention key bias has a zero gradient in exact arithmetic (softmax cancels it):
    # its SNR is rounding noise at any precision, and an fp32 island cannot change that.
    model, batch = bert(), hf_batch()
    advice = advise(model, batch, hf_loss, hardware=CPU_WITHOUT_16_BIT_UNITS, backend="emulated")
    assert advice.rejected
    for rule in advice.rejected:
        name = rule.split(" ->")[0]
        assert rule not in advice.policy
        before = compare_layers(model, batch, hf_loss, advice.policy, backend="emulated")
        after = compare_layers(
            model, batch, hf_loss, f"{advice.policy}; {rule}", backend="emulated"
        )
        old, new = module_snr(before, name), module_snr(after, name)
        assert new <= old + 1.0
        assert any(
            r.startswith(f"{name}: ") and f"SNR {old:.1f} dB without the island" in r
            for r in advice.reasons
        )


class _Cancelling(nn.Module):
    """``Linear(1000 + x)`` with a bias that cancels the offset: bf16 inputs lose ``x``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)
        with torch.no_grad():
            self.fc.bias.copy_(-1000.0 * self.fc.weight.sum(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(1000.0 + x)))


def test_an_island_that_raises_the_snr_is_kept_with_the_db_before_and_after():
    model = _Cancelling()
    x, y = torch.randn(16, 8, generator=torch.Generator().manual_seed(2)), torch.arange(16) % 2
    batch = (x, y)
    advice = advise(
        model, batch, F.cross_entropy, hardware=CPU_WITHOUT_16_BIT_UNITS, backend="emulated"
    )
    assert "fc -> fp32" in advice.policy and not advice.rejected
    base = advice.policy.replace("; fc -> fp32", "")
    old = module_snr(compare_layers(model, batch, F.cross_entropy, base, backend="emulated"), "fc")
    new = module_snr(
        compare_layers(model, batch, F.cross_entropy, advice.policy, backend="emulated"), "fc"
    )
    assert new > old + 1.0
    assert any(
        f"fc: SNR {old:.1f} dB without the island, {new:.1f} dB with it" in r
        for r in advice.reasons
    )
