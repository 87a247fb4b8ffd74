"""The requestor's referee pool: a re-run split by fold, its folds at once on lent cores, bit for bit."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mltask import run_task
from mltask.backends.local import LocalBackend
from mltask.definition import parse_definition
from mltask.protocol import TrialResult, TrialSpec, dumps
from mltask.referee import RefereePool, rerun
from mltask.runner import preload_modules
from mltask.task import HyperparameterSearchTask
from tests.support import results, task_dict

# Each call logs (pid, parent pid, seed, fold); with MEET in its dir, it waits for another fold to start
# first (a rendezvous: only folds running at once both get past it; a fold alone logs that it gave up).
SCRIPT = '''
import glob, hashlib, json, os, time
HERE = os.path.dirname(os.path.abspath(__file__))
LOG = os.path.join(HERE, "..", "..", "calls.log")

def fit_and_score(params, X_train, y_train, X_valid, y_valid, seed):
    fold = hashlib.sha256(y_valid.tobytes()).hexdigest()[:8]
    met = None
    if os.path.exists(os.path.join(HERE, "..", "..", "MEET")):
        open(os.path.join(HERE, "..", "..", f"started-{fold}"), "w").close()
        end = time.monotonic() + 30
        while len(glob.glob(os.path.join(HERE, "..", "..", "started-*"))) < 2 and time.monotonic() < end:
            time.sleep(0.01)
        met = time.monotonic() < end
    with open(LOG, "a") as fh:
        fh.write(json.dumps([os.getpid(), os.getppid(), seed, fold, met]) + "\\n")
    return params["a"] * (1 + (seed % 97) / 1000) + float(y_valid.mean())
'''


def _script_data(tmp_path: Path, n_trials: int = 6) -> dict[str, Any]:
    (tmp_path / "train.py").write_text(SCRIPT)
    data = task_dict(estimator=None, scoring=None, script={"file": "train.py"}, n_trials=n_trials,
                     search_space={"a": {"type": "float", "low": 0, "high": 1}}, cv={"kind": "kfold", "folds": 3})
    data.update(resources=["train.py"], subtasks_count=n_trials)
    return data


def _task(tmp_path: Path, data: dict[str, Any]) -> HyperparameterSearchTask:
    return HyperparameterSearchTask.create(parse_definition(data), tmp_path, tmp_path / "out")


def _spec(task: HyperparameterSearchTask, params: dict[str, Any], number: int = 0) -> TrialSpec:
    return TrialSpec(number=number, params=params, seed=1234 + number)


def _run(pool: RefereePool, trials: list[TrialSpec]) -> dict[int, TrialResult]:
    for trial in trials:
        pool.submit(trial.number, trial)
    got: dict[int, TrialResult] = {}
    deadline = time.monotonic() + 120
    while len(got) < len(trials):
        assert time.monotonic() < deadline, "the referee pool did not answer"
        got.update({key: result for key, result, _ in pool.poll(timeout=0.5)})
    return got


def _serial(task: HyperparameterSearchTask, trial: TrialSpec) -> TrialResult:
    text, _ = rerun(dumps(task.problem), str(task.resources_dir), dumps(trial))
    return TrialResult.model_validate_json(text)


def _same(a: TrialResult, b: TrialResult) -> bool:
    """What a re-run's verdict rests on (everything but its timings)."""
    return a.model_dump(exclude={"fit_times", "score_times"}) == b.model_dump(exclude={"fit_times", "score_times"})


def test_folds_of_a_re_run_run_at_once_on_lent_cores(tmp_path: Path) -> None:
    """Regression: a re-run was one job on one process, its folds one after another, even where the
    backend's workers sat idle: the best's final re-run was a serial tail after the search."""
    task = _task(tmp_path, _script_data(tmp_path))
    (tmp_path / "MEET").touch()
    pool = RefereePool(task.problem, task.resources_dir, workers=1)
    try:
        pool.lend(3)
        [got] = _run(pool, [_spec(task, {"a": 0.5})]).values()
    finally:
        pool.close()
    calls = [json.loads(line) for line in (tmp_path / "calls.log").read_text().splitlines()]
    assert len(calls) == 3 and len({pid for pid, *_ in calls}) >= 2
    assert all(met for *_, met in calls)  # every fold met another one running: none ran alone
    (tmp_path / "MEET").unlink()
    assert got.status == "ok" and _same(got, _serial(task, _spec(task, {"a": 0.5})))


def test_a_split_re_run_is_bit_for_bit_the_serial_one(tmp_path: Path) -> None:
    """Every fold's scores, metrics, training scores and fingerprints, the mean and std, and a failing
    trial's error: as one process evaluating the folds in turn gives them."""
    data = task_dict(estimator="sklearn.linear_model.LogisticRegression", scoring=["accuracy", "f1_macro"],
                     return_train_score=True, cv={"kind": "stratified", "folds": 5},
                     search_space={"C": {"type": "float", "low": 0.01, "high": 10, "log": True}})
    task = _task(tmp_path, data)
    trials = [_spec(task, {"C": 0.3}, 0), _spec(task, {"C": 3.0}, 1), _spec(task, {"C": -1.0}, 2),
              _spec(task, {"C": 1.0}, 3).model_copy(update={"folds": [1, 3, 4]})]
    pool = RefereePool(task.problem, task.resources_dir, workers=1)
    try:
        pool.lend(3)
        got = _run(pool, trials)
    finally:
        pool.close()
    assert got[2].status == "failed"
    for trial in trials:
        assert _same(got[trial.number], _serial(task, trial)), trial


def test_the_best_s_final_re_run_takes_the_idle_workers_cores(tmp_path: Path) -> None:
    """End to end on the local backend: once the workers are idle, the best's folds the requestor re-runs
    are spread over several of its referee processes (before: all on its one process).

    One trial on 3 workers: at least 2 of them are idle when its re-run starts (a check subtask may
    hold one), and none before it is over (nothing can be re-run before the search's one trial is in).
    """
    (tmp_path / "task.json").write_text(json.dumps(_script_data(tmp_path, n_trials=1)))
    run_task(tmp_path / "task.json", workers=3, output=tmp_path / "out", quiet=True)
    doc = results(tmp_path / "out")
    [best] = doc["trials"]
    assert best["verified"] == "full"
    calls = [json.loads(line) for line in (tmp_path / "calls.log").read_text().splitlines()]
    local = calls[0][1]  # the provider's run comes first: its workers' parent
    referee = {pid for pid, parent, *_ in calls if parent != local}
    assert len(referee) >= 2


def test_only_local_workers_offered_work_and_given_none_are_spare(tmp_path: Path) -> None:
    """Regression: a worker given a subtask that it finished within the same wait counted as spare, so
    the referee took its core (and re-ran the best so far) in the middle of a search."""
    task = _task(tmp_path, task_dict())
    with LocalBackend(workers=2, preload=preload_modules(task.problem)) as backend:
        backend.start(task.resources_dir, tmp_path / "scratch")
        assert backend.idle_providers() == ["local-0", "local-1"] and backend.spare_cores() == 2
        subtask = task.next_subtask("local-0")
        assert subtask is not None
        backend.submit("local-0", subtask, 60)
        deadline = time.monotonic() + 60
        while not backend.wait(0.5):
            assert time.monotonic() < deadline
        assert backend.spare_cores() == 1  # local-0 is idle again, but it is offered work first
        backend.idle_providers()
        assert backend.spare_cores() == 2
