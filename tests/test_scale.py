"""The scale simulation, small: a simulated network in virtual time drives the real task, scheduler and verifier."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.scale import TooSlow, report, scratch_dir, simulate, simulated_verifier
from mltask.definition import parse_definition
from mltask.protocol import TrialSpec
from mltask.provider import evaluator_for
from mltask.scheduler import drive
from mltask.simulation import (
    METER,
    Network,
    SimBackend,
    faked_trials,
    fold_seconds,
    measure,
    synthetic_task,
    trial_seconds,
)
from mltask.task import HyperparameterSearchTask

BLATANT = ("random_scores", "inflate", "claim_failed", "malformed")


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with scratch_dir() as path:
        yield path


@pytest.fixture(scope="module")
def runs(scratch: Path) -> list:
    return [simulate(20, 400, seed, scratch, kinds=BLATANT) for seed in range(3)]


def test_figures_are_measured(runs: list) -> None:
    for fig in runs:
        assert fig.providers == 20 and fig.trials == 400
        assert 0 < fig.provider_busy <= 1
        assert 0 < fig.requestor_cores <= 1  # today's re-runs are serial, on the requestor
        assert 0 < fig.overhead < 1
        assert fig.makespan > 1800  # virtual: half an hour of provider work in a second of real time
        assert 0 < sum(fig.requestor_records.values()) <= fig.requestor_cores * fig.makespan * (1 + 1e-9)
    line = report(runs, 1.0)[-1]
    assert line.startswith("scale: providers=20 trials=400 provider_busy=")
    assert [field.split("=")[0] for field in line.split()[1:]] == [
        "providers", "trials", "provider_busy", "requestor_cores", "overhead", "caught", "faked_left",
        "outcome_changed", "false_bans"]


def test_the_store_accounts_for_every_requestor_rerun(runs: list) -> None:
    """Regression: re-runs for checks a ban cancelled were spent (and charged to the budget) but never stored."""
    for fig in runs:
        assert sum(fig.requestor_records.values()) == pytest.approx(fig.requestor_cores * fig.makespan, rel=1e-9)


def test_the_check_breakdown_covers_every_check_subtask(runs: list) -> None:
    """bench/scale.py's breakdown of check subtasks by kind and by fate adds up to what the overhead counts."""
    for fig in runs:
        kinds = sum(v for k, v in fig.check_costs.items() if k.startswith("kind:"))
        fates = sum(v for k, v in fig.check_costs.items() if k.startswith("fate:"))
        assert kinds == pytest.approx(fates) == pytest.approx(fig.overhead * fig.useful
                                                              - fig.requestor_cores * fig.makespan)
        assert fig.believed is not None and fig.believed[1] > 0
    assert "check subtasks: " in report(runs, 1.0)[0]


def test_blatant_fakers_are_caught_and_honest_providers_are_not(runs: list) -> None:
    for fig in runs:
        assert set(fig.faked) == set(BLATANT)
        assert fig.banned == {name for name, faked in fig.faked.items() if faked}, fig.faked
        assert fig.false_bans == 0
        assert fig.faked_left == 0
        assert not fig.outcome_changed


def test_unverified_lies_show_in_the_figures(scratch: Path) -> None:
    """The figures can fail: with sampled checks off, a saboteur that hides the best configuration wins.

    Without checks nothing catches it; whether the true best lands among its trials depends on
    the hand-out order, so the first of a few seeds where it does shows the outcome changed.
    """
    for seed in range(8):
        fig = simulate(2, 300, seed, scratch, kinds=("saboteur_lower",),
                       verification={"budget": 0.0, "verify_best": False})
        assert fig.faked_left == fig.faked["saboteur_lower"] > 0 and fig.banned == set()
        if fig.outcome_changed:
            break
    assert fig.outcome_changed
    line = report([fig], 1.0)[-1]
    assert "caught=0%" in line and "outcome_changed=100.0%" in line


def test_a_replayer_has_nothing_to_replay(scratch: Path) -> None:
    """v1 drew its checks from random.Random(task seed), and a provider replaying it was never caught (see
    bench/scale.py --policy today); draws from the OS leave it guessing, and it is caught."""
    fig = simulate(6, 600, 0, scratch, kinds=("replayer",))
    assert fig.faked["replayer"] > 0
    assert fig.banned == {"replayer"} and fig.faked_left == 0 and fig.false_bans == 0


def test_a_run_over_its_real_time_budget_is_stopped(scratch: Path) -> None:
    with pytest.raises(TooSlow, match=r"of 400 trials settled in 0 s of real time"):
        simulate(20, 400, 0, scratch, kinds=BLATANT, budget=0.0)


def _backend(tmp_path: Path, network: Network, providers: int = 1) -> tuple[HyperparameterSearchTask, SimBackend]:
    data = synthetic_task(tmp_path / "task", n_trials=4, trials_per_subtask=2, folds=3, seed=0)
    task = HyperparameterSearchTask.create(parse_definition(data), tmp_path, tmp_path / "out")
    backend = SimBackend({f"p{i}": None for i in range(providers)}, network, seed=1)
    backend.start(task.resources_dir, tmp_path / "scratch")
    return task, backend


def test_the_store_accounts_for_trials_the_requestor_runs_before_giving_them_up(tmp_path: Path) -> None:
    """Regression (1 run of test_the_store_accounts_for_every_requestor_rerun in ~70 failed): the requestor's
    runs of a subtask faulted max_attempts times were metered but stored nowhere. Every subtask faults here."""
    task, backend = _backend(tmp_path, Network(fault_rate=1.0, session_seconds=1e12), providers=3)
    assert drive(task, backend, timeout=10**9, verifier=simulated_verifier(task, backend)) == "finished"
    fig = measure(task, backend, set())
    assert set(fig.requestor_records) == {"rescue"}
    assert fig.requestor_records["rescue"] == pytest.approx(fig.requestor_cores * fig.makespan, rel=1e-9)
    assert fig.requestor_records["rescue"] == pytest.approx(fig.useful)  # each trial run once, all on the requestor
    task.store.close()


