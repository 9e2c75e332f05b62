"""The ``mixprec`` command.

Subcommands:
    formats   the number formats as a table (``--json`` for machines).
    doctor    what this device can do, the precision ``auto`` picks and why, the op table.
    compare   train built-in tasks under several precisions side by side; writes a report.
    train     train one task under one precision, with checkpoints and ``--resume``.

``train`` and ``compare`` launched by ``torchrun --nproc-per-node N -m mixprec ...`` train
data-parallel over the N ranks (:mod:`mixprec.distributed.launch`), as DDP replicas or, with
``--strategy fsdp2``, as FSDP2 shards; rank 0 prints and writes the report.
    advise    recommend a precision policy for a built-in task's model, with the reasons.
    explain   per module of a task's model: the format and bytes of weights, compute, saved
              activations, gradients and master copy under a policy (a table and a PNG).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mixprec import __version__
from mixprec.app.cli_info import add_info_parsers
from mixprec.app.cli_plan import add_plan_parser


def _task_options(args: argparse.Namespace, task_name: str) -> Any:
    from mixprec.app.model_size import charlm_lr, charlm_params, sized_task_options
    from mixprec.app.tasks import TASKS, TaskConfig, make_task

    text_task = task_name in _TEXT_TASKS
    if args.data is not None and not text_task and args.task not in _TASK_SETS:
        raise ValueError(
            f"--data {args.data!r} is for the charlm task only (and gpt2, on the same text): "
            f"{task_name} trains on its own bundled data; drop --data, or use --task charlm"
        )
    defaults = TASKS[task_name].DEFAULT_CONFIG
    config = TaskConfig(
        steps=args.steps if args.steps is not None else defaults.steps,
        batch_size=args.batch_size if args.batch_size is not None else defaults.batch_size,
        lr=args.lr if args.lr is not None else defaults.lr,
        weight_decay=defaults.weight_decay,
        seed=args.seed,
    )
    options: dict[str, Any] = {"data": args.data} if text_task and args.data is not None else {}
    if args.model_size is not None:
        options.update(sized_task_options(task_name, args.model_size))
        if args.lr is None:  # a size's own rate: the small task's diverges a billion-param model
            size = charlm_params(options["d_model"], options["n_layers"])  # the shape's count
            config = replace(config, lr=charlm_lr(size, defaults.lr))
    task = make_task(task_name, config, **options)
    if args.model_size is not None:
        task.meta = True  # type: ignore[attr-defined]  # built on meta, materialized by prepare
    return task


def _progress() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from mixprec.distributed import launch

    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=False,
        disable=launch.rank() != 0,  # one bar per run, not one per rank
    )


def _data_parallel(command: Any) -> Any:
    """Run ``command(args)`` inside torchrun's process group (when launched by torchrun), with
    this rank's device in ``args.device``; output of ranks other than 0 is silenced."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        from mixprec.distributed import launch

        with launch.torchrun_group(args.device) as device:
            args.device = device
            if launch.rank() != 0:
                with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                    return int(command(args))
            return int(command(args))

    return run


def _output_folder(path: str) -> Path:
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output folder {path!r} is a file; give a folder path")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _advance(progress: Any, bar: Any, done: int) -> None:
    progress.update(bar, completed=done)


def _run_line(task: str, result: Any, seconds: float) -> str:
    """One line per finished run, for logs: what ran, how long it took and where it ended.

    Example:
        >>> from types import SimpleNamespace
        >>> run = SimpleNamespace(recipe="bf16-mixed", steps=40, final_train_loss=1.25,
        ...                       metrics={"val_loss": 1.5}, skipped_steps=0)
        >>> _run_line("charlm", run, 12.34)
        'charlm bf16-mixed: 40 steps in 12.3 s, train loss 1.25, val_loss 1.5, 0 skipped'
    """
    metrics = ", ".join(f"{key} {value:.4g}" for key, value in result.metrics.items())
    return (
        f"{task} {result.recipe}: {result.steps} steps in {seconds:.1f} s, train loss "
        f"{result.final_train_loss:.4g}{', ' + metrics if metrics else ''}, "
        f"{result.skipped_steps} skipped"
    )


def split_precisions(text: str) -> list[str]:
    """``--precisions`` split at its commas, except those inside parentheses, which belong to a
    recipe's options: ``"bf16-mixed,nvfp4-mixed(rht=false,sr_grad=false)"`` is two runs."""
    return [p.strip() for p in re.split(r",(?![^()]*\))", text) if p.strip()]


