"""Building mixprec's C++ kernels on first use, and the name each build is cached under.

Design note: the kernels (the one-pass optimizer updates, the fake-quantize of emulated GEMM
operands) are compiled with the machine's C++ compiler the first time they are needed and loaded
as ``torch.ops`` libraries; torch caches a build under ``~/.cache/torch_extensions`` by the
extension's name. The name is therefore a digest of everything the binary depends on
(:func:`extension_name`): the source, the compiler flags, the CPU (``-march=native``) and the
torch installation it links against (its version and install path: an extension built against
one torch does not load, or misbehaves, in another). A cached build is therefore current, and is
loaded without running the build tool (:func:`load`). :class:`LazyBuild` builds once per process,
under a lock, and where a build fails remembers why and warns once, so callers take their
torch-ops path. A leaf: every layer that has a kernel uses it.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FLAGS",
    "LazyBuild",
    "build_directory",
    "build_flags",
    "expand_includes",
    "extension_name",
    "library",
]

FLAGS = (
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-trapping-math",
)


def _cpu_signature() -> str:
    """The CPU's flags: a build with ``-march=native`` must not be reused on another CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return next((line for line in text.splitlines() if line.startswith("flags")), "unknown")


def extension_name(
    prefix: str,
    source: str,
    flags: tuple[str, ...] | list[str] = FLAGS,
    cpu: str | None = None,
    torch_version: str | None = None,
    torch_path: str | None = None,
) -> str:
    """``prefix`` and a digest of all a build depends on: the name it is built and cached under.

    Args:
        prefix: the kernel's name, e.g. ``"mixprec_fused"``.
        source: the C++ source.
        flags: the compiler flags.
        cpu: the CPU's flags line (default: this machine's).
        torch_version: default ``torch.__version__``.
        torch_path: the torch installation's folder (default: this one's).

    Example:
        >>> a = extension_name("k", "int x;", torch_version="2.5.0")
        >>> a == extension_name("k", "int x;", torch_version="2.6.0"), a.startswith("k_")
        (False, True)
    """
    parts = (
        source,
        " ".join(flags),
        _cpu_signature() if cpu is None else cpu,
        str(torch.__version__) if torch_version is None else torch_version,
        str(Path(torch.__file__).resolve().parent) if torch_path is None else torch_path,
    )
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    return f"{prefix}_{digest[:16]}"


_INCLUDE = re.compile(r'^#include "([A-Za-z0-9_]+\.h)"$', re.MULTILINE)


def expand_includes(source: str) -> str:
    """``source`` with each ``#include "<name>.h"`` line replaced by that header of mixprec's
    (``src/mixprec/<name>.h``): the kernels share their bit helpers, and the extension's name,
    a digest of the text, changes when a header does.

    Raises:
        FileNotFoundError: a header mixprec does not have.
    """
    return _INCLUDE.sub(lambda m: (_HERE / m.group(1)).read_text(), source)


_HERE = Path(__file__).resolve().parent


EXTRA_FLAGS_VARIABLE = "MIXPREC_KERNEL_CFLAGS"


def build_flags() -> tuple[str, ...]:
    """:data:`FLAGS`, then the flags in the environment variable ``MIXPREC_KERNEL_CFLAGS``
    (split on spaces), which come last and so win: e.g. ``-mno-avx512f`` builds the kernels for
    an AVX2 CPU on an AVX-512 one (``benchmarks/bench_emulation.py --isa avx2``)."""
    return (*FLAGS, *os.environ.get(EXTRA_FLAGS_VARIABLE, "").split())


