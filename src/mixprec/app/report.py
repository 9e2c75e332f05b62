"""The comparison report: a side-by-side table, PNG plots and ``report.md``.

Every figure is relative to the fp32 run of the same task when there is one: loss difference in
percent, accuracy difference in points, time and activation memory as ratios.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mixprec.app.runner import RunResult
from mixprec.formats import BF16, FP16
from mixprec.fp4_recipes import FP4_RECIPES, Fp4Recipe
from mixprec.policy import Policy

if TYPE_CHECKING:
    from mixprec.diagnostics import Explanation

__all__ = [
    "ablation_section",
    "comparison_rows",
    "explain_section",
    "plot_runs",
    "world_line",
    "write_report",
]

_COLUMNS = (
    "precision",
    "backend",
    "train loss",
    "val loss",
    "Δ val loss",
    "val acc",
    "Δ acc (pts)",
    "ms/step",
    "× fp32 time",
    "activations",
    "× fp32 act.",
    "state B/param",
    "skipped",
    "final scale",
)


def _reference(results: Sequence[RunResult]) -> RunResult | None:
    return next((r for r in results if r.recipe == "fp32"), None)


_COMPACT = {
    "precision": "precision",
    "val loss": "val loss",
    "Δ val loss": "Δ loss",
    "val acc": "acc",
    "Δ acc (pts)": "Δ pts",
    "ms/step": "ms/step",
    "× fp32 time": "×time",
    "× fp32 act.": "×act",
    "state B/param": "B/param",
    "skipped": "skip",
    "final scale": "scale",
}
"""The columns a terminal shows (and their short headers); report.md has them all."""


def comparison_rows(
    results: Sequence[RunResult], compact: bool = False
) -> tuple[tuple[str, ...], list[list[str]]]:
    """The table as strings: the column headers and one row per run (``compact``: fewer)."""
    ref = _reference(results)
    rows = []
    for r in results:
        val_loss = r.metrics.get("val_loss", math.nan)
        acc = r.metrics.get("val_accuracy")
        row = [
            r.recipe,
            r.backend,
            f"{r.final_train_loss:.4f}",
            f"{val_loss:.4f}",
            _relative(val_loss, ref.metrics.get("val_loss") if ref else None),
            "-" if acc is None else f"{100 * acc:.1f}%",
            "-"
            if acc is None or ref is None
            else f"{100 * (acc - ref.metrics['val_accuracy']):+.1f}",
            f"{r.ms_per_step:.1f}",
            _ratio(r.ms_per_step, ref.ms_per_step if ref else None),
            f"{r.activation_bytes / 2**20:.2f} MiB",
            _ratio(r.activation_bytes, ref.activation_bytes if ref else None),
            f"{r.state_bytes_per_param:.1f}",
            str(r.skipped_steps),
            f"{r.final_scale:g}",
        ]
        rows.append(row)
    if not compact:
        return _COLUMNS, rows
    keep = [i for i, c in enumerate(_COLUMNS) if c in _COMPACT]
    headers = tuple(_COMPACT[_COLUMNS[i]] for i in keep)
    return headers, [[row[i] for i in keep] for row in rows]


def _relative(value: float, reference: float | None) -> str:
    if reference is None or not math.isfinite(value) or reference == 0:
        return "-"
    return f"{100 * (value - reference) / reference:+.2f}%"


def _ratio(value: float, reference: float | None) -> str:
    if reference is None or not reference:
        return "-"
    return f"{value / reference:.2f}"


def plot_runs(results: Sequence[RunResult], folder: Path, prefix: str) -> list[Path]:
    """Loss curves, loss scale over time and the gradient histogram, as PNGs in ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.plot(_smooth(r.losses), label=r.recipe, linewidth=1.2)
    ax.set(xlabel="step", ylabel="train loss (smoothed)", title=f"{prefix}: training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, folder / f"{prefix}_loss.png"))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for r in results:
        ax.plot(r.scales, label=r.recipe, linewidth=1.2)
    ax.set(xlabel="step", ylabel="loss scale", title=f"{prefix}: loss scale", yscale="log")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, folder / f"{prefix}_loss_scale.png"))

    ref = _reference(results) or results[0]
    if ref.grad_log2:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.hist(ref.grad_log2, bins=80, color="0.3")
        fp16_sub, fp16_min, fp16_max = (
            math.log2(v) for v in (FP16.min_subnormal, FP16.min_normal, FP16.max)
        )
        ax.axvspan(fp16_min, fp16_max, color="tab:orange", alpha=0.15, label="fp16 normal range")
        ax.axvspan(fp16_sub, fp16_min, color="tab:red", alpha=0.15, label="fp16 subnormals")
        ax.set(
            xlabel="log2 |gradient| (unscaled)",
            ylabel="count",
            title=f"{prefix}: gradients of the {ref.recipe} run vs 16-bit ranges",
        )
        # Below half the smallest subnormal, fp16 rounds to zero: at scale 1, and at 2**16.
        flush = fp16_sub - 1
        values = torch.tensor(ref.grad_log2)
        unscaled, scaled = ((values < flush - s).float().mean().item() for s in (0, 16))
        ax.axvline(flush - 16, color="tab:green", ls=":", label="fp16 flush at scale 2^16")
        ax.text(
            0.02,
            0.95,
            f"flushed to zero in fp16: {100 * unscaled:.2f}% without scaling, "
            f"{100 * scaled:.2f}% at scale 2^16\nbf16 normal range 2^{BF16.min_exponent} to "
            f"2^{BF16.max_exponent + 1}: all of this axis, no scaling needed",
            transform=ax.transAxes,
            fontsize=8,
            va="top",
            bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none"},
        )
        lo = min(min(ref.grad_log2), flush - 16) - 2
        ax.set_xlim(max(lo, -140), max(max(ref.grad_log2), fp16_max) + 2)
        ax.legend(fontsize=8)
        paths.append(_save(fig, folder / f"{prefix}_grad_hist.png"))
    plt.close("all")
    return paths


