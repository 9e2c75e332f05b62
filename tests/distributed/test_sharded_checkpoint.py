"""Sharded checkpoint folders in one process: atomic against a kill, refusals change nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mixprec import MixedPrecision
from mixprec.checkpoint import CheckpointError
from mixprec.distributed import checkpoint as sharded


def make(width: int = 6) -> tuple[MixedPrecision, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    mp = MixedPrecision("fp32", device="cpu")
    model = nn.Sequential(nn.Linear(4, width), nn.Linear(width, 2))
    model, opt = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    return mp, model, opt


def one_step(mp: MixedPrecision, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    mp.backward(model(torch.ones(3, 4)).pow(2).mean())
    mp.step(opt)
    opt.zero_grad()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_round_trip_in_a_folder(tmp_path: Path) -> None:
    mp, model, opt = make()
    one_step(mp, model, opt)
    mp.save(tmp_path, model, opt, epoch=3)  # an existing folder: the sharded format
    assert sharded.is_sharded_checkpoint(tmp_path)
    saved = snapshot(model)
    saved_momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    torch.manual_seed(7)
    mp2, model2, opt2 = make()
    assert mp2.load(tmp_path, model2, opt2) == {"epoch": 3}
    assert all(torch.equal(saved[k], v) for k, v in model2.state_dict().items())
    for p, momentum in zip(model2.parameters(), saved_momentum, strict=True):
        assert torch.equal(opt2.state[p]["momentum_buffer"], momentum)
    assert torch.equal(torch.get_rng_state(), rng)
    assert mp2.state_dict()["steps"] == 1


def test_other_global_shapes_are_refused_and_nothing_loads(tmp_path: Path) -> None:
    mp, model, opt = make()
    mp.save(tmp_path, model, opt)
    mp_wide, wide, wide_opt = make(width=7)
    before = snapshot(wide)
    with pytest.raises(CheckpointError, match=r"'0\.weight' was saved with global shape \(6, 4\)"):
        mp_wide.load(tmp_path, wide, wide_opt)
    assert all(torch.equal(before[k], v) for k, v in wide.state_dict().items())


def test_refused_values_write_nothing(tmp_path: Path) -> None:
    mp, model, opt = make()
    mp.save(tmp_path, model, opt, epoch=1)
    listing = sorted(os.listdir(tmp_path))
    with pytest.raises(TypeError, match=r"numpy"):
        mp.save(tmp_path, model, opt, epoch=np.int64(2))
    assert sorted(os.listdir(tmp_path)) == listing
    assert make()[0].load(tmp_path, *make()[1:]) == {"epoch": 1}


def test_a_policy_mismatch_is_refused(tmp_path: Path) -> None:
    mp, model, opt = make()
    mp.save(tmp_path, model, opt)
    other = MixedPrecision("bf16-mixed", device="cpu")
    model2 = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    model2, opt2 = other.prepare(model2, torch.optim.SGD(model2.parameters(), lr=0.1))
    with pytest.raises(CheckpointError, match=r"saved with policy 'params=fp32"):
        other.load(tmp_path, model2, opt2, strict=True)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    _, model, opt = make()
    with pytest.raises(CheckpointError, match=r"is not a sharded mixprec checkpoint"):
        sharded.load(tmp_path, model, [opt])


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from mixprec.distributed import checkpoint as sharded
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    print("ready", flush=True)
    value = 0.0
    while True:
        value += 1.0
        with torch.no_grad():
            model.weight.fill_(value)
        sharded.save(sys.argv[1], model, state={"value": value})
    """
)


@pytest.mark.slow
def test_a_kill_mid_save_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 60
        while not sharded.is_sharded_checkpoint(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.7)  # several saves later, at an arbitrary instant of one of them
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    model = torch.nn.Linear(256, 256)
    value = sharded.load(tmp_path, model)["value"]
    assert value >= 1.0
    assert torch.equal(model.weight, torch.full((256, 256), value))  # one whole version
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("v-")]) >= 1
    sharded.save(tmp_path, model, state={"value": -1.0})  # the next save cleans up
    assert [p.name.startswith("v-") for p in tmp_path.iterdir() if p.is_dir()] == [True]


def test_a_file_path_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    mp, model, opt = make()
    single = tmp_path / "ckpt.pt"
    mp.save(single, model, opt)  # one process, a file path: the single-file format
    before = single.read_bytes()
    with pytest.raises(ValueError, match=r"'.*ckpt\.pt' is a file; a sharded checkpoint is a"):
        sharded.save(single, model, [opt])
    assert single.read_bytes() == before
    assert make()[0].load(single, *make()[1:]) == {}  # a file loads as a single-file checkpoint


