"""Eager vs ``torch.compile``d training step under fp32, torch.autocast and mixprec's regions.

Model: the reference step of the other benchmarks (``reference_step.py``: the small charlm-style
transformer, d_model 256, 4 layers, 4 heads, seq 128, batch 16, AdamW). Rows: fp32;
``torch.autocast`` bf16; ``mixprec.autocast`` bf16 native, bf16 emulated and fp16 emulated;
``MixedPrecision("bf16-mixed")`` with the model compiled after ``prepare``. Each row trains an
eager model and a compiled twin (``model.compile()``: forward and backward compiled, the AdamW step
eager) from the same weights on the same batch, so their losses must agree step by step within the
row's tolerance (4 ulps of its 16-bit format; 1e-5 for fp32). bf16-mixed keeps fp32 parameters
and needs no loss scaling, so its ``mp.backward``/``mp.step`` are ``loss.backward()``/
``optimizer.step()``; its row times the prepared model (FP32 islands included) under
``mp.autocast()``.

Measurement: row by row, the eager and the compiled model are warmed up (the compiled one
compiles), then timed in alternation, so drift in machine load reaches both; times are medians,
ratios medians of per-step ratios. Rows run one after the other because entering a region whose
mixprec settings differ from the last one resets torch.compile's caches (compiled code cannot see
the settings, so it is traced again). Graph breaks: ``torch._dynamo.explain`` of each row's
forward (run last, since ``explain`` resets dynamo's caches). Targets: compiled mixprec bf16 native
within 5% of compiled torch.autocast bf16; compiled emulated no slower than eager emulated.

Each compiled model has a backend object of its own, and the torch rows run first.

    python benchmarks/bench_compile.py [--steps 5] [--warmup 2] [--threads N] [--quick]
        [--compile-backend inductor]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from reference_step import VOCAB, Region, make_step

from mixprec import MixedPrecision, autocast
from mixprec.hardware import probe

SIZES = {"d_model": 256, "n_layers": 4, "n_heads": 4, "seq_len": 128, "batch": 16}
QUICK_SIZES = {"d_model": 32, "n_layers": 1, "n_heads": 2, "seq_len": 16, "batch": 2}
# flags that decide whether 16-bit GEMMs are fast on a CPU, as /proc/cpuinfo names them
SHOWN_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")


@dataclass(frozen=True)
class Row:
    """One precision set-up: a name, its 16-bit dtype (None: fp32) and how a model enters it.

    ``setup(model)`` prepares the model if the row needs it and returns the region factory the
    training step runs its forward in.
    """

    name: str
    dtype: torch.dtype | None
    setup: Callable[[torch.nn.Module], Region]
    mixprec: bool


def _plain(region: Region) -> Callable[[torch.nn.Module], Region]:
    return lambda model: region


def _session(model: torch.nn.Module) -> Region:
    mp = MixedPrecision("bf16-mixed", device="cpu")
    mp.prepare(model)
    return mp.autocast


ROWS = (
    Row("fp32", None, _plain(contextlib.nullcontext), mixprec=False),
    Row(
        "torch.autocast bf16",
        torch.bfloat16,
        _plain(lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
        mixprec=False,
    ),
    Row(
        "mixprec bf16 native",
        torch.bfloat16,
        _plain(lambda: autocast("cpu", dtype=torch.bfloat16, backend="native")),
        mixprec=True,
    ),
    Row(
        "mixprec bf16 emulated",
        torch.bfloat16,
        _plain(lambda: autocast("cpu", dtype=torch.bfloat16, backend="emulated")),
        mixprec=True,
    ),
    Row(
        "mixprec fp16 emulated",
        torch.float16,
        _plain(lambda: autocast("cpu", dtype=torch.float16, backend="emulated")),
        mixprec=True,
    ),
    Row("MixedPrecision bf16-mixed", torch.bfloat16, _session, mixprec=True),
)


@dataclass
class Variant:
    """A row's eager or compiled model, its step, and what its steps measured."""

    row: Row
    compiled: bool
    model: torch.nn.Module
    step: Callable[[Region], float]
    region: Region
    losses: list[float]
    times: list[float] = field(default_factory=list)

    def run(self) -> float:
        return self.step(self.region)


def _compile_backend(name: str) -> Callable[..., Any]:
    """A backend object of its own for one compiled model, calling torch's backend ``name``.

    Dynamo guards on the backend object, so each model keeps its own graphs.
    """
    inner = torch._dynamo.lookup_backend(name)

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        return inner(gm, example_inputs)

    return backend


def _variants(sizes: dict[str, int], compile_backend: str) -> list[Variant]:
    """Every row, eager and compiled: the torch rows first, so that they are compiled before any
    mixprec region is entered (a plain torch.autocast region traced later would reach mixprec's
    kernels)."""
    variants = []
    for row in sorted(ROWS, key=lambda r: r.mixprec):
        for compiled in (False, True):
            losses: list[float] = []
            model, step = make_step(
                lr=1e-3,
                d_model=sizes["d_model"],
                n_layers=sizes["n_layers"],
                n_heads=sizes["n_heads"],
                seq_len=sizes["seq_len"],
                batch=sizes["batch"],
                losses=losses,
            )
            region = row.setup(model)
            if compiled:
                model.compile(backend=_compile_backend(compile_backend))
            variants.append(Variant(row, compiled, model, step, region, losses))
    return variants


