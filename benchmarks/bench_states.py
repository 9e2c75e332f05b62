"""Optimizer states in fewer bits: fp32 / bf16 / fp8 / int8 states, and torchao's AdamW8bit.

Part 1, the codec of the second moment (why :mod:`mixprec.optim.quantized_states` stores
``sqrt(v)``): blocks of ``v = g**2`` whose gradients ``g`` span 2, 4 and 6 decades
(log-uniform); the relative error of ``sqrt(v)`` (what Adam divides by) and the fraction of
non-zero values decoded as 0, storing ``v`` directly (torchao / bitsandbytes) or its square root.

Part 2, training: the 8x8 digits classifier from scikit-learn's bundled data, an MLP 64-H-H-10
(H=256: the 64xH and HxH weights are quantized, smaller tensors keep fp32 states as in torchao
and bitsandbytes), bf16 parameters, AdamW (lr 1e-3, weight decay 0.01) for 200 minibatch steps
of 128, the same batches for every run. Each run's final loss on the whole training set and on
the held-out split, and its difference to the fp32-states run of the same update rule:

* fp32 master weights (``MasterWeightOptimizer``) with ``state="fp32" | "bf16" | "fp8" |
  "int8"``;
* stochastic rounding (``StochasticRoundingOptimizer``) with ``state="fp32" | "int8"`` beside
  torchao's ``AdamW8bit(bf16_stochastic_round=True)`` on the same bf16 model (the same recipe:
  bf16 weights rounded stochastically, block-quantized 8-bit moments; torchao compiles its
  step with ``torch.compile``).

Expected: every compressed-state run within 1% of fp32 states, and mixprec's int8 within 1% of
torchao's AdamW8bit. Also prints the bytes of optimizer state per parameter and the mean step
time (a figure, not a claim; on this small MLP the step is dominated by per-parameter overhead).

    PYTHONPATH=src python benchmarks/bench_states.py [--steps 200] [--hidden 256] [--threads 1]

Part 3 (``--step-time``, alone): the AdamW step on 4M parameters (four 1024x1024 weights, fixed
gradients) with bf16 parameters and int8/fp8 states through the one-pass kernel
(:mod:`mixprec.optim.fused_codes`), against torch's bare fp32 AdamW step on fp32 parameters of
the same size, in one process, interleaved (one step of each in turn), medians; also the
one-pass fp32-state step and the int8 reference path (decode, torch's AdamW, encode). Prints the
CPU flags and the load average before and after (the target, issue 21: int8/fp8 states at most
1.3x the bare fp32 AdamW step).

    PYTHONPATH=src python benchmarks/bench_states.py --step-time --threads 1 [--millions 4]

Measured (Intel Xeon with AVX512-BF16/AMX, torch 2.13 CPU, 1 thread, a shared machine):

    run                      train loss  val loss  vs fp32 st.  state B/p  step ms
    master, fp32 states          0.0656    0.1222      +0.00%       8.00     0.55
    master, bf16 states          0.0651    0.1220      -0.69%       4.00     1.28
    master, fp8 states           0.0653    0.1223      -0.38%       2.27     6.96
    master, int8 states          0.0652    0.1218      -0.60%       2.27    10.76
    SR, fp32 states              0.0656    0.1221      +0.00%       8.00     0.52
    SR, int8 states              0.0652    0.1220      -0.60%       2.27    10.63
    SR, int8 as torchao          0.0601    0.1254      -8.33%       2.27     4.64
    torchao AdamW8bit (SR)       0.0627    0.1266      -4.34%          -     6.77

Every mixprec compressed-state run ends within 1% of fp32 states. torchao's AdamW8bit ends 4.3%
from them (mixprec's int8 is +3.9% from torchao: not within 1%), and mixprec's int8 storage set
up as torchao stores (nearest rounding, ``v`` directly) drifts the same way (-8.3%): on this task
the two choices of :mod:`mixprec.optim.quantized_states` (stochastic rounding, ``sqrt(v)``) are
what keep 8-bit states on the fp32 trajectory. (State B/p is over all parameters; the 2.27 is
2 x 1.016 for the quantized weights plus fp32 states for the 2.6k-element head and the biases.)
The step times above were measured on the reference path (dequantize, torch's AdamW,
requantize, per chunk), before the one-pass kernel read coded states; part 3 has the kernel's.

Part 3, measured (same machine, 1 thread, 2 cores shared with other jobs: load average 13-14
before and after, so single figures move by 10-20% between runs; the ratios are of interleaved
steps, and were 0.93-1.02x for int8 and 0.85-0.89x for fp8 over four runs):

    AdamW step, 4M parameters, medians of 21 interleaved steps
                           run       ms   p10 ms   p90 ms  vs fp32
       torch fp32 AdamW (bare)    66.40    50.88    69.60    1.00x
               SR, fp32 states    28.98    20.85    37.64    0.44x
               SR, int8 states    62.05    53.44    70.68    0.93x
                SR, fp8 states    56.26    47.23    70.71    0.85x
           master, int8 states    65.59    54.83    73.10    0.99x
            master, fp8 states    57.41    46.76    68.23    0.86x
      SR, int8, reference path  1880.38  1753.78  2093.54   28.32x

Part 4 (``--charlm``, alone): the same comparison on the charlm task's transformer (d 128, 2
blocks, 470k parameters) in bf16, AdamW lr 2e-3, 250 steps of the built-in text, three seeds
of the stochastic-rounding draws each (the loss above the digits MLP's 0.06 is the harder test of
relative figures, and the seeds say how far two runs of one recipe land):

    python benchmarks/bench_states.py --charlm --steps 250 --seeds 3

    run                        seed 0   seed 1   seed 2    mean
    SR, fp32 states            2.4102   2.4533   2.4424  2.4353
    SR, int8 states            2.4223   2.4236   2.4035  2.4165
    torchao AdamW8bit (SR)     2.4156   2.4127   2.4112  2.4131
    mixprec int8 vs torchao AdamW8bit (mean val loss): +0.14%; vs fp32 states: mixprec -0.77%,
    torchao -0.91%

Within 1% of torchao's AdamW8bit, and both within the seed-to-seed spread of fp32 states (1.8%).

Where the time goes (perf, int8 states, stochastic rounding): encoding (absmax, the code
lookup, the draws) 36%, decoding 10%, the Adam arithmetic 16%, torch's sqrt 3%; before the
encode was vectorized it was 53% of a step 2.6x the fp32 AdamW step.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from mixprec.hardware import probe
from mixprec.optim import MasterWeightOptimizer, StochasticRoundingOptimizer, codecs, memory_report
from mixprec.optim.quantized_states import Int8States


def second_moment_table() -> None:
    print("second moment codec: relative error of sqrt(v), and non-zero values decoded as 0")
    print(f"{'decades of g':>12} {'codec':>16} {'median':>8} {'p99':>8} {'flushed':>8}")
    g = torch.Generator().manual_seed(0)
    for decades in (2, 4, 6):
        grad = 10 ** (-decades * torch.rand(1, 256 * 256, generator=g))
        v, root = grad.square(), grad
        decoded = {
            "int8 v (torchao)": codecs.dequantize_int8(
                *codecs.quantize_int8(v, False), False
            ).sqrt(),
            "int8 sqrt(v)": codecs.dequantize_int8(*codecs.quantize_int8(root, False), False),
            "fp8 v (torchao)": codecs.dequantize_fp8(*codecs.quantize_fp8(v)).sqrt(),
            "fp8 sqrt(v)": codecs.dequantize_fp8(*codecs.quantize_fp8(root)),
        }
        for name, back in decoded.items():
            err = (back - root).abs() / root
            print(
                f"{decades:>12} {name:>16} {err.median().item():>8.4f} "
                f"{err.quantile(0.99).item():>8.4f} {(back == 0).float().mean().item():>8.4f}"
            )


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1500], y[:1500], x[1500:], y[1500:]


def model(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )
    return net.to(torch.bfloat16)


Make = Callable[[nn.Module], torch.optim.Optimizer]


def adamw(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)


def torchao_adamw8bit(net: nn.Module) -> torch.optim.Optimizer:
    from torchao.optim import AdamW8bit

    return AdamW8bit(net.parameters(), lr=1e-3, weight_decay=0.01, bf16_stochastic_round=True)


RUNS: dict[str, tuple[str, Make]] = {
    "master, fp32 states": ("master", lambda n: MasterWeightOptimizer(adamw(n), state="fp32")),
    "master, bf16 states": ("master", lambda n: MasterWeightOptimizer(adamw(n), state="bf16")),
    "master, fp8 states": ("master", lambda n: MasterWeightOptimizer(adamw(n), state="fp8")),
    "master, int8 states": ("master", lambda n: MasterWeightOptimizer(adamw(n), state="int8")),
    "SR, fp32 states": ("sr", lambda n: StochasticRoundingOptimizer(adamw(n), state="fp32")),
    "SR, int8 states": ("sr", lambda n: StochasticRoundingOptimizer(adamw(n), state="int8")),
    "SR, int8 as torchao": ("sr", lambda n: torchao_like(StochasticRoundingOptimizer(adamw(n)))),
    "torchao AdamW8bit (SR)": ("sr", torchao_adamw8bit),
}


def torchao_like(opt: StochasticRoundingOptimizer) -> StochasticRoundingOptimizer:
    """int8 states stored as torchao stores them: to nearest, the second moment directly."""
    opt.storage = Int8States(rounding="nearest", sqrt_second_moment=False)
    return opt


def loss_of(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return F.cross_entropy(net(x.bfloat16()).float(), y).item()


def train(make: Make, hidden: int, steps: int) -> tuple[float, float, float, float | None]:
    x, y, vx, vy = data()
    net = model(hidden)
    opt = make(net)
    order = torch.Generator().manual_seed(1)
    times = []
    for _ in range(steps):
        batch = torch.randint(0, len(y), (128,), generator=order)
        loss = F.cross_entropy(net(x[batch].bfloat16()).float(), y[batch])
        opt.zero_grad()
        loss.backward()
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    state = None
    if isinstance(opt, (MasterWeightOptimizer, StochasticRoundingOptimizer)):
        state = memory_report(net, opt).per_param["optimizer_state"]
    step_ms = 1e3 * sum(times[10:]) / max(1, len(times) - 10)  # past compilation and warm-up
    return loss_of(net, x, y), loss_of(net, vx, vy), step_ms, state


STEP_RUNS: dict[str, tuple[Callable[[list[nn.Parameter]], torch.optim.Optimizer], str]] = {
    "SR, fp32 states": (lambda ps: StochasticRoundingOptimizer(_adamw(ps), state="fp32"), "auto"),
    "SR, int8 states": (lambda ps: StochasticRoundingOptimizer(_adamw(ps), state="int8"), "auto"),
    "SR, fp8 states": (lambda ps: StochasticRoundingOptimizer(_adamw(ps), state="fp8"), "auto"),
    "master, int8 states": (lambda ps: MasterWeightOptimizer(_adamw(ps), state="int8"), "auto"),
    "master, fp8 states": (lambda ps: MasterWeightOptimizer(_adamw(ps), state="fp8"), "auto"),
    "SR, int8, reference path": (
        lambda ps: StochasticRoundingOptimizer(_adamw(ps), state="int8"),
        "off",
    ),
}


def _adamw(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


def _step_params(millions: float, dtype: torch.dtype, seed: int = 0) -> list[nn.Parameter]:
    """Square 1024-wide weights, ``millions`` M elements, with fixed gradients."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for _ in range(max(1, round(millions * 1e6 / 1024**2))):
        p = nn.Parameter(torch.randn(1024, 1024, generator=g).to(dtype))
        p.grad = (torch.randn(1024, 1024, generator=g) * 1e-3).to(dtype)
        params.append(p)
    return params


