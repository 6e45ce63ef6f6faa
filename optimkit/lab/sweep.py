"""The sweep: tune every optimizer on every task under one protocol, then rerun the winners.

For each (task, optimizer) pair a :class:`Study` says which trials can run now, given the
trials already finished. Its state is nothing but the results file, so a sweep interrupted at
any point resumes exactly where it stopped: a finished trial (same key) is never run again.

Protocol, the same for every optimizer:

1. the same quasi-random points of the unit square, mapped to (lr, weight decay) around each
   optimizer's default lr (:class:`~optimkit.lab.search.SearchSpace`);
2. the same schedule (linear warm-up, cosine decay to zero at the end of each run's budget);
3. random search (every point at the full budget) or Hyperband (same points, adaptive budget);
4. the winner is the best *validation* metric at the full budget;
5. the winner is rerun with ``seeds - 1`` more seeds; reports use the *test* split of these runs.
"""

from __future__ import annotations

import concurrent.futures as futures
import functools
import math
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import optimkit
from optimkit.lab.errors import LabError, OptimizerChoiceError
from optimkit.lab.results import RESULTS_FILENAME, ResultsFile, environment
from optimkit.lab.search import (
    FALLBACK_LR,
    OptimizerSpec,
    SearchSpace,
    hyperband_brackets,
    unit_points,
)
from optimkit.lab.task import SIZES, Task, check_task_reference, task_reference_is_module
from optimkit.lab.trial import TrialSpec, load_task_cached, run_trial, worker_init

__all__ = [
    "Protocol",
    "Study",
    "SweepOutcome",
    "run_sweep",
    "rank_key",
    "describe_optimizer",
    "SEARCH_METHODS",
    "default_jobs",
]

SEARCH_METHODS = ("random", "hyperband")


def default_jobs() -> int:
    """Worker processes by default: the cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Protocol:
    """Settings shared by every optimizer in a sweep (stored in the results file).

    Attributes:
        search: ``"random"`` (``trials`` points, each at the full budget) or ``"hyperband"``.
        trials: configurations per optimizer for random search.
        seeds: runs of the winner, counting its tuning run (seed 0).
        size: task size, ``"small"`` or ``"large"``.
        device: torch device of every trial.
        warmup_fraction: share of each run's steps spent in linear warm-up.
        space: the lr x weight-decay window.
        sequence_seed: seed of the scrambled Halton sequence.
        hyperband_eta, hyperband_rungs: Hyperband's halving rate and rungs per bracket.
    """

    search: str = "random"
    trials: int = 6
    seeds: int = 3
    size: str = "small"
    device: str = "cpu"
    warmup_fraction: float = 0.05
    space: SearchSpace = field(default_factory=SearchSpace)
    sequence_seed: int = 0
    hyperband_eta: int = 3
    hyperband_rungs: int = 3
    steps_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.search not in SEARCH_METHODS:
            raise LabError(f"unknown search {self.search!r}; choose from {SEARCH_METHODS}")
        if self.trials < 1:
            raise LabError(f"trials must be >= 1, got {self.trials}")
        if self.seeds < 1:
            raise LabError(f"seeds must be >= 1, got {self.seeds}")
        if self.size not in SIZES:
            raise LabError(f"unknown size {self.size!r}; sizes: {', '.join(SIZES)}")
        if not self.steps_scale > 0:
            raise LabError(f"steps_scale must be > 0, got {self.steps_scale}")

    def scaled(self, steps: int) -> int:
        """A task's step budget (or interval) under ``steps_scale``, at least 1."""
        return max(1, round(steps * self.steps_scale))

    @property
    def point_count(self) -> int:
        """How many unit points the search draws."""
        if self.search == "random":
            return self.trials
        brackets = hyperband_brackets(1000, self.hyperband_eta, self.hyperband_rungs)
        return sum(len(b.configs) for b in brackets)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Protocol:
        """The protocol stored in a results file."""
        hyperband = data.get("hyperband") or {}
        space = data.get("space") or {}
        default_space = SearchSpace()
        return cls(
            search=data["search"],
            trials=int(data.get("trials", cls.__dataclass_fields__["trials"].default)),
            seeds=int(data["seeds"]),
            size=data["size"],
            device=data.get("device", "cpu"),
            warmup_fraction=float(data.get("warmup_fraction", 0.05)),
            space=SearchSpace(
                tuple(space.get("lr_decades", default_space.lr_decades)),  # type: ignore[arg-type]
                tuple(  # type: ignore[arg-type]
                    space.get("log10_weight_decay", default_space.log10_weight_decay)
                ),
            ),
            sequence_seed=int(data.get("sequence_seed", 0)),
            hyperband_eta=int(hyperband.get("eta", 3)),
            hyperband_rungs=int(hyperband.get("rungs", 3)),
            steps_scale=float(data.get("steps_scale", 1.0)),
        )

    def as_dict(self) -> dict[str, Any]:
        """The protocol as stored; a results file is resumed only under an equal protocol."""
        result: dict[str, Any] = {
            "search": self.search,
            "seeds": self.seeds,
            "size": self.size,
            "device": self.device,
            "warmup_fraction": self.warmup_fraction,
            "schedule": "linear warm-up, cosine decay to 0 at the end of the budget",
            "space": self.space.as_dict(),
            "sequence": "scrambled Halton",
            "sequence_seed": self.sequence_seed,
            "points": unit_points(self.point_count, self.sequence_seed),
            "steps_scale": self.steps_scale,
        }
        if self.search == "random":
            result["trials"] = self.trials
        else:
            result["hyperband"] = {"eta": self.hyperband_eta, "rungs": self.hyperband_rungs}
        return result


