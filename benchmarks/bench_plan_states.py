"""The memory plan against measured model state, with compressed optimizer states.

A stack of ``--layers`` square Linear layers of width ``--width`` (default 8 x 5000: 200M
parameters) is prepared by ``MixedPrecision`` under each precision, stepped once with AdamW
(a batch of 2), and :func:`mixprec.optim.memory_report`'s measured bytes are printed beside
:func:`mixprec.distributed.memory_plan`'s, from the parameter count alone (what
``mixprec plan --params N`` prints) and from the shapes (exact). One process per precision is
not needed: the report counts the tensors that exist, not the process's RSS.

    PYTHONPATH=src python benchmarks/bench_plan_states.py [--width 5000] [--layers 8]
        [--precisions bf16-lean,bf16-pure/stochastic,bf16-lean/master]

Expected: the plan within 5% of the measured total for every precision (issue 21: "plan equals
measured within 5% on a model of a few hundred million parameters").
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from torch import nn

from mixprec import MixedPrecision
from mixprec.distributed import memory_plan
from mixprec.optim import memory_report
from mixprec.policy import PRESETS


def measure(preset: str, update: str, width: int, layers: int) -> tuple[dict[str, float], float]:
    """Bytes per part measured after one AdamW step, and the step time in seconds."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
    mp = MixedPrecision(preset, "cpu", backend="emulated", update=update)
    model, opt = mp.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    loss = model(torch.randn(2, width)).float().pow(2).mean()
    mp.backward(loss)
    start = time.perf_counter()
    mp.step(opt)
    seconds = time.perf_counter() - start
    report = memory_report(model, opt)
    shapes = [tuple(p.shape) for p in model.parameters()]
    figures = {
        "num_params": report.num_params,
        "measured": report.total,
        "states": report.optimizer_state,
        "tensors": len(shapes),
        "shapes": shapes,
    }
    del model, opt, mp
    gc.collect()
    return figures, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=5000)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument(
        "--precisions", default="bf16-lean,bf16-lean/master,bf16-lean/nearest,bf16-pure/stochastic"
    )
    args = parser.parse_args(argv)
    print(
        f"{'precision':<24}{'params':>12}{'measured GB':>13}{'plan GB':>10}{'plan/meas.':>11}"
        f"{'exact GB':>10}{'B/param':>9}{'step s':>8}"
    )
    worst = 0.0
    for spec in args.precisions.split(","):
        preset, _, update = spec.partition("/")
        update = update or ("stochastic" if PRESETS[preset].param != PRESETS["fp32"].param else "-")
        figures, seconds = measure(preset, "auto" if update == "-" else update, args.width,
                                   args.layers)  # fmt: skip
        n, tensors = figures["num_params"], figures["tensors"]
        row = memory_plan(n, 1, "single", presets=[preset], num_tensors=tensors).row(preset, update)
        exact = memory_plan(
            n, 1, "single", presets=[preset], num_tensors=tensors, shapes=figures["shapes"]
        ).row(preset, update)
        ratio = row.total_bytes / figures["measured"]
        worst = max(worst, abs(ratio - 1))
        print(
            f"{spec:<24}{n:>12,}{figures['measured'] / 1e9:>13.4f}{row.total_bytes / 1e9:>10.4f}"
            f"{ratio:>11.4f}{exact.total_bytes / 1e9:>10.4f}{figures['measured'] / n:>9.3f}"
            f"{seconds:>8.2f}"
        )
    print(f"largest plan/measured difference: {worst:.2%} ({'ok' if worst <= 0.05 else 'OVER 5%'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
