"""Shared test setup: one intra-op thread, so tiny ops are not slowed by a busy second core; the
C++ kernels built in the background while the first tests run."""

import subprocess
import sys

import pytest
import torch

_KERNELS = (
    "mixprec.optim.fused_build",
    "mixprec.compute.emulate_build",
    "mixprec.blockscaled_build",
)


def pytest_sessionstart(session: pytest.Session) -> None:
    # Where torch's extension cache has no build for this source, CPU and torch (a new machine,
    # a changed kernel), each kernel takes about 30 s to compile on first use. One background
    # process builds them in turn on the second core while the tests run on the first; a test
    # that needs a kernel first waits on torch's build lock instead of compiling it itself.
    build = "importlib.import_module(name)._BUILD.get()"
    code = f"import importlib\nfor name in {_KERNELS!r}:\n    {build}"
    session.config.stash[_PREBUILD] = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def pytest_sessionfinish(session: pytest.Session) -> None:
    process = session.config.stash.get(_PREBUILD, None)
    if process is not None:
        process.wait()  # never killed mid-build: a killed build would leave torch's lock behind


_PREBUILD = pytest.StashKey[subprocess.Popen]()


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