def rank_key(record: dict[str, Any] | None, higher_is_better: bool) -> float:
    """Sort key of a trial by validation metric, best first; diverged or missing last."""
    if record is None or record.get("diverged") or record.get("val_metric") is None:
        return math.inf
    value = float(record["val_metric"])
    return -value if higher_is_better else value


def describe_optimizer(spec: OptimizerSpec) -> dict[str, Any]:
    """Registry facts about an optimizer, checked to accept the spec's fixed hyperparameters.

    Raises :class:`OptimizerChoiceError` naming the registered optimizers when ``spec.name``
    is unknown, or with the optimizer's own message when it rejects a hyperparameter.
    """
    names = optimkit.available()
    lowered = {n.lower(): n for n in names}
    if spec.name.lower() not in lowered:
        raise OptimizerChoiceError(
            f"unknown optimizer {spec.name!r}; available: {', '.join(names)}"
        )
    name = lowered[spec.name.lower()]
    record = optimkit.info(name)
    defaults = dict(record.defaults)
    default_lr = defaults.get("lr")
    if not isinstance(default_lr, (int, float)) or isinstance(default_lr, bool) or default_lr <= 0:
        default_lr = FALLBACK_LR
    # a hyperparameter the spec names stays as given (docs/lab.md), also lr and weight_decay
    tunable = sorted(({"lr", "weight_decay"} & set(defaults)) - set(spec.fixed_hyperparams))
    probe = torch.zeros(2, requires_grad=True)
    hyperparams = {**spec.fixed_hyperparams, **dict.fromkeys(tunable, 1e-3)}
    try:
        optimkit.create(name, [probe], **hyperparams)
    except (TypeError, ValueError) as error:
        raise OptimizerChoiceError(f"optimizer {spec.label}: {error}") from None
    paper = getattr(record, "paper", None)
    return {
        "name": name,
        "label": spec.label,
        "fixed": spec.fixed_hyperparams,
        "default_lr": float(default_lr),
        "tunable": tunable,
        "category": getattr(record, "category", ""),
        "paper": getattr(paper, "title", ""),
        "arxiv": getattr(paper, "arxiv", ""),
        "year": getattr(paper, "year", None),
        "needs_closure": bool(getattr(record, "needs_closure", False)),
    }


