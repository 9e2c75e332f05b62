"""The C++ kernels share their bit helpers through ``_bits.h``, included textually before the
source is hashed into the extension's name, so a change to the header rebuilds every kernel."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import mixprec
from mixprec import _cpp

SOURCES = sorted(Path(mixprec.__file__).parent.rglob("*.cpp"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_every_kernel_expands_to_one_text_with_the_shared_helpers(path):
    source = path.read_text()
    expanded = _cpp.expand_includes(source)
    assert '#include "' not in expanded  # every mixprec header was found and inlined
    if '#include "_bits.h"' in source:
        assert "MIXPREC_INLINE uint32_t bits_of(float x)" in expanded


def test_the_header_is_part_of_the_name_and_a_missing_one_is_refused(tmp_path, monkeypatch):
    source = 'namespace {\n#include "_bits.h"\n}\n'
    before = _cpp.extension_name("k", _cpp.expand_includes(source))
    (tmp_path / "_bits.h").write_text("// another header\n")
    monkeypatch.setattr(_cpp, "_HERE", tmp_path)
    assert _cpp.extension_name("k", _cpp.expand_includes(source)) != before
    with pytest.raises(FileNotFoundError):
        _cpp.expand_includes('#include "_missing.h"\n')


def test_flags_from_the_environment_come_last_and_name_their_own_build(monkeypatch):
    monkeypatch.delenv(_cpp.EXTRA_FLAGS_VARIABLE, raising=False)
    assert _cpp.build_flags() == _cpp.FLAGS
    monkeypatch.setenv(_cpp.EXTRA_FLAGS_VARIABLE, " -mno-avx512f  -O2 ")
    flags = _cpp.build_flags()
    assert flags == (*_cpp.FLAGS, "-mno-avx512f", "-O2")  # last: they override -march=native
    assert _cpp.extension_name("k", "int x;", flags) != _cpp.extension_name("k", "int x;")


def test_a_built_kernel_loads_from_its_cache_without_the_build_tool(monkeypatch):
    """A kernel already built (its name a digest of all it depends on) is loaded as it lies: a
    ninja other than the one that built it (another PATH) would rebuild it otherwise, 30 s."""
    from mixprec.optim import fused_build

    assert fused_build.engine() is not None  # built (or loaded) once, the usual way

    def no_build(*args, **kwargs):
        raise AssertionError("torch's build was called for a kernel already built")

    monkeypatch.setattr("torch.utils.cpp_extension.load", no_build)
    _cpp.load("mixprec_fused", "\n".join(p.read_text() for p in fused_build._SOURCES))


def test_a_kernel_not_built_yet_is_built_in_its_folder(monkeypatch, tmp_path):
    """Built from its own text, with the headers it includes and no others (load_inline would put
    all of torch's C++ API in front: ~35 s a kernel instead of ~24)."""
    calls = []
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda *a, **k: calls.append((a, k)))
    source = '#include "_bits.h"\nint x;\n'
    _cpp.load("k", source)
    ((args, kwargs),) = calls
    name = args[0]
    expanded = _cpp.expand_includes(source)
    assert name == _cpp.extension_name("k", expanded, _cpp.build_flags())
    assert kwargs["build_directory"] == str(tmp_path / name)
    assert kwargs["sources"] == [str(tmp_path / name / "main.cpp")]
    assert (tmp_path / name / "main.cpp").read_text() == expanded
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["main.cpp"]  # no leftovers


def test_the_source_of_a_build_is_written_once(monkeypatch, tmp_path):
    """A second process that finds the build under way leaves its source as it is: a newer
    main.cpp would make torch's build compile and link again, over a library already loaded."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda *a, **k: None)
    _cpp.load("k", "int x;")
    main = tmp_path / _cpp.extension_name("k", "int x;", _cpp.build_flags()) / "main.cpp"
    os.utime(main, ns=(1, 1))
    _cpp.load("k", "int x;")
    assert main.stat().st_mtime_ns == 1
    main.write_text("int y;")  # another text (a build killed half way): written again
    _cpp.load("k", "int x;")
    assert main.read_text() == "int x;"


def test_a_kernel_whose_build_holds_its_lock_is_waited_for(monkeypatch, tmp_path):
    """Another process's build holds the folder's lock until its link is done: the library may be
    half written, so the load goes through torch's build, which waits for the lock."""
    calls = []
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda *a, **k: calls.append(a[0]))
    name = _cpp.extension_name("k", "int x;", _cpp.build_flags())
    (tmp_path / name).mkdir()
    (tmp_path / name / f"{name}.so").write_bytes(b"half a library")
    (tmp_path / name / "lock").touch()
    opened = []
    monkeypatch.setattr("torch.ops.load_library", opened.append)
    _cpp.load("k", "int x;")
    assert calls == [name] and opened == []  # not opened half written


def test_the_build_folder_is_torchs(monkeypatch, tmp_path):
    """A kernel is looked for where torch's load builds it, so the cache of a build made
    before (by torch's own choice of folder) is found."""
    from torch.utils import cpp_extension

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(cpp_extension, "get_default_build_root", lambda: str(tmp_path))
    assert _cpp.build_directory("k") == Path(cpp_extension._get_build_directory("k", False))
