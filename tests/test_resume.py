"""Durability: kill -9, Ctrl-C and abort, then resume; refused resumes; chaos runs, multi-fidelity too."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import results, run_cli, task_dict, write_task

SLOW_SCRIPT = '''
import time

def fit_and_score(params, X_train, y_train, X_valid, y_valid, seed):
    time.sleep(DELAY)
    return params["a"] * params["b"] + (seed % 1000) / 1e6
'''


def _task(tmp_path: Path, algorithm: str, n: int, subtasks: int, delay: float = 0.02, **options: Any) -> Path:
    (tmp_path / "slow.py").write_text(SLOW_SCRIPT.replace("DELAY", str(delay)))
    space = ({"a": list(range(n // 10)), "b": list(range(10))} if algorithm == "grid"
             else {"a": {"type": "float", "low": 0, "high": 1}, "b": {"type": "int", "low": 0, "high": 9}})
    data = task_dict(estimator=None, scoring=None, script={"file": "slow.py"}, algorithm=algorithm,
                     n_trials=None if algorithm == "grid" else n, search_space=space,
                     cv={"kind": "kfold", "folds": 2}, **options)
    data.update(resources=["slow.py"], subtasks_count=subtasks)
    return write_task(tmp_path, data)


def _mltask(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "mltask", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _settled(out: Path) -> int:
    if not (out / "state.db").exists():
        return 0
    with sqlite3.connect(out / "state.db", timeout=30) as conn:
        return conn.execute("SELECT count(*) FROM trials WHERE state != 'running'").fetchone()[0]


def _wait_for(out: Path, at_least: int, limit: float = 60) -> None:
    end = time.monotonic() + limit
    while _settled(out) < at_least:
        assert time.monotonic() < end, "the search made no progress"
        time.sleep(0.05)


def _scores(out: Path) -> dict[str, Any]:
    doc = results(out)
    return {json.dumps(t["params"], sort_keys=True): t["mean_test_score"] for t in doc["trials"]}


def _check_study(out: Path, planned: int) -> None:
    """Exactly the planned trials, each settled once, each configuration told once."""
    with sqlite3.connect(out / "state.db") as conn:
        numbers = [n for (n,) in conn.execute("SELECT number FROM trials WHERE state = 'complete'")]
        accepted = [json.loads(t) for (t,) in conn.execute("SELECT trial_numbers FROM subtasks WHERE state='accepted'")]
    assert sorted(numbers) == list(range(planned))
    told = [n for batch in accepted for n in batch]
    assert sorted(told) == list(range(planned)), "a trial was accepted twice or never"


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    runs = {}
    for algorithm in ("random", "grid"):
        tmp = tmp_path_factory.mktemp(algorithm)
        proc = _mltask("tasks", "create", str(_task(tmp, algorithm, 60, 20)), "--output", str(tmp / "out"),
                       "--quiet", "--workers", "2")
        assert proc.wait(120) == 0, proc.stderr.read()
        runs[algorithm] = _scores(tmp / "out")
    return runs


@pytest.mark.parametrize("algorithm", ["random", "grid"])
def test_kill_9_then_resume_gives_the_undisturbed_result(algorithm: str, tmp_path: Path, undisturbed: dict) -> None:
    out = tmp_path / "out"
    proc = _mltask("tasks", "create", str(_task(tmp_path, algorithm, 60, 20)), "--output", str(out), "--quiet",
                   "--workers", "2")
    _wait_for(out, 10)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert 10 <= _settled(out) < 60
    resumed = _mltask("tasks", "resume", str(out), "--quiet", "--workers", "2")
    assert resumed.wait(120) == 0, resumed.stderr.read()
    _check_study(out, 60)
    assert _scores(out) == undisturbed[algorithm]


def test_ctrl_c_stops_saves_and_says_how_to_resume(tmp_path: Path, undisturbed: dict) -> None:
    out = tmp_path / "out"
    proc = _mltask("tasks", "create", str(_task(tmp_path, "random", 60, 20)), "--output", str(out), "--workers", "2")
    _wait_for(out, 6)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and f"mltask tasks resume {out}" in err and "Traceback" not in err
    assert results(out)["status"] == "interrupted"
    resumed = _mltask("tasks", "resume", str(out), "--quiet")
    assert resumed.wait(120) == 0
    _check_study(out, 60)
    assert _scores(out) == undisturbed["random"]


def test_abort_then_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    proc = _mltask("tasks", "create", str(_task(tmp_path, "random", 60, 20)), "--output", str(out), "--quiet")
    _wait_for(out, 6)
    code, said, _ = run_cli(["tasks", "abort", str(out)], capsys)
    assert code == 0 and "resume" in said
    assert proc.wait(30) == 1 and results(out)["status"] == "aborted"
    code, _, _ = run_cli(["tasks", "resume", str(out), "--quiet"], capsys)
    assert code == 0 and results(out)["status"] == "finished"
    _check_study(out, 60)


def test_a_second_requestor_on_a_running_task_is_refused(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: a second resume re-queued the first one's trials and died on a UNIQUE constraint."""
    from mltask.definition import load_definition
    from mltask.task import HyperparameterSearchTask

    out = tmp_path / "out"
    task = _task(tmp_path, "random", 20, 10, delay=0.1)
    HyperparameterSearchTask.create(load_definition(task), tmp_path, out).store.close()  # created, never run
    first = _mltask("tasks", "resume", str(out), "--quiet", "--workers", "1")
    _wait_for(out, 2)
    for args in (["tasks", "resume", str(out), "--quiet"],
                 ["tasks", "create", str(task), "--output", str(out), "--force", "--quiet"]):
        code, said, err = run_cli(args, capsys)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in said + err, err
        assert f"run by process {first.pid}" in err and f"mltask tasks abort {out}" in err
    assert run_cli(["tasks", "show", str(out)], capsys)[0] == 0  # readers need no lock
    assert first.wait(120) == 0, first.stderr.read()
    _check_study(out, 20)


