"""Atomic checkpoints: refused saves lose nothing, damage is named, permissions follow the umask."""

import argparse
import collections
import datetime
import enum
import io
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from mixprec.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    check_loadable,
    load_checkpoint,
    save_checkpoint,
)


class Colour(enum.Enum):
    RED = 1


def torch_reads_back(value):
    """The reference: does torch's own weights_only loader read ``value`` back?"""
    buffer = io.BytesIO()
    try:
        torch.save({"v": value}, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception:
        return False
    return True


REFUSED = {
    "numpy scalar": (np.int64(2), r"value\.item\(\)"),
    "numpy array": (np.zeros(3), r"torch\.from_numpy\(value\)"),
    "path": (pathlib.Path("runs/a"), r"str\(value\)"),
    "namespace": (argparse.Namespace(lr=0.1), r"vars\(value\)"),
    "datetime": (datetime.datetime(2024, 1, 2), r"isoformat"),
    "enum": (Colour.RED, r"value\.value"),
    "slice": (slice(1, 3), r"store tensors, numbers, strings"),
    "lambda": (lambda x: x, r"store tensors, numbers, strings"),
}
ACCEPTED = [
    torch.float16,
    torch.device("cpu"),
    torch.Size([2, 3]),
    collections.OrderedDict(a=1),
    {1, 2},
    1 + 2j,
    b"bytes",
    (1, "two", None, 3.5),
    {"nested": [torch.ones(2), {"deep": "x"}]},
]


def test_round_trip_with_tensors(tmp_path):
    path = save_checkpoint(tmp_path / "a" / "ckpt.pt", {"w": torch.arange(4.0), "step": 7})
    record = load_checkpoint(path)
    assert torch.equal(record["w"], torch.arange(4.0)) and record["step"] == 7
    assert set(record) == {"format", "version", "w", "step"}  # checksums are checked, not returned


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_value_torch_cannot_load_is_refused_before_writing(tmp_path, name):
    value, hint = REFUSED[name]
    assert not torch_reads_back(value)  # the rule is torch's own loader
    path = save_checkpoint(tmp_path / "ckpt.pt", {"step": 1})
    before = path.read_bytes()
    with pytest.raises(TypeError, match=rf"checkpoint value extra\['run'\]\[1\] is a .*{hint}"):
        save_checkpoint(path, {"step": 2, "extra": {"run": [0, value]}})
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_refused_key_is_named(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint value extra key PosixPath\('k'\) is a "):
        save_checkpoint(tmp_path / "ckpt.pt", {"extra": {pathlib.Path("k"): 1}})
    assert not (tmp_path / "ckpt.pt").exists()


@pytest.mark.parametrize("value", ACCEPTED, ids=lambda v: type(v).__name__)
def test_values_torch_loads_are_kept_as_torch_loads_them(tmp_path, value):
    assert torch_reads_back(value)
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    reference = torch.load(buffer, weights_only=True)
    loaded = load_checkpoint(save_checkpoint(tmp_path / "ckpt.pt", {"v": value}))["v"]
    assert type(loaded) is type(reference)
    assert repr(loaded) == repr(reference)


def test_torch_safe_globals_are_honoured(tmp_path):
    with torch.serialization.safe_globals([pathlib.PosixPath]):
        check_loadable({"p": pathlib.PosixPath("a")})  # torch would read it back here
    with pytest.raises(TypeError, match=r"PosixPath"):
        check_loadable({"p": pathlib.PosixPath("a")})


@pytest.mark.parametrize("key", ["format", "version", "checksums"])
def test_reserved_keys_are_refused(tmp_path, key):
    with pytest.raises(ValueError, match=rf"payload keys \['{key}'\] are reserved"):
        save_checkpoint(tmp_path / "ckpt.pt", {key: 1})


def _refuse_by_value(path, monkeypatch):
    save_checkpoint(path, {"extra": {"step": np.int64(2)}})


def _refuse_unpicklable(path, monkeypatch):
    save_checkpoint(path, {"hook": lambda: None})


def _die_mid_write(path, monkeypatch):
    real_save = torch.save

    def dying_save(obj, handle, *args, **kwargs):
        if isinstance(handle, io.BytesIO):  # the in-memory check of the values
            return real_save(obj, handle, *args, **kwargs)
        real_save({"partial": torch.zeros(1000)}, handle)
        handle.flush()
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    save_checkpoint(path, {"step": 2})


def _disk_full(path, monkeypatch):
    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    save_checkpoint(path, {"step": 2, "w": torch.randn(100)})


def _rename_refused(path, monkeypatch):
    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    save_checkpoint(path, {"step": 2})


@pytest.mark.parametrize(
    "refuse",
    [_refuse_by_value, _refuse_unpicklable, _die_mid_write, _disk_full, _rename_refused],
    ids=lambda f: f.__name__.strip("_"),
)
def test_a_refused_save_keeps_the_previous_checkpoint_byte_identical(tmp_path, monkeypatch, refuse):
    path = save_checkpoint(tmp_path / "ckpt.pt", {"step": 1, "w": torch.arange(10.0)})
    before = path.read_bytes()
    with pytest.raises((TypeError, OSError, KeyboardInterrupt)):
        refuse(path, monkeypatch)
    monkeypatch.undo()
    assert path.read_bytes() == before
    record = load_checkpoint(path)
    assert record["step"] == 1 and torch.equal(record["w"], torch.arange(10.0))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def test_truncated_checkpoint_is_reported(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", {"w": torch.randn(1000)})
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"is corrupt or truncated and cannot be read"):
        load_checkpoint(path)


def test_a_flipped_bit_in_a_tensor_is_found_and_named(tmp_path):
    weights = torch.arange(1000, dtype=torch.float32) + 0.5
    path = save_checkpoint(
        tmp_path / "ckpt.pt", {"model": {"0.weight": weights, "0.bias": torch.zeros(3)}}
    )
    raw = bytearray(path.read_bytes())
    offset = bytes(raw).find(weights.numpy().tobytes())
    assert offset > 0  # tensors are stored uncompressed
    raw[offset + 2001] ^= 0x04
    path.write_bytes(bytes(raw))
    damaged = torch.load(path, weights_only=True)  # torch alone reads it without a word
    assert not torch.equal(damaged["model"]["0.weight"], weights)
    with pytest.raises(CheckpointError, match=r"corrupt: tensor 'model/0.weight' \(\(1000,\)"):
        load_checkpoint(path)


def test_a_readable_file_of_refused_objects_is_not_called_corrupt(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": 2, "step": np.int64(2)}, path)
    with pytest.raises(CheckpointError, match=r"is intact but holds Python objects") as info:
        load_checkpoint(path)
    assert "corrupt" not in str(info.value) and "numpy" in str(info.value)


def test_version_1_files_without_checksums_still_load(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "w": torch.ones(2), "step": 4}, path)
    record = load_checkpoint(path)
    assert record["step"] == 4 and torch.equal(record["w"], torch.ones(2))


def test_a_newer_version_is_refused_by_name(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": 99}, path)
    with pytest.raises(
        CheckpointError, match=r"has format version 99; this mixprec reads versions"
    ):
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


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=oct)
def test_checkpoints_follow_the_umask_like_other_files(tmp_path, umask):
    previous = os.umask(umask)
    try:
        (tmp_path / "other.txt").write_text("x")  # the reference: a file made by open()
        save_checkpoint(tmp_path / "ckpt.pt", {"step": 1})
        save_checkpoint(tmp_path / "ckpt.pt", {"step": 2})  # replacing keeps following it
    finally:
        os.umask(previous)
    expected = (tmp_path / "other.txt").stat().st_mode & 0o777
    assert (tmp_path / "ckpt.pt").stat().st_mode & 0o777 == expected


WRITER = """
import os, signal, sys
from pathlib import Path
from mixprec.checkpoint import _create_temporary
temporary, fd = _create_temporary(Path(sys.argv[1]))
os.write(fd, b"half a checkpoint")
print(temporary.name, flush=True)
sys.stdin.readline()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_temporaries_of_killed_saves_are_removed_and_live_ones_kept(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", {"step": 1})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    live = writer.stdout.readline().strip()
    old_naming = tmp_path / ".ckpt.pt.k3j9x2qa.tmp"  # mkstemp's names, from before the pid
    old_naming.write_bytes(b"left by a kill long ago")
    fresh_old_naming = tmp_path / ".ckpt.pt.a8b7c6d5.tmp"
    fresh_old_naming.write_bytes(b"maybe being written")
    hour_ago = time.time() - 3600
    os.utime(old_naming, (hour_ago, hour_ago))
    other = tmp_path / ".ckpt.pt.bak.deadbeef.1.0a0b0c0d.tmp"  # another checkpoint's, fresh
    other.write_bytes(b"not ours")
    try:
        save_checkpoint(path, {"step": 2})
        assert (tmp_path / live).exists()  # its writer is alive: a save in progress
        assert not old_naming.exists() and fresh_old_naming.exists() and other.exists()
    finally:
        writer.communicate("die\n", timeout=60)
    assert writer.returncode == -9 and (tmp_path / live).exists()  # killed mid-write
    assert load_checkpoint(path)["step"] == 2
    assert not (tmp_path / live).exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt.pt", fresh_old_naming.name, other.name])


def _session_like_payload():
    return {
        "model": {"0.weight": torch.arange(6.0).reshape(2, 3), "0.bias": torch.zeros(2)},
        "optimizers": [
            {
                "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 3)}},
                "param_groups": [
                    {
                        "lr": 0.001,
                        "betas": (0.9, 0.999),
                        "eps": 1e-8,
                        "amsgrad": False,
                        "params": [0, 1],
                    }
                ],
            }
        ],
        "mixed_precision": {
            "policy": "fp16-mixed",
            "steps": 7,
            "scaler": {"scale": 65536.0, "growth_tracker": 12, "enabled": True},
        },
        "extra": {"epoch": 3},
    }


def _pickle_span(path):
    """(start, end) of the uncompressed data.pkl member inside a torch zip file."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack(
        "<HH", raw[info.header_offset + 26 : info.header_offset + 30]
    )
    start = info.header_offset + 30 + name_len + extra_len
    return start, start + info.file_size


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # a flipped protocol byte
def test_flipped_bits_in_plain_values_are_found(tmp_path):
    """Learning rates, betas, flags, the loss scale, step counts and key names are checked too:
    a flipped bit anywhere in the pickled record is refused or changes nothing loaded."""
    import struct

    payload = _session_like_payload()
    path = save_checkpoint(tmp_path / "ckpt.pt", payload)
    original = path.read_bytes()
    start, end = _pickle_span(path)
    expected = load_checkpoint(path)
    targeted = [
        original.find(struct.pack(">d", value), start) + 3 for value in (0.001, 0.9, 65536.0)
    ]
    targeted.append(original.find(b"growth_tracker", start) + 2)
    assert all(start < offset < end for offset in targeted)
    silent = []
    for bit in [8 * offset + 1 for offset in targeted] + list(range(8 * start, 8 * end, 11)):
        raw = bytearray(original)
        raw[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(raw))
        try:
            loaded = load_checkpoint(path)
        except CheckpointError:
            continue
        if not _same(loaded, expected):
            silent.append(bit // 8 - start)
    assert silent == [], f"flips at data.pkl offsets {silent[:10]} loaded other values silently"


def test_version_2_files_without_a_metadata_checksum_still_load(tmp_path):
    import mixprec.checkpoint as module

    record = {"format": CHECKPOINT_FORMAT, "version": 2, "step": 4, "w": torch.ones(2)}
    record["checksums"] = [["w", module._crc(record["w"])]]
    torch.save(record, tmp_path / "ckpt.pt")
    loaded = load_checkpoint(tmp_path / "ckpt.pt")
    assert loaded["step"] == 4 and torch.equal(loaded["w"], torch.ones(2))


def _real_short_write_error():
    """The error torch's zip writer raises when the disk is full (writing to /dev/full)."""
    try:
        torch.save({"w": torch.randn(10000)}, "/dev/full")
    except RuntimeError as err:
        return err
    pytest.skip("torch wrote to /dev/full without an error")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (ENOSPC on write)")
@pytest.mark.parametrize("how", ["kernel", "torch_zip_writer"])
def test_a_full_disk_is_named_and_the_previous_file_kept(tmp_path, monkeypatch, how):
    import mixprec.checkpoint as module

    path = save_checkpoint(tmp_path / "ckpt.pt", {"step": 1})
    before = path.read_bytes()
    if how == "kernel":  # every write of the temporary file fails as on a full disk
        real = module._create_temporary

        def on_full_disk(target):
            temporary, fd = real(target)
            os.close(fd)
            return temporary, os.open("/dev/full", os.O_WRONLY)

        monkeypatch.setattr(module, "_create_temporary", on_full_disk)
    else:  # torch's own message for it, replayed
        error = _real_short_write_error()
        real_save = torch.save

        def short_write(obj, handle, *args, **kwargs):
            if isinstance(handle, io.BytesIO):  # the in-memory check of the values
                return real_save(obj, handle, *args, **kwargs)
            raise error

        monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(OSError, match=r"no space left on device: checkpoint '.*ckpt\.pt'") as info:
        save_checkpoint(path, {"step": 2, "w": torch.randn(1000)})
    assert info.value.errno == 28 and "inline_container" not in str(info.value).split("(")[0]
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_refused_object_is_named_by_its_type_not_called_corrupt(tmp_path, zip_format):
    path = tmp_path / "ckpt.pt"
    record = {"format": CHECKPOINT_FORMAT, "version": 2, "when": datetime.date(2024, 1, 2)}
    torch.save(record, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(
        CheckpointError, match=r"intact but holds Python objects \(one of type datetime\.date\)"
    ):
        load_checkpoint(path)