def _compare(args: argparse.Namespace) -> int:
    from mixprec.app.report import comparison_rows, world_line, write_report
    from mixprec.app.runner import Recipe, RunResult, train

    recipes = [Recipe.parse(p) for p in split_precisions(args.precisions)]
    if not recipes:
        raise ValueError("--precisions is empty; e.g. --precisions fp32,bf16-mixed")
    from mixprec.app.tasks import DEFAULT_TASKS, TASKS

    names = {"default": list(DEFAULT_TASKS), "all": list(TASKS)}.get(args.task, [args.task])
    tasks = {name: _task_options(args, name) for name in names}
    folder = _output_folder(args.out)
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = 120  # a log file has room for the whole table
    groups: dict[str, Sequence[RunResult]] = {}
    with _progress() as progress:
        for name, task in tasks.items():
            results = []
            for recipe in recipes:
                bar = progress.add_task(f"{name} {recipe.name}", total=task.config.steps)
                started = time.perf_counter()
                result = train(
                    task,
                    recipe,
                    folder / name / recipe.name.replace("/", "_"),
                    device=args.device,
                    backend=args.backend,
                    overwrite=True,  # a comparison is recomputed from scratch every time
                    strategy=args.strategy,
                    step_in_backward=args.step_in_backward,
                    on_step=functools.partial(_advance, progress, bar),
                )
                results.append(result)
                if not console.is_terminal:  # a log gets a line per run; a terminal has the bars
                    print(_run_line(name, result, time.perf_counter() - started), flush=True)
            groups[name] = results
    for name, runs in groups.items():
        headers, rows = comparison_rows(runs, compact=True)
        table = Table(title=f"{name}", title_justify="left", box=None, pad_edge=False)
        for header in headers:
            left = header == "precision"
            table.add_column(header, justify="left" if left else "right", no_wrap=left)
        for row in rows:
            table.add_row(*row)
        console.print(table)
        backends = sorted({r.backend for r in runs})
        console.print(f"  settings {runs[0].task}; backends: {', '.join(backends)}")
        if runs[0].world_size > 1:
            console.print(f"  {world_line(runs)}")
    from mixprec.distributed import launch

    if launch.rank() == 0:
        explanations = _explanations(tasks, recipes, args.device)
        report = write_report(groups, folder, "mixprec " + " ".join(sys.argv[1:]), explanations)
        console.print(f"report: {report}")
    return 0


def _explanations(tasks: dict[str, Any], recipes: Sequence[Any], device: str) -> dict[str, Any]:
    """Per task, where memory and precision go under the first 16-bit recipe compared."""
    from mixprec.app.model_size import eager_model
    from mixprec.diagnostics import explain
    from mixprec.policy import Policy

    policies = [Policy.parse(r.policy) for r in recipes]
    mixed = next((p for p in policies if p.compute.bits <= 16), None)
    if mixed is None:
        return {}
    return {
        name: explain(eager_model(task, device), mixed, task.batch(0)[0].to(device))
        for name, task in tasks.items()
    }


def _train(args: argparse.Namespace) -> int:
    from mixprec.app.runner import Recipe, train

    recipe = Recipe.parse(args.precision)
    task = _task_options(args, args.task)
    folder = Path(args.out)
    if args.resume and not folder.is_file() and not (folder / "checkpoint.pt").exists():
        print(
            f"mixprec train: no checkpoint in {args.out!r} to resume from; starting from scratch",
            file=sys.stderr,
        )
    with _progress() as progress:
        bar = progress.add_task(f"{args.task} {recipe.name}", total=task.config.steps)
        result = train(
            task,
            recipe,
            folder,
            device=args.device,
            backend=args.backend,
            resume=args.resume,
            overwrite=args.overwrite,
            checkpoint_every=args.checkpoint_every,
            strategy=args.strategy,
            step_in_backward=args.step_in_backward,
            on_step=lambda done: progress.update(bar, completed=done),
        )
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
    where = f" on {result.world_size} ranks ({result.strategy})" if result.world_size > 1 else ""
    Console(highlight=False).print(
        f"{args.task} {recipe.name}{where}: train loss {result.final_train_loss:.4f}, {metrics}, "
        f"{result.ms_per_step:.1f} ms/step, skipped {result.skipped_steps} -> {folder}"
    )
    if result.memory is not None:
        from mixprec.app.memory_figures import memory_line

        print(memory_line(recipe.name, result.memory))
    return 0