def _smooth(values: Sequence[float], window: int = 10) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _save(fig: object, path: Path) -> Path:
    fig.tight_layout()  # type: ignore[attr-defined]
    fig.savefig(path, dpi=110)  # type: ignore[attr-defined]
    return path


def markdown_table(results: Sequence[RunResult]) -> str:
    """The comparison table in Markdown."""
    headers, rows = comparison_rows(results)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _fp4_recipe(result: RunResult) -> Fp4Recipe | None:
    """The 4-bit recipe a run's linear layers used, or None (not 4-bit, or not a policy)."""
    try:
        fp8 = Policy.parse(result.recipe.partition("/")[0]).fp8
    except (ValueError, TypeError):
        return None
    if fp8 is None or fp8.partition(":")[0] not in FP4_RECIPES:
        return None
    return Fp4Recipe.parse(fp8)


def ablation_section(results: Sequence[RunResult]) -> list[str]:
    """What each 4-bit stabiliser buys: the runs of a 4-bit recipe with options switched off,
    against the run with the recipe's defaults (and bf16-mixed), as Markdown lines.

    ``Δ vs default`` is the variant's val loss minus the default recipe's, in percent: a positive
    figure is what the switched-off stabilisers bought. Empty without a 4-bit variant.
    """
    by_recipe = [(r, _fp4_recipe(r)) for r in results]
    bf16 = next((r for r in results if r.recipe == "bf16-mixed"), None)
    lines: list[str] = []
    for name, default in FP4_RECIPES.items():
        runs = [(r, rec) for r, rec in by_recipe if rec is not None and rec.name == name]
        base = next((r for r, rec in runs if rec == default), None)
        if not any(rec != default for _, rec in runs):
            continue
        if not lines:
            lines = ["### What the 4-bit stabilisers buy", ""]
        lines += [
            f"| {name} run | switched off / changed | val loss | Δ vs {name} default "
            "| Δ vs bf16-mixed |",
            "|---|---|---|---|---|",
        ]
        for r, rec in runs:
            val = r.metrics.get("val_loss", math.nan)
            changed = (
                ", ".join(
                    f"no {key}"
                    if getattr(default, key) is True and not getattr(rec, key)
                    else f"{key}={getattr(rec, key)}"
                    for key in default.options()
                    if getattr(rec, key) != getattr(default, key)
                )
                or "(defaults)"
            )
            ref_base = base.metrics.get("val_loss") if base else None
            ref_bf16 = bf16.metrics.get("val_loss") if bf16 else None
            lines.append(
                f"| {r.recipe} | {changed} | {val:.4f} | {_relative(val, ref_base)} "
                f"| {_relative(val, ref_bf16)} |"
            )
        lines.append("")
    if lines:
        lines += [
            "A positive Δ vs default is what the switched-off stabilisers bought (lower loss with "
            "them); one seed per run, so compare against the spread between runs.",
            "",
        ]
    return lines


