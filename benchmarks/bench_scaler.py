"""Benchmark: torch.amp.GradScaler vs mixprec.GradScaler on the same model and gradients.

Times one scaler iteration (scale -> unscale -> inf check -> optimizer step -> update) on a
model of about 12.6M fp32 parameters, alternating the two scalers pair by pair (which one goes
first alternates too), and prints the median over pairs of the time ratio mixprec / torch.
Both scalers drive one shared model and optimizer, and the gradients are restored from one
saved copy before every timed iteration, so both see identical inputs and memory; an overflow is
injected every ``--overflow-every`` iterations so that the skip path is timed as well.

With ``--clip`` both also clip to a global norm: torch as ``unscale_`` + ``clip_grad_norm_``,
mixprec with its unscale-folded ``clip_grad_norm_``.

Usage:
    python benchmarks/bench_scaler.py [--pairs 40] [--threads N] [--optimizer sgd] [--clip]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mixprec.scaling import GradScaler

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9, foreach=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
}


def build(width: int, depth: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


class Bench:
    """A scaler driving the shared model and optimizer; ``iteration`` runs the timed part.

    Both scalers work on the same parameter, gradient and optimizer-state memory, so neither
    gains from a luckier memory placement (an A/A run of this script with two torch scalers on
    separate models showed a 3-5% bias for the second model).
    """

    def __init__(
        self,
        scaler,
        args: argparse.Namespace,
        params: list[torch.nn.Parameter],
        opt: torch.optim.Optimizer,
        grads: list[torch.Tensor],
    ) -> None:
        self.params = params
        self.opt = opt
        self.scaler = scaler
        self.grads = grads
        self.clip = args.clip
        self.loss = torch.tensor(1.0)
        self.count = 0
        self.overflow_every = args.overflow_every

    def restore_grads(self) -> None:
        for p, g in zip(self.params, self.grads, strict=True):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        self.count += 1
        if self.overflow_every and self.count % self.overflow_every == 0:
            first = self.params[0].grad
            assert first is not None  # restored just above
            first.view(-1)[0] = float("inf")

    def iteration(self) -> float:
        self.restore_grads()
        start = time.perf_counter()
        self.scaler.scale(self.loss)
        if self.clip:
            if isinstance(self.scaler, GradScaler):
                self.scaler.clip_grad_norm_(self.opt, 1.0)
            else:
                self.scaler.unscale_(self.opt)
                torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd")
    parser.add_argument("--clip", action="store_true")
    parser.add_argument("--overflow-every", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # Same gradients for both: a scaled backward pass once (scale 2**16, as both start).
    model = build(args.width, args.depth)
    x = torch.randn(32, args.width, generator=torch.Generator().manual_seed(1))
    (model(x).pow(2).mean() * 2.0**16).backward()
    grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    n_params = sum(g.numel() for g in grads)

    params = list(model.parameters())
    opt = OPTIMIZERS[args.optimizer](params)
    benches = {
        "torch": Bench(torch.amp.GradScaler("cpu"), args, params, opt, grads),
        "mixprec": Bench(GradScaler("cpu"), args, params, opt, grads),
    }
    for _ in range(args.warmup):
        for bench in benches.values():
            bench.iteration()
    times: dict[str, list[float]] = {"torch": [], "mixprec": []}
    ratios = []
    for i in range(args.pairs):
        order = ["torch", "mixprec"] if i % 2 == 0 else ["mixprec", "torch"]
        pair = {name: benches[name].iteration() for name in order}
        for name, seconds in pair.items():
            times[name].append(seconds)
        ratios.append(pair["mixprec"] / pair["torch"])

    scale_t, scale_m = benches["torch"].scaler.get_scale(), benches["mixprec"].scaler.get_scale()
    print(
        f"model: {n_params / 1e6:.1f}M fp32 params, optimizer {args.optimizer}, "
        f"clip={args.clip}, overflow every {args.overflow_every} iterations"
    )
    print(f"threads: {torch.get_num_threads()}, pairs: {args.pairs} (alternating order)")
    for name, values in times.items():
        print(f"  {name:8s} median {statistics.median(values) * 1e3:8.2f} ms / iteration")
    print(f"  final scales: torch {scale_t}, mixprec {scale_m}")
    print(f"ratio mixprec / torch (median of pairs): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
