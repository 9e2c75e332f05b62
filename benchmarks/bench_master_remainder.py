"""Loss of 24-bit masters (bf16 + an 8-bit remainder) against full and exact compressed masters.

Trains a built-in task (digits MLP by default; ``--task charlm`` for the byte-level transformer)
with bf16 parameters and fp32 master weights stored three ways, in one process, same data:

* ``full``: fp32 masters (4 B/param);
* ``r16``: the parameter plus a 16-bit remainder (2 B/param): exact, so its losses must equal
  ``full``'s bit for bit (the script checks it);
* ``r8``: the parameter plus an 8-bit remainder (1 B/param): 24-bit masters, lossy;

and, for scale, ``fp32`` training and ``bf16-pure`` with stochastic rounding (no master). It
prints the final train loss (mean of the last 10 steps), the validation metrics and the
relative differences to ``full``.

Measured (digits MLP, 300 steps, 2 shared cores): see the README's memory section.

    python benchmarks/bench_master_remainder.py [--task digits] [--steps 300] [--lr 1e-4]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from mixprec.app.tasks import TASKS, TaskConfig
from mixprec.session import MixedPrecision

RUNS = {
    "fp32": ("fp32", "auto", None),
    "full": ("p=bf16,master=fp32", "auto", None),
    "r16": ("p=bf16,master=fp32", "auto", 16),
    "r8": ("p=bf16,master=fp32", "auto", 8),
    "bf16-pure/sr": ("bf16-pure", "stochastic", None),
}


def train(task_name: str, config: TaskConfig, run: str) -> dict[str, float]:
    policy, update, remainder = RUNS[run]
    task = TASKS[task_name](config)  # type: ignore[call-arg]
    model = task.build_model()
    optimizer = task.build_optimizer(model)
    mp = MixedPrecision(
        policy,
        "cpu",
        backend="emulated",
        update=update,
        master_remainder=remainder,  # type: ignore[arg-type]
    )
    model, optimizer = mp.prepare(model, optimizer)
    losses = []
    for step in range(config.steps):
        x, y = task.batch(step)
        loss = task.loss(model(x), y)
        mp.backward(loss)
        mp.step(optimizer)
        optimizer.zero_grad()
        losses.append(loss.item())
    metrics = task.evaluate(model, mp.autocast)
    return {"train_loss": statistics.fmean(losses[-10:]), **metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="digits", choices=tuple(TASKS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = TaskConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    results = {run: train(args.task, config, run) for run in RUNS}
    keys = list(results["full"])
    print(f"{args.task}, {args.steps} steps, batch {args.batch_size}, lr {args.lr:g}")
    print(f"{'run':14}" + "".join(f"{k:>16}" for k in keys) + f"{'train vs full':>16}")
    base = results["full"]["train_loss"]
    for run, values in results.items():
        diff = (values["train_loss"] - base) / base
        print(f"{run:14}" + "".join(f"{values[k]:>16.5f}" for k in keys) + f"{diff:>+16.2%}")
    exact = results["r16"] == results["full"]
    print(f"16-bit remainder equals full masters exactly: {exact}")


if __name__ == "__main__":
    main()