def _advise(args: argparse.Namespace) -> int:
    from mixprec.app.model_size import eager_model
    from mixprec.app.runner import available_memory, bytes_per_sample, check_batch_memory
    from mixprec.diagnostics import advise
    from mixprec.session.setup import check_device

    check_device(args.device)
    task = _task_options(args, args.task)
    model = eager_model(task, args.device)
    per_sample = bytes_per_sample(task, model)
    check_batch_memory(task.config.batch_size, per_sample, available_memory(args.device))
    inputs, target = (t.to(args.device) for t in task.batch(0))
    advice = advise(model, (inputs, target), task.loss, args.device, threshold_db=args.threshold_db)
    if args.json:
        print(
            json.dumps(
                {
                    "policy": advice.policy,
                    "backend": advice.backend,
                    "init_scale": advice.init_scale,
                    "reasons": list(advice.reasons),
                    "fp16_ruled_out": list(advice.fp16_ruled_out),
                    "rejected_islands": list(advice.rejected),
                    "scaler_options": advice.scaler_options,
                },
                indent=2,
            )
        )
    else:
        Console(highlight=False).print(str(advice))
    return 0


def _explain(args: argparse.Namespace) -> int:
    from mixprec.app.model_size import eager_model
    from mixprec.diagnostics import explain
    from mixprec.session.setup import check_device

    check_device(args.device)
    task = _task_options(args, args.task)
    model = eager_model(task, args.device)
    inputs, target = (t.to(args.device) for t in task.batch(0))
    result = explain(model, args.precision, (inputs, target), backend=args.backend)
    if args.json:
        totals = result.totals()
        print(json.dumps({"policy": result.policy, "loss_scaling": result.loss_scaling,
                          "totals": totals,
                          "modules": [m.__dict__ for m in result.modules]}, indent=2))  # fmt: skip
    else:
        print(result.markdown())
    if args.out is not None:
        folder = _output_folder(args.out)
        (folder / "explain.md").write_text(result.markdown() + "\n![explain](explain.png)\n")
        result.plot(folder / "explain.png")
        if not args.json:
            print(f"wrote {folder / 'explain.md'} and {folder / 'explain.png'}")
    return 0


def _positive_int(name: str) -> Any:
    """An argparse type: an integer >= 1, refused with a message naming ``name``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {value}")
        return value

    return parse


_MAX_LR = 1.0
_TEXT_TASKS = ("charlm", "gpt2")  # the tasks that train on text, and so take --data
_TASK_SETS = ("default", "all")  # --task values that name several tasks


def _learning_rate(text: str) -> float:
    """An argparse type: a learning rate in (0, 1] for the tasks' AdamW."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"lr must be a number, got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= _MAX_LR):
        raise argparse.ArgumentTypeError(
            f"lr must be a finite number in (0, {_MAX_LR:g}], got {text!r}: the tasks train with "
            "AdamW, which moves every weight by about lr per step, so a larger lr only diverges "
            "(the defaults are 1e-4 to 2e-3)"
        )
    return value


def _seed(text: str) -> int:
    """An argparse type: a seed the tasks' generators accept."""
    from mixprec.app.tasks import MAX_SEED

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed must be an integer, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(
            f"seed must be an integer from 0 to {MAX_SEED} (2**32 - 1), got {text}"
        )
    return value


