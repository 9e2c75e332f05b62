"""The ``mixprec`` command.

Subcommands:
    formats   the number formats as a table (``--json`` for machines).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from mixprec import __version__
from mixprec.formats import FORMATS


def _formats(args: argparse.Namespace) -> int:
    rows = [fmt.describe() for fmt in FORMATS.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(
        title="Number formats (bits: sign.exponent.mantissa)",
        title_justify="left",
        box=None,
        show_edge=False,
        padding=(0, 1),
        pad_edge=False,
    )
    for header in ("format", "bits", "max", "min normal", "subnormal", "eps", "inf"):
        table.add_column(header, justify="left" if header == "format" else "right", no_wrap=True)
    table.add_column("torch dtype", no_wrap=True)
    for fmt, row in zip(FORMATS.values(), rows, strict=True):
        dtype = str(row["dtype"]) + ("" if fmt.stored_exactly else " *")
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
    console = Console()
    console.print(table)
    console.print(
        "  * tf32 is computed by tensor cores and stored in float32 tensors", highlight=False
    )
    for row in rows:
        console.print(f"  {row['name']}: also {', '.join(row['aliases'])}", highlight=False)  # type: ignore[arg-type]
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``mixprec`` command."""
    parser = argparse.ArgumentParser(
        prog="mixprec", description="Mixed precision training toolkit for PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"mixprec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    formats = sub.add_parser("formats", help="show the number formats: range, precision, dtype")
    formats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    formats.set_defaults(run=_formats)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mixprec`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
