"""MixprecPrecision end to end on a tiny MLP, against Lightning's own fp32 run and a hand loop."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from mixprec import MixedPrecision  # noqa: E402
from mixprec.integrations.lightning import MixprecPrecision  # noqa: E402
from mixprec.optim import MasterWeightOptimizer, StochasticRoundingOptimizer  # noqa: E402

STEPS, BATCH, LR, CLIP = 30, 32, 1e-2, 1.0
PER_EPOCH = 10  # batches per epoch; the resume test saves at step 10, the end of epoch 0
# Overflows in the first fp16 backwards and, with a short growth interval, again later.
SKIPPY = {"init_scale": 2.0**24, "growth_interval": 8}

_g = torch.Generator().manual_seed(0)
X = torch.randn(PER_EPOCH * BATCH, 16, generator=_g)
Y = (X @ torch.randn(16, 4, generator=_g)).argmax(1)


@pytest.fixture(autouse=True)
def _quiet_lightning():
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def _loss(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(net(x).float(), y)


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 4))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = _loss(self.net, batch)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=LR)


class ValidatedNet(Net):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", _loss(self.net, batch))


def _data() -> DataLoader:
    return DataLoader(TensorDataset(X, Y), batch_size=BATCH)


def _trainer(plugin: MixprecPrecision | None, **overrides: object) -> pl.Trainer:
    settings: dict[str, object] = {
        "max_steps": STEPS,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "gradient_clip_val": CLIP,
        "plugins": [plugin] if plugin is not None else None,
    }
    settings.update(overrides)
    return pl.Trainer(**settings)  # type: ignore[arg-type]


def _fit(plugin: MixprecPrecision | None, **overrides: object) -> Net:
    module = Net()
    _trainer(plugin, **overrides).fit(module, _data())
    return module


@pytest.fixture(scope="module")
def fp32_loss() -> float:
    return sum(_fit(None).losses) / STEPS


@pytest.mark.parametrize(
    ("precision", "update", "wrapper"),
    [
        ("fp16-mixed", "auto", None),
        ("bf16-pure", "auto", StochasticRoundingOptimizer),
        ("bf16-pure", "master", MasterWeightOptimizer),
    ],
)
def test_loss_within_two_percent_of_fp32_lightning(fp32_loss, precision, update, wrapper):
    plugin = MixprecPrecision(precision, "cpu", update=update)
    module = Net()
    trainer = _trainer(plugin)
    trainer.fit(module, _data())
    loss = sum(module.losses) / STEPS
    assert abs(loss - fp32_loss) <= 0.02 * fp32_loss, (loss, fp32_loss)
    optimizer = trainer.optimizers[0]
    if wrapper is None:
        assert type(optimizer) is torch.optim.AdamW
    else:
        assert isinstance(optimizer, wrapper)
        assert module.net[0].weight.dtype == torch.bfloat16
    assert module.net[1].weight.dtype == torch.float32  # LayerNorm: an fp32 island


def _hand_loop() -> tuple[list[bool], list[float], float]:
    net = Net().net
    mp = MixedPrecision("fp16-mixed", "cpu", scaler_options=SKIPPY)
    net, optimizer = mp.prepare(net, torch.optim.AdamW(net.parameters(), lr=LR))
    skipped, losses = [], []
    for step in range(STEPS):
        i = step % PER_EPOCH
        batch = (X[i * BATCH : (i + 1) * BATCH], Y[i * BATCH : (i + 1) * BATCH])
        with mp.autocast():
            loss = _loss(net, batch)
        mp.backward(loss)
        skipped.append(not mp.step(optimizer, max_grad_norm=CLIP).stepped)
        optimizer.zero_grad()
        losses.append(loss.item())
    return skipped, losses, mp.scaler.get_scale()


def test_skips_match_a_hand_written_loop():
    plugin = MixprecPrecision("fp16-mixed", "cpu", scaler_options=SKIPPY)
    module = _fit(plugin)
    skipped, losses, scale = _hand_loop()
    assert 0 < sum(skipped) < STEPS // 2
    assert plugin.skipped_steps == sum(skipped)
    assert plugin.loss_scale == scale
    assert module.losses == pytest.approx(losses, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "options"), [("fp16-mixed", SKIPPY), ("bf16-pure", None)])
def test_resume_from_lightning_checkpoint_is_bit_exact(tmp_path, precision, options):
    def run(ckpt_path: Path | None = None) -> tuple[Net, MixprecPrecision]:
        plugin = MixprecPrecision(precision, "cpu", scaler_options=options)
        # Saved at a batch's end: Lightning resumes those exactly (a checkpoint written in
        # on_train_epoch_end replays the epoch boundary differently, with or without mixprec).
        saver = pl.callbacks.ModelCheckpoint(
            dirpath=tmp_path, every_n_train_steps=PER_EPOCH, save_top_k=-1
        )
        module = Net()
        trainer = _trainer(plugin, enable_checkpointing=True, callbacks=[saver])
        trainer.fit(module, _data(), ckpt_path=ckpt_path)
        return module, plugin

    uninterrupted, plugin = run()
    checkpoint = tmp_path / f"epoch=0-step={PER_EPOCH}.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["MixprecPrecision"]["scaler"] is not None
    resumed, resumed_plugin = run(checkpoint)
    expected = uninterrupted.state_dict()
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert resumed.losses == uninterrupted.losses[PER_EPOCH:]
    assert resumed_plugin.skipped_steps == plugin.skipped_steps
    assert resumed_plugin.loss_scale == plugin.loss_scale


def test_resume_refuses_another_policy_and_a_plain_checkpoint(tmp_path):
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)
    trainer = _trainer(
        MixprecPrecision("fp16-mixed", "cpu"),
        max_steps=2,
        enable_checkpointing=True,
        callbacks=[saver],
    )
    trainer.fit(Net(), _data())
    mixed = Path(saver.best_model_path)
    plain = tmp_path / "plain.ckpt"
    checkpoint = torch.load(mixed, weights_only=True)
    del checkpoint["MixprecPrecision"]
    torch.save(checkpoint, plain)
    with pytest.raises(ValueError, match=r"saved with policy .*fp16.*this session uses .*bf16"):
        _trainer(MixprecPrecision("bf16-mixed", "cpu")).fit(Net(), _data(), ckpt_path=mixed)
    with pytest.raises(
        ValueError, match=r"holds no 'MixprecPrecision' state.*load_from_checkpoint"
    ):
        _trainer(MixprecPrecision("fp16-mixed", "cpu")).fit(Net(), _data(), ckpt_path=plain)


def test_validation_runs_under_the_policy_like_fp32():
    expected = _trainer(None).validate(ValidatedNet(), _data(), verbose=False)[0]["val_loss"]
    plugin = MixprecPrecision("bf16-pure", "cpu")
    got = _trainer(plugin).validate(ValidatedNet(), _data(), verbose=False)[0]["val_loss"]
    assert got == pytest.approx(expected, rel=0.01)
    assert math.isfinite(got)


# -- bad input ----------------------------------------------------------------------------------


class PerSampleLoss(Net):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return {"loss": nn.functional.cross_entropy(self.net(x).float(), y, reduction="none")}


def test_a_loss_that_is_not_a_scalar_is_refused():
    trainer = _trainer(MixprecPrecision("fp16-mixed", "cpu"), max_steps=1)
    with pytest.raises(ValueError, match=r"scalar tensor, got shape \(32,\).*reduce it"):
        trainer.fit(PerSampleLoss(), _data())


def test_value_clipping_of_still_scaled_gradients_is_refused():
    plugin = MixprecPrecision("params=fp16,compute=fp16,master=fp32", "cpu")
    trainer = _trainer(plugin, max_steps=1, gradient_clip_algorithm="value")
    with pytest.raises(RuntimeError, match=r"'value' with MasterWeightOptimizer.*'norm'"):
        trainer.fit(Net(), _data())


def test_one_plugin_per_model():
    plugin = MixprecPrecision("bf16-mixed", "cpu")
    _trainer(plugin, max_steps=1).fit(Net(), _data())
    with pytest.raises(RuntimeError, match=r"already applied its policy to a Net.*its own"):
        _trainer(plugin, max_steps=1).fit(Net(), _data())


def test_bad_precision_and_options_are_refused():
    with pytest.raises(TypeError, match=r"precision must be .*got int 16"):
        MixprecPrecision(16)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown update mode 'fast'"):
        MixprecPrecision("bf16-pure", "cpu", update="fast")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"configure a new session"):
        MixprecPrecision(MixedPrecision("bf16-mixed", "cpu"), update="master")
