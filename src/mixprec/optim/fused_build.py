"""Building the one-pass kernels (``_fused.cpp`` and ``_fused_states.cpp``) on first use, and where
the build is cached.

Design note: the kernel is compiled with the machine's C++ compiler the first time a wrapper
steps (about 35 s) and loaded as ``torch.ops.mixprec_fused``; torch caches the build under
``~/.cache/torch_extensions`` by the extension's name. The name is therefore a digest of
everything the binary depends on (:func:`extension_name`): the source, the compiler flags, the
CPU (``-march=native``) and the torch installation it links against (its version and install
path: an extension built against one torch does not load, or misbehaves, in another). Two
environments with different torches on one machine then build two extensions side by side
instead of loading each other's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mixprec import _cpp
from mixprec._cpp import FLAGS

__all__ = ["FLAGS", "engine", "engine_error", "extension_name"]

# Compiled as one translation unit, in this order: the second uses the first's helpers.
_SOURCES = tuple(Path(__file__).with_name(name) for name in ("_fused.cpp", "_fused_states.cpp"))
_OPS = ("adam_", "sgd_", "stochastic_round_", "adam_coded_", "sgd_coded_")


def extension_name(
    source: str,
    flags: tuple[str, ...] | list[str] = FLAGS,
    cpu: str | None = None,
    torch_version: str | None = None,
    torch_path: str | None = None,
) -> str:
    """The name the kernel is built and cached under: a digest of all the build depends on
    (:func:`mixprec._cpp.extension_name`).

    Example:
        >>> a = extension_name("int x;", torch_version="2.5.0")
        >>> a == extension_name("int x;", torch_version="2.6.0")
        False
    """
    return _cpp.extension_name("mixprec_fused", source, flags, cpu, torch_version, torch_path)


def engine() -> Any | None:
    """``torch.ops.mixprec_fused`` with the fused kernels, built on first call; None if it
    cannot be built (:func:`engine_error` says why; a warning says so once).

    Example:
        >>> ops = engine()
        >>> ops is None or hasattr(ops, "adam_")
        True
    """
    return _BUILD.get()


def engine_error() -> str | None:
    """Why :func:`engine` returned None (None if it was built or not tried yet)."""
    return _BUILD.error


def _build() -> Any:
    if hasattr(torch.ops, "mixprec_fused") and all(
        hasattr(torch.ops.mixprec_fused, name) for name in _OPS
    ):
        return torch.ops.mixprec_fused
    _cpp.load("mixprec_fused", "\n".join(path.read_text() for path in _SOURCES))
    ops = torch.ops.mixprec_fused
    for name in _OPS:
        torch.library.register_fake(f"mixprec_fused::{name}")(_returns_nothing)
    return ops


def _returns_nothing(*args: Any, **kwargs: Any) -> None:
    return None


_BUILD = _cpp.LazyBuild(
    _build,
    "mixprec.optim.fused: the fused update kernels",
    "the optimizer wrappers take their reference path (same results, slower). Install a C++ "
    "compiler and ninja to get them",
)
