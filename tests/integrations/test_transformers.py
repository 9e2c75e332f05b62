"""MixprecTrainer end to end on a tiny HF GPT-2, against Trainer's own fp32 run and a hand loop."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from mixprec import MixedPrecision  # noqa: E402
from mixprec.integrations.transformers import (  # noqa: E402
    STATE_NAME,
    MixprecTrainer,
    check_loss,
    refused_precision_flags,
)
from mixprec.optim import MasterWeightOptimizer, StochasticRoundingOptimizer  # noqa: E402

STEPS, BATCH, SEQ, LR, CLIP = 30, 8, 32, 3e-3, 1.0
# A scale high enough that the first fp16 backwards overflow, and a short growth interval so it
# overflows again later: the runs below skip a few steps at the start and in the middle.
SKIPPY = {"init_scale": 2.0**22, "growth_interval": 10}


def _dataset(n: int = STEPS * BATCH) -> list[dict[str, torch.Tensor]]:
    # Arithmetic progressions mod 64: learnable, so the loss falls within 30 steps.
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 64, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + stride * torch.arange(SEQ)) % 64
    return [{"input_ids": row, "labels": row} for row in ids]


DATA = _dataset()


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    # No dropout: the hand loop below draws no dropout masks from Trainer's RNG stream.
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def _args(out: Path, **overrides: object) -> TrainingArguments:
    settings: dict[str, object] = {
        "max_steps": STEPS,
        "per_device_train_batch_size": BATCH,
        "learning_rate": LR,
        "lr_scheduler_type": "constant",
        "optim": "adamw_torch",
        "max_grad_norm": CLIP,
        "logging_steps": 1,
        "save_strategy": "no",
        "train_sampling_strategy": "sequential",
        "report_to": [],
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": 0,
    }
    settings.update(overrides)
    return TrainingArguments(str(out), **settings)  # type: ignore[arg-type]


def _train_logs(trainer: Trainer) -> list[dict[str, float]]:
    return [log for log in trainer.state.log_history if "loss" in log]


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory: pytest.TempPathFactory) -> float:
    trainer = Trainer(
        model=_model(), args=_args(tmp_path_factory.mktemp("fp32")), train_dataset=DATA
    )
    return trainer.train().training_loss


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, MixprecTrainer]:
    """An uninterrupted 30-step run per policy that also saves checkpoints every 10 steps."""
    runs = {}
    for name, options in (("fp16-mixed", SKIPPY), ("bf16-pure", None)):
        out = tmp_path_factory.mktemp(name)
        trainer = MixprecTrainer(
            model=_model(),
            args=_args(out, save_strategy="steps", save_steps=10),
            train_dataset=DATA,
            precision=name,
            scaler_options=options,
        )
        trainer.train()
        runs[name] = trainer
    return runs


# -- the numbers: loss against fp32, skips against a hand loop, resume bit for bit --------------


@pytest.mark.parametrize(
    ("precision", "update", "wrapper"),
    [
        ("fp16-mixed", "auto", None),
        ("bf16-pure", "auto", StochasticRoundingOptimizer),
        ("bf16-pure", "master", MasterWeightOptimizer),
    ],
)
def test_loss_within_two_percent_of_fp32_trainer(fp32_run, tmp_path, precision, update, wrapper):
    trainer = MixprecTrainer(
        model=_model(), args=_args(tmp_path), train_dataset=DATA, precision=precision, update=update
    )
    loss = trainer.train().training_loss
    assert abs(loss - fp32_run) <= 0.02 * fp32_run, (loss, fp32_run)
    inner = trainer.optimizer.optimizer  # Trainer holds Accelerate's wrapper around ours
    if wrapper is None:
        assert isinstance(inner, torch.optim.AdamW)
    else:
        assert isinstance(inner, wrapper)
        assert trainer.model.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16
    assert trainer.model.transformer.ln_f.weight.dtype == torch.float32  # an fp32 island


def _hand_loop() -> tuple[list[bool], list[float], list[float]]:
    """The same training as MixprecTrainer, written with the session's five lines."""
    model = _model()
    mp = MixedPrecision("fp16-mixed", "cpu", scaler_options=SKIPPY)
    model, optimizer = mp.prepare(model, torch.optim.AdamW(model.parameters(), lr=LR))
    skipped, scales, norms = [], [], []
    for i in range(STEPS):
        batch = DATA[i * BATCH : (i + 1) * BATCH]
        ids = torch.stack([row["input_ids"] for row in batch])
        with mp.autocast():  # Trainer divides the summed token loss by the label count
            loss = model(input_ids=ids, labels=ids, num_items_in_batch=ids.numel()).loss
        mp.backward(loss)
        report = mp.step(optimizer, max_grad_norm=CLIP)
        optimizer.zero_grad()
        skipped.append(not report.stepped)
        scales.append(mp.scaler.get_scale())
        norms.append(report.grad_norm)
    return skipped, scales, norms


