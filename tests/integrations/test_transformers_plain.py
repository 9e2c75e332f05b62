"""A prepared model in a plain ``transformers.Trainer``, and Trainer checkpoints across policies
(issue 19 items 24, 33, 37). Tiny GPT-2, a few steps; references: the unwrapped twin's loss,
Trainer's own resume, MixprecTrainer's own resume."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from mixprec import MixedPrecision  # noqa: E402
from mixprec.integrations.transformers import MixprecTrainer  # noqa: E402

SEQ = 16


def _data(n: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, SEQ), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=SEQ)
    return GPT2LMHeadModel(config)


def _args(out: Path, **overrides: object) -> TrainingArguments:
    settings: dict[str, object] = {
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": 0,
        "optim": "adamw_torch",
    }
    settings.update(overrides)
    return TrainingArguments(str(out), **settings)  # type: ignore[arg-type]


# -- item 37 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "loses"), [("bf16-pure", "stochastic rounding"), ("fp16-mixed", "loss scaling")]
)
def test_a_plain_trainer_on_a_prepared_model_warns_pointing_to_mixprec_trainer(
    tmp_path, policy, loses
):
    model = MixedPrecision(policy, "cpu").prepare(_model())
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_data())
    with pytest.warns(UserWarning, match=rf"trains without {loses}.*MixprecTrainer"):
        trainer.train()


def test_mixprec_trainer_and_the_session_loop_do_not_warn(tmp_path):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        MixprecTrainer(
            model=_model(), args=_args(tmp_path), train_dataset=_data(), precision="bf16-pure"
        ).train()
        mp = MixedPrecision("bf16-pure", "cpu")
        model = _model()
        model, opt = mp.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
        for batch in _data(12)[::4]:
            ids = batch["input_ids"][None]
            mp.backward(model(input_ids=ids, labels=ids).loss)
            mp.step(opt)
            opt.zero_grad()
    assert not [w for w in seen if "without the session" in str(w.message)]


def test_a_bf16_pure_model_returns_its_loss_in_fp32():
    model = MixedPrecision("bf16-pure", "cpu", backend="native").prepare(_model().eval())
    reference = MixedPrecision("bf16-pure", "cpu", backend="native", wrap_forward=False)
    twin = reference.prepare(_model().eval())  # eval: no dropout, so the two runs compare
    batch = _data(2)
    ids = torch.stack([b["input_ids"] for b in batch])
    with reference.autocast():
        expected = twin(input_ids=ids, labels=ids)
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16  # the policy's output format
    assert out.loss.dtype == expected.loss.dtype == torch.float32
    assert torch.equal(out.loss, expected.loss)
