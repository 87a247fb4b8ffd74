"""Provider faults on the real local backend: crash, hang, kill, out of memory, no result."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mltask import run_task
from mltask.backends.local import LocalBackend
from mltask.definition import parse_definition
from mltask.runner import preload_modules
from mltask.scheduler import drive
from mltask.store import Store
from mltask.task import HyperparameterSearchTask
from tests.dishonest import nothing, run_inline
from tests.support import results, task_dict

SCRIPT = '''
import os, resource, time
with open(os.path.join(os.path.dirname(__file__), "..", "imports.log"), "a") as fh:
    fh.write(f"{os.getpid()}\\n")  # once per import: once per worker if the problem is cached

def fit_and_score(params, X_train, y_train, X_valid, y_valid, seed):
    k = params["k"]
    if k == BAD and params["mode"] == "crash":
        os._exit(3)
    if k == BAD and params["mode"] == "hang":
        time.sleep(60)
    if k == BAD and params["mode"] == "oom":
        resource.setrlimit(resource.RLIMIT_AS, (2 * 1024 ** 3, resource.RLIM_INFINITY))
        hog = bytearray(4 * 1024 ** 3)
    return float(k)
'''


def _script_task(tmp_path: Path, mode: str, bad: int = 3, n: int = 8, subtasks: int = 2, **envelope: Any) -> dict:
    (tmp_path / "train.py").write_text(SCRIPT.replace("BAD", str(bad)))
    data = task_dict(estimator=None, scoring=None, script={"file": "train.py"}, algorithm="grid", n_trials=None,
                     search_space={"k": list(range(n)), "mode": mode}, max_attempts=2)
    data.update(resources=["train.py"], subtasks_count=subtasks, **envelope)
    return data


def _run(tmp_path: Path, data: dict, workers: int = 2) -> dict:
    (tmp_path / "task.json").write_text(json.dumps(data))
    run_task(tmp_path / "task.json", workers=workers, output=tmp_path / "out", quiet=True)
    return results(tmp_path / "out")


def _by_k(doc: dict) -> dict[int, dict]:
    return {t["params"]["k"]: t for t in doc["trials"]}


def test_crashing_configuration_fails_alone_and_once(tmp_path: Path) -> None:
    doc = _run(tmp_path, _script_task(tmp_path, "crash"))
    trials = _by_k(doc)
    assert doc["status"] == "finished" and doc["counts"]["complete"] == 7 and doc["counts"]["failed"] == 1
    assert trials[3]["state"] == "failed" and "exit code 3" in trials[3]["error"]
    assert "gave up after 2 attempts" in trials[3]["error"]
    assert all(t["mean_test_score"] == k for k, t in trials.items() if k != 3)


@pytest.mark.slow
def test_hanging_configuration_is_killed_at_the_subtask_timeout(tmp_path: Path) -> None:
    started = time.monotonic()
    doc = _run(tmp_path, _script_task(tmp_path, "hang", subtask_timeout="00:00:02"))
    assert time.monotonic() - started < 30
    trials = _by_k(doc)
    assert trials[3]["state"] == "failed" and "timed out after 2 s" in trials[3]["error"]
    assert doc["counts"]["complete"] == 7


def test_hanging_configuration_is_retried_on_the_idle_worker_and_drops_no_one(tmp_path: Path) -> None:
    """Regression: it went back to the worker that had failed it while the other sat idle, and after
    `max_provider_failures` of its timeouts that worker was dropped and the task stopped."""
    data = _script_task(tmp_path, "hang", n=4, subtasks=4, subtask_timeout="00:00:02")
    data["options"].update(max_attempts=3, max_provider_failures=2)
    doc = _run(tmp_path, data)
    assert doc["status"] == "finished" and doc["counts"]["complete"] == 3
    assert "gave up after 3 attempts" in _by_k(doc)[3]["error"]
    assert doc["verification"]["dropped_providers"] == {}
    bad = _by_k(doc)[3]["number"]
    store = Store.open(tmp_path / "out" / "state.db")
    sends = [s["provider"] for s in store.subtasks() if bad in json.loads(s["trial_numbers"])]
    store.close()
    assert len(sends) == 3 and sends[1] != sends[0]  # the other worker was idle: the retry went there


def test_out_of_memory_fails_its_trial_only(tmp_path: Path) -> None:
    doc = _run(tmp_path, _script_task(tmp_path, "oom"))
    trials = _by_k(doc)
    assert trials[3]["state"] == "failed" and "MemoryError" in trials[3]["error"]
    assert doc["counts"]["complete"] == 7


def test_problem_is_built_once_per_worker(tmp_path: Path) -> None:
    doc = _run(tmp_path, _script_task(tmp_path, "fine", bad=-1, n=12, subtasks=6))
    assert doc["counts"]["complete"] == 12
    pids = [int(p) for p in (tmp_path / "out" / "imports.log").read_text().split()]
    workers = [p for p in pids if p != os.getpid()]  # the requestor imports it to validate
    # 6 subtasks, but each worker built the problem once (a third and a fourth process: the requestor's
    # referee pool, which the idle workers' cores let grow to 2 for the best's re-run)
    assert len(workers) == len(set(workers)) and len(set(workers)) in (2, 3, 4)


@pytest.mark.slow
def test_killed_worker_is_replaced_and_its_subtask_sent_again(tmp_path: Path) -> None:
    data = _script_task(tmp_path, "fine", bad=-1, n=8, subtasks=8)
    (tmp_path / "train.py").write_text(SCRIPT.replace("BAD", "-1").replace("return float(k)",
                                                                         "time.sleep(1.0)\n    return float(k)"))
    task = HyperparameterSearchTask.create(parse_definition(data), tmp_path, tmp_path / "out")
    backend = LocalBackend(workers=2)
    killed: list[int] = []

    def killer() -> None:  # kill local-0 in the middle of a subtask
        deadline = time.monotonic() + 30
        while backend._slots[0].subtask is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        killed.append(backend._slots[0].pid)
        os.kill(killed[0], signal.SIGKILL)

    with backend:
        backend.start(task.resources_dir, tmp_path / "scratch")
        threading.Thread(target=killer).start()
        assert drive(task, backend, timeout=120) == "finished"
        assert backend._slots[0].pid not in killed  # replaced
    assert killed
    states = [s["state"] for s in task.store.subtasks()]
    assert "rejected" in states
    assert task.progress().done == 8 and task.progress().failed == 0


def test_worker_killed_while_idle_is_replaced_before_its_next_subtask(tmp_path: Path) -> None:
    """Regression: submitting to a worker that died idle raised BrokenPipeError in the requestor."""
    data = _script_task(tmp_path, "fine", bad=-1, n=2, subtasks=1)
    task = HyperparameterSearchTask.create(parse_definition(data), tmp_path, tmp_path / "out")
    with LocalBackend(workers=1) as backend:
        backend.start(task.resources_dir, tmp_path / "scratch")
        os.kill(backend._slots[0].pid, signal.SIGKILL)
        assert backend._slots[0].conn.poll(10)  # its end of the socket closed: it is gone
        assert drive(task, backend, timeout=60) == "finished"
    assert [s["state"] for s in task.store.subtasks()] == ["accepted"]


def test_workers_preload_what_every_trial_imports(tmp_path: Path) -> None:
    """Regression: a replaced worker spent 1.2 s importing scikit-learn before its first trial."""
    task = HyperparameterSearchTask.create(parse_definition(_script_task(tmp_path, "fine")), tmp_path, tmp_path / "o")
    assert {"sklearn.model_selection", "sklearn.metrics", "sklearn.datasets"} <= set(preload_modules(task.problem))


def test_provider_that_returns_nothing_is_retried_elsewhere_then_dropped(tmp_path: Path) -> None:
    data = task_dict(n_trials=12, max_provider_failures=2)
    data["subtasks_count"] = 6
    task, _, status = run_inline(data, tmp_path / "out", {"silent": nothing, "steady": None})
    assert status == "finished" and task.progress().done == 12
    assert "silent" in json.loads(task.store.meta_value("dropped")) and task.store.bans() == {}
    assert all(r.provider == "steady" for r in task.store.trials())


@pytest.mark.slow
def test_whole_task_timeout_stops_cleanly_and_resumes(tmp_path: Path) -> None:
    data = _script_task(tmp_path, "fine", bad=-1, n=20, subtasks=20, timeout="00:00:03")
    (tmp_path / "train.py").write_text(SCRIPT.replace("BAD", "-1").replace("return float(k)",
                                                                         "time.sleep(0.2)\n    return float(k)"))
    doc = _run(tmp_path, data, workers=1)
    assert doc["status"] == "timeout" and 0 < doc["counts"]["complete"] < 20
    from mltask.runner import resume_task

    longer = {**data, "timeout": "00:05:00"}  # a compatible change on resume
    resumed = resume_task(tmp_path / "out", task=longer, workers=2, quiet=True)
    assert resumed.summary.status == "finished" and resumed.summary.counts()["complete"] == 20


def test_a_ctrl_c_while_the_fork_server_starts_does_not_kill_it() -> None:
    """Regression (CI): Ctrl-C goes to the whole process group; one that arrived while the fork
    server was still importing ``site`` killed it with a KeyboardInterrupt traceback on stderr."""
    import os
    import signal
    import time

    from mltask.backends.forkserver import ForkServer

    server = ForkServer([])
    server._start()
    assert server._process is not None
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and server._process.poll() is None:
            os.kill(server._process.pid, signal.SIGINT)
            time.sleep(0.002)
        assert server._process.poll() is None
    finally:
        server.close()
