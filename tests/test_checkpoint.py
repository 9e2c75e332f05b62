import os

import pytest
import torch

from mixprec.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_round_trip_with_tensors(tmp_path):
    path = save_checkpoint(tmp_path / "a" / "ckpt.pt", {"w": torch.arange(4.0), "step": 7})
    record = load_checkpoint(path)
    assert torch.equal(record["w"], torch.arange(4.0)) and record["step"] == 7


def test_a_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1})
    before = path.read_bytes()
    real_save = torch.save

    def dying_save(obj, handle):
        real_save({"partial": torch.zeros(1000)}, handle)
        handle.flush()
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2})
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def test_truncated_checkpoint_is_reported(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", {"w": torch.randn(1000)})
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"is corrupt or truncated and cannot be read"):
        load_checkpoint(path)


def test_foreign_and_missing_files(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}}, foreign)
    with pytest.raises(CheckpointError, match=r"is not a mixprec checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match=r"does not exist or is not a file"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_folder_is_not_a_checkpoint_path(tmp_path):
    with pytest.raises(ValueError, match=r"is a folder; give a file name"):
        save_checkpoint(tmp_path, {"step": 1})


def test_loading_never_unpickles_code(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", {"step": 1})
    record = torch.load(path, weights_only=True)  # the checkpoint is plain data
    assert record["format"] == "mixprec-checkpoint"
