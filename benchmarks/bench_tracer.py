"""Training-step time with the NonFiniteTracer attached vs the plain step (and disabled).

Model: the small transformer (d_model 256, 4 layers, 4 heads, seq 128, batch 16, AdamW), fp32.
Plain, traced and disabled-tracer steps alternate on the same model; the medians and the median
of per-round ratios are printed. A disabled tracer registers no hook, so its ratio is 1 up to
noise. The traced step pays one reduction and one host sync per module output and per gradient.

    python benchmarks/bench_tracer.py [--steps 8] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from collections.abc import Callable

import torch
from reference_step import make_step

from mixprec.diagnostics import NonFiniteTracer


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) + sum(
        len(p._backward_hooks or {}) for p in model.parameters()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="rounds of plain/traced/disabled")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, step = make_step(lr=1e-4, backward_in_region=True)

    kinds: dict[str, Callable[[], contextlib.AbstractContextManager[object]]] = {
        "plain": contextlib.nullcontext,
        "traced": lambda: NonFiniteTracer(model),
        "disabled": lambda: NonFiniteTracer(model, enabled=False),
    }
    with NonFiniteTracer(model, enabled=False):
        disabled_hooks = _hooks(model)
    with NonFiniteTracer(model) as tracer:
        attached_hooks = tracer.hooks_registered
    for region in kinds.values():  # warm-up
        step(region)
    rounds = [{name: step(region) for name, region in kinds.items()} for _ in range(args.steps)]
    plain = statistics.median(r["plain"] for r in rounds)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, {args.steps} rounds"
    )
    print(
        f"hooks: {attached_hooks} while attached, {disabled_hooks} when disabled, "
        f"{_hooks(model)} after exit"
    )
    print(f"plain step      {plain * 1e3:9.1f} ms")
    for name in ("traced", "disabled"):
        median = statistics.median(r[name] for r in rounds)
        ratio = statistics.median(r[name] / r["plain"] for r in rounds)
        print(f"{name + ' step':<15} {median * 1e3:9.1f} ms   {name} / plain = {ratio:.3f}")


if __name__ == "__main__":
    main()