_REDUCTION = {"ddp": "all-reduced", "fsdp2": "reduce-scattered"}


def world_line(results: Sequence[RunResult]) -> str:
    """Where the runs trained: one process, or the world size, the strategy and the bytes of
    gradients each rank handed to the reduction per step in each run's reduce format (what the
    DDP hook counted; under FSDP2 the reduce-scatter's input). State B/param is then per rank."""
    first = results[0]
    if first.world_size == 1 and first.strategy == "single":
        return "World size: 1 (one process)."
    moved = ", ".join(
        f"{r.recipe} {_bytes(r.reduce_bytes_per_step)} in {r.reduce_format}" for r in results
    )
    how = _REDUCTION.get(first.strategy, "reduced")
    sharded = " State B/param is per rank (shards)." if first.strategy == "fsdp2" else ""
    return (
        f"World size: {first.world_size} ({first.strategy}, each rank a slice of the global "
        f"batch). Gradients {how} per step by each rank: {moved}.{sharded}"
    )


def _bytes(count: float | None) -> str:
    if count is None:
        return "-"
    return f"{count / 2**10:.1f} KiB" if count < 2**20 else f"{count / 2**20:.2f} MiB"


def explain_section(explanation: Explanation, folder: Path, prefix: str) -> list[str]:
    """The report lines that show where one model's memory and precision go under a policy.

    Writes ``<prefix>_explain.png`` into ``folder`` (see :func:`mixprec.explain`).
    """
    path = explanation.plot(folder / f"{prefix}_explain.png")
    return [
        f"### Where the memory and the precision go: `{explanation.policy}`",
        "",
        explanation.markdown(),
        f"![{path.stem}]({path.name})",
        "",
    ]


def write_report(
    groups: dict[str, Sequence[RunResult]],
    folder: Path,
    command: str,
    explanations: Mapping[str, Explanation] | None = None,
) -> Path:
    """Write ``report.md`` with one section (table and plots) per task; returns its path.

    Args:
        groups: the runs of each task, by task name.
        folder: where the report and its PNGs go.
        command: the command line, quoted at the top.
        explanations: per task name, a :func:`mixprec.explain` of its model under the mixed
            policy compared, shown after that task's table.
    """
    parts = ["# mixprec compare", "", f"Command: `{command}`", ""]
    for name, results in groups.items():
        task = results[0].task
        parts += [f"## {name}", "", f"Task settings: `{task}`", "", world_line(results), ""]
        parts += [markdown_table(results), ""]
        parts += ablation_section(results)
        for path in plot_runs(results, folder, name):
            parts += [f"![{path.stem}]({path.name})", ""]
        if explanations and name in explanations:
            parts += explain_section(explanations[name], folder, name)
    parts += [
        "Δ columns are relative to the fp32 run; time and activation memory are ratios to it.",
        "Activations: bytes autograd saves for backward in one forward pass (parameters excluded).",
        "State B/param: parameters, gradients, master copies and optimizer state per parameter"
        " (held by each rank, under a process group).",
    ]
    report = folder / "report.md"
    report.write_text("\n".join(parts) + "\n")
    return report
