"""Sweeps, resuming them, and the results file they write."""

from __future__ import annotations

import io
import json
import math
import os

import pytest
from lab_helpers import Interrupt, fake_runner

from optimkit.lab import OptimizerChoiceError, ResultsError
from optimkit.lab.results import SCHEMA_VERSION, ResultsFile
from optimkit.lab.search import OptimizerSpec, parse_optimizer_list
from optimkit.lab.sweep import Protocol, Study, describe_optimizer, run_sweep

TASKS = ["digits_mlp", "rosenbrock"]
OPTIMIZERS = parse_optimizer_list("SGD(momentum=0.9), AdamW")


def _planned(protocol: Protocol, outcome) -> int:
    return sum(len(s.planned()) for s in outcome.studies)


def test_random_search_runs_the_plan_and_picks_the_best_validation_lr(tmp_path):
    calls: list[str] = []
    protocol = Protocol(trials=5, seeds=3)
    outcome = run_sweep(TASKS, OPTIMIZERS, protocol, tmp_path, runner=fake_runner(calls))
    assert outcome.trials_run == len(calls) == 2 * 2 * (5 + 2)
    assert len(set(calls)) == len(calls)
    trials = outcome.results.trials
    for study in outcome.studies:
        tuned = [r for r in trials.values()
                 if r["task"] == study.task["name"] and r["optimizer"] == study.label
                 and r["phase"] == "tune"]  # fmt: skip
        sign = -1 if study.higher_is_better else 1
        best = min(tuned, key=lambda r: sign * r["val_metric"])
        assert study.winner(trials) == best["config"]
        seeds = [trials[k]["seed"] for k in study.seed_keys(trials)]
        assert seeds == [0, 1, 2]
        assert study.done(trials)


def test_resume_after_interrupt_does_not_rerun_finished_trials(tmp_path):
    protocol = Protocol(trials=4, seeds=2)
    first_calls: list[str] = []
    interrupted = Interrupt(fake_runner(first_calls), after=7)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(TASKS, OPTIMIZERS, protocol, tmp_path, runner=interrupted)
    saved = ResultsFile.load(tmp_path / "results.json")
    assert len(saved.trials) == 7 == len(first_calls)

    second_calls: list[str] = []
    outcome = run_sweep(TASKS, OPTIMIZERS, protocol, tmp_path, runner=fake_runner(second_calls))
    assert outcome.resumed and outcome.trials_reused == 7
    total = _planned(protocol, outcome)
    assert len(second_calls) == total - 7
    assert not set(first_calls) & set(second_calls)
    assert len(outcome.results.trials) == total

    # a third run has nothing left to do
    third_calls: list[str] = []
    run_sweep(TASKS, OPTIMIZERS, protocol, tmp_path, runner=fake_runner(third_calls))
    assert third_calls == []


def test_a_partial_sweep_is_extended_by_the_full_one(tmp_path):
    protocol = Protocol(trials=3, seeds=2)
    calls: list[str] = []
    run_sweep(["rosenbrock"], OPTIMIZERS[:1], protocol, tmp_path, runner=fake_runner(calls))
    assert len(calls) == 4
    more: list[str] = []
    outcome = run_sweep(TASKS, OPTIMIZERS, protocol, tmp_path, runner=fake_runner(more))
    assert len(more) == 4 * 4 - 4 and outcome.trials_reused == 4


def test_hyperband_runs_successive_halving(tmp_path):
    calls: list[str] = []
    protocol = Protocol(search="hyperband", seeds=2, steps_scale=0.1)
    outcome = run_sweep(["rosenbrock"], OPTIMIZERS[1:], protocol, tmp_path,
                        runner=fake_runner(calls))  # fmt: skip
    study = outcome.studies[0]
    assert len(calls) == len(study.planned()) == 9 + 3 + 1 + 5 + 1 + 3 + 1
    trials = outcome.results.trials
    full = study.steps
    budgets = sorted({r["steps"] for r in trials.values()})
    assert budgets == [round(full / 9), round(full / 3), full]
    # the survivors of the first rung are its three best
    rung0 = [r for r in trials.values() if r["phase"] == "hyperband b0 r0"]
    rung1 = {r["config"] for r in trials.values() if r["phase"] == "hyperband b0 r1"}
    # rosenbrock's f - f* is minimised
    best3 = {r["config"] for r in sorted(rung0, key=lambda r: r["val_metric"])[:3]}
    assert rung1 == best3
    assert study.winner(trials) is not None