class Study:
    """Tuning and seed reruns of one optimizer on one task, driven by finished trials."""

    def __init__(
        self,
        task: dict[str, Any],
        optimizer: dict[str, Any],
        protocol: Protocol,
        points: Sequence[Sequence[float]],
    ) -> None:
        self.task = task
        self.optimizer = optimizer
        self.protocol = protocol
        self.points = points
        self.steps = protocol.scaled(int(task["steps"]))
        self.eval_every = protocol.scaled(int(task["eval_every"]))
        self.higher_is_better = bool(task["higher_is_better"])
        self.failed = False
        self.brackets = (
            hyperband_brackets(self.steps, protocol.hyperband_eta, protocol.hyperband_rungs)
            if protocol.search == "hyperband"
            else []
        )

    @property
    def label(self) -> str:
        return self.optimizer["label"]

    def key(self, config: int, steps: int, seed: int) -> str:
        """The trial's identity: same task, optimizer, configuration, budget and seed."""
        return f"{self.task['name']}|{self.label}|c{config}|n{steps}|s{seed}"

    def hyperparams(self, config: int) -> dict[str, Any]:
        tuned = self.protocol.space.hyperparams(
            list(self.points[config]), self.optimizer["default_lr"], set(self.optimizer["tunable"])
        )
        return {**self.optimizer["fixed"], **tuned}

    def spec(self, config: int, steps: int, seed: int, phase: str) -> TrialSpec:
        return TrialSpec(
            key=self.key(config, steps, seed),
            task=self.task["name"],
            task_reference=self.task["reference"],
            size=self.protocol.size,
            optimizer=self.label,
            optimizer_name=self.optimizer["name"],
            hyperparams=self.hyperparams(config),
            steps=steps,
            seed=seed,
            device=self.protocol.device,
            warmup_fraction=self.protocol.warmup_fraction,
            phase=phase,
            config=config,
            eval_every=self.eval_every,
        )

    # ---------------------------------------------------------------------------------------
    def _tuning_stage(self, trials: dict[str, Any]) -> tuple[list[TrialSpec], list[TrialSpec]]:
        """(tuning trials runnable now, tuning trials at the full budget planned so far)."""
        if self.protocol.search == "random":
            specs = [self.spec(c, self.steps, 0, "tune") for c in range(self.protocol.trials)]
            return [s for s in specs if s.key not in trials], specs
        runnable: list[TrialSpec] = []
        finals: list[TrialSpec] = []
        for bracket in self.brackets:
            configs = list(bracket.configs)
            for rung, budget in enumerate(bracket.budgets):
                specs = [
                    self.spec(c, budget, 0, f"hyperband b{bracket.index} r{rung}") for c in configs
                ]
                missing = [s for s in specs if s.key not in trials]
                if budget == self.steps:
                    finals.extend(specs)
                if missing:
                    runnable.extend(missing)
                    break
                ranked = sorted(
                    specs, key=lambda s: (rank_key(trials[s.key], self.higher_is_better), s.config)
                )
                configs = [s.config for s in ranked[: bracket.keep[rung]]]
        return runnable, finals

    def winner(self, trials: dict[str, Any]) -> int | None:
        """Config index of the tuned winner, or ``None`` while tuning is unfinished."""
        runnable, finals = self._tuning_stage(trials)
        if runnable or not finals:
            return None
        best = min(finals, key=lambda s: (rank_key(trials[s.key], self.higher_is_better), s.config))
        return best.config

    def runnable(self, trials: dict[str, Any]) -> list[TrialSpec]:
        """Trials whose prerequisites are finished and that have not run yet."""
        if self.failed:
            return []
        tuning, _ = self._tuning_stage(trials)
        if tuning:
            return tuning
        winner = self.winner(trials)
        if winner is None:
            return []
        seeds = [self.spec(winner, self.steps, s, "seed") for s in range(self.protocol.seeds)]
        return [s for s in seeds if s.key not in trials]

    def seed_keys(self, trials: dict[str, Any]) -> list[str]:
        """Keys of the winner's runs, one per seed (empty while tuning is unfinished)."""
        winner = self.winner(trials)
        if winner is None:
            return []
        return [self.key(winner, self.steps, s) for s in range(self.protocol.seeds)]

    def planned(self) -> list[int]:
        """Budgets (steps) of every trial the study will run, in order."""
        extra = [self.steps] * (self.protocol.seeds - 1)
        if self.protocol.search == "random":
            return [self.steps] * self.protocol.trials + extra
        budgets: list[int] = []
        for bracket in self.brackets:
            counts = [len(bracket.configs), *bracket.keep[:-1]]
            for count, budget in zip(counts, bracket.budgets):
                budgets.extend([budget] * count)
        return budgets + extra

    def done(self, trials: dict[str, Any]) -> bool:
        return not self.failed and not self.runnable(trials) and bool(self.seed_keys(trials))


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
class _InlineExecutor(futures.Executor):
    """Runs each call at submission, in this process (``--jobs 1``)."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[override]
        future: futures.Future = futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # noqa: BLE001 - handed to the caller via the future
            if isinstance(error, KeyboardInterrupt):
                raise
            future.set_exception(error)
        return future


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers fork from a clean server process that has imported torch and the lab once
    ("forkserver"); where that start method is missing, each worker is a fresh interpreter."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["optimkit.lab.trial"])
        return context
    return multiprocessing.get_context("spawn")


def _guarded(runner: Callable[[TrialSpec], dict[str, Any]], spec: TrialSpec) -> dict[str, Any]:
    """Run a trial; an exception comes back as one RuntimeError carrying its traceback."""
    try:
        return runner(spec)
    except Exception as error:
        # keep the remote traceback readable in the parent
        details = "".join(traceback.format_exception(error)).rstrip()
        raise RuntimeError(f"{type(error).__name__}: {error}\n{details}") from None


@dataclass
class SweepOutcome:
    """What a sweep did: the results document, trials run now, and failures."""

    results: ResultsFile
    resumed: bool
    trials_run: int
    trials_reused: int
    errors: list[str]
    wall_time_s: float
    studies: list[Study]


def _study_list(
    results: ResultsFile,
    tasks: Sequence[Task],
    references: Sequence[str],
    optimizers: Sequence[dict[str, Any]],
    protocol: Protocol,
) -> list[Study]:
    points = results.data["protocol"]["points"]
    studies = []
    for task, reference in zip(tasks, references):
        description = {**task.describe(), "reference": reference}
        results.register_task(description)
        for optimizer in optimizers:
            studies.append(Study(results.data["tasks"][task.name], optimizer, protocol, points))
    for optimizer in optimizers:
        results.register_optimizer(optimizer["label"], optimizer)
    return studies


def run_sweep(
    task_references: Sequence[str],
    optimizers: Sequence[OptimizerSpec],
    protocol: Protocol,
    out_dir: str | os.PathLike[str],
    *,
    jobs: int = 1,
    progress: Any = None,
    runner: Callable[[TrialSpec], dict[str, Any]] | None = None,
) -> SweepOutcome:
    """Run (or resume) a sweep; every finished trial is saved to ``out_dir/results.json``.

    Args:
        task_references: built-in task names or ``package.module:function`` references.
        optimizers: optimizers to compare (checked against the registry first).
        protocol: the tuning protocol.
        out_dir: folder of the results file; an existing compatible file is resumed.
        jobs: worker processes (1 runs trials in this process).
        progress: an object with ``start(studies, trials)``, ``advance(record)`` and
            ``stop()`` (see :class:`optimkit.lab.progress.SweepProgress`), or ``None``.
        runner: the trial function when ``jobs == 1`` (tests count calls with it).

    Raises:
        LabError: unknown task or optimizer, a task module that fails to import, or a results
            file that is corrupt, of another version or of another protocol.
    """
    started = time.perf_counter()
    if jobs < 1:
        raise LabError(f"jobs must be >= 1, got {jobs}")
    if not task_references:
        raise LabError("no task to run")
    if not optimizers:
        raise LabError("no optimizer to run")
    for reference in task_references:
        check_task_reference(reference)
    described = [describe_optimizer(spec) for spec in optimizers]
    if protocol.device.startswith("cuda") and not torch.cuda.is_available():
        raise LabError("--device cuda was asked for, but torch sees no CUDA device")
    if any(task_reference_is_module(r) for r in task_references) and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # before workers start: they inherit sys.path

    executor: futures.Executor
    if jobs == 1:
        executor = _InlineExecutor()
        call = functools.partial(_guarded, runner or run_trial)
    else:
        executor = futures.ProcessPoolExecutor(
            jobs, mp_context=_worker_context(), initializer=worker_init
        )
        call = functools.partial(_guarded, run_trial)
        # workers start and build the tasks while this process builds them too
        for _ in range(jobs):
            executor.submit(_prepare_tasks, tuple(task_references), protocol.size)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        return _sweep(
            executor, call, task_references, described, protocol, Path(out_dir), jobs,
            progress, started,
        )  # fmt: skip
    except BaseException:
        if isinstance(executor, futures.ProcessPoolExecutor):
            executor.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        torch.set_num_threads(threads)
        executor.shutdown(wait=True)


def _prepare_tasks(references: tuple[str, ...], size: str) -> None:
    """Worker warm-up: build (and cache) the sweep's tasks."""
    for reference in references:
        load_task_cached(reference, size)


