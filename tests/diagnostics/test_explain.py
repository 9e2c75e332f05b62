"""mixprec.explain against the session's own casts and runner.activation_bytes on HF GPT-2/BERT."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import mixprec
from mixprec import MixedPrecision
from mixprec.app.runner import activation_bytes
from mixprec.session import needs_loss_scaling

transformers = pytest.importorskip("transformers")
VOCAB = 64


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertForMaskedLM(config)


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("make", [gpt2, bert], ids=["gpt2", "bert"])
@pytest.mark.parametrize("policy", ["fp32", "fp16-mixed", "bf16-pure"])
def test_bytes_and_formats_match_a_prepared_session(make, policy):
    model, example = make(), batch()
    mp = MixedPrecision(policy, "cpu", backend="emulated")
    result = mp.explain(model, example)
    twin = mp.prepare(copy.deepcopy(model))
    params = {id(p): p for p in twin.parameters()}.values()
    assert sum(m.weight_bytes for m in result.modules) == sum(
        p.numel() * p.element_size() for p in params
    )
    by_name = {m.name: m for m in result.modules}
    for name, module in twin.named_modules():
        for p in module.parameters(recurse=False):
            fmt = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[p.dtype]
            assert by_name[name].weights == fmt == by_name[name].gradients
    with mp.autocast():
        expected = activation_bytes(twin, lambda: twin(**example).loss)
    assert result.totals()["saved"] == expected
    assert result.loss_scaling == needs_loss_scaling(mp.policy)
    assert all(m.loss_scaled == (result.loss_scaling and m.weights != "-") for m in result.modules)


def test_the_table_shows_casts_islands_and_tied_weights():
    result = mixprec.explain(gpt2(), "fp16-mixed", batch(), backend="emulated")
    rows = {m.name: m for m in result.modules}
    assert rows["transformer.h.0.attn.c_attn"].compute == "fp16"
    assert "weights fp32→fp16 each forward" in rows["transformer.h.0.attn.c_attn"].casts
    assert rows["transformer.ln_f"].compute == "fp32"
    assert "island" in rows["transformer.ln_f"].casts
    assert rows["lm_head"].weight_bytes == 0 and "tied" in rows["lm_head"].casts
    text = result.markdown()
    assert "| transformer.h.0.attn.c_attn | Conv1D |" in text and "loss scaling: on" in text


def test_master_copies_of_16_bit_weights_are_counted():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    result = mixprec.explain(model, "params=bf16,compute=bf16,master=fp32")
    linear, norm = result.modules
    assert (linear.weights, linear.master, linear.master_bytes) == ("bf16", "fp32", 20 * 4)
    assert (norm.weights, norm.master, norm.master_bytes) == ("fp32", "-", 0)


def test_plot_writes_a_png(tmp_path):
    result = mixprec.explain(gpt2(), "bf16-mixed", batch(), backend="emulated")
    path = result.plot(tmp_path / "explain.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input():
    with pytest.raises(ValueError, match="explain needs a model with parameters"):
        mixprec.explain(nn.ReLU(), "fp32")
    with pytest.raises(TypeError, match=r"explain needs an nn\.Module"):
        mixprec.explain("model", "fp32")


def test_the_explain_command_shows_a_task_model_as_a_session_stores_it(tmp_path, capsys):
    from mixprec.app.cli import main
    from mixprec.app.tasks import make_task

    args = ["explain", "--task", "digits", "--precision", "bf16-pure", "--json"]
    assert main([*args, "--out", str(tmp_path), "--backend", "emulated"]) == 0
    shown = json.loads(capsys.readouterr().out)
    task = make_task("digits")
    mp = MixedPrecision("bf16-pure", "cpu", backend="emulated")
    model = mp.prepare(task.build_model())
    assert shown["totals"]["weights"] == sum(
        p.numel() * p.element_size() for p in model.parameters()
    )
    assert shown["loss_scaling"] is False
    assert (tmp_path / "explain.png").read_bytes()[:4] == b"\x89PNG"
    assert "| **total** |" in (tmp_path / "explain.md").read_text()


def test_the_compare_report_has_an_explain_section(tmp_path):
    from mixprec.app.report import write_report
    from mixprec.app.runner import Recipe, train
    from mixprec.app.tasks import TaskConfig, make_task

    task = make_task("digits", TaskConfig(steps=2, batch_size=8, lr=1e-3))
    runs = [
        train(task, Recipe.parse(p), tmp_path / p, backend="emulated", overwrite=True)
        for p in ("fp32", "fp16-mixed")
    ]
    x, y = task.batch(0)
    explanation = mixprec.explain(task.build_model(), "fp16-mixed", (x, y), backend="emulated")
    report = write_report({"digits": runs}, tmp_path, "mixprec compare", {"digits": explanation})
    text = report.read_text()
    assert "### Where the memory and the precision go: `params=fp32,compute=fp16" in text
    assert explanation.markdown() in text
    assert (tmp_path / "digits_explain.png").read_bytes()[:4] == b"\x89PNG"
