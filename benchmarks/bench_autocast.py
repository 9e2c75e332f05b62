"""Training-step time of emulated 16-bit autocast vs FP32 and vs torch's native autocast.

Model: the small transformer of the issue (d_model 256, 4 layers, 4 heads, seq 128, batch 16,
AdamW). FP32 and emulated steps alternate (median of pairs); the native torch.autocast step is
timed over fewer steps because on CPUs without 16-bit GEMM units it is ~100x slower.
Targets: emulated / fp32 <= 1.5 and native / emulated >= 20 on such a CPU; mixprec's
``backend="auto"`` within 10% of the faster of torch's native autocast and emulation.

    python benchmarks/bench_autocast.py [--dtype bf16] [--steps 6] [--native-steps 1]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from collections.abc import Callable

import torch
from reference_step import make_step

from mixprec import autocast
from mixprec.formats import resolve_format
from mixprec.hardware import probe


def _trainer(dtype: torch.dtype) -> dict[str, Callable[[], float]]:
    _, step = make_step(lr=1e-3)
    return {
        "fp32": lambda: step(contextlib.nullcontext),
        "emulated": lambda: step(lambda: autocast("cpu", dtype=dtype, backend="emulated")),
        "native": lambda: step(lambda: torch.autocast("cpu", dtype=dtype)),
        "auto": lambda: step(lambda: autocast("cpu", dtype=dtype, backend="auto")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", help="bf16 or fp16")
    parser.add_argument("--steps", type=int, default=6, help="fp32/emulated pairs to time")
    parser.add_argument("--native-steps", type=int, default=1, help="0 skips the native timing")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = resolve_format(args.dtype).dtype
    steps = _trainer(dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, dtype {dtype}")
    steps["fp32"](), steps["emulated"]()  # warm-up
    pairs = [(steps["fp32"](), steps["emulated"]()) for _ in range(args.steps)]
    fp32 = statistics.median(p[0] for p in pairs)
    emulated = statistics.median(p[1] for p in pairs)
    ratio = statistics.median(e / f for f, e in pairs)
    print(f"fp32 step          {fp32 * 1e3:9.1f} ms")
    print(f"emulated step      {emulated * 1e3:9.1f} ms   emulated / fp32 = {ratio:.2f}  (<= 1.5)")
    auto_region = autocast("cpu", dtype=dtype, backend="auto")
    print(f"cpu flags: {', '.join(sorted(probe('cpu', measure=False).cpu_flags)) or 'none'}")
    print(f"auto picks {auto_region.backend}: {auto_region.reason}")
    if args.native_steps:
        steps["native"](), steps["auto"]()  # warm-up
        runs = [(steps["native"](), steps["auto"]()) for _ in range(args.native_steps)]
        native = statistics.median(r[0] for r in runs)
        auto = statistics.median(r[1] for r in runs)
        print(
            f"native autocast    {native * 1e3:9.1f} ms   native / emulated = "
            f"{native / emulated:.1f}  (>= 20 where 16-bit GEMMs are slow)"
        )
        best = min(native, emulated)
        print(
            f"mixprec auto       {auto * 1e3:9.1f} ms   auto / best of native and emulated = "
            f"{auto / best:.2f}  (<= 1.10)"
        )


if __name__ == "__main__":
    main()