def step_time_table(millions: float, repeats: int) -> None:
    """Step times of AdamW with 8-bit states through the one-pass kernel (bf16 parameters)
    against torch's bare fp32 AdamW step on fp32 parameters of the same size: one process,
    interleaved (one step of each in turn), medians of ``repeats``."""
    steps: dict[str, Callable[[], object]] = {
        "torch fp32 AdamW (bare)": _adamw(_step_params(millions, torch.float32)).step
    }
    for name, (make, fused) in STEP_RUNS.items():
        opt = make(_step_params(millions, torch.bfloat16))
        opt.fused = fused  # type: ignore[attr-defined]
        steps[name] = opt.step
    for step in steps.values():  # build the kernel, create the states, warm the caches
        step(), step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    load_before = os.getloadavg()
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    load_after = os.getloadavg()
    base = statistics.median(times["torch fp32 AdamW (bare)"])
    print(
        f"AdamW step, {millions:g}M parameters, medians of {repeats} interleaved steps; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
        f"({os.cpu_count()} CPUs)"
    )
    print(f"{'run':>26} {'ms':>8} {'p10 ms':>8} {'p90 ms':>8} {'vs fp32':>8}")
    for name, values in times.items():
        q = statistics.quantiles(values, n=10)
        median = statistics.median(values)
        print(
            f"{name:>26} {1e3 * median:>8.2f} {1e3 * q[0]:>8.2f} {1e3 * q[-1]:>8.2f} "
            f"{median / base:>7.2f}x"
        )


