"""Red team: a provider (or several) that has read mltask's code and the image attacks the verifier.

Each test runs the adversary of ``tests/dishonest.py`` on real worker processes (the local
backend's, with the requestor's real referee pool) and asserts the SECURE behaviour. Where
today's code does not hold, the test is ``xfail(strict=True)`` with the finding as its reason,
so CI reports it until it is fixed (and then reports the XPASS, to remove the mark).

No outcome here rests on luck: a provider's first subtask is always checked, claimed
failures and the best are always re-run by the requestor, and where checks must reach a
given provider the budget (1.0) makes it certain.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mltask.definition import parse_definition
from mltask.problem import combined_fingerprint
from mltask.referee import RefereePool
from mltask.scheduler import drive
from mltask.task import HyperparameterSearchTask
from mltask.verifier import Verifier
from tests.dishonest import (
    FakeThenOutdated,
    Unrun,
    Withholder,
    bogus_fingerprint,
    check_aware,
    claim_failed,
    dodge_checks,
    framer,
    nudge_folds,
    nudge_mean,
    run_inline,
    run_local,
    secondary_metric,
)
from tests.support import task_dict
from tests.test_verification import _scores, _search


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float | None]:
    task, _, status = run_inline(_search(), tmp_path_factory.mktemp("honest") / "out", {"a": None, "b": None})
    assert status == "finished"
    return _scores(task)


def _checked(**options: Any) -> dict[str, Any]:
    """The search of test_verification with every result checked (budget 1.0), in 12 subtasks of 2 trials."""
    data = _search(verification={"budget": 1.0}, **options)
    data["subtasks_count"] = 12
    return data


# -- lying checkers and check-aware providers ---------------------------------------------


@pytest.mark.slow
def test_a_checker_that_contradicts_honest_results_is_banned_not_the_honest_provider(
        tmp_path: Path, honest: dict) -> None:
    """Framing: every check the framer gets (all of the honest worker's, budget 1.0) is a lie; the referee
    sides with the honest result each time, so the framer is banned and the outcome is the honest one."""
    task, backend, status = run_local(_checked(), tmp_path / "out", {"local-1": framer}, workers=2)
    assert status == "finished" and backend.faked["local-1"] > 0
    assert set(task.store.bans()) == {"local-1"}
    assert _scores(task) == honest
    wrong = [v for v in task.store.verdicts() if not v["ok"]]
    assert wrong and all(v["provider"] == "local-1" for v in wrong)


@pytest.mark.slow
def test_a_provider_honest_only_on_checks_is_still_caught(tmp_path: Path, honest: dict) -> None:
    """A provider sees that a subtask is a check (its trials have ``folds``); answering those honestly does not
    help it: its own results are checked by someone else (its first subtask always), never by itself."""
    task, backend, status = run_local(_search(), tmp_path / "out", {"local-1": check_aware}, workers=2)
    assert status == "finished" and backend.faked["local-1"] > 0
    assert set(task.store.bans()) == {"local-1"}
    assert _scores(task) == honest


def test_a_provider_that_never_answers_checks_cannot_stall_the_task(tmp_path: Path, honest: dict) -> None:
    """Regression: after two lost cross checks a check was to go to the requestor, but the next round handed it
    to a checker again, the same one when it was the only other: a provider answering no check (at once, as if
    it crashed) kept every check it was sent from ever resolving, and the task never finished."""
    task, backend, status = run_local(_checked(), tmp_path / "out", {"local-1": dodge_checks}, workers=2,
                                      timeout=90)
    assert backend.faked["local-1"] > 0
    assert status == "finished" and _scores(task) == honest
    assert not task.store.checks("planned") and task.store.bans() == {}


@pytest.mark.slow
def test_a_provider_that_never_answers_checks_is_dropped(tmp_path: Path, honest: dict) -> None:
    """Regression: check dodging was free: faults on check subtasks were not counted, so a provider that
    answered no check was never dropped (each check it got was lost twice before the requestor ran it)."""
    task, _, status = run_local(_checked(), tmp_path / "out", {"local-1": dodge_checks}, workers=2, timeout=90)
    assert status == "finished" and _scores(task) == honest
    dodged = [s for s in task.store.subtasks("check") if s["provider"] == "local-1" and s["state"] == "rejected"]
    assert dodged  # it was sent checks and answered none
    assert len(dodged) <= task.definition.options.max_provider_failures
    assert task.is_banned("local-1")


# -- escaping a ban ------------------------------------------------------------------------


@pytest.mark.slow
def test_claiming_other_versions_after_a_lie_does_not_escape_the_ban(tmp_path: Path, honest: dict) -> None:
    """A version mismatch drops a provider and keeps its work; a liar who switches to claiming another
    scikit-learn right after lying is still banned by the check of its lie, and that work is reopened."""
    task, backend, status = run_local(_search(), tmp_path / "out", {"local-1": FakeThenOutdated()}, workers=2)
    assert status == "finished" and backend.faked["local-1"] > 0
    assert set(task.store.bans()) == {"local-1"}
    assert _scores(task) == honest and all(r.provider == "local-0" for r in task.store.trials())


# -- lies the protocol's own bounds must refuse ---------------------------------------------


def test_an_impossible_score_of_a_secondary_metric_is_refused_at_once(tmp_path: Path) -> None:
    """Regression: only the refit metric's scores were range-checked; a secondary metric's f1 of 7.0 was
    accepted and stayed in the results unless a sampled check happened to land on it."""
    data = _search(scoring={"acc": "accuracy", "f1": "f1_macro"}, refit_metric="acc")
    task, backend, status = run_local(data, tmp_path / "out", {"local-1": secondary_metric}, workers=2)
    assert status == "finished" and backend.faked["local-1"] > 0
    assert set(task.store.bans()) == {"local-1"}
    first = next(v for v in task.store.verdicts() if not v["ok"])
    assert first["kind"] == "structure" and "outside [0.0, 1.0]" in first["reason"], first


def _nudge_mean_and_fingerprint(doc: dict, subtask: Any, rng: Any) -> dict:
    return bogus_fingerprint(nudge_mean(doc, subtask, rng), subtask, rng)


def test_figures_computable_from_the_folds_are_computed_not_taken(tmp_path: Path, honest: dict) -> None:
    """Regression: ``mean_score`` (what the search ranks by) had only to be within 1e-9 of its folds' mean,
    and no re-run compares it: a provider reporting every mean 5e-10 higher won every tie, and its
    made-up value was the reported best, verified 'full'. A trial's ``fingerprint`` (in results.json)
    was taken as sent too. The requestor now computes both from the folds."""
    task, backend, status = run_local(_search(), tmp_path / "out", {"local-0": _nudge_mean_and_fingerprint},
                                      workers=1)
    assert status == "finished" and backend.faked["local-0"] > 0
    assert _scores(task) == honest
    assert task.best_trial().value == max(v for v in honest.values() if v is not None)
    rows = [r for r in task.store.trials() if r.result and r.result["status"] == "ok"]
    assert rows and all(r.result["fingerprint"] == combined_fingerprint(r.result["fold_fingerprints"]) for r in rows)


@pytest.mark.slow
def test_fold_scores_nudged_within_tolerance_are_not_what_is_reported(tmp_path: Path, honest: dict) -> None:
    """Regression: fold scores 5e-10 higher (rel_tolerance 1e-9) passed the best's full re-run, and the made-up
    value was reported as the verified best. The requestor's own figures now replace every fold it re-ran."""
    task, backend, status = run_local(_search(), tmp_path / "out", {"local-0": nudge_folds}, workers=1)
    assert status == "finished" and backend.faked["local-0"] > 0
    best = task.best_trial()
    assert best.verified == "full"
    assert best.value == max(v for v in honest.values() if v is not None)


# -- hiding the best by faults ---------------------------------------------------------------


@pytest.mark.slow
def test_withholding_the_best_by_faults_does_not_hide_it(tmp_path: Path, honest: dict) -> None:
    """Regression: providers (max_attempts=3 of them, colluding) that never answered the best configuration
    made it 'gave up', which nothing re-ran and which counted against no provider. The requestor now runs
    trials before giving them up after faults; where they run, each provider that failed them has a fault."""
    top = max(v for v in honest.values() if v is not None)
    cheats = {f"local-{i}": Withholder(top) for i in range(3)}
    task, backend, status = run_local(_search(max_attempts=3), tmp_path / "out", cheats, workers=3)
    assert status == "finished" and sum(backend.faked.values()) > 0
    best = task.best_trial()
    assert best.value == top and best.verified == "full"


# -- exhausting the requestor -----------------------------------------------------------------


class _CountingPool(RefereePool):
    """The real referee pool, counting the re-runs it is asked for and does not cancel, by trial number."""

    def __init__(self, task: HyperparameterSearchTask) -> None:
        super().__init__(task.problem, task.resources_dir, 1)
        self.submitted: list[int] = []
        self.widest = 1  # the most processes it could run re-runs on at once

    def lend(self, cores: int) -> None:
        self.widest = max(self.widest, cores)
        super().lend(cores)

    def submit(self, key: Any, trial: Any) -> None:
        self.submitted.append(trial.number)
        super().submit(key, trial)

    def cancel(self, keys: Any) -> set[Any]:
        """A cancelled re-run that had not started cost nothing: it is not counted."""
        numbers = {key: self._reruns[key].trial.number for key in keys if key in self._reruns}
        dropped = super().cancel(keys)
        for key in dropped:
            self.submitted.remove(numbers[key])
        return dropped


@pytest.mark.slow
def test_a_liar_claiming_many_failures_costs_the_requestor_a_few_re_runs(tmp_path: Path, honest: dict) -> None:
    """Regression: claimed failures exhausted the referee: all 12 were queued at once and still re-run after
    the first proved the provider a liar and it was banned. A ban now cancels its queued re-runs, and a
    confirming re-run goes before the others, so the liar is banned after its first lie's two runs (one lie's
    per referee process: the local backend lends its idle workers' cores to the pool, and CI once saw two lies
    re-run at once on two)."""
    data = _search()
    data["subtasks_count"] = 2  # 12 trials a subtask: the liar claims all 12 failed at once
    pools: list[_CountingPool] = []

    def referee(task: HyperparameterSearchTask) -> _CountingPool:
        pools.append(_CountingPool(task))
        return pools[0]

    task, backend, status = run_local(data, tmp_path / "out", {"local-1": claim_failed}, workers=2, referee=referee)
    assert status == "finished" and backend.faked["local-1"] > 0
    assert set(task.store.bans()) == {"local-1"} and _scores(task) == honest
    searches = [s for s in task.store.subtasks("search") if s["provider"] == "local-1"]
    claimed = {n for s in searches for n in json.loads(s["trial_numbers"])}
    reruns = [n for n in pools[0].submitted if n in claimed]
    # one lie found per process (twice: the referee checks its own run is reproducible), then the best's full re-run
    assert len(reruns) <= 2 * pools[0].widest + 1, (reruns, pools[0].widest)


SLOW = '''
import time

def fit_and_score(params, X_train, y_train, X_valid, y_valid, seed):
    time.sleep(params["wait"])
    return params["a"]
'''


@pytest.mark.slow
def test_a_claimed_failure_of_a_slow_configuration_costs_the_requestor_at_most_a_subtask_timeout(
        tmp_path: Path) -> None:
    """Regression: the referee's re-runs had no time limit; a claimed failure (a timeout) of a configuration
    that runs 60 s, past subtask_timeout (2 s), held the requestor, and the task's end, that long. Its re-run
    now times out too, which agrees with the claim: the task finishes in time and nobody is banned."""
    (tmp_path / "slow.py").write_text(SLOW)
    data = task_dict(estimator=None, scoring=None, script={"file": "slow.py"}, n_trials=4, algorithm="grid",
                     search_space={"a": [0.1, 0.2], "wait": [0.0, 60.0]})
    data.update(resources=["slow.py"], subtasks_count=2, subtask_timeout="00:00:02")
    task = HyperparameterSearchTask.create(parse_definition(data), tmp_path, tmp_path / "out")
    backend = Unrun(["lazy"], skip=lambda params: params["wait"] > 0)  # says a slow one timed out, without running it
    backend.start(task.resources_dir, tmp_path / "scratch")
    status = drive(task, backend, timeout=10, verifier=Verifier(task))
    assert backend.faked["lazy"] > 0
    assert status == "finished" and task.store.bans() == {}
