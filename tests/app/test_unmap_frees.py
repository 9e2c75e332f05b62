"""``unmap_large_frees``: freed activations leave the resident set (glibc), so a run's peak RSS
is what it needed. Measured in fresh processes, against the same process without the call."""

from __future__ import annotations

import ctypes.util
import platform
import subprocess
import sys

import pytest

_SCRIPT = """
import sys, torch
from mixprec.app.memory_figures import resident_bytes, unmap_large_frees
if sys.argv[1] == "on":
    assert unmap_large_frees()
retained = []
for _ in range(6):  # blocks of 24 MiB, each allocated, touched and freed in turn
    before = resident_bytes()
    block = torch.ones(6 << 20)
    del block
    retained.append(resident_bytes() - before)
print(max(retained[1:]))
"""


def _retained(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(
    platform.system() != "Linux"
    or platform.libc_ver()[0] != "glibc"
    or ctypes.util.find_library("c") is None,
    reason="glibc's allocator only",
)
def test_freed_blocks_leave_the_resident_set() -> None:
    assert _retained("off") >= 16 << 20  # glibc keeps a freed block after the first one
    assert _retained("on") < 4 << 20
