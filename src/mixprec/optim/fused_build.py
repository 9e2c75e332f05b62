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

import hashlib
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["FLAGS", "engine", "engine_error", "extension_name"]

# Compiled as one translation unit, in this order: the second uses the first's helpers.
_SOURCES = tuple(Path(__file__).with_name(name) for name in ("_fused.cpp", "_fused_states.cpp"))
_OPS = ("adam_", "sgd_", "stochastic_round_", "adam_coded_", "sgd_coded_")
FLAGS = (
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-trapping-math",
)

_lock = threading.Lock()
_state: dict[str, Any] = {"ops": None, "error": None, "tried": False}


def _cpu_signature() -> str:
    """The CPU's flags: a build with ``-march=native`` must not be reused on another CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return next((line for line in text.splitlines() if line.startswith("flags")), "unknown")


def extension_name(
    source: str,
    flags: tuple[str, ...] | list[str] = FLAGS,
    cpu: str | None = None,
    torch_version: str | None = None,
    torch_path: str | None = None,
) -> str:
    """The name the kernel is built and cached under: a digest of all the build depends on.

    Args:
        source: the C++ source.
        flags: the compiler flags.
        cpu: the CPU's flags line (default: this machine's).
        torch_version: default ``torch.__version__``.
        torch_path: the torch installation's folder (default: this one's).

    Example:
        >>> a = extension_name("int x;", torch_version="2.5.0")
        >>> a == extension_name("int x;", torch_version="2.6.0")
        False
    """
    parts = (
        source,
        " ".join(flags),
        _cpu_signature() if cpu is None else cpu,
        str(torch.__version__) if torch_version is None else torch_version,
        str(Path(torch.__file__).resolve().parent) if torch_path is None else torch_path,
    )
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    return f"mixprec_fused_{digest[:16]}"


def engine() -> Any | None:
    """``torch.ops.mixprec_fused`` with the fused kernels, built on first call; None if it
    cannot be built (:func:`engine_error` says why; a warning says so once).

    Example:
        >>> ops = engine()
        >>> ops is None or hasattr(ops, "adam_")
        True
    """
    if _state["tried"]:
        return _state["ops"]
    with _lock:
        if not _state["tried"]:
            try:
                _state["ops"] = _build()
            except Exception as error:  # no compiler, a compile error, no ninja...
                _state["error"] = f"{type(error).__name__}: {error}"
                warnings.warn(
                    "mixprec.optim.fused: the fused update kernels could not be built "
                    f"({_state['error'][:300]}); the optimizer wrappers take their reference "
                    "path (same results, slower). Install a C++ compiler and ninja to get them",
                    stacklevel=3,
                )
            _state["tried"] = True
    return _state["ops"]


def engine_error() -> str | None:
    """Why :func:`engine` returned None (None if it was built or not tried yet)."""
    return _state["error"]


def _build() -> Any:
    if hasattr(torch.ops, "mixprec_fused") and all(
        hasattr(torch.ops.mixprec_fused, name) for name in _OPS
    ):
        return torch.ops.mixprec_fused
    from torch.utils.cpp_extension import load_inline

    source = "\n".join(path.read_text() for path in _SOURCES)
    load_inline(
        extension_name(source),
        cpp_sources=[source],
        extra_cflags=list(FLAGS),
        is_python_module=False,
    )
    ops = torch.ops.mixprec_fused
    for name in _OPS:
        torch.library.register_fake(f"mixprec_fused::{name}")(_returns_nothing)
    return ops


def _returns_nothing(*args: Any, **kwargs: Any) -> None:
    return None