def _finished_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    task = _task(tmp_path, "random", 10, 5, delay=0)
    out = tmp_path / "out"
    assert run_cli(["tasks", "create", str(task), "--output", str(out), "--quiet"], capsys)[0] == 0
    return task, out


def test_resume_refuses_an_incompatible_task_and_accepts_a_compatible_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task, out = _finished_task(tmp_path, capsys)
    data = json.loads(task.read_text())
    changed = json.loads(task.read_text())
    changed["options"]["search_space"]["b"]["high"] = 5
    other = write_task(tmp_path, changed, "other.json")
    code, _, err = run_cli(["tasks", "resume", str(out), "--task", str(other), "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and "options.search_space.b.high" in err
    data["options"]["n_trials"], data["timeout"] = 14, "00:09:00"
    more = write_task(tmp_path, data, "more.json")
    assert run_cli(["tasks", "resume", str(out), "--task", str(more), "--quiet"], capsys)[0] == 0
    assert results(out)["counts"] == {"complete": 14, "failed": 0, "running": 0, "planned": 14}


def test_resume_refuses_changed_resources(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out = _finished_task(tmp_path, capsys)
    with open(out / "resources" / "slow.py", "a") as fh:
        fh.write("\n# edited\n")
    code, _, err = run_cli(["tasks", "resume", str(out)], capsys)
    assert code == 2 and "slow.py does not match its sha256" in err and err.count("\n") == 1


@pytest.mark.parametrize("damage", ["not_a_task", "corrupt", "truncated", "foreign_sqlite"])
def test_resume_refuses_a_broken_state_and_changes_nothing(
    damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out = _finished_task(tmp_path, capsys)
    db = out / "state.db"
    if damage == "not_a_task":
        target = tmp_path / "elsewhere"
        target.mkdir()
    else:
        target = out
        data = bytearray(db.read_bytes())
        if damage == "corrupt":  # garbage over the header of every b-tree page after the first
            rng = random.Random(0)
            page = int.from_bytes(data[16:18], "big")
            for start in range(page, len(data), page):
                data[start:start + 12] = bytes(rng.randrange(256) for _ in range(12))
        elif damage == "truncated":
            data = data[: len(data) // 2]
        else:
            db.unlink()
            with sqlite3.connect(db) as conn:
                conn.execute("CREATE TABLE notes (x)")
            data = bytearray(db.read_bytes())
        db.write_bytes(bytes(data))
    before = db.read_bytes() if damage != "not_a_task" else None
    code, _, err = run_cli(["tasks", "resume", str(target)], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert ("not a task output dir" in err) if damage == "not_a_task" else ("unreadable" in err)
    if before is not None:
        assert db.read_bytes() == before


def test_state_file_appears_only_whole(tmp_path: Path) -> None:
    """Regression: state.db existed without its tables while being created (seen by a reader)."""
    from mltask.store import Store

    with pytest.raises(sqlite3.IntegrityError):  # the meta insert fails after the tables exist
        Store.create(tmp_path / "state.db", {"schema_version": "0"})
    assert list(tmp_path.iterdir()) == []
    store = Store.create(tmp_path / "state.db", {"name": "t"})
    store.close()
    assert Store.open(tmp_path / "state.db").meta()["name"] == "t"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(("-wal", "-shm"))) == ["state.db"]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["random", "grid", "asha"])
def test_chaos(algorithm: str, tmp_path: Path) -> None:
    """200 trials while workers are killed at random and the requestor twice by SIGKILL.

    ``asha``: a multi-fidelity random search, whose score scales with the resource by a factor
    that keeps every trial's rank, so the best configuration is the best at every rung and
    Optuna's eager rule promotes it whatever order answers arrive in. Which other trials climb
    depends on that order, so the check is: no rung evaluation lost or accepted twice, every
    trial settled on its ladder, the calm run's best.
    """
    n = 200
    fidelity = algorithm == "asha"
    extra = {"fidelity": {"resource": "epochs", "min_resource": 1, "max_resource": 9}} if fidelity else {}
    # Kills are the point here, so no batch may give up and no worker slot be dropped for them.
    task = _task(tmp_path, "random" if fidelity else algorithm, n, 50, delay=0.01, max_attempts=20,
                 max_provider_failures=1000, **extra)
    if fidelity:
        script = (tmp_path / "slow.py").read_text()
        score = 'params["a"] * params["b"] + (seed % 1000) / 1e6'
        (tmp_path / "slow.py").write_text(script.replace(score, f'params["epochs"] / 10 * ({score})'))
    calm = tmp_path / "calm"
    assert _mltask("tasks", "create", str(task), "--output", str(calm), "--quiet", "--workers", "2").wait(300) == 0
    out = tmp_path / "out"
    rng = random.Random(1)
    args = ["tasks", "create", str(task), "--output", str(out), "--quiet", "--workers", "2"]
    requestor_kills = 0
    kills = 0
    end = time.monotonic() + 240
    proc = _mltask(*args)
    while True:
        assert time.monotonic() < end, "chaos run did not finish in time"
        time.sleep(rng.uniform(0.3, 1.0))  # a replaced worker needs ~0.2 s before its first trial
        if proc.poll() is not None:
            if proc.returncode == 0 and _settled(out) == n:
                break
            proc = _mltask("tasks", "resume", str(out), "--quiet", "--workers", "2")
            continue
        settled = _settled(out)
        if requestor_kills < 2 and settled >= (requestor_kills + 1) * n // 3:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            requestor_kills += 1
            continue
        workers = _descendants(proc.pid)
        if workers and kills < 30:
            os.kill(rng.choice(workers), signal.SIGKILL)
            kills += 1
    assert requestor_kills == 2 and kills >= 3
    if fidelity:
        _check_ladders(out, n, top=9)
        assert _best(out) == _best(calm)
        return
    _check_study(out, n)
    assert _scores(out) == _scores(calm)


def _best(out: Path) -> tuple[Any, ...]:
    best = results(out)["best"]
    return best["params"], best["mean_score"], best["resource"]


def _check_ladders(out: Path, planned: int, top: int) -> None:
    """Every planned trial settled, each rung evaluation accepted once, each trial's rungs one climb from its
    first: promoted at every rung but its last, where it was pruned or, at the ``top`` resource, complete."""
    with sqlite3.connect(out / "state.db") as conn:
        states = dict(conn.execute("SELECT number, state FROM trials"))
        told = [n for (t,) in conn.execute("SELECT trial_numbers FROM subtasks WHERE purpose = 'search' AND "
                                           "state = 'accepted'") for n in json.loads(t)]
    rungs = _rungs(out)
    assert sorted(states) == list(range(planned)) and set(states.values()) <= {"complete", "pruned"}
    assert sorted(told) == sorted(n for n, *_ in rungs), "a rung evaluation was accepted twice or lost"
    ladders: dict[int, list[tuple[Any, ...]]] = {}
    for row in rungs:
        ladders.setdefault(row[0], []).append(row)
    assert sorted(ladders) == list(range(planned))
    for number, (*climbed, last) in ladders.items():
        assert [r[1] for r in climbed] == list(range(last[1])), number
        assert all(r[4] == "promoted" for r in climbed) and last[4] == states[number], (climbed, last)
        assert (last[4] == "complete") == (last[2] == top), last


def _descendants(pid: int) -> list[int]:
    """The local backend's workers: children of the requestor's forkserver process."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    workers = []
    for child in children.get(pid, []):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"forkserver" in cmdline:
            workers += children.get(child, [])
    return workers


def _rungs(out: Path) -> list[tuple]:
    with sqlite3.connect(out / "state.db") as conn:
        return conn.execute("SELECT number, rung, resource, value, decision FROM rungs ORDER BY number, rung"
                            ).fetchall()


@pytest.mark.parametrize("schedule", ["asha", "hyperband"])
def test_kill_9_between_rungs_loses_and_repeats_no_rung_evaluation(schedule: str, tmp_path: Path) -> None:
    """Multi-fidelity: accepted rungs stand, in-flight ones run again at the same resource, promotions wait again.

    One worker, so the undisturbed run's order (on which ASHA's decisions depend) is fixed.
    """
    fidelity = {"resource": "epochs", "min_resource": 1, "max_resource": 9, "schedule": schedule}
    task = _task(tmp_path, "random", 24, 12, delay=0.02, fidelity=fidelity)
    script = (tmp_path / "slow.py").read_text().replace('params["a"] * params["b"]',
                                                        'params["a"] * params["b"] * params["epochs"] ** 0.5')
    (tmp_path / "slow.py").write_text(script)
    calm = tmp_path / "calm"
    assert _mltask("tasks", "create", str(task), "--output", str(calm), "--quiet", "--workers", "1").wait(120) == 0
    out = tmp_path / "out"
    proc = _mltask("tasks", "create", str(task), "--output", str(out), "--quiet", "--workers", "1")
    end = time.monotonic() + 60
    while not (out / "state.db").exists() or not any(rung > 0 for _, rung, *_ in _rungs(out)):
        assert time.monotonic() < end, "no trial was promoted"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert 0 < len(_rungs(out)) < len(_rungs(calm))
    resumed = _mltask("tasks", "resume", str(out), "--quiet", "--workers", "1")
    assert resumed.wait(120) == 0, resumed.stderr.read()
    assert _rungs(out) == _rungs(calm)
    with sqlite3.connect(out / "state.db") as conn:
        accepted = sum(len(json.loads(t)) for (t,) in conn.execute(
            "SELECT trial_numbers FROM subtasks WHERE purpose = 'search' AND state = 'accepted'"))
    assert accepted == len(_rungs(out)), "a rung evaluation was accepted twice"
