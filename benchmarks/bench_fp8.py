"""Training-step time of mixprec's emulated FP8 vs FP32 and vs torchao's ``emulate=True``.

Model: the small transformer of the issue (d_model 256, 4 layers, 4 heads, seq 128, batch 16,
AdamW), from the same initial weights in every variant. Variants, timed in rotation; the fastest
of the rounds is reported (the least disturbed by other work on a shared machine), the median
beside it:

- ``fp32``: the baseline;
- ``mixprec``: every ``nn.Linear`` swapped by ``convert_to_fp8`` (FP8 GEMMs, fp32 elsewhere);
- ``torchao``: the same layers swapped by torchao's ``convert_to_float8_training`` with
  ``Float8LinearConfig(emulate=True)`` (skipped when torchao is not installed);
- ``mixprec+bf16``: mixprec's FP8 linears inside an emulated bf16 autocast region (the
  ``fp8-mixed`` configuration: FP8 GEMMs, bf16 attention and activations).

Targets: mixprec / fp32 <= 2 and mixprec faster than torchao.

    python benchmarks/bench_fp8.py [--recipe tensorwise] [--steps 5]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import warnings
from collections.abc import Callable

import torch
from reference_step import make_step

from mixprec import autocast
from mixprec.compute.fp8_convert import convert_to_fp8


def _torchao_step(recipe: str) -> Callable[[], float] | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        return None
    model, step = make_step()
    config = Float8LinearConfig.from_recipe_name(recipe)
    config = Float8LinearConfig(**{**config.__dict__, "emulate": True})
    convert_to_float8_training(model, config=config)
    return lambda: step(contextlib.nullcontext)


def _variants(recipe: str) -> dict[str, Callable[[], float]]:
    _, fp32 = make_step()
    fp8_model, fp8 = make_step()
    convert_to_fp8(fp8_model, recipe)
    mixed_model, mixed = make_step()
    convert_to_fp8(mixed_model, recipe)
    variants = {
        "fp32": lambda: fp32(contextlib.nullcontext),
        "mixprec": lambda: fp8(contextlib.nullcontext),
        "mixprec+bf16": lambda: mixed(
            lambda: autocast("cpu", dtype=torch.bfloat16, backend="emulated")
        ),
    }
    peer = _torchao_step(recipe) if recipe in ("tensorwise", "rowwise") else None
    if peer is not None:
        variants["torchao"] = peer
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="tensorwise", help="any mixprec fp8 recipe")
    parser.add_argument("--steps", type=int, default=5, help="rounds of timed steps")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = _variants(args.recipe)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, recipe {args.recipe}")
    for run in variants.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.steps):
        for name, run in variants.items():
            times[name].append(run())
    best = {name: min(t) for name, t in times.items()}
    for name, t in best.items():
        median = statistics.median(times[name])
        print(
            f"{name:<14} {t * 1e3:9.1f} ms   / fp32 = {t / best['fp32']:.2f}   "
            f"(median {median * 1e3:.1f} ms)"
        )
    print(f"mixprec / fp32 = {best['mixprec'] / best['fp32']:.2f}  (target <= 2)")
    if "torchao" in best:
        print(
            f"torchao / mixprec = {best['torchao'] / best['mixprec']:.2f}  "
            "(target > 1: mixprec faster)"
        )


if __name__ == "__main__":
    main()
