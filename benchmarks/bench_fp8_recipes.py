"""charlm's final validation loss under each FP8 recipe, against bf16-mixed and fp32, one run.

Every recipe trains the built-in charlm transformer with the same data, seed and steps through
``mixprec.app.runner.train`` (the path ``mixprec compare`` takes), FP8 on every linear layer,
bf16 elsewhere, fp32 weights. Targets: rowwise within 2% of bf16-mixed, tensorwise within 3%.

    python benchmarks/bench_fp8_recipes.py [--steps 250] [--threads N] [--out runs/fp8_recipes]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from mixprec.app.runner import Recipe, train
from mixprec.app.tasks import TaskConfig
from mixprec.app.tasks.charlm import CharLMTask
from mixprec.hardware import probe

RECIPES = ("tensorwise", "tensorwise_delayed", "rowwise", "blockwise", "mxfp8")
TARGETS = {"tensorwise": 0.03, "rowwise": 0.02}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=250, help="training steps per run")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flags = ", ".join(sorted(probe("cpu", measure=False).cpu_flags)) or "none"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu flags: {flags}")
    out = Path(args.out or tempfile.mkdtemp(prefix="fp8_recipes_"))
    precisions = {"fp32": "fp32", "bf16-mixed": "bf16-mixed"}
    precisions |= {r: f"params=fp32,compute=fp8:{r},output=fp32" for r in RECIPES}
    losses = {}
    for label, policy in precisions.items():
        defaults = CharLMTask.DEFAULT_CONFIG
        task = CharLMTask(TaskConfig(args.steps, defaults.batch_size, defaults.lr))
        result = train(task, Recipe.parse(policy), out / label, backend="emulated", overwrite=True)
        losses[label] = result.metrics["val_loss"]
        print(f"{label:<20} val loss {losses[label]:.4f}  ({result.ms_per_step:.0f} ms/step)")
    bf16 = losses["bf16-mixed"]
    print()
    for recipe in RECIPES:
        change = losses[recipe] / bf16 - 1
        target = TARGETS.get(recipe)
        verdict = "" if target is None else f"  (target within {target:.0%})"
        print(f"{recipe:<20} vs bf16-mixed {change:+.2%}{verdict}")


if __name__ == "__main__":
    main()
