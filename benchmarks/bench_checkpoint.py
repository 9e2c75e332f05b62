"""What mixprec's checkpoint checks cost: save and load time vs plain torch.save/torch.load.

Model: a 10M-parameter MLP with AdamW state after one step (model + two moments: ~120 MB). The
baseline is the same atomic write without the checks (temporary file, torch.save, fsync, rename)
and ``torch.load(weights_only=True)``; mixprec adds the in-memory check that every value loads
back, a CRC-32 per tensor on save and its verification on load. Runs alternate (median of
``--repeats``); the file lives in ``--folder`` (default: a temporary folder).

    python benchmarks/bench_checkpoint.py [--params 10_000_000] [--repeats 5] [--folder DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixprec.checkpoint import load_checkpoint, save_checkpoint


def _payload(params: int) -> dict[str, Any]:
    width = int((params / 4) ** 0.5)
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(4)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    count = sum(p.numel() for p in model.parameters())
    print(f"model: {count / 1e6:.1f}M parameters, 4 x Linear({width}, {width}) with AdamW state")
    return {"model": model.state_dict(), "optimizers": [opt.state_dict()], "extra": {"step": 1}}


def _plain_save(path: Path, payload: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.plain.tmp")
    with open(temporary, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=10_000_000, help="model size (%(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs each (%(default)s)")
    parser.add_argument("--folder", default=None, help="where to write (a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    payload = _payload(args.params)
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        plain, checked = Path(folder) / "plain.pt", Path(folder) / "checked.pt"
        _plain_save(plain, payload)
        save_checkpoint(checked, payload)
        print(
            f"file: {checked.stat().st_size / 1e6:.0f} MB (plain: {plain.stat().st_size / 1e6:.0f})"
        )
        rows = {
            "save": (
                _median_seconds(lambda: _plain_save(plain, payload), args.repeats),
                _median_seconds(lambda: save_checkpoint(checked, payload), args.repeats),
            ),
            "load": (
                _median_seconds(lambda: torch.load(plain, weights_only=True), args.repeats),
                _median_seconds(lambda: load_checkpoint(checked), args.repeats),
            ),
        }
    print(f"{'':6}{'torch (ms)':>12}{'mixprec (ms)':>14}{'ratio':>8}{'added (ms)':>12}")
    for name, (base, ours) in rows.items():
        print(
            f"{name:6}{1e3 * base:12.1f}{1e3 * ours:14.1f}{ours / base:8.2f}"
            f"{1e3 * (ours - base):12.1f}"
        )


if __name__ == "__main__":
    main()