# -- refused and failed loads and saves change nothing (issue 19: 1, 2, 3, 6, 20, 26) -------------


def version_of(folder: Path) -> Path:
    return folder / (folder / "LATEST").read_text().strip()


def live_state(mp: MixedPrecision, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {
        "model": snapshot(model),
        "optim": {k: [t.clone() for t in v.values()] for k, v in enumerate(opt.state.values())},
        "steps": mp.state_dict()["steps"],
    }


def assert_unchanged(before: dict, mp, model, opt) -> None:
    after = live_state(mp, model, opt)
    assert before["steps"] == after["steps"]
    assert all(torch.equal(before["model"][k], v) for k, v in after["model"].items())
    assert list(before["optim"]) == list(after["optim"])
    for k, tensors in before["optim"].items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, after["optim"][k], strict=True))


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: len(file.read_bytes()) * 2 // 3])


def flip_middle(file: Path) -> None:
    raw = bytearray(file.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    file.write_bytes(bytes(raw))


def last_item_damaged(file: Path) -> None:
    """A folder written before per-item checksums whose last item's archive is damaged: only
    DCP notices, after it has read the other items (into the live model, before the fix)."""
    from mixprec.distributed._dcp_io import read_metadata

    (file.parent / "manifest.pt").unlink()
    storage = read_metadata(file.parent).storage_data.values()
    last = max(
        (info for info in storage if info.relative_path == file.name), key=lambda i: i.offset
    )
    raw = bytearray(file.read_bytes())
    end = last.offset + last.length
    raw[end - 22 : end] = bytes(22)  # its zip end-of-central-directory record
    file.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", [truncate, flip_middle, last_item_damaged])
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "trained"])
def test_a_damaged_shard_is_refused_before_anything_changes(tmp_path, damage, fresh) -> None:
    mp, model, opt = make()
    one_step(mp, model, opt)
    mp.save(tmp_path, model, opt)
    damage(version_of(tmp_path) / "__0_0.distcp")
    mp2, model2, opt2 = make()
    torch.manual_seed(5)
    if not fresh:  # live optimizer state and weights that differ from the saved ones
        one_step(mp2, model2, opt2)
        one_step(mp2, model2, opt2)
    before, rng = live_state(mp2, model2, opt2), torch.get_rng_state()
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp|v-\w+' failed on rank 0") as info:
        mp2.load(tmp_path, model2, opt2)
    assert isinstance(info.value, Exception)  # not torch's CheckpointException (a BaseException)
    assert "Traceback" not in str(info.value) and len(str(info.value)) < 600
    assert_unchanged(before, mp2, model2, opt2)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not fresh or not opt2.state  # a fresh optimizer stays without state


def test_a_flipped_bit_in_a_shard_is_named_by_its_item(tmp_path) -> None:
    mp, model, opt = make()
    one_step(mp, model, opt)
    mp.save(tmp_path, model, opt)
    shard = version_of(tmp_path) / "__0_0.distcp"
    raw = bytearray(shard.read_bytes())
    weight = model.state_dict()["0.weight"].numpy().tobytes()
    offset = bytes(raw).find(weight)
    assert offset > 0
    raw[offset + 5] ^= 0x01  # one low mantissa bit of one fp32 weight
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"item 'model\.0\.weight@0,0' .* does not match"):
        make()[0].load(tmp_path, *make()[1:])


class _Payload:
    """Unpickling this writes a marker file: proof that a load ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _replace_metadata_keeping_checksums(version: Path, data: bytes) -> None:
    """What an attacker can do: any bytes, with the manifest's CRC made to fit."""
    import zlib

    from mixprec.checkpoint import load_checkpoint, save_checkpoint

    (version / ".metadata").write_bytes(data)
    manifest = load_checkpoint(version / "manifest.pt")
    manifest["metadata_crc"] = zlib.crc32(data)
    save_checkpoint(
        version / "manifest.pt",
        {k: v for k, v in manifest.items() if k != "format" and k != "version"},
    )


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process
@pytest.mark.filterwarnings("ignore:Detected an existing checkpoint")  # the crafted overwrite
def test_no_checkpoint_path_runs_a_pickle_payload(tmp_path) -> None:
    import pickle

    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "ran"
    # a file: the payload inside the record
    single = tmp_path / "ckpt.pt"
    torch.save({"format": "mixprec-checkpoint", "version": 2, "x": _Payload(marker)}, single)
    with pytest.raises(CheckpointError, match=r"holds Python objects"):
        make()[0].load(single, *make()[1:])
    # a folder: its .metadata
    folder = tmp_path / "folder"
    folder.mkdir()
    mp, model, opt = make()
    one_step(mp, model, opt)
    mp.save(folder, model, opt)
    version = version_of(folder)
    original = (version / ".metadata").read_bytes()
    _replace_metadata_keeping_checksums(version, pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match=r"object of type pathlib\.Path\.touch, refused"):
        make()[0].load(folder, *make()[1:])
    # a folder: a non-tensor item (the learning rate) DCP would read with weights_only=False
    _replace_metadata_keeping_checksums(version, original)
    target = sharded._dcp_state(model, [opt])
    target["optim"]["param_groups"][0]["lr"] = _Payload(marker)
    dcp.save(target, checkpoint_id=str(version), no_dist=True)
    (version / "manifest.pt").unlink()  # as written before the manifest
    with pytest.raises(CheckpointError, match=r"holds Python objects that torch\.load"):
        make()[0].load(folder, *make()[1:])
    assert not marker.exists()


