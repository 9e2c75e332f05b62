"""The one-pass kernel's build cache is keyed by everything the binary depends on."""

from __future__ import annotations

from pathlib import Path

import torch

from mixprec.optim import fused_build


def test_the_build_name_depends_on_the_torch_installation_and_the_flags(monkeypatch):
    source = "int x;"
    here = fused_build.extension_name(source)
    assert fused_build.extension_name(source, torch_version="0.0.1") != here
    assert fused_build.extension_name(source, torch_path="/elsewhere/torch") != here
    assert fused_build.extension_name(source, flags=["-O2"]) != here
    assert fused_build.extension_name(source, cpu="flags : sse2") != here
    # The defaults are this installation's: another torch version gives another name.
    monkeypatch.setattr(torch, "__version__", "0.0.1+other")
    assert fused_build.extension_name(source) != here
    assert fused_build.extension_name(
        source, torch_path=str(Path(torch.__file__).resolve().parent)
    ) == fused_build.extension_name(source)