def test_subtasks_take_their_cost_in_virtual_time(tmp_path: Path) -> None:
    task, backend = _backend(tmp_path, Network(fault_rate=0.0, speed_sigma=0.0, session_seconds=1e12))
    subtask = task.next_subtask("p0")
    backend.submit("p0", subtask, timeout=1e9)
    assert backend.idle_providers() == []
    [done] = backend.wait(0.25)
    assert done.error is None and (done.output_dir / "result.json").is_file()
    assert backend.now == pytest.approx(sum(trial_seconds(t.params, 3) for t in subtask.trials))
    assert backend.idle_providers() == ["p0"]
    task.store.close()


def test_requestor_compute_stalls_the_clock(tmp_path: Path) -> None:
    task, backend = _backend(tmp_path, Network(fault_rate=0.0, session_seconds=1e12))
    evaluator = evaluator_for(task.problem, task.resources_dir)
    params = {"x": 0.5, "y": 0.5, "lr": 0.01, "depth": 3}
    evaluator.evaluate(TrialSpec(number=0, params=params, seed=1), [0])
    assert backend.idle_providers() == ["p0"]
    assert backend.now == pytest.approx(fold_seconds(params)) == pytest.approx(backend.ledger.requestor)
    task.store.close()


def test_a_provider_that_left_while_the_requestor_was_busy_gets_no_work(tmp_path: Path) -> None:
    task, backend = _backend(tmp_path, Network(fault_rate=0.0, session_seconds=10.0))
    assert backend.idle_providers() == ["p0"]
    METER.charge(1e6)  # the requestor re-runs something for a virtual week
    assert backend.idle_providers() == []
    assert backend.wait(0.25) == []  # its leave is processed, and the newcomer who took its place joins
    assert backend.idle_providers() == ["joined1"]
    task.store.close()


def test_the_network_is_reproducible(tmp_path: Path) -> None:
    """The same seed gives the same durations, faults and departures (the verifier's draws are the OS's)."""
    histories = []
    for run in range(2):
        task, backend = _backend(tmp_path / str(run), Network(fault_rate=0.5, session_seconds=100.0), providers=2)
        subtasks = {p: task.next_subtask(p) for p in ("p0", "p1")}
        history = []
        for _ in range(10):
            for provider in backend.idle_providers():
                if provider in subtasks:
                    backend.submit(provider, subtasks[provider], timeout=60.0)
            history += [(backend.now, c.provider, c.error) for c in backend.wait(0.25)]
        histories.append(history)
        task.store.close()
    assert histories[0] == histories[1] and len(histories[0]) >= 4


def test_faults_and_leavers_end_subtasks_without_a_result(tmp_path: Path) -> None:
    task, backend = _backend(tmp_path, Network(fault_rate=1.0, session_seconds=1e12))
    errors = []
    subtask = task.next_subtask("p0")
    for _ in range(20):
        backend.submit("p0", subtask, timeout=5.0)
        [done] = backend.wait(0.25)
        errors.append(done.error or ("no result" if not (done.output_dir / "result.json").exists() else "ok"))
    assert set(errors) == {"timed out", "no result"}
    task.store.close()
    task, backend = _backend(tmp_path / "churn", Network(fault_rate=0.0, session_seconds=1.0, rejoin_seconds=1.0))
    subtask = task.next_subtask("p0")
    backend.submit("p0", subtask, timeout=1e9)
    [left] = backend.wait(0.25)
    assert left.provider == "p0" and left.error == "the provider left the network"
    assert backend.expecting_providers()
    assert backend.wait(0.25) == [] and backend.idle_providers() == ["joined1"]
    task.store.close()


def test_faked_trials_counts_what_an_answer_gets_wrong() -> None:
    honest = {"task_id": "t", "subtask_id": "s1", "trials": [{"number": 0, "x": 1}, {"number": 1, "x": 2}]}
    changed = json.loads(json.dumps(honest))
    changed["trials"][1]["x"] = 3
    assert faked_trials(honest, honest) == 0
    assert faked_trials(honest, changed) == 1
    assert faked_trials(honest, b"{") == 2
    assert faked_trials(honest, dict(honest, subtask_id="s2")) == 2
    assert faked_trials(honest, None) == 0


def test_the_objective_is_deterministic_and_metered(tmp_path: Path) -> None:
    data = synthetic_task(tmp_path / "task", n_trials=4, trials_per_subtask=2, folds=5, seed=0)
    task = HyperparameterSearchTask.create(parse_definition(data), tmp_path, tmp_path / "out")
    evaluator = evaluator_for(task.problem, task.resources_dir)
    rng = random.Random(0)
    for _ in range(20):
        params = {"x": rng.random(), "y": rng.random(), "lr": 10 ** rng.uniform(-4, 0), "depth": rng.randint(1, 12)}
        spec = TrialSpec(number=0, params=params, seed=rng.getrandbits(32))
        before = METER.ns
        first = evaluator.evaluate(spec)
        assert (METER.ns - before) / 1e9 == pytest.approx(trial_seconds(params, 5))
        again, fold = evaluator.evaluate(spec), evaluator.evaluate(spec, [2])
        assert (again.status, again.fold_scores, again.fold_fingerprints) == (
            first.status, first.fold_scores, first.fold_fingerprints)
        assert (fold.fold_scores, fold.fold_fingerprints) == (first.fold_scores[2:3], first.fold_fingerprints[2:3])
    task.store.close()