def test_a_damaged_or_missing_metadata_file_is_named(tmp_path) -> None:
    mp, model, opt = make()
    mp.save(tmp_path, model, opt)
    metadata = version_of(tmp_path) / ".metadata"
    original = metadata.read_bytes()
    _replace_metadata_keeping_checksums(version_of(tmp_path), original[:40])
    with pytest.raises(CheckpointError, match=r"\.metadata' is corrupt or truncated \(\w+Error"):
        make()[0].load(tmp_path, *make()[1:])
    metadata.unlink()
    with pytest.raises(CheckpointError, match=r"\.metadata' is missing"):
        make()[0].load(tmp_path, *make()[1:])


def test_a_second_writer_is_refused_and_the_first_ones_versions_stay(tmp_path) -> None:
    import fcntl

    mp, model, opt = make()
    mp.save(tmp_path, model, opt, epoch=1)
    listing = sorted(os.listdir(tmp_path))
    with open(tmp_path / ".lock", "a") as held:  # another process saving holds this
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(CheckpointError, match=r"another process is saving into checkpoint"):
            mp.save(tmp_path, model, opt, epoch=2)
    assert sorted(os.listdir(tmp_path)) == listing
    assert make()[0].load(tmp_path, *make()[1:]) == {"epoch": 1}
    mp.save(tmp_path, model, opt, epoch=3)  # the lock is free again
    assert make()[0].load(tmp_path, *make()[1:]) == {"epoch": 3}


def _disk_full_in_dcp(monkeypatch) -> None:
    from torch.distributed.checkpoint import filesystem

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(filesystem, "_write_item", full)


def _disk_full_in_rank_file(monkeypatch) -> None:
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sharded, "save_checkpoint", full)


@pytest.mark.parametrize("fail", [_disk_full_in_dcp, _disk_full_in_rank_file])
def test_a_failed_save_removes_its_temporary_and_keeps_the_previous(tmp_path, monkeypatch, fail):
    mp, model, opt = make()
    mp.save(tmp_path, model, opt, epoch=1)
    saved = snapshot(model)
    listing = sorted(os.listdir(tmp_path))
    one_step(mp, model, opt)
    before = live_state(mp, model, opt)
    fail(monkeypatch)
    with pytest.raises(CheckpointError, match=r"no space left on device") as info:
        mp.save(tmp_path, model, opt, epoch=2)
    monkeypatch.undo()
    assert isinstance(info.value, Exception) and "Traceback" not in str(info.value)
    assert str(tmp_path) in str(info.value)
    assert sorted(os.listdir(tmp_path)) == listing  # no .tmp-* left behind
    assert_unchanged(before, mp, model, opt)
    mp2, model2, opt2 = make()
    assert mp2.load(tmp_path, model2, opt2) == {"epoch": 1}
    assert all(torch.equal(saved[k], v) for k, v in model2.state_dict().items())


_RACING_WRITER = textwrap.dedent(
    """
    import sys, torch
    from mixprec.checkpoint import CheckpointError
    from mixprec.distributed import checkpoint as sharded
    model = torch.nn.Linear(64, 64)
    refused = 0
    for value in range(int(sys.argv[2])):
        with torch.no_grad():
            model.weight.fill_(float(value))
        try:
            sharded.save(sys.argv[1], model, state={"value": float(value)})
        except CheckpointError as err:
            assert "another process is saving" in str(err), err
            refused += 1
    print(refused, flush=True)
    """
)


@pytest.mark.slow
def test_two_processes_saving_into_one_folder_never_break_it(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACING_WRITER, str(tmp_path), "25"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for _ in range(2)
    ]
    for writer in writers:
        _, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err.decode()[-2000:]  # only clear refusals, no crash
    model = torch.nn.Linear(64, 64)
    value = sharded.load(tmp_path, model)["value"]
    assert torch.equal(model.weight, torch.full((64, 64), value))
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(("v-", ".tmp-"))]) == 1