def build_directory(name: str) -> Path:
    """Where the extension ``name`` is built and cached: the folder torch's ``load`` picks for
    it (``$TORCH_EXTENSIONS_DIR/<name>``, or
    ``~/.cache/torch_extensions/py311_cpu/<name>``, ``..._cu128/`` for a CUDA build of torch)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        if torch.version.hip is not None:
            accelerator = f"rocm{torch.version.hip.replace('.', '')}"
        elif torch.version.cuda is not None:
            accelerator = f"cu{torch.version.cuda.replace('.', '')}"
        else:
            accelerator = "cpu"
        python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = str(Path(get_default_build_root()) / f"{python}_{accelerator}")
    return Path(root) / name


def load(prefix: str, source: str) -> None:
    """Load ``source``'s library (which registers ``prefix``), built with :func:`build_flags`:
    from its cache where it was built before, else compiled now.

    A cached build is loaded as it lies, without running the build tool: its name is a digest
    of everything it depends on, so it is current, and a ninja other than the one that built it
    (another ``PATH``: the system's, a virtual environment's) may compile it again: ninja 1.11
    and 1.13 record a command under different hashes, so each takes the other's build as stale.
    """
    from torch.utils.cpp_extension import load as build_and_load

    source = expand_includes(source)
    flags = build_flags()
    name = extension_name(prefix, source, flags)
    directory = build_directory(name)
    built = directory / f"{name}.so"
    # torch's build holds the folder's "lock" file from before the compile until after the link:
    # while it is there the library may be half written, so wait for the build (torch's load)
    if built.is_file() and not (directory / "lock").exists():
        try:
            torch.ops.load_library(str(built))
            return
        except OSError:
            pass  # unreadable: torch's load builds it again or says why
    directory.mkdir(parents=True, exist_ok=True)
    main = directory / "main.cpp"
    # The source as it is, not through load_inline, which puts <torch/extension.h> (all of
    # torch's C++ API and pybind11) in front: each kernel includes the headers it uses, and
    # compiles in ~24 s instead of ~35. Written only where it is not there yet, as torch does: a
    # newer main.cpp would make a second process's build compile and link again, over the library
    # a first one may have loaded. Written whole, then renamed: a concurrent build reads all of it.
    if not main.is_file() or main.read_text() != source:
        partial = directory / f"main.cpp.{os.getpid()}.{threading.get_ident()}"
        partial.write_text(source)
        os.replace(partial, main)
    build_and_load(
        name,
        sources=[str(main)],
        extra_cflags=list(flags),
        is_python_module=False,
        build_directory=str(directory),
    )


def library(namespace: str, sources: Sequence[Path], marker: str) -> Any:
    """``torch.ops.<namespace>``: the library already loaded in this process (its op ``marker``
    is registered), or built from ``sources`` (concatenated) and loaded now."""
    loaded = getattr(torch.ops, namespace, None)
    if loaded is not None and hasattr(loaded, marker):
        return loaded
    load(namespace, "\n".join(path.read_text() for path in sources))
    return getattr(torch.ops, namespace)


class LazyBuild:
    """A kernel built on the first :meth:`get`, once per process; None where it cannot be built.

    Args:
        build: builds and returns the ops (raises where it cannot).
        failure: what the warning says after ``"(<error>); "`` — what callers do instead and how
            to get the kernel; the warning starts with ``what``.
        what: the kernel, for the warning (e.g. ``"mixprec.optim.fused: the fused update
            kernels"``).
    """

    def __init__(self, build: Callable[[], Any], what: str, failure: str) -> None:
        self._build, self._what, self._failure = build, what, failure
        self._lock = threading.Lock()
        self.ops: Any = None
        self.error: str | None = None
        self.tried = False

    def get(self) -> Any | None:
        """The built ops, or None (:attr:`error` says why; a warning said so once)."""
        if self.tried:
            return self.ops
        with self._lock:
            if not self.tried:
                try:
                    self.ops = self._build()
                except Exception as error:  # no compiler, a compile error, no ninja...
                    self.error = f"{type(error).__name__}: {error}"
                    warnings.warn(
                        f"{self._what} could not be built ({self.error[:300]}); {self._failure}",
                        stacklevel=4,
                    )
                self.tried = True
        return self.ops
