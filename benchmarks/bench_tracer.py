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
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mixprec.diagnostics import NonFiniteTracer
from mixprec.tasks.transformer import TinyTransformer

VOCAB = 96


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
    torch.manual_seed(0)
    model = TinyTransformer(VOCAB, d_model=256, n_layers=4, n_heads=4, seq_len=128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, VOCAB, (16, 128))
    targets = torch.randint(0, VOCAB, (16, 128))

    def step(region: Callable[[], contextlib.AbstractContextManager[object]]) -> float:
        start = time.perf_counter()
        with region():
            logits = model(tokens)
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        return time.perf_counter() - start

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