def _submission_order(
    studies: Sequence[Study],
    ready: dict[int, list[TrialSpec]],
    busy: set[str],
    started_tasks: set[str],
):
    """Runnable trials in submission order: first one trial of each task not started yet (so
    the progress display can time every task early), then the studies in order."""
    chosen: set[str] = set()
    for study in studies:
        name = study.task["name"]
        if name in started_tasks or name in chosen:
            continue
        for spec in ready[id(study)]:
            if spec.key not in busy:
                chosen.add(name)
                yield study, spec
                break
    for study in studies:
        for spec in ready[id(study)]:
            if spec.key not in busy:
                yield study, spec


def _sweep(
    executor: futures.Executor,
    call: Callable[[TrialSpec], dict[str, Any]],
    task_references: Sequence[str],
    described: list[dict[str, Any]],
    protocol: Protocol,
    out: Path,
    jobs: int,
    progress: Any,
    started: float,
) -> SweepOutcome:
    tasks = [load_task_cached(reference, protocol.size) for reference in task_references]
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise LabError(f"task listed twice: {', '.join(duplicates)}")
    results, resumed = ResultsFile.open_for_sweep(
        out / RESULTS_FILENAME, protocol.as_dict(), environment(protocol.device)
    )
    studies = _study_list(results, tasks, task_references, described, protocol)
    results.save()
    trials = results.trials
    reused = sum(
        1 for key in trials if any(key.startswith(f"{s.task['name']}|{s.label}|") for s in studies)
    )
    errors: list[str] = []
    trials_run = 0
    if progress is not None:
        progress.start(studies, trials)
    in_flight: dict[futures.Future, tuple[Study, TrialSpec]] = {}
    ready: dict[int, list[TrialSpec]] = {id(s): s.runnable(trials) for s in studies}
    started_tasks = {r["task"] for r in trials.values()}
    try:
        while True:
            busy = {spec.key for _, spec in in_flight.values()}
            # one queued trial per worker keeps them busy; inline, one at a time
            room = (1 if jobs == 1 else jobs + 1) - len(in_flight)
            for study, spec in _submission_order(studies, ready, busy, started_tasks):
                if room <= 0:
                    break
                in_flight[executor.submit(call, spec)] = (study, spec)
                busy.add(spec.key)
                started_tasks.add(study.task["name"])
                room -= 1
            if not in_flight:
                break
            finished, _ = futures.wait(in_flight, return_when=futures.FIRST_COMPLETED)
            for future in finished:
                study, spec = in_flight.pop(future)
                try:
                    record = future.result()
                except BrokenProcessPool as error:
                    raise LabError(
                        f"a worker process died ({error}); run again to resume"
                    ) from None
                except Exception as error:  # noqa: BLE001 - reported, the study stops
                    study.failed = True
                    message = f"{spec.task} / {spec.optimizer}: {error}"
                    errors.append(message)
                    results.add_error(spec.key, spec.task, spec.optimizer, str(error))
                    if progress is not None:
                        progress.fail(study, message)
                else:
                    results.add_trial(record)
                    trials_run += 1
                    if progress is not None:
                        progress.advance(study, record)
                ready[id(study)] = study.runnable(trials)
    except BaseException:
        # keep every trial that did finish
        for future in in_flight:
            if future.done() and not future.cancelled() and future.exception() is None:
                results.add_trial(future.result())
        raise
    finally:
        if progress is not None:
            progress.stop()
    return SweepOutcome(
        results=results,
        resumed=resumed,
        trials_run=trials_run,
        trials_reused=reused,
        errors=errors,
        wall_time_s=time.perf_counter() - started,
        studies=studies,
    )