def _folder(text: str) -> str:
    """An argparse type: a non-empty folder path."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the folder is an empty path; give one, e.g. runs/x")
    return text


def _finite(name: str) -> Any:
    """An argparse type: a finite number."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number, got {text!r}")
        return value

    return parse


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--steps", type=_positive_int("steps"), default=None, help="training steps (task default)"
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int("batch size"),
        default=None,
        help="batch size (task default); checked against the memory the device has",
    )
    parser.add_argument(
        "--lr",
        type=_learning_rate,
        default=None,
        help=f"AdamW learning rate in (0, {_MAX_LR:g}] (task default; with --model-size, "
        "GPT-3's rate for the size from 125M parameters on)",
    )
    parser.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="seed of the model's initialisation and the batches, 0 to 2**32 - 1 (%(default)s)",
    )
    parser.add_argument("--data", default=None, help="charlm only: train on this UTF-8 text file")
    parser.add_argument(
        "--model-size",
        default=None,
        help="charlm only: scale the transformer to this many parameters (3e9, 3B, 350M), "
        "width and depth chosen for it, built on the meta device (learning rate: see --lr)",
    )
    parser.add_argument(
        "--device", default="cpu", help="where to train: cpu, cuda, cuda:1 ... (%(default)s)"
    )
    parser.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "native", "emulated"),
        help="autocast backend: torch's kernels or emulated 16-bit numerics (%(default)s)",
    )
    parser.add_argument(
        "--step-in-backward",
        action="store_true",
        help="step each parameter inside backward and free its gradient (no gradient buffer; "
        "not with fp16 loss scaling)",
    )
    from mixprec.app.runner import STRATEGIES

    parser.add_argument(
        "--strategy",
        default=None,
        choices=STRATEGIES,
        help="under torchrun: ddp (replicas, the default) or fsdp2 (params, grads and optimizer "
        "state sharded over the ranks)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``mixprec`` command."""
    parser = argparse.ArgumentParser(
        prog="mixprec", description="Mixed precision training toolkit for PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"mixprec {__version__}")
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, help="what to do (COMMAND -h for more)"
    )
    add_info_parsers(sub)

    from mixprec.app.runner import DEFAULT_RECIPES
    from mixprec.app.tasks import TASKS

    compare = sub.add_parser("compare", help="train under several precisions side by side")
    compare.add_argument(
        "--task",
        default="default",
        choices=(*_TASK_SETS, *TASKS),
        help="the built-in task to train (default: charlm and cnn, a transformer and a CNN; "
        "all: every task, gpt2 needs transformers)",
    )
    compare.add_argument(
        "--precisions",
        default=",".join(DEFAULT_RECIPES),
        help="comma-separated POLICY[/UPDATE] list; a 4-bit preset takes recipe options for an "
        "ablation, e.g. nvfp4-mixed,'nvfp4-mixed(rht=false)' (default: %(default)s)",
    )
    compare.add_argument(
        "--out",
        type=_folder,
        default="runs/compare",
        help="output folder, recomputed on every run (%(default)s)",
    )
    _add_run_options(compare)
    compare.set_defaults(run=_data_parallel(_compare))

    train = sub.add_parser("train", help="train one task under one precision")
    train.add_argument(
        "--task", required=True, choices=tuple(TASKS), help="the built-in task to train"
    )
    train.add_argument("--precision", default="bf16-mixed", help="POLICY[/UPDATE] (%(default)s)")
    train.add_argument(
        "--out", required=True, type=_folder, help="the run folder (metrics, checkpoint, result)"
    )
    existing = train.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in OUT from OUT/checkpoint.pt (from scratch if there is none)",
    )
    existing.add_argument(
        "--overwrite", action="store_true", help="replace a run already in OUT with a new one"
    )
    train.add_argument(
        "--checkpoint-every",
        type=_positive_int("checkpoint-every"),
        default=50,
        help="also checkpoint every this many steps, >= 1 (%(default)s)",
    )
    _add_run_options(train)
    train.set_defaults(run=_data_parallel(_train))

    advise = sub.add_parser("advise", help="recommend a precision policy for a task's model")
    advise.add_argument(
        "--task", required=True, choices=tuple(TASKS), help="the built-in task's model"
    )
    advise.add_argument(
        "--threshold-db",
        type=_finite("threshold-db"),
        default=20.0,
        help="per-layer SNR floor in dB (%(default)s)",
    )
    advise.add_argument("--json", action="store_true", help="print JSON")
    _add_run_options(advise)
    advise.set_defaults(run=_advise)

    explain = sub.add_parser(
        "explain", help="show where a task model's memory and precision go under a policy"
    )
    explain.add_argument(
        "--task", required=True, choices=("digits", "charlm"), help="the built-in task's model"
    )
    explain.add_argument("--precision", default="bf16-mixed", help="the policy (%(default)s)")
    explain.add_argument(
        "--out", default=None, type=_folder, help="also write explain.md and explain.png here"
    )
    explain.add_argument("--json", action="store_true", help="print JSON")
    _add_run_options(explain)
    explain.set_defaults(run=_explain)
    add_plan_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mixprec`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (ValueError, TypeError, RuntimeError, OSError) as err:
        # A user's mistake (bad value, missing device, unreadable file) gets one line, no traceback.
        parser.exit(2, f"mixprec {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
