"""Results are untrusted data: every way a result file can be wrong is refused, never followed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mltask.definition import parse_definition
from mltask.errors import TaskError
from mltask.protocol import (
    ERROR_FILE,
    RESULT_FILE,
    SUBTASK_FILE,
    MissingResult,
    ResultError,
    SubtaskDefinition,
    dumps,
    read_result,
    result_size_limit,
    write_json_atomic,
)
from mltask.provider import check_resources, evaluate_subtask
from mltask.task import HyperparameterSearchTask
from tests.support import task_dict


@pytest.fixture
def answered(tmp_path: Path) -> tuple[HyperparameterSearchTask, SubtaskDefinition, dict]:
    task = HyperparameterSearchTask.create(parse_definition(task_dict()), tmp_path, tmp_path / "out")
    subtask = task.next_subtask("p")
    result = evaluate_subtask(subtask, task.resources_dir)
    return task, subtask, json.loads(dumps(result))


def _write(directory: Path, doc: object) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / RESULT_FILE).write_text(json.dumps(doc))
    return directory


def test_honest_result_reads_back(answered, tmp_path: Path) -> None:
    _, subtask, doc = answered
    assert read_result(_write(tmp_path / "o", doc), subtask).subtask_id == subtask.subtask_id


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda d: d.update(subtask_id="s999999"), "answers subtask"),
        (lambda d: d["trials"][0]["params"].update(max_depth=99), "differ from those sent"),
        (lambda d: d["trials"][0].update(seed=1), "differ from those sent"),
        (lambda d: d["trials"].pop(), "differ from those sent"),
        (lambda d: d["trials"][0].update(number=77), "differ from those sent"),
        (lambda d: d["trials"][0].update(mean_score=0.999), "not the mean of its fold scores"),
        (lambda d: d["trials"][0].update(std_score=0.5), "not the deviation"),
        (lambda d: d["trials"][0].update(fold_scores=[1.0]), "lacks its 3 fold scores"),
        (lambda d: d["trials"][0].update(status="failed", error=None), "failed without an error"),
        (lambda d: d["trials"][0].update(extra="field"), "schema"),
        (lambda d: d["trials"][0].update(fingerprint="not-hex"), "schema"),
        (lambda d: d.update(compute_time=-1), "schema"),
        (lambda d: d.update(compute_time=1e300), "schema"),
        (lambda d: d["trials"][0]["fit_times"].__setitem__(0, 1e300), "schema"),
        (lambda d: d["trials"][0]["score_times"].__setitem__(0, 1e300), "schema"),
        (lambda d: d["trials"][0]["score_times"].pop(), "lacks its 3 fold scores, times"),
        (lambda d: d["trials"][0]["fit_times"].__setitem__(0, d["compute_time"] + 1), "more than the"),
    ],
)
def test_tampered_result_is_refused(answered, tmp_path: Path, tamper, message: str) -> None:
    _, subtask, doc = answered
    tamper(doc)
    with pytest.raises(ResultError, match=message):
        read_result(_write(tmp_path / "o", doc), subtask)


def test_nan_and_infinite_scores_are_refused(answered, tmp_path: Path) -> None:
    _, subtask, doc = answered
    text = json.dumps(doc).replace(str(doc["trials"][0]["fold_scores"][0]), "NaN", 1)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / RESULT_FILE).write_text(text)
    with pytest.raises(ResultError, match="schema"):
        read_result(tmp_path / "o", subtask)


def test_malformed_json_missing_file_directory_and_oversize(answered, tmp_path: Path) -> None:
    _, subtask, doc = answered
    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(MissingResult):
        read_result(out, subtask)
    (out / RESULT_FILE).write_text('{"task_id": ')
    with pytest.raises(ResultError, match="schema"):
        read_result(out, subtask)
    (out / RESULT_FILE).unlink()
    (out / RESULT_FILE).mkdir()
    with pytest.raises(ResultError):
        read_result(out, subtask)
    (out / RESULT_FILE).rmdir()
    os.mkfifo(out / RESULT_FILE)  # would block a plain open() forever
    with pytest.raises(ResultError, match="not a regular file"):
        read_result(out, subtask)
    (out / RESULT_FILE).unlink()
    doc["trials"][0]["error"] = None
    huge = json.dumps(doc) + " " * result_size_limit(subtask)
    (out / RESULT_FILE).write_text(huge)
    with pytest.raises(ResultError, match="larger than"):
        read_result(out, subtask)


def test_symlinked_result_is_never_followed(answered, tmp_path: Path) -> None:
    _, subtask, doc = answered
    secret = _write(tmp_path / "elsewhere", doc) / RESULT_FILE
    out = tmp_path / "o"
    out.mkdir()
    (out / RESULT_FILE).symlink_to(secret)
    with pytest.raises(ResultError, match="links are refused"):
        read_result(out, subtask)


def test_provider_is_deterministic_and_fingerprints_predictions(answered) -> None:
    task, subtask, doc = answered
    again = json.loads(dumps(evaluate_subtask(subtask, task.resources_dir)))
    for a, b in zip(doc["trials"], again["trials"], strict=True):
        assert (a["fold_scores"], a["fold_fingerprints"], a["fingerprint"]) == (
            b["fold_scores"], b["fold_fingerprints"], b["fingerprint"])
    assert len({t["fingerprint"] for t in doc["trials"]}) > 1 or len(doc["trials"]) == 1


def test_one_bad_configuration_fails_only_its_trial(tmp_path: Path) -> None:
    space = {"max_depth": {"type": "int", "low": -3, "high": 3}}  # max_depth <= 0 is invalid
    task = HyperparameterSearchTask.create(parse_definition(task_dict(search_space=space, n_trials=12)),
                                           tmp_path, tmp_path / "out")
    sub = task.next_subtask("p")
    while not any(t.params["max_depth"] <= 0 for t in sub.trials):
        sub = task.next_subtask("p")
    result = evaluate_subtask(sub, task.resources_dir)
    for trial in result.trials:
        assert (trial.status == "failed") == (trial.params["max_depth"] <= 0)
        if trial.status == "failed":
            assert "max_depth" in trial.error


def test_resource_hash_mismatch_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data.npz").write_bytes(b"")
    np.savez(tmp_path / "data.npz", X=np.random.default_rng(0).normal(size=(40, 3)), y=np.arange(40) % 2)
    data = {**task_dict(dataset={"npz": "data.npz"}), "resources": ["data.npz"]}
    task = HyperparameterSearchTask.create(parse_definition(data), tmp_path, tmp_path / "out")
    check_resources(task.problem.resources, task.resources_dir)
    with open(task.resources_dir / "data.npz", "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(TaskError, match="does not match its sha256"):
        check_resources(task.problem.resources, task.resources_dir)


def test_npz_with_pickled_objects_is_refused(tmp_path: Path, capsys) -> None:
    np.savez(tmp_path / "data.npz", X=np.array([[object()]] * 10, dtype=object), y=np.arange(10))
    data = {**task_dict(dataset={"npz": "data.npz"}), "resources": ["data.npz"]}
    (tmp_path / "task.json").write_text(json.dumps(data))
    from mltask.cli import main

    assert main(["tasks", "create", str(tmp_path / "task.json"), "--output", str(tmp_path / "o")]) == 2
    assert "without pickle" in capsys.readouterr().err


def test_provider_entry_point_in_golem_layout(answered, tmp_path: Path) -> None:
    task, subtask, doc = answered
    work, output = tmp_path / "work", tmp_path / "output"
    work.mkdir()
    output.mkdir()
    (work / SUBTASK_FILE).write_text(dumps(subtask))
    proc = subprocess.run(
        [sys.executable, "-m", "mltask.provider", "--work", str(work), "--resources", str(task.resources_dir),
         "--output", str(output)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    written = read_result(output, subtask)
    assert [t.fold_scores for t in written.trials] == [t["fold_scores"] for t in doc["trials"]]


def test_provider_entry_point_refuses_a_bad_subtask(tmp_path: Path) -> None:
    (tmp_path / SUBTASK_FILE).write_text('{"protocol": 1}')
    proc = subprocess.run([sys.executable, "-m", "mltask.provider", "--work", str(tmp_path), "--resources",
                           str(tmp_path), "--output", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "bad subtask" in proc.stderr and not (tmp_path / RESULT_FILE).exists()


def test_serve_mode_answers_each_new_subtask_and_reports_its_own_failures(answered, tmp_path: Path) -> None:
    task, subtask, doc = answered
    work, output = tmp_path / "work", tmp_path / "output"
    work.mkdir()
    output.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "mltask.provider", "--serve", "--work", str(work), "--resources",
                             str(task.resources_dir), "--output", str(output)])

    def answer(name: str) -> Path:
        deadline = time.monotonic() + 60
        while not (output / name).exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the serving provider did not answer"
            time.sleep(0.02)
        return output / name

    try:
        write_json_atomic(work / SUBTASK_FILE, dumps(subtask))
        answer(RESULT_FILE)
        assert [t.fold_scores for t in read_result(output, subtask).trials] == [t["fold_scores"] for t in doc["trials"]]
        (output / RESULT_FILE).unlink()
        write_json_atomic(work / SUBTASK_FILE, '{"protocol": 1}')  # the next one is broken: it says so, stays up
        assert "ValidationError" in answer(ERROR_FILE).read_text()
        (output / ERROR_FILE).unlink()
        second = task.next_subtask("p")
        write_json_atomic(work / SUBTASK_FILE, dumps(second))
        answer(RESULT_FILE)
        assert read_result(output, second).subtask_id == second.subtask_id
    finally:
        proc.kill()
        proc.wait()


# What a provider runs is its own policy, not the subtask's ------------------------------

def _run_provider(doc: dict, resources: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """``mltask-provider`` on a subtask document, as a provider runs it (no policy file: the default)."""
    work, output = tmp_path / "work", tmp_path / "output"
    for directory in (work, output):
        directory.mkdir(exist_ok=True)
    (work / SUBTASK_FILE).write_text(json.dumps(doc))
    return subprocess.run([sys.executable, "-m", "mltask.provider", "--work", str(work), "--resources", str(resources),
                           "--output", str(output)], capture_output=True, text=True, timeout=120)


def _refused(proc: subprocess.CompletedProcess, tmp_path: Path, field: str) -> None:
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"mltask-provider: {field}: "), proc.stderr
    assert not (tmp_path / "output" / RESULT_FILE).exists()


@pytest.mark.parametrize("estimator", ["this.s", "os.system", "subprocess.Popen", {  # nested in an estimator object
    "class": "sklearn.pipeline.Pipeline", "params": {"steps": [{"tuple": ["run", {"class": "this.s"}]}]}}])
def test_provider_imports_only_from_its_own_modules(answered, tmp_path: Path, estimator: str | dict) -> None:
    task, subtask, _ = answered
    doc = json.loads(dumps(subtask))
    doc["problem"].update(allowed_modules=[""], estimator=estimator)  # the subtask allows everything
    proc = _run_provider(doc, task.resources_dir, tmp_path)
    _refused(proc, tmp_path, "options.estimator")
    assert "outside the modules this provider allows (sklearn.)" in proc.stderr
    assert "Zen of Python" not in proc.stdout  # refused before importing: `this` prints on import


def test_provider_policy_can_only_be_narrowed_by_a_subtask(answered, tmp_path: Path) -> None:
    task, subtask, _ = answered
    doc = json.loads(dumps(subtask))
    doc["problem"]["allowed_modules"] = ["sklearn.svm."]  # narrower than the provider's sklearn.
    proc = _run_provider(doc, task.resources_dir, tmp_path)
    _refused(proc, tmp_path, "options.estimator")
    assert "outside the allowed modules ['sklearn.svm.']" in proc.stderr


def _outside_script(tmp_path: Path) -> Path:
    marker = tmp_path / "ran"
    script = tmp_path / "outside.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\ndef fit_and_score(*args):\n    return 1.0\n")
    return script


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_provider_runs_no_script_outside_its_resources(answered, tmp_path: Path, where: str) -> None:
    task, subtask, _ = answered
    script = _outside_script(tmp_path)
    name = "../" * len(task.resources_dir.parts) + str(script)[1:] if where == "relative" else str(script)
    doc = json.loads(dumps(subtask))
    doc["problem"].update(estimator=None, scoring=None, script={"file": name, "function": "fit_and_score"})
    proc = _run_provider(doc, task.resources_dir, tmp_path)
    _refused(proc, tmp_path, "options.script.file")
    assert not (tmp_path / "ran").exists()


def test_provider_reads_no_dataset_outside_its_resources(answered, tmp_path: Path) -> None:
    task, subtask, _ = answered
    secret = tmp_path / "secret.csv"
    secret.write_text("SECRET-HEADER,other\n1,2\n3,4\n")
    for name in (str(secret), "../" * len(task.resources_dir.parts) + str(secret)[1:], "/etc/passwd"):
        doc = json.loads(dumps(subtask))
        doc["problem"]["dataset"] = {"csv": name, "target": "nothere"}
        proc = _run_provider(doc, task.resources_dir, tmp_path)
        _refused(proc, tmp_path, "options.dataset.csv")
        assert "SECRET" not in proc.stderr and "root:" not in proc.stderr


def test_a_link_among_the_resources_is_not_followed(answered, tmp_path: Path) -> None:
    task = answered[0]
    (tmp_path / "secret.csv").write_text("SECRET-HEADER,other\n1,2\n3,4\n")
    (task.resources_dir / "link.csv").symlink_to(tmp_path / "secret.csv")
    from mltask.data import load_dataset
    from mltask.definition import DatasetSpec

    with pytest.raises(TaskError, match=r"'link\.csv' is not among the resources") as caught:
        load_dataset(DatasetSpec(csv="link.csv", target="nothere"), task.resources_dir)
    assert "SECRET" not in str(caught.value)


def test_dataset_errors_never_quote_the_file(tmp_path: Path) -> None:
    import struct
    import zipfile

    from mltask.data import load_dataset
    from mltask.definition import DatasetSpec

    (tmp_path / "data.csv").write_text("a,SECRET-CELL,b\n1,2,3\n4,5,6\n")
    with pytest.raises(TaskError, match=r"no column 'y' among the 3 in the header of data\.csv") as caught:
        load_dataset(DatasetSpec(csv="data.csv", target="y"), tmp_path)
    assert "SECRET" not in str(caught.value)
    header = "{'descr': 'SECRET-DESCR', 'fortran_order': False, 'shape': (2, 2), }"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(32)
    with zipfile.ZipFile(tmp_path / "data.npz", "w") as npz:
        npz.writestr("X.npy", npy)
        npz.writestr("y.npy", npy)
    with pytest.raises(TaskError, match=r"cannot read data\.npz as NPZ without pickle") as caught:
        load_dataset(DatasetSpec(npz="data.npz"), tmp_path)
    assert "SECRET" not in str(caught.value)


def test_one_thread_limits_the_openmp_of_packages_imported_after_its_first_use() -> None:
    """Regression: the thread-pool controller was made once per process, so LightGBM's or
    XGBoost's OpenMP, loaded after it, ran with two threads (scores could depend on it)."""
    probe = (
        "from threadpoolctl import threadpool_info\n"
        "from mltask.provider import one_thread\n"
        "with one_thread():\n    pass\n"
        "import lightgbm, xgboost\n"
        "with one_thread():\n    print(sorted({i['num_threads'] for i in threadpool_info()}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[1]"
