"""The task type driven directly, as every backend drives it: batching, requeue, idempotence."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from mltask.definition import parse_definition
from mltask.protocol import SubtaskDefinition, SubtaskResult
from mltask.provider import evaluate_subtask
from mltask.samplers import make_sampler
from mltask.task import HyperparameterSearchTask
from tests.support import task_dict


def _task(tmp_path: Path, n_trials: int = 10, subtasks: int = 4, **options: object) -> HyperparameterSearchTask:
    data = task_dict(n_trials=n_trials, **options)
    data["subtasks_count"] = subtasks
    return HyperparameterSearchTask.create(parse_definition(data), tmp_path, tmp_path / "out")


def _answer(task: HyperparameterSearchTask, subtask: SubtaskDefinition) -> SubtaskResult:
    return evaluate_subtask(subtask, task.resources_dir)


def test_trials_are_split_into_subtasks_count_batches(tmp_path: Path) -> None:
    task = _task(tmp_path, n_trials=10, subtasks=4)
    sizes = []
    while (sub := task.next_subtask("p")) is not None:
        sizes.append(len(sub.trials))
    assert sizes == [3, 3, 2, 2]
    assert [t.number for t in task.study.trials] == list(range(10))


def test_accept_tells_the_study_and_finishes(tmp_path: Path) -> None:
    task = _task(tmp_path, n_trials=4, subtasks=2)
    subs = [task.next_subtask("p"), task.next_subtask("q")]
    assert task.next_subtask("p") is None and not task.finished()
    for sub in subs:
        assert task.accept(_answer(task, sub))
    assert task.finished()
    progress = task.progress()
    assert progress.done == 4 and progress.best_value == max(t.value for t in task.study.trials)


def test_late_or_repeated_result_is_never_counted_twice(tmp_path: Path) -> None:
    task = _task(tmp_path, n_trials=2, subtasks=1)
    first = task.next_subtask("p")
    task.reject(first.subtask_id, "timed out", fault=True)
    retry = task.next_subtask("q")
    assert [t.number for t in retry.trials] == [0] and task.next_subtask("q").trials[0].number == 1
    late = _answer(task, first)
    assert task.accept(_answer(task, retry))
    assert not task.accept(late)  # the first send was re-queued and answered already
    assert not task.accept(_answer(task, retry))  # and the same answer again counts nothing
    assert task.progress().done == 1


def test_requeue_keeps_numbers_params_and_seeds_and_avoids_the_failed_provider(tmp_path: Path) -> None:
    task = _task(tmp_path, n_trials=6, subtasks=2)
    sub = task.next_subtask("bad")
    task.reject(sub.subtask_id, "wrong answer")  # not a fault: the batch stays whole
    fresh = task.next_subtask("bad")  # the failed provider gets fresh work, not its old batch
    assert {t.number for t in fresh.trials} == {3, 4, 5}
    again = task.next_subtask("good")
    assert again.trials == sub.trials


def test_fault_splits_batch_and_gives_up_after_max_attempts(tmp_path: Path) -> None:
    task = _task(tmp_path, n_trials=3, subtasks=1, max_attempts=2)
    sub = task.next_subtask("a")
    task.reject(sub.subtask_id, "worker died", fault=True)
    singles = [task.next_subtask("b") for _ in range(3)]
    assert [len(s.trials) for s in singles] == [1, 1, 1]
    for s in singles[1:]:
        task.accept(_answer(task, s))
    task.reject(singles[0].subtask_id, "worker died again", fault=True)
    assert task.finished()
    progress = task.progress()
    assert (progress.done, progress.failed) == (2, 1)
    row = task.store.trial(singles[0].trials[0].number)
    assert row.state == "failed" and "gave up after 2 attempts" in row.result["error"]


def test_provider_is_dropped_once_the_work_it_failed_succeeds_elsewhere(tmp_path: Path) -> None:
    task = _task(tmp_path, n_trials=8, subtasks=8, max_provider_failures=2)
    for _ in range(2):
        task.reject(task.next_subtask("flaky").subtask_id, "no result", fault=True)
    assert not task.is_banned("flaky")  # so far it could be the configurations
    assert task.hand_out_order(["flaky", "steady"]) == ["steady", "flaky"]  # its batches go elsewhere first
    for _ in range(2):
        task.accept(_answer(task, task.next_subtask("steady")))
    assert task.is_banned("flaky") and not task.is_banned("steady")
    assert task.store.bans() == {} and "flaky" in task.store.meta_value("dropped")


def test_configuration_that_fails_everywhere_drops_no_provider(tmp_path: Path) -> None:
    """Regression: one hanging configuration got its provider dropped, and with it the task stopped."""
    task = _task(tmp_path, n_trials=2, subtasks=2, max_attempts=3, max_provider_failures=1)
    task.accept(_answer(task, task.next_subtask("b")))
    for provider in ("a", "b", "a"):
        task.reject(task.next_subtask(provider).subtask_id, "timed out", fault=True)
    assert task.finished() and task.progress().failed == 1
    assert not task.is_banned("a") and not task.is_banned("b")


def test_ban_reopens_everything_the_provider_reported(tmp_path: Path) -> None:
    task = _task(tmp_path, n_trials=4, subtasks=2)
    cheat, honest = task.next_subtask("cheat"), task.next_subtask("honest")
    task.accept(_answer(task, cheat))
    task.accept(_answer(task, honest))
    assert task.finished()
    task.ban("cheat", "faked scores")
    assert not task.finished() and task.progress().done == 2
    again = task.next_subtask("honest")
    assert again.trials == cheat.trials
    assert [t.state.name for t in task.study.trials].count("RUNNING") == 2
    task.accept(_answer(task, again))
    assert task.finished() and task.progress().done == 4


def test_abort_keeps_what_is_done(tmp_path: Path) -> None:
    task = _task(tmp_path, n_trials=4, subtasks=2)
    done, lost = task.next_subtask("p"), task.next_subtask("q")
    task.accept(_answer(task, done))
    task.abort()
    assert task.finished() and task.next_subtask("p") is None
    assert not task.accept(_answer(task, lost))
    states = {s["subtask_id"]: s["state"] for s in task.store.subtasks()}
    assert states == {done.subtask_id: "accepted", lost.subtask_id: "discarded"}


@pytest.mark.parametrize("algorithm", ["grid", "random", "qmc", "tpe", "cmaes"])
def test_every_algorithm_proposes_valid_distinct_batches(algorithm: str, tmp_path: Path) -> None:
    space = {"max_depth": {"type": "int", "low": 1, "high": 8}, "min_samples_leaf": [1, 2, 4]}
    if algorithm == "cmaes":
        space = {"max_depth": {"type": "int", "low": 1, "high": 8},
                 "ccp_alpha": {"type": "float", "low": 0.0, "high": 0.1}}
    task = _task(tmp_path, n_trials=None if algorithm == "grid" else 12, subtasks=3, algorithm=algorithm,
                 search_space=space)
    seen = []
    while (sub := task.next_subtask("p")) is not None:
        seen += [t.params for t in sub.trials]
        task.accept(_answer(task, sub))
    assert len(seen) == (24 if algorithm == "grid" else 12)
    assert all(1 <= p["max_depth"] <= 8 for p in seen)
    if algorithm == "grid":
        assert len({tuple(sorted(p.items())) for p in seen}) == 24  # every grid point exactly once


def test_tpe_start_up_counts_asked_trials(tmp_path: Path) -> None:
    """Regression: Optuna counts only finished trials, so batched TPE ran 15 random trials instead of 10."""
    space = parse_definition(task_dict(algorithm="tpe", search_space={
        "ccp_alpha": {"type": "float", "low": 0.0, "high": 1.0}, "max_depth": {"type": "int", "low": 1, "high": 50},
    })).options.search_space

    def first_11(sampler: optuna.samplers.BaseSampler) -> list[dict]:
        study = optuna.create_study(sampler=sampler)
        return [space.sample(study.ask()) for _ in range(11)]  # none told: all pending, as in a batch

    ours = first_11(make_sampler("tpe", space, seed=3))
    stock = first_11(optuna.samplers.TPESampler(seed=3, constant_liar=True, multivariate=True))
    assert ours[:10] == stock[:10]  # the same 10 random start-up trials
    assert ours[10] != stock[10]  # then the model, where Optuna would still be waiting for 10 to finish


def test_conditional_parameter_only_when_its_condition_holds(tmp_path: Path) -> None:
    space = {"criterion": ["gini", "entropy"],
             "max_depth": {"type": "int", "low": 1, "high": 5, "when": {"criterion": ["entropy"]}}}
    task = _task(tmp_path, n_trials=16, subtasks=2, search_space=space, algorithm="tpe")
    params = [t.params for s in iter(lambda: task.next_subtask("p"), None) for t in s.trials]
    assert {("max_depth" in p) for p in params} == {True, False}
    assert all(("max_depth" in p) == (p["criterion"] == "entropy") for p in params)