def test_skips_scale_and_unscaled_norms_match_a_hand_written_loop(saved_runs):
    logs = _train_logs(saved_runs["fp16-mixed"])
    skipped, scales, norms = _hand_loop()
    assert sum(skipped) > 0  # the comparison below is about skips, so there must be some
    assert [log["skipped_steps"] for log in logs] == [sum(skipped[: i + 1]) for i in range(STEPS)]
    assert [log["loss_scale"] for log in logs] == scales
    for log, norm in zip(logs, norms, strict=True):
        if math.isfinite(norm):  # clipped on unscaled gradients: the session's norm
            assert log["grad_norm"] == pytest.approx(norm, rel=1e-3)
            assert log["grad_norm"] < 100
        else:
            assert not math.isfinite(log["grad_norm"])


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16-mixed", "bf16-pure"])
def test_resume_from_trainer_checkpoint_is_bit_exact(saved_runs, tmp_path, precision):
    uninterrupted = saved_runs[precision]
    checkpoint = Path(uninterrupted.args.output_dir) / "checkpoint-10"
    assert (checkpoint / STATE_NAME).is_file()
    resumed = MixprecTrainer(
        model=_model(),
        args=_args(tmp_path),
        train_dataset=DATA,
        precision=precision,
        scaler_options=SKIPPY if precision == "fp16-mixed" else None,
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected = uninterrupted.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert resumed.skipped_steps == uninterrupted.skipped_steps
    assert resumed.loss_scale == uninterrupted.loss_scale
    # The resumed history starts with the checkpoint's first 10 logs, then its own 20.
    keys = ("loss", "grad_norm", "loss_scale", "skipped_steps")
    logged = [[log[k] for k in keys] for log in _train_logs(resumed)]
    assert logged == [[log[k] for k in keys] for log in _train_logs(uninterrupted)]


def test_resume_refuses_a_checkpoint_of_another_policy(saved_runs, tmp_path):
    checkpoint = Path(saved_runs["fp16-mixed"].args.output_dir) / "checkpoint-10"
    trainer = MixprecTrainer(
        model=_model(), args=_args(tmp_path), train_dataset=DATA, precision="bf16-mixed"
    )
    with pytest.raises(ValueError, match=r"saved with policy .*fp16.*this session uses .*bf16"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_resume_refuses_a_plain_trainer_checkpoint(tmp_path):
    plain = Trainer(
        model=_model(),
        args=_args(tmp_path / "plain", max_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=DATA,
    )
    plain.train()
    trainer = MixprecTrainer(
        model=_model(), args=_args(tmp_path / "mp"), train_dataset=DATA, precision="bf16-mixed"
    )
    with pytest.raises(ValueError, match=rf"has no '{STATE_NAME}'.*saved"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-2"))


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        ({"fp16": True}, "fp16=True"),
        ({"bf16": True}, "bf16=True"),
        ({"bf16_full_eval": True}, "bf16_full_eval=True"),
    ],
)
def test_trainer_precision_flags_are_refused_with_a_policy(tmp_path, flags, named):
    args = _args(tmp_path, **flags)
    assert refused_precision_flags(args) == [named]
    with pytest.raises(ValueError, match=rf"own mixed precision \({named}\).*'fp16-mixed'"):
        MixprecTrainer(model=_model(), args=args, train_dataset=DATA, precision="fp16-mixed")


def test_plain_arguments_refuse_nothing(tmp_path):
    assert refused_precision_flags(_args(tmp_path)) == []


def test_a_loss_that_is_not_a_scalar_is_refused(tmp_path):
    def per_token(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels[:, 1:], reduction="none"
        )

    trainer = MixprecTrainer(
        model=_model(),
        args=_args(tmp_path, max_steps=1),
        train_dataset=DATA,
        precision="bf16-mixed",
        compute_loss_func=per_token,
    )
    with pytest.raises(ValueError, match=r"scalar tensor, got shape \(8, 31\).*reduce it"):
        trainer.train()


def test_check_loss_names_the_bad_value():
    check_loss(torch.tensor(2.0))
    with pytest.raises(TypeError, match=r"got float 1\.5"):
        check_loss(1.5)
    with pytest.raises(TypeError, match=r"floating-point tensor, got dtype torch\.int64"):
        check_loss(torch.tensor(3))


def test_model_init_and_bad_precision_are_refused(tmp_path):
    with pytest.raises(TypeError, match=r"needs the model itself.*got NoneType None"):
        MixprecTrainer(model_init=_model, args=_args(tmp_path), precision="bf16-mixed")
    with pytest.raises(TypeError, match=r"precision must be .*got int 16"):
        MixprecTrainer(model=_model(), args=_args(tmp_path), precision=16)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown update mode 'fast'"):
        MixprecTrainer(model=_model(), args=_args(tmp_path), update="fast")  # type: ignore[arg-type]


def test_a_scheduler_bound_to_the_unwrapped_optimizer_is_refused(tmp_path):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer = MixprecTrainer(
        model=model,
        args=_args(tmp_path, max_steps=1),
        train_dataset=DATA,
        optimizers=(optimizer, scheduler),
        precision="bf16-pure",
    )
    with pytest.raises(ValueError, match=r"LambdaLR .* drives the plain AdamW.*optimizers=\("):
        trainer.train()


def test_evaluate_runs_under_the_policy_like_fp32_trainer(tmp_path):
    held_out = DATA[:16]
    reference = Trainer(model=_model(), args=_args(tmp_path / "fp32"), eval_dataset=held_out)
    expected = reference.evaluate()["eval_loss"]
    trainer = MixprecTrainer(
        model=_model(), args=_args(tmp_path / "mp"), eval_dataset=held_out, precision="bf16-pure"
    )
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected, rel=0.01)


def test_accelerate_mixed_precision_from_the_environment_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ValueError, match=r"Accelerate runs in mixed precision 'bf16'.*Unset"):
        MixprecTrainer(model=_model(), args=_args(tmp_path), precision="bf16-mixed")


def test_unclipped_grad_norm_is_logged_unscaled(tmp_path):
    def norms(max_grad_norm: float) -> list[float]:
        trainer = MixprecTrainer(
            model=_model(),
            args=_args(tmp_path / str(max_grad_norm), max_steps=6, max_grad_norm=max_grad_norm),
            train_dataset=DATA,
            precision="fp16-mixed",
            scaler_options=SKIPPY,
        )
        trainer.train()
        return [log["grad_norm"] for log in _train_logs(trainer)]

    # A clip bound no gradient reaches changes nothing, and measures the same unscaled norm.
    unclipped, measured = norms(0.0), norms(1e9)
    assert any(not math.isfinite(n) for n in measured)  # skipped steps are among them
    finite = [i for i, n in enumerate(measured) if math.isfinite(n)]
    assert finite
    assert [unclipped[i] for i in finite] == pytest.approx([measured[i] for i in finite], rel=1e-5)
    assert all(unclipped[i] < 100 for i in finite)