def charlm_run(
    make: Callable[[nn.Module, int], torch.optim.Optimizer], steps: int, seed: int
) -> float:
    """The charlm task's transformer (d 128, 2 blocks) in bf16, ``steps`` AdamW steps on the
    built-in text, the same batches every run; ``seed`` seeds the stochastic-rounding draws
    (mixprec's counter-based stream, torch's global generator for torchao). Val loss."""
    from mixprec.app.tasks import CharLMTask

    task = CharLMTask()
    net = task.build_model().to(torch.bfloat16)
    torch.manual_seed(seed)
    opt = make(net, seed)
    for step in range(steps):
        x, y = task.batch(step)
        loss = task.loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return task.evaluate(net, contextlib.nullcontext)["val_loss"]


CHARLM_RUNS: dict[str, Callable[[nn.Module, int], torch.optim.Optimizer]] = {
    "SR, fp32 states": lambda n, s: StochasticRoundingOptimizer(
        _charlm_adamw(n), seed=s, state="fp32"
    ),
    "SR, int8 states": lambda n, s: StochasticRoundingOptimizer(
        _charlm_adamw(n), seed=s, state="int8"
    ),
    "torchao AdamW8bit (SR)": lambda n, s: _charlm_torchao(n),
}


def _charlm_adamw(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.0)


