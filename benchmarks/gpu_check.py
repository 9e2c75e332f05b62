"""mixprec against torch.amp on a CUDA GPU: autocast op lists, GradScaler lock-step, presets.

Five sections, each with a time budget (the whole script stays under 5 minutes on one H200):

- ``fp8``: on GPUs with FP8 units (sm_89+), the native ``torch._scaled_mm`` FP8 linear against
  the emulated one on the same inputs (tensorwise, rowwise), and FP8 vs bf16 GEMM time at
  8192^3; elsewhere it checks that ``auto`` picks the emulated path.
- ``fp4``: on GPUs with block-scaled FP4 units (sm_100+, Blackwell), the native 4-bit linear
  (NVFP4 and MXFP4 on block-scaled ``torch._scaled_mm``) against the emulated one on the same
  inputs and random draws (output, input and weight gradients), and NVFP4 vs bf16 GEMM time at
  8192^3; elsewhere it prints that the section was skipped and why, and checks that ``auto``
  picks the emulated path and that ``native`` is refused with that reason.
- ``autocast``: every case of torch's CUDA autocast op lists
  (``torch.testing._internal.autocast_test_lists.AutocastTestLists``), in fp16 and bf16.
  ``mixprec.autocast(backend="native")`` must give exactly what ``torch.autocast`` gives (dtype
  and values, or the same exception type; within a few ulps only where torch itself does not
  repeat its result); ``backend="emulated"`` the same dtype and values within a few 16-bit ulps,
  or no farther than torch's from an fp64 run of the op on the same rounded inputs (some of
  torch's 16-bit kernels accumulate in 16 bits).
- ``scaler``: ``mixprec.GradScaler`` and ``torch.amp.GradScaler`` on twin models (same weights,
  same batches, fp16 autocast), with AdamW ``fused=True`` and ``foreach=True``, with and without
  ``unscale_`` + gradient clipping, with an inf and a NaN gradient injected: scales, skipped steps
  and weights must be identical at every step.
- ``presets``: ``MixedPrecision`` fp32, bf16-mixed, fp16-mixed and bf16-pure on a GPT-2-sized
  transformer (mixprec's TinyTransformer: 12 layers, d_model 768, 12 heads, seq 1024, GPT-2's
  vocabulary, untied head), beside a plain fp32 loop and hand-written torch.autocast loops (bf16;
  fp16 with ``torch.amp.GradScaler``) on the same model, batches and initial weights. The variants
  alternate step by step; it prints the losses against fp32, the median step times and the ratios
  bf16-mixed / fp32 and mixprec / torch.amp. The data are windows of real text (the charlm corpus,
  bytes as tokens), so nothing is downloaded.

Each section runs in its own ``try``; a failure is printed and the next section runs. The exit code
is 1 if any check failed, else 0. Without a CUDA device the script prints
``no CUDA device: gpu_check skipped`` and exits 0. ``--device cpu`` runs the same checks on the CPU
(torch.autocast and torch.amp.GradScaler support it; presets then use a small model), to exercise
the script on a machine without a GPU; the figures then say nothing about a GPU.

    python benchmarks/gpu_check.py [--sections autocast,scaler,presets] [--quick] [--steps 20]

This file runs the sections; each lives in a module of its own beside it (``gpu_check_autocast``,
``gpu_check_training``: scaler and presets, ``gpu_check_lowp``: fp8 and fp4), with the budget and
the GPU timing they share in ``gpu_check_base``.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import traceback
from collections.abc import Callable

import torch
from gpu_check_autocast import check_autocast
from gpu_check_base import OverBudget, Section
from gpu_check_lowp import check_fp4, check_fp8
from gpu_check_training import check_presets, check_scaler

import mixprec

SECTIONS = ("autocast", "scaler", "presets", "fp8", "fp4")
BUDGET_S = {"autocast": 60.0, "scaler": 60.0, "presets": 150.0, "fp8": 40.0, "fp4": 40.0}
SKIP_MESSAGE = "no CUDA device: gpu_check skipped"


def _parse_sections(text: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown sections {unknown or text!r}; valid sections: {', '.join(SECTIONS)} "
            "(comma-separated, e.g. --sections autocast,scaler)"
        )
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sections",
        type=_parse_sections,
        default=list(SECTIONS),
        help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})",
    )
    parser.add_argument("--quick", action="store_true", help="fewer cases, steps and a small model")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per preset")
    parser.add_argument(
        "--device",
        default="cuda",
        help="cuda (default); cpu runs the same checks on the CPU to exercise the script",
    )
    args = parser.parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(
            line_buffering=True
        )  # a run killed at its time limit keeps its lines
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(SKIP_MESSAGE)
        return 0
    device = torch.device(args.device)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps!r}")
    steps = min(args.steps, 4) if args.quick else args.steps
    print(f"torch {torch.__version__}, mixprec {mixprec.__version__}, device {device}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(
            f"GPU: {props.name}, sm_{props.major}{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
        )
    runners: dict[str, Callable[[Section], None]] = {
        "autocast": lambda s: check_autocast(s, device, args.quick),
        "scaler": lambda s: check_scaler(s, device, args.quick),
        "presets": lambda s: check_presets(s, device, args.quick, steps),
        "fp8": lambda s: check_fp8(s, device, args.quick),
        "fp4": lambda s: check_fp4(s, device, args.quick),
    }
    failed = False
    started = time.perf_counter()
    for name in args.sections:
        section = Section(name, BUDGET_S[name])
        print(f"\n== {name} (budget {section.budget_s:.0f} s)")
        t0 = time.perf_counter()
        try:
            runners[name](section)
        except OverBudget as err:
            print(f"  {err}; skipped the rest of this section")
        except Exception:
            traceback.print_exc(file=sys.stdout)
            section.failures.append("raised")
            print(f"  FAIL {name}: the section raised (above)")
        failed = failed or bool(section.failures)
        status = "FAILED" if section.failures else "ok"
        print(
            f"== {name}: {status}, {section.passed} checks passed, {len(section.failures)} failed, "
            f"{time.perf_counter() - t0:.0f} s"
        )
    print(
        f"\ntotal {time.perf_counter() - started:.0f} s: "
        f"{'FAILED' if failed else 'all checks passed'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
