"""The ``optimkit`` command line.

::

    optimkit list [--category C]          registered optimizers, one row each
    optimkit info NAME                    everything the registry knows of one optimizer
    optimkit bench [options]              the lab's quick suite (tune, rerun, report)
    optimkit bench gallery [options]      trajectories on 2-D test functions, one PNG each
    optimkit bench report RESULTS.json    rebuild a report from its results file
    optimkit bench tasks                  the built-in tasks
    optimkit bench speed ...              step-time benchmark (optimkit.lab.speed)
    optimkit bench speed-matrix ...       matrix optimizers vs their matmul floor

Bad input (an unknown name, a broken task module, an unusable results file) prints a message
and exits with status 2; an interrupted sweep exits with 130 and resumes when run again with the
same ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "DEFAULT_TASKS", "RESULTS_ROOT"]

#: the quick suite's tasks, most expensive first (workers pick them up in this order).
DEFAULT_TASKS = (
    "stdlib_lm",
    "mnist1d_cnn",
    "digits_mlp",
    "teacher_student",
    "breast_cancer_logreg",
    "rosenbrock",
    "rastrigin",
    "beale",
    "rotated_quadratic",
    "noisy_quadratic",
)
#: where runs go unless ``--out`` says otherwise.
RESULTS_ROOT = Path("optimkit-results")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _console(stderr: bool = False):
    from rich.console import Console

    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=160)
    return console


def _error(message: str) -> int:
    print(f"optimkit: error: {message}", file=sys.stderr)
    return EXIT_USAGE


# --------------------------------------------------------------------------------------------
# list / info
# --------------------------------------------------------------------------------------------
def command_list(args: argparse.Namespace) -> int:
    """``optimkit list``: a table of the registered optimizers."""
    from rich.table import Table

    import optimkit
    from optimkit.registry import format_state_bytes

    try:
        names = optimkit.available(args.category)
    except (KeyError, ValueError) as error:
        return _error(str(error).strip("'\""))
    table = Table(title=f"optimkit optimizers ({len(names)})")
    for column in ("name", "paper", "year", "category", "state bytes/param"):
        table.add_column(column, justify="right" if column == "state bytes/param" else "left")
    for name in names:
        record = optimkit.info(name)
        paper = getattr(record, "paper", None)
        table.add_row(
            record.name,
            getattr(paper, "title", ""),
            str(getattr(paper, "year", "")),
            str(getattr(record, "category", "")),
            format_state_bytes(record.state_bytes),
        )
    _console().print(table)
    return EXIT_OK


def _resolve_optimizer_name(name: str) -> str | None:
    import optimkit

    matches = [n for n in optimkit.available() if n.lower() == name.lower()]
    return matches[0] if matches else None


def _describe(value: Any) -> str:
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        inner = ", ".join(f"{f.name}={getattr(value, f.name)!r}" for f in dataclasses.fields(value))
        return f"{type(value).__name__}({inner})"
    return repr(value) if not isinstance(value, str) else value


def command_info(args: argparse.Namespace) -> int:
    """``optimkit info NAME``: every field of the optimizer's registry record."""
    from rich.table import Table

    import optimkit

    name = _resolve_optimizer_name(args.name)
    if name is None:
        return _error(
            f"unknown optimizer {args.name!r}; available: {', '.join(optimkit.available())}"
        )
    record = optimkit.info(name)
    if dataclasses.is_dataclass(record):
        items = [(f.name, getattr(record, f.name)) for f in dataclasses.fields(record)]
    else:
        items = sorted(vars(record).items())
    table = Table(title=record.name, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in items:
        if key == "paper" and value is not None:
            for attribute in ("title", "arxiv", "year", "authors", "url"):
                if getattr(value, attribute, None):
                    table.add_row(f"paper.{attribute}", str(getattr(value, attribute)))
            continue
        if key == "defaults" and isinstance(value, dict):
            for hyper, default in value.items():
                table.add_row(f"defaults.{hyper}", repr(default))
            continue
        table.add_row(key, _describe(value))
    _console().print(table)
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------
def _add_sweep_options(parser: argparse.ArgumentParser, default_tasks: str) -> None:
    from optimkit.lab.sweep import SEARCH_METHODS

    parser.add_argument(
        "--optimizers",
        help="comma-separated optimizers, each NAME or NAME(key=value, ...) with fixed "
        "hyperparameters, lr and weight_decay included (not tuned then) (default: "
        "SGD(momentum=0.9), Adam, AdamW, AdaMax, SGDW(momentum=0.9), those registered)",
    )
    parser.add_argument(
        "--tasks", default=None, help=f"comma-separated built-in tasks (default: {default_tasks})"
    )
    parser.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="MODULE:FUNCTION",
        help="a task of your own, package.module:function returning an optimkit.lab.Task "
        "(repeatable; replaces the default tasks unless --tasks is given too)",
    )
    parser.add_argument("--size", choices=("small", "large"), default="small")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    parser.add_argument("--search", choices=SEARCH_METHODS, default="random")
    parser.add_argument(
        "--trials", type=int, default=6, help="random search: configurations per optimizer"
    )
    parser.add_argument("--seeds", type=int, default=3, help="runs of each tuned winner")
    parser.add_argument(
        "--lr-decades",
        type=float,
        nargs=2,
        default=(-1.0, 2.0),
        metavar=("LOW", "HIGH"),
        help="lr window around each optimizer's default, in decades (default: -1 2)",
    )
    parser.add_argument(
        "--steps-scale",
        type=float,
        default=1.0,
        metavar="F",
        help="multiply every task's step budget by F (e.g. 0.1 for a smoke test)",
    )
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: cores)")
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    parser.add_argument("--name", default=None, help=f"output folder {RESULTS_ROOT}/NAME")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="resume the newest run under ./optimkit-results (an --out folder holding a "
        "compatible results.json is always resumed)",
    )
    parser.add_argument(
        "--reference", default="AdamW", help="optimizer whose tuned result is the target"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``optimkit`` (``bench speed`` is forwarded before parsing)."""
    parser = argparse.ArgumentParser(
        prog="optimkit", description="optimkit: PyTorch optimizers and their lab."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    listing = commands.add_parser("list", help="list the registered optimizers")
    listing.add_argument("--category", default=None, help="only this category")
    information = commands.add_parser("info", help="show one optimizer's record")
    information.add_argument("name")

    bench = commands.add_parser(
        "bench",
        help="benchmark optimizers (quick suite; see also: gallery, report, tasks, speed)",
        description="Tune every optimizer on the built-in tasks under one protocol, rerun the "
        "winners with several seeds, and write results.json, report.md, report.html and plots. "
        "Subcommands: gallery, report, tasks, speed, speed-matrix.",
    )
    _add_sweep_options(bench, ", ".join(DEFAULT_TASKS))
    sub = bench.add_subparsers(dest="bench_command", metavar="SUBCOMMAND")
    gallery = sub.add_parser("gallery", help="trajectory PNGs per optimizer on 2-D functions")
    _add_sweep_options(gallery, "the five 2-D functions")
    report = sub.add_parser("report", help="rebuild a report from a results file")
    report.add_argument("results", type=Path, help="a results.json")
    report.add_argument("--out", type=Path, default=None, help="folder (default: beside it)")
    report.add_argument("--reference", default="AdamW")
    sub.add_parser("tasks", help="list the built-in tasks")
    sub.add_parser("speed", help="step-time benchmark (arguments go to optimkit.lab.speed)")
    sub.add_parser(
        "speed-matrix",
        help="matrix optimizers against their matmul floor (optimkit.lab.speed_matrix)",
    )
    return parser


def _bench_speed(argv: list[str]) -> int:
    from optimkit.lab.speed import main as speed_main

    return int(speed_main(argv) or 0)


def _bench_speed_matrix(argv: list[str]) -> int:
    from optimkit.lab.speed_matrix import main as speed_matrix_main

    return int(speed_matrix_main(argv) or 0)


def _default_optimizers():
    import optimkit
    from optimkit.lab.search import DEFAULT_OPTIMIZERS, OptimizerSpec, parse_optimizer_list

    registered = {n.lower(): n for n in optimkit.available()}
    chosen = []
    for spec in parse_optimizer_list(list(DEFAULT_OPTIMIZERS)):
        name = registered.get(spec.name.lower())
        if name is None:
            continue
        accepted = set(optimkit.info(name).defaults)
        fixed = tuple((k, v) for k, v in spec.fixed if k in accepted)
        chosen.append(OptimizerSpec(name, fixed))
    return chosen


def _output_folder(args: argparse.Namespace, prefix: str) -> Path:
    from optimkit.lab.results import RESULTS_FILENAME

    if args.out is not None:
        return args.out
    if args.name:
        return RESULTS_ROOT / args.name
    if args.resume:
        runs = sorted(
            (p.parent for p in RESULTS_ROOT.glob(f"*/{RESULTS_FILENAME}")),
            key=lambda p: (p / RESULTS_FILENAME).stat().st_mtime,
        )
        if runs:
            return runs[-1]
    return RESULTS_ROOT / f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}"


def _results_table(summary) -> Any:
    from rich.table import Table
    from rich.text import Text

    from optimkit.lab.report import format_value

    table = Table(title="Test results of the tuned optimizers: median, min-max over seeds")
    table.add_column("task")
    table.add_column("metric")
    for label in summary.optimizers:
        table.add_column(label, justify="right")
    for task in summary.tasks.values():
        best = task.winners()
        cells = []
        for label in summary.optimizers:
            study = task.studies.get(label)
            if study is None or not study.test_metrics:
                cells.append(Text("-"))
                continue
            text = Text(
                format_value(study.test_median), style="bold green" if label in best else ""
            )
            if len(study.test_metrics) > 1:
                text.append(
                    f"\n{format_value(study.test_min, 3)}-{format_value(study.test_max, 3)}",
                    style="dim",
                )
            if not study.complete:
                text.append(" (partial)", style="yellow")
            cells.append(text)
        arrow = "max" if task.higher_is_better else "min"
        table.add_row(task.name, f"{task.meta['metric']} ({arrow})", *cells)
    return table


def _overview(summary) -> Any:
    from rich.table import Table

    table = Table(title="Overview")
    for column in ("optimizer", "tasks won", "mean rank", f"reached {summary.reference}'s result"):
        table.add_column(column, justify="left" if column == "optimizer" else "right")
    wins, ranks = summary.wins(), summary.mean_ranks()
    reached = summary.ratios("steps")
    for label in summary.optimizers:
        hits = sum(1 for r in reached[label] if r != float("inf"))
        table.add_row(
            label, str(wins[label]), f"{ranks[label]:.2f}", f"{hits}/{len(summary.tasks)}"
        )
    return table


def command_bench(args: argparse.Namespace, gallery: bool = False) -> int:
    """``optimkit bench`` (and ``bench gallery``): sweep, then report."""
    from optimkit.lab.analysis import summarize
    from optimkit.lab.errors import LabError
    from optimkit.lab.gallery import GALLERY_TASKS, write_gallery
    from optimkit.lab.progress import SweepProgress, format_seconds
    from optimkit.lab.report import build_report
    from optimkit.lab.search import SearchSpace, parse_optimizer_list
    from optimkit.lab.sweep import Protocol, default_jobs, run_sweep

    console = _console()
    try:
        if args.optimizers:
            optimizers = parse_optimizer_list(args.optimizers)
        else:
            optimizers = _default_optimizers()
            if not optimizers:
                return _error("none of the default optimizers is registered; use --optimizers")
    except ValueError as error:
        return _error(str(error))
    tasks: list[str] = []
    if args.tasks:
        tasks += [t.strip() for t in args.tasks.split(",") if t.strip()]
    tasks += args.task
    if not tasks:
        tasks = list(GALLERY_TASKS if gallery else DEFAULT_TASKS)
        if "mnist1d_cnn" in tasks and importlib.util.find_spec("mnist1d") is None:
            tasks.remove("mnist1d_cnn")
            console.print("[yellow]skipping mnist1d_cnn[/yellow]: pip install mnist1d to run it")
    jobs = args.jobs if args.jobs is not None else default_jobs()
    out = _output_folder(args, "gallery-" if gallery else "")
    try:
        protocol = Protocol(
            search=args.search,
            trials=args.trials,
            seeds=args.seeds,
            size=args.size,
            device=args.device,
            space=SearchSpace(lr_decades=tuple(args.lr_decades)),
            steps_scale=args.steps_scale,
        )
        progress = None if args.no_progress else SweepProgress(console, jobs)
        console.print(
            f"optimkit bench: {len(tasks)} tasks x {len(optimizers)} optimizers "
            f"({', '.join(s.label for s in optimizers)}), {protocol.search} search, "
            f"{jobs} workers -> {out}"
        )
        outcome = run_sweep(tasks, optimizers, protocol, out, jobs=jobs, progress=progress)
    except LabError as error:
        return _error(str(error))
    except ValueError as error:  # a malformed setting, e.g. the lr window
        return _error(str(error))
    except KeyboardInterrupt:
        console.print(
            f"\n[yellow]interrupted[/yellow]: finished trials are saved in {out}/results.json; "
            f"run again with --out {out} to resume."
        )
        return EXIT_INTERRUPTED

    summary = summarize(outcome.results.data, args.reference)
    files = build_report(summary, out)
    console.print(_results_table(summary))
    console.print(_overview(summary))
    if gallery:
        page, images = write_gallery(summary, out)
        console.print(f"gallery page: {page}  ({len(images)} images in {page.parent / 'gallery'})")
    reused = f", {outcome.trials_reused} reused from the results file" if outcome.resumed else ""
    console.print(
        f"{outcome.trials_run} trials run{reused} in {format_seconds(outcome.wall_time_s)}"
    )
    console.print(f"results: {outcome.results.path}")
    console.print(f"report:  {files.markdown}")
    console.print(f"         {files.html} (self-contained)")
    console.print(f"plots:   {', '.join(str(p) for p in files.plots)}")
    if outcome.errors:
        console.print(f"[red]{len(outcome.errors)} trial(s) failed[/red]; see the report.")
        return EXIT_FAILED
    return EXIT_OK


def command_report(args: argparse.Namespace) -> int:
    """``optimkit bench report RESULTS.json``: rebuild the report from the results file."""
    from optimkit.lab.errors import LabError
    from optimkit.lab.report import write_report

    try:
        files, summary = write_report(args.results, args.out, args.reference)
    except LabError as error:
        return _error(str(error))
    console = _console()
    console.print(_results_table(summary))
    console.print(f"report: {files.markdown}\n        {files.html}")
    return EXIT_OK


def command_tasks() -> int:
    """``optimkit bench tasks``: the built-in tasks and their step budgets."""
    from rich.table import Table

    from optimkit.lab.functions2d import BUILDERS as FUNCTION_BUILDERS
    from optimkit.lab.tasks import BUILDERS

    table = Table(title="built-in tasks (--tasks NAME,...)")
    table.add_column("task")
    table.add_column("what")
    for name, builder in {**BUILDERS, **FUNCTION_BUILDERS}.items():
        summary = (builder.__doc__ or "").strip().splitlines()[0]
        table.add_row(name, summary)
    _console().print(table)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``optimkit`` command line; returns the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:2] == ["bench", "speed"]:
        return _bench_speed(arguments[2:])
    if arguments[:2] == ["bench", "speed-matrix"]:
        return _bench_speed_matrix(arguments[2:])
    parser = build_parser()
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if args.command == "list":
        return command_list(args)
    if args.command == "info":
        return command_info(args)
    if args.command == "bench":
        if args.bench_command == "report":
            return command_report(args)
        if args.bench_command == "tasks":
            return command_tasks()
        return command_bench(args, gallery=args.bench_command == "gallery")
    parser.print_help()
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
