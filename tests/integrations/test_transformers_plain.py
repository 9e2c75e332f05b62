"""A prepared model in a plain ``transformers.Trainer``, and Trainer checkpoints across policies
(issue 19 items 24, 33, 37). Tiny GPT-2, a few steps; references: the unwrapped twin's loss,
Trainer's own resume, MixprecTrainer's own resume."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from mixprec import MixedPrecision, Policy  # noqa: E402
from mixprec.integrations.transformers import MixprecTrainer  # noqa: E402
from mixprec.optim.plain_state import export_plain  # noqa: E402

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


# -- items 24 and 33: Trainer checkpoints across policies and trainers ---------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A MixprecTrainer checkpoint after 2 steps, per policy."""
    folders = {}
    for policy in ("fp16-mixed", "bf16-pure"):
        out = tmp_path_factory.mktemp(policy)
        args = _args(out, max_steps=2, save_strategy="steps", save_steps=2)
        MixprecTrainer(model=_model(), args=args, train_dataset=_data(), precision=policy).train()
        folders[policy] = out / "checkpoint-2"
    return folders


@pytest.mark.parametrize(
    ("saved", "resumed"), [("fp16-mixed", "bf16-pure"), ("bf16-pure", "fp16-mixed")]
)
def test_resume_under_another_policy_names_both_policies(checkpoints, tmp_path, saved, resumed):
    trainer = MixprecTrainer(
        model=_model(), args=_args(tmp_path), train_dataset=_data(), precision=resumed
    )
    expected = rf"saved with policy {re.escape(repr(str(Policy.parse(saved))))}.*this session uses "
    with pytest.raises(ValueError, match=expected + re.escape(repr(str(Policy.parse(resumed))))):
        trainer.train(resume_from_checkpoint=str(checkpoints[saved]))


def test_a_plain_trainer_resumes_a_bf16_pure_mixprec_checkpoint(checkpoints, tmp_path):
    folder = checkpoints["bf16-pure"]
    saved = torch.load(folder / "optimizer.pt", weights_only=True)
    trainer = Trainer(model=_model(), args=_args(tmp_path), train_dataset=_data())
    trainer.train(resume_from_checkpoint=str(folder))  # 2 saved steps, then a 3rd
    steps = {float(state["step"]) for state in trainer.optimizer.state_dict()["state"].values()}
    assert steps == {3.0}
    assert "params" in saved["param_groups"][0]  # the inner optimizer's groups, at the top


def test_a_mixprec_trainer_loads_its_exported_optimizer_state_whole(checkpoints, tmp_path):
    folder = checkpoints["bf16-pure"]
    trainer = MixprecTrainer(
        model=_model(), args=_args(tmp_path), train_dataset=_data(), precision="bf16-pure"
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=3)
    trainer._load_optimizer_and_scheduler(str(folder))
    loaded = trainer._mixprec_optimizer.state_dict()
    exported = torch.load(folder / "optimizer.pt", weights_only=True)
    assert set(exported) == {"state", "param_groups", "mixprec_wrapper"}
    assert export_plain(loaded).keys() == exported.keys()
    assert same(export_plain(loaded), exported)


def same(a: object, b: object) -> bool:
    """Equal nested state dicts: tensors bit for bit (dtype included), the rest by ==."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b
