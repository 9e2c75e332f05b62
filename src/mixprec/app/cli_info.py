"""The ``formats`` and ``doctor`` subcommands: what the number formats are, and what this
device can do (the precision ``auto`` picks and why, the op table)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from mixprec.formats import ALL_FORMATS, BLOCK_FORMATS, Format

__all__ = ["add_info_parsers"]


def add_info_parsers(sub: Any) -> None:
    """Add ``formats`` and ``doctor`` to the ``mixprec`` command's subparsers."""
    formats = sub.add_parser("formats", help="show the number formats: range, precision, dtype")
    formats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    formats.set_defaults(run=_formats)
    doctor = sub.add_parser("doctor", help="probe the hardware and explain the auto precision")
    doctor.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: best)")
    doctor.add_argument("--dtype", default=None, help="autocast dtype to explain (bf16, fp16)")
    doctor.add_argument("--ops", action="store_true", help="also print the autocast op table")
    doctor.add_argument("--no-measure", action="store_true", help="skip the GEMM timing")
    doctor.add_argument("--json", action="store_true", help="print JSON")
    doctor.set_defaults(run=_doctor)


def _formats(args: argparse.Namespace) -> int:
    rows = [fmt.describe() for fmt in ALL_FORMATS.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    scalar = [f for f in ALL_FORMATS.values() if isinstance(f, Format)]
    table = _plain_table("Number formats (bits: sign.exponent.mantissa)")
    for header in ("format", "bits", "max", "min normal", "subnormal", "eps", "inf"):
        table.add_column(header, justify="left" if header == "format" else "right", no_wrap=True)
    table.add_column("torch dtype", no_wrap=True)
    for fmt in scalar:
        dtype = str(fmt.dtype).removeprefix("torch.") + ("" if fmt.stored_exactly else " *")
        table.add_row(
            fmt.name,
            f"1.{fmt.exponent_bits}.{fmt.mantissa_bits}",
            f"{fmt.max:.0f}" if fmt.max < 1e6 else f"{fmt.max:.2e}",
            f"2^{fmt.min_exponent}",
            f"2^{fmt.min_exponent - fmt.mantissa_bits}",
            f"2^-{fmt.mantissa_bits}",
            "yes" if fmt.has_inf else "no",
            dtype,
        )
    blocks = _plain_table("Block-scaled formats (blocks along the last dimension)")
    for header in ("format", "element", "block", "block scale", "tensor scale", "bits/value"):
        blocks.add_column(header, no_wrap=True)
    for block in BLOCK_FORMATS.values():
        blocks.add_row(
            block.name,
            block.element.name,
            str(block.block_size),
            block.scale,
            block.tensor_scale or "-",
            f"{block.bits_per_value:g}",
        )
    console = Console()
    console.print(table)
    console.print(
        "  * held in float32 tensors: tf32 (a tensor-core mode), fp4_e2m1 (no torch dtype)",
        highlight=False,
    )
    console.print(blocks)
    for row in rows:
        console.print(f"  {row['name']}: also {', '.join(row['aliases'])}", highlight=False)  # type: ignore[arg-type]
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from mixprec.compute import autocast
    from mixprec.compute.fp8_linear import fp8_backend
    from mixprec.hardware import probe, recommend

    report = probe(args.device, measure=not args.no_measure)
    choice = recommend(report)
    region = autocast(report.kind, dtype=args.dtype, backend="auto")
    table = region.op_table.by_category()
    fp8 = {recipe: fp8_backend("auto", report.device, recipe) for recipe in ("tensorwise", "mxfp8")}
    if args.json:
        print(
            json.dumps(
                {
                    "hardware": report.describe(),
                    "auto": {
                        "policy": str(choice.policy),
                        "backend": choice.backend,
                        "reason": choice.reason,
                    },
                    "autocast": {
                        "dtype": str(region.dtype).removeprefix("torch."),
                        "backend": region.backend,
                        "reason": region.reason,
                        "ops": table,
                    },
                    "fp8": {r: {"backend": b, "reason": why} for r, (b, why) in fp8.items()},
                },
                indent=2,
            )
        )
        return 0
    console = Console(highlight=False)
    console.print(f"[bold]device[/bold]        {report.device}: {report.name}")
    if report.compute_capability is not None:
        major, minor = report.compute_capability
        console.print(f"[bold]capability[/bold]    sm_{major}{minor}")
    if report.kind == "cpu":
        console.print(f"[bold]cpu flags[/bold]     {', '.join(sorted(report.cpu_flags)) or 'none'}")
    tensor_cores = ", ".join(sorted(report.tensor_core_formats)) or "none"
    console.print(f"[bold]16-bit units[/bold]  {tensor_cores}")
    if report.gemm_gflops:
        measured = ", ".join(f"{k} {v:g}" for k, v in report.gemm_gflops.items())
        console.print(f"[bold]GEMM GFLOP/s[/bold]  {measured}")
    console.print(f"[bold]auto policy[/bold]   {choice.policy}  (backend {choice.backend})")
    console.print(f"  why: {choice.reason}")
    dtype_name = str(region.dtype).removeprefix("torch.")
    console.print(
        f"[bold]autocast[/bold]      {dtype_name}: backend {region.backend} ({region.reason})"
    )
    for recipe, (backend, why) in fp8.items():
        console.print(f"[bold]fp8 {recipe:<10}[/bold] backend {backend} ({why})")
    if args.ops:
        for category, names in table.items():
            console.print(f"  [bold]{category}[/bold]: {', '.join(names)}")
    return 0


def _plain_table(title: str) -> Table:
    """A borderless rich table with its title on the left (the ``formats`` listing's style)."""
    return Table(
        title=title, title_justify="left", box=None, show_edge=False, padding=(0, 1), pad_edge=False
    )