def _graph_breaks(variant: Variant, sizes: dict[str, int]) -> tuple[int, str]:
    """Graph breaks of the row's forward under its region, and the first reason if any."""
    tokens = torch.randint(0, VOCAB, (sizes["batch"], sizes["seq_len"]))
    with variant.region():
        explained = torch._dynamo.explain(variant.model)(tokens)
    reason = str(explained.break_reasons[0].reason) if explained.break_reasons else ""
    return explained.graph_break_count, reason.splitlines()[0] if reason else ""


def _tolerance(dtype: torch.dtype | None) -> float:
    """Relative loss tolerance between eager and compiled twins: 4 ulps of the 16-bit compute
    format (fused kernels round intermediates differently, and the difference grows over the
    steps); 1e-5 for fp32, whose sums compiled kernels reorder."""
    return 4 * torch.finfo(dtype).eps if dtype is not None else 1e-5


def _max_rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b, strict=True))


def _ratio(numerators: list[float], denominators: list[float]) -> float:
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))


def _header(compile_backend: str, sizes: dict[str, int]) -> None:
    cpu = probe("cpu", measure=False)
    flags = ", ".join(f"{f.upper()} {'yes' if f in cpu.cpu_flags else 'no'}" for f in SHOWN_FLAGS)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, compile {compile_backend}"
    )
    print(f"CPU: {cpu.name}; {flags}; load average {os.getloadavg()[0]:.1f}")
    print(
        f"model: d_model {sizes['d_model']}, {sizes['n_layers']} layers, {sizes['n_heads']} "
        f"heads, seq {sizes['seq_len']}, batch {sizes['batch']}, vocabulary {VOCAB}, AdamW"
    )
    session = MixedPrecision("bf16-mixed", device="cpu")
    print(f"MixedPrecision('bf16-mixed') backend: {session.backend}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (each runs every row)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (default inductor)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny model, 1 warm-up step and 2 timed rounds"
    )
    args = parser.parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    if args.quick:
        args.steps, args.warmup = 2, 1
    if args.steps < 1 or args.warmup < 1:
        parser.error(
            f"--steps and --warmup must be >= 1 (got {args.steps!r} and {args.warmup!r}): the "
            "first warm-up step compiles"
        )
    torch.set_num_threads(args.threads)
    sizes = QUICK_SIZES if args.quick else SIZES
    _header(args.compile_backend, sizes)

    variants = _variants(sizes, args.compile_backend)
    warmup = 0.0
    for row in ROWS:
        pair = [v for v in variants if v.row is row]
        started = time.perf_counter()
        for variant in pair:
            for _ in range(args.warmup):
                variant.run()
        warmup += time.perf_counter() - started
        for step in range(args.steps):
            for variant in pair if step % 2 == 0 else pair[::-1]:
                variant.times.append(variant.run())
    print(f"compile and warm-up: {warmup:.0f} s")

    by_key = {(v.row.name, v.compiled): v for v in variants}
    breaks = {row.name: _graph_breaks(by_key[row.name, False], sizes) for row in ROWS}

    print()
    print(
        f"{'row':<27}{'eager ms':>10}{'compiled ms':>13}{'eager/compiled':>16}{'breaks':>8}"
        f"{'loss rel diff':>15}{'tolerance':>11}  loss check"
    )
    failed = []
    for row in ROWS:
        eager, compiled = by_key[row.name, False], by_key[row.name, True]
        diff = _max_rel_diff(eager.losses, compiled.losses)
        tolerance = _tolerance(row.dtype)
        ok = math.isfinite(diff) and diff <= tolerance
        if not ok:
            failed.append(row.name)
        print(
            f"{row.name:<27}{statistics.median(eager.times) * 1e3:>10.1f}"
            f"{statistics.median(compiled.times) * 1e3:>13.1f}"
            f"{_ratio(eager.times, compiled.times):>16.2f}{breaks[row.name][0]:>8}"
            f"{diff:>15.2e}{tolerance:>11.1e}  {'ok' if ok else 'MISMATCH'}"
        )
    for name, (count, reason) in breaks.items():
        if count:
            print(f"  {name}: first graph break: {reason}")

    print()
    native = _ratio(
        by_key["mixprec bf16 native", True].times, by_key["torch.autocast bf16", True].times
    )
    print(
        f"compiled mixprec bf16 native / compiled torch.autocast bf16 = {native:.3f}  "
        "(target <= 1.05)"
    )
    for name in ("mixprec bf16 emulated", "mixprec fp16 emulated"):
        ratio = _ratio(by_key[name, True].times, by_key[name, False].times)
        print(f"compiled / eager, {name[8:]:<14} = {ratio:.3f}  (target <= 1.00)")
    losses = len(variants[0].losses)
    print(f"losses compared over {losses} steps per row (eager vs compiled twin)")
    print(f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if failed:
        print(f"compiled losses differ from eager beyond tolerance for: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