def _charlm_torchao(net: nn.Module) -> torch.optim.Optimizer:
    from torchao.optim import AdamW8bit

    return AdamW8bit(net.parameters(), lr=2e-3, weight_decay=0.0, bf16_stochastic_round=True)


def charlm_table(steps: int, seeds: int) -> None:
    """Part 4: val loss of each run over ``seeds`` seeds of the rounding draws; the spread
    between seeds says how far apart two runs of one recipe land."""
    print(f"charlm transformer (d 128, 2 blocks), bf16 params, AdamW lr 2e-3, {steps} steps")
    print(f"{'run':>24} " + " ".join(f"{'seed ' + str(s):>8}" for s in range(seeds)) + "    mean")
    means: dict[str, float] = {}
    for name, make in CHARLM_RUNS.items():
        losses = [charlm_run(make, steps, seed) for seed in range(seeds)]
        means[name] = statistics.fmean(losses)
        print(f"{name:>24} " + " ".join(f"{v:>8.4f}" for v in losses) + f" {means[name]:>7.4f}")
    ours, theirs = means["SR, int8 states"], means["torchao AdamW8bit (SR)"]
    fp32 = means["SR, fp32 states"]
    print(
        f"mixprec int8 vs torchao AdamW8bit (mean val loss): {100 * (ours / theirs - 1):+.2f}%; "
        f"vs fp32 states: mixprec {100 * (ours / fp32 - 1):+.2f}%, "
        f"torchao {100 * (theirs / fp32 - 1):+.2f}%"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-torchao", action="store_true")
    parser.add_argument("--step-time", action="store_true", help="only part 3: the step time table")
    parser.add_argument("--millions", type=float, default=4.0, help="part 3: M parameters")
    parser.add_argument("--repeats", type=int, default=21, help="part 3: timed steps per run")
    parser.add_argument(
        "--charlm", action="store_true", help="only part 4: int8 states vs torchao on charlm"
    )
    parser.add_argument("--seeds", type=int, default=3, help="part 4: seeds of the draws")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = probe("cpu", measure=False)
    print(
        f"CPU: {report.name}; flags: {' '.join(sorted(report.cpu_flags)) or 'none'}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    if args.step_time:
        step_time_table(args.millions, args.repeats)
        return
    if args.charlm:
        charlm_table(args.steps, args.seeds)
        return
    second_moment_table()
    print()
    print(f"digits MLP 64-{args.hidden}-{args.hidden}-10, bf16 params, AdamW, {args.steps} steps")
    header = f"{'run':>24} {'train loss':>10} {'val loss':>9} {'vs fp32 st.':>11}"
    print(header + f" {'state B/p':>9} {'step ms':>8}")
    baseline: dict[str, float] = {}
    results: dict[str, float] = {}
    for name, (rule, make) in RUNS.items():
        if args.skip_torchao and name.startswith("torchao"):
            continue
        train_loss, val_loss, step_ms, state = train(make, args.hidden, args.steps)
        baseline.setdefault(rule, train_loss)
        results[name] = train_loss
        diff = 100 * (train_loss / baseline[rule] - 1)
        state_text = f"{state:>9.2f}" if state is not None else f"{'-':>9}"
        print(
            f"{name:>24} {train_loss:>10.4f} {val_loss:>9.4f} {diff:>+10.2f}% "
            f"{state_text} {step_ms:>8.2f}"
        )
    ours, theirs = results.get("SR, int8 states"), results.get("torchao AdamW8bit (SR)")
    if ours is not None and theirs is not None:
        print(f"mixprec int8 vs torchao AdamW8bit (train loss): {100 * (ours / theirs - 1):+.2f}%")


if __name__ == "__main__":
    main()