def test_real_trials_in_a_process_pool(tmp_path):
    protocol = Protocol(trials=2, seeds=1, steps_scale=0.2)
    outcome = run_sweep(["rosenbrock"], OPTIMIZERS, protocol, tmp_path, jobs=2)
    assert outcome.trials_run == 4 and not outcome.errors
    assert all(r["wall_time_s"] > 0 for r in outcome.results.trials.values())


def test_a_failing_trial_is_reported_and_retried_on_resume(tmp_path):
    def broken(spec):
        raise RuntimeError("boom")

    outcome = run_sweep(["rosenbrock"], OPTIMIZERS[:1], Protocol(trials=2, seeds=1), tmp_path,
                        runner=broken)  # fmt: skip
    assert outcome.errors and "boom" in outcome.errors[0]
    assert outcome.results.data["errors"][0]["key"].startswith("rosenbrock|")
    calls: list[str] = []
    outcome = run_sweep(["rosenbrock"], OPTIMIZERS[:1], Protocol(trials=2, seeds=1), tmp_path,
                        runner=fake_runner(calls))  # fmt: skip
    assert len(calls) == 2 and not outcome.errors


def test_unknown_optimizer_and_bad_hyperparameter(tmp_path):
    with pytest.raises(OptimizerChoiceError) as error:
        describe_optimizer(OptimizerSpec("NoSuchOpt"))
    assert "AdamW" in str(error.value) and "available" in str(error.value)
    with pytest.raises(OptimizerChoiceError, match="SGD"):
        describe_optimizer(OptimizerSpec("SGD", (("momentum", -1.0),)))
    with pytest.raises(OptimizerChoiceError):
        describe_optimizer(OptimizerSpec("Adam", (("no_such_hyper", 1),)))
    facts = describe_optimizer(OptimizerSpec("adamw"))
    assert facts["name"] == "AdamW" and facts["tunable"] == ["lr", "weight_decay"]


def test_a_fixed_lr_or_weight_decay_is_not_tuned():
    """``NAME(lr=...)`` keeps that learning rate in every trial (only the weight decay is
    searched), as docs/lab.md says of every named hyperparameter; it used to be overridden
    by the tuned value without a word."""
    protocol = Protocol(trials=3, seeds=1)
    points = protocol.as_dict()["points"]
    task = {"name": "t", "reference": "t", "steps": 10, "eval_every": 1, "higher_is_better": True}
    for fixed, tunable in ((("lr", 0.1),), ["weight_decay"]), ((("weight_decay", 0.0),), ["lr"]):
        facts = describe_optimizer(OptimizerSpec("Shampoo", fixed))
        assert facts["tunable"] == tunable
        study = Study(task, facts, protocol, points)
        chosen = [study.hyperparams(config) for config in range(3)]
        name, value = fixed[0]
        assert all(hp[name] == value for hp in chosen)
        assert len({hp[tunable[0]] for hp in chosen}) == 3  # the other one is searched


# --------------------------------------------------------------------------------------------
# The results file
# --------------------------------------------------------------------------------------------
def _small_results(tmp_path) -> ResultsFile:
    run_sweep(["rosenbrock"], OPTIMIZERS[:1], Protocol(trials=2, seeds=1), tmp_path,
              runner=fake_runner())  # fmt: skip
    return ResultsFile.load(tmp_path / "results.json")


def test_results_file_is_plain_json_with_a_version(tmp_path):
    results = _small_results(tmp_path)
    raw = json.loads((tmp_path / "results.json").read_text())
    assert raw["version"] == SCHEMA_VERSION and raw["format"] == "optimkit-lab-results"
    assert raw == json.loads(json.dumps(results.data))
    assert len(raw["trials"]) == 2
    assert results.to_json() == json.dumps(results.data, separators=(",", ":"))
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed


def test_non_finite_values_are_stored_as_null(tmp_path):
    results = ResultsFile.new(tmp_path / "r.json", {"search": "random"}, {})
    results.add_trial({"key": "k", "val_metric": math.inf, "curve": [[1, math.nan, 1.0]]})
    raw = json.loads((tmp_path / "r.json").read_text())
    assert raw["trials"]["k"]["val_metric"] is None and raw["trials"]["k"]["curve"][0][1] is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"format": "optimkit-lab-results", "version": 1, "trials": {', "corrupt"),
        ('{"format": "optimkit-lab-results", "version": 99}', "schema version 99"),
        ('{"hello": "world"}', "not an optimkit lab results file"),
        ('{"format": "optimkit-lab-results", "version": 1, "protocol": {}}', "corrupt"),
    ],
)
def test_unusable_results_are_refused_and_left_untouched(tmp_path, content, message):
    path = tmp_path / "results.json"
    path.write_text(content)
    with pytest.raises(ResultsError, match=message):
        run_sweep(["rosenbrock"], OPTIMIZERS[:1], Protocol(trials=1, seeds=1), tmp_path,
                  runner=fake_runner())  # fmt: skip
    assert path.read_text() == content


def test_results_of_another_protocol_are_refused(tmp_path):
    _small_results(tmp_path)
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(ResultsError) as error:
        run_sweep(["rosenbrock"], OPTIMIZERS[:1], Protocol(trials=3, seeds=1), tmp_path,
                  runner=fake_runner())  # fmt: skip
    assert "another protocol" in str(error.value) and "trials" in str(error.value)
    assert (tmp_path / "results.json").read_text() == before


def test_study_keys_identify_configuration_budget_and_seed():
    protocol = Protocol(trials=2, seeds=2)
    task = {"name": "t", "reference": "t", "steps": 10, "eval_every": 1, "higher_is_better": True}
    optimizer = {"name": "AdamW", "label": "AdamW", "fixed": {}, "default_lr": 1e-3,
                 "tunable": ["lr"]}  # fmt: skip
    study = Study(task, optimizer, protocol, protocol.as_dict()["points"])
    specs = study.runnable({})
    assert [s.key for s in specs] == ["t|AdamW|c0|n10|s0", "t|AdamW|c1|n10|s0"]
    good = {"val_metric": 0.9, "diverged": False}
    bad = {"val_metric": 0.5, "diverged": False}
    trials = {specs[0].key: bad, specs[1].key: good}
    assert study.winner(trials) == 1  # higher is better here
    assert [s.key for s in study.runnable(trials)] == ["t|AdamW|c1|n10|s1"]
    trials[specs[1].key] = {"val_metric": None, "diverged": True}
    assert study.winner(trials) == 0  # a diverged run never wins


def test_protocol_round_trips_through_its_stored_form():
    protocol = Protocol(search="hyperband", seeds=2, size="large", steps_scale=0.5)
    assert Protocol.from_dict(protocol.as_dict()) == protocol
    assert Protocol.from_dict(Protocol(trials=4).as_dict()).trials == 4
    assert protocol.scaled(301) == 150 and protocol.scaled(1) == 1
    for bad in ({"search": "grid"}, {"trials": 0}, {"seeds": 0}, {"size": "xl"},
                {"steps_scale": 0.0}):  # fmt: skip
        with pytest.raises(Exception, match="must be|unknown"):
            Protocol(**bad)


def test_default_jobs_counts_usable_cores():
    from optimkit.lab.sweep import default_jobs

    assert 1 <= default_jobs() <= (os.cpu_count() or 1)


def test_default_optimizers_are_the_registered_ones():
    from optimkit.cli import _default_optimizers

    labels = [spec.label for spec in _default_optimizers()]
    assert "AdamW" in labels and "SGD(momentum=0.9)" in labels
    assert all(describe_optimizer(spec) for spec in _default_optimizers())


def test_progress_display_counts_trials_and_estimates_time(tmp_path):
    from rich.console import Console

    from optimkit.lab.progress import SweepProgress, format_seconds

    assert format_seconds(None) == "?" and format_seconds(65) == "1:05"
    assert format_seconds(3725) == "1:02:05"
    console = Console(file=io.StringIO(), width=120, force_terminal=False)
    progress = SweepProgress(console, jobs=2)
    protocol = Protocol(trials=2, seeds=1)
    outcome = run_sweep(["rosenbrock"], OPTIMIZERS, protocol, tmp_path, runner=fake_runner(),
                        progress=progress)  # fmt: skip
    assert outcome.trials_run == 4
    overall = progress.progress.tasks[0]
    assert overall.completed == overall.total == 4
    assert progress.remaining_seconds() == 0.0  # nothing left
    text = console.file.getvalue()
    assert "all tasks" in text and "rosenbrock" in text
