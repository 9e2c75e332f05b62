"""``mixprec plan``: model-state and activation memory per rank, before renting the machines.

    mixprec plan --params 7e9 --world 64 --strategy fsdp2 --layers 32 --hidden 4096 \\
        --seq 4096 --batch 1 --device-memory 80GB

prints bytes per parameter per rank for params, grads, master weights, optimizer state (AdamW,
in each preset's ``state`` format or ``--state``'s) and compensation, for each preset and update
mode, the activation estimate and whether it fits; ``--master-remainder 16|8`` plans compressed
masters, ``--step-in-backward`` no gradient buffer (see :mod:`mixprec.distributed.plan`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

__all__ = ["add_plan_parser"]


def _plan(args: argparse.Namespace) -> int:
    from mixprec.distributed.plan import memory_plan

    plan = memory_plan(
        args.params,
        args.world,
        args.strategy,
        # An empty --presets is refused by memory_plan, not read as "all".
        presets=_all_presets() if args.presets is None else args.presets,
        num_tensors=args.tensors,
        layers=args.layers,
        hidden=args.hidden,
        seq=args.seq,
        batch=args.batch,
        heads=args.heads,
        attention_scores=args.attention_scores,
        device_memory=args.device_memory,
        state=args.state,
        master_remainder=args.master_remainder,
        step_in_backward=args.step_in_backward,
    )
    if args.json:
        record = {k: v for k, v in asdict(plan).items() if k != "rows"}
        record["rows"] = [{**asdict(r), "state_per_param": r.state_per_param} for r in plan.rows]
        print(json.dumps(record, indent=2))
    else:
        print(plan)
    return 0


def _all_presets() -> tuple[str, ...]:
    from mixprec.policy import PRESETS

    return tuple(PRESETS)


def add_plan_parser(sub: Any) -> None:
    """Register the ``plan`` subcommand on the ``mixprec`` command's subparsers."""
    plan = sub.add_parser("plan", help="memory per rank for a model size, world and strategy")
    plan.add_argument("--params", type=float, required=True, help="parameter count, e.g. 7e9")
    plan.add_argument("--world", type=int, default=1, help="ranks (%(default)s)")
    plan.add_argument(
        "--strategy",
        default="fsdp2",
        choices=("single", "ddp", "fsdp2"),
        help="one process, DDP replicas, or FSDP2 sharding (ZeRO-3) (default: fsdp2)",
    )
    plan.add_argument("--presets", default=None, help="comma-separated presets (default: all)")
    plan.add_argument("--tensors", type=int, default=0, help="parameter tensors (AdamW steps)")
    plan.add_argument("--layers", type=int, default=None, help="transformer blocks")
    plan.add_argument("--hidden", type=int, default=None, help="model width")
    plan.add_argument("--seq", type=int, default=None, help="sequence length")
    plan.add_argument("--batch", type=int, default=1, help="sequences per rank (%(default)s)")
    plan.add_argument("--heads", type=int, default=None, help="attention heads (hidden/64)")
    plan.add_argument(
        "--attention-scores", action="store_true", help="eager attention stores its scores"
    )
    plan.add_argument("--device-memory", default=None, help="e.g. 80GB or 80GiB")
    plan.add_argument(
        "--state",
        default=None,
        choices=("fp32", "bf16", "fp16", "fp8", "int8"),
        help="optimizer states in this format for every preset (default: each preset's own)",
    )
    plan.add_argument(
        "--master-remainder",
        type=int,
        default=None,
        choices=(16, 8),
        help="masters of bf16 params as the param plus a 16-bit (exact) or 8-bit remainder",
    )
    plan.add_argument(
        "--step-in-backward", action="store_true", help="each parameter steps in backward"
    )
    plan.add_argument("--json", action="store_true", help="print JSON")
    plan.set_defaults(run=_plan)
