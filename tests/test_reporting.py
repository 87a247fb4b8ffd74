"""What the terminal, the result files and the report say: failures are never silent."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from support import ROOT, results, run_cli, task_dict, write_task

import mltask
from mltask.console import PLAIN_EVERY_SECONDS, Estimate, SearchProgress, leaderboard
from mltask.errors import TaskError
from mltask.report import REPORT_FILE, RUNGS_PLOT_FILE
from mltask.results import refit_best
from mltask.runner import finish, resume_task, run_task, show
from mltask.store import Store
from mltask.task import STATE_FILE, HyperparameterSearchTask
from mltask.task import Progress as TaskProgress

# -- every trial fails ---------------------------------------------------------------------

_ROWS = range(30)
_LOGREG = {"estimator": "sklearn.linear_model.LogisticRegression",
           "search_space": {"C": {"type": "float", "low": 0.1, "high": 10, "log": True}}}
_STRING_SCRIPT = "def fit_and_score(params, X_train, y_train, X_valid, y_valid, seed):\n    return 'good'\n"

# name: (options, files written next to the task, a fragment of the error every trial gets)
ALL_FAIL: dict[str, tuple[dict[str, Any], dict[str, str], str]] = {
    "roc_auc on 3 classes": ({**_LOGREG, "scoring": "roc_auc"}, {}, "multi_class must be in"),
    "NaN features": (
        {**_LOGREG, "dataset": {"csv": "data.csv", "target": "label"}},
        {"data.csv": "a,b,label\n" + "".join(f"{i},{'nan' if i % 3 == 0 else 2 * i},{i % 2}\n" for i in _ROWS)},
        "Input X contains NaN",
    ),
    "one class": (
        {**_LOGREG, "dataset": {"csv": "data.csv", "target": "label"}},
        {"data.csv": "a,b,label\n" + "".join(f"{i},{2 * i},1\n" for i in _ROWS)},
        "only one class",
    ),
    "string target for a regressor": (
        {"estimator": "sklearn.linear_model.Ridge", "scoring": "r2", "cv": {"kind": "kfold", "folds": 3},
         "search_space": {"alpha": {"type": "float", "low": 0.1, "high": 10}},
         "dataset": {"csv": "data.csv", "target": "label"}},
        {"data.csv": "a,b,label\n" + "".join(f"{i},{2 * i},{'ab'[i % 2]}\n" for i in _ROWS)},
        "could not convert string to float",
    ),
    "categorical of mixed types": (
        {"search_space": {"max_features": ["all", 7.5]}}, {}, "The 'max_features' parameter",
    ),
    "script returning a string": (
        {"estimator": None, "script": {"file": "train.py"}, "scoring": None, "cv": {"kind": "kfold", "folds": 3},
         "search_space": {"k": {"type": "int", "low": 1, "high": 5}}},
        {"train.py": _STRING_SCRIPT},
        "could not convert string to float",
    ),
}


def _failing_task(tmp_path: Path, case: str) -> Path:
    options, files, _ = ALL_FAIL[case]
    task = task_dict(**options, n_trials=4)
    task["subtasks_count"] = 2
    task["resources"] = sorted(files)
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    return write_task(tmp_path, task)


def _tables_are_well_formed(markdown: str) -> None:
    """Every row of every Markdown table has as many cells as its header."""
    width = None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            width = None
            continue
        cells = len(re.split(r"(?<!\\)\|", line)) - 2
        if width is None:
            width = cells
        assert cells == width, line


@pytest.mark.parametrize("case", list(ALL_FAIL))
def test_all_trials_failing_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(["tasks", "create", str(_failing_task(tmp_path, case)), "--output", str(out),
                            "--workers", "1"], capsys)
    fragment = ALL_FAIL[case][2]
    assert code == 2, err
    said = err.splitlines()[-1]
    assert said.startswith("mltask: error: all 4 trials failed: ") and fragment in said
    assert re.search(r"\d× [A-Za-z]+Error: ", said)  # each error with its count
    assert sum(int(n) for n in re.findall(r"(\d)× ", said)) == 4
    assert "status: finished" not in err and "status: failed" in err

    doc = results(out)  # nothing computed is lost
    assert doc["status"] == "failed" and doc["best"] is None
    assert sum(e["count"] for e in doc["errors"]) == 4 and fragment in doc["errors"][0]["error"]
    assert all(t["state"] == "failed" and t["rank_test_score"] is None for t in doc["trials"])

    report = (out / REPORT_FILE).read_text(encoding="utf-8")
    assert "status: **failed**" in report and "all 4 trials that ran failed" in report
    assert ("script tasks" in report) == (case == "script returning a string")
    assert "## Failed trials" in report and fragment in report
    assert "| 1 |" not in report  # no failed trial ranks first
    _tables_are_well_formed(report)


def test_run_task_raises_after_writing_results(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(mltask.AllTrialsFailed) as raised:
        run_task(_failing_task(tmp_path, "roc_auc on 3 classes"), workers=1, output=out, quiet=True)
    assert isinstance(raised.value, TaskError) and raised.value.output_dir == out
    [(error, count)] = raised.value.errors
    assert count == 4 and "multi_class must be in" in error
    assert results(out)["status"] == "failed" and (out / REPORT_FILE).is_file()
    assert show(out).status == "failed"


def test_some_trials_failing_are_summed_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = write_task(tmp_path, task_dict(search_space={"max_features": ["all", 7.5, "sqrt"]}, algorithm="grid",
                                          n_trials=None))
    code, _, err = run_cli(["tasks", "create", str(task), "--output", str(tmp_path / "o"), "--workers", "1"], capsys)
    assert code == 0
    assert "2 of 3 trials failed:" in err
    assert re.search(r"1× InvalidParameterError: .* Got 7\.5 instead", err)
    assert re.search(r"1× InvalidParameterError: .* Got 'all' instead", err)
    assert re.search(r"trial \d failed: InvalidParameterError", err)  # said while it ran


# -- the live display ----------------------------------------------------------------------


def test_estimate_moves_between_results() -> None:
    estimate = Estimate(total=16)
    assert estimate.update(settled=0, running=8, now=0.0) == (0.0, None)  # no rate yet: no made-up ETA
    assert estimate.update(settled=8, running=8, now=10.0) == (8.0, 10.0)
    shown, eta = [], []
    for now in (12.0, 14.0, 16.0):
        s, e = estimate.update(settled=8, running=8, now=now)
        shown.append(s)
        eta.append(e)
    assert 8 < shown[0] < shown[1] < shown[2] <= 8 + 0.95 * 8  # moves, but never past the running trials
    assert eta[0] > eta[1] > eta[2]  # counts down
    capped, capped_eta = estimate.update(settled=8, running=8, now=20.0)
    assert capped == pytest.approx(8 + 0.95 * 8)  # the running trials' worth, and no further
    late, late_eta = estimate.update(settled=8, running=8, now=40.0)
    assert late == capped and late_eta > capped_eta  # results are late: the ETA grows, it does not sit at 0
    assert estimate.update(settled=12, running=4, now=41.0)[0] >= late  # never moves back
    assert estimate.update(settled=16, running=0, now=50.0) == (16.0, 0.0)


def test_plain_progress_lines_and_failures_once(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("mltask.console.time.monotonic", lambda: clock[0])
    stream = io.StringIO()
    errors = [(3, "ValueError: bad\nvalue"), (5, "ValueError: bad value"), (6, "TypeError: other")]
    with SearchProgress(Console(file=stream, width=200), 10, "tiny", errors=lambda: errors) as bar:
        bar.update(TaskProgress(total=10, running=4), force=True)
        clock[0] += 1
        bar.update(TaskProgress(total=10, done=2, failed=3, running=4, best_value=0.9, best_number=1))
        clock[0] += PLAIN_EVERY_SECONDS
        bar.update(TaskProgress(total=10, done=4, failed=3, running=3, best_value=0.9, best_number=1))
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("tiny: 0/10, 4 running; 0:00:00 elapsed, eta -:--:--")
    assert lines[1:3] == ["trial 3 failed: ValueError: bad value", "trial 6 failed: TypeError: other"]
    assert lines[3].startswith("tiny: 7/10, 3 running, best 0.9 (trial 1), 3 failed; 0:00:06 elapsed, eta 0:00:0")
    assert len(lines) == 4  # one line per PLAIN_EVERY_SECONDS, not per update


def test_terminal_says_what_happens_before_the_first_trial(tmp_path: Path) -> None:
    stream = io.StringIO()
    run_task(task_dict(), workers=1, output=tmp_path / "out", console=Console(file=stream, force_terminal=True,
                                                                              width=200))
    said = stream.getvalue()
    assert "resolving tiny: loading the dataset" in said and "starting the local backend (1 provider)" in said
    assert "8/8" in said and "eta" in said  # and then the bar


_SLEEPY = """import time


def fit_and_score(params, X_train, y_train, X_valid, y_valid, seed):
    time.sleep(0.25)
    return float(params["k"])
"""


@pytest.mark.slow
def test_progress_lines_while_running_when_stderr_is_a_pipe(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(_SLEEPY, encoding="utf-8")
    task = task_dict(estimator=None, script={"file": "train.py"}, scoring=None, cv={"kind": "kfold", "folds": 3},
                     search_space={"k": {"type": "int", "low": 1, "high": 100}}, n_trials=12)
    task.update(name="sleepy", resources=["train.py"], subtasks_count=12)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mltask", "tasks", "create", str(write_task(tmp_path, task)), "--output",
         str(tmp_path / "out"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    assert proc.stderr is not None
    seen, seen_running = [], []
    for line in proc.stderr:
        seen.append(line)
        if proc.poll() is None:
            seen_running.append(line)
    assert proc.wait(120) == 0, seen
    counts = [int(m.group(1)) for m in (re.match(r"sleepy: (\d+)/12", line) for line in seen_running) if m]
    assert any(0 < n < 12 for n in counts), seen_running  # progress while it ran, not only at the end


# -- leaderboard and report ----------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished search whose conditional parameter is missing from the best configuration."""
    out = tmp_path_factory.mktemp("finished") / "out"
    task = task_dict(
        estimator={"pipeline": [["scale", "sklearn.preprocessing.StandardScaler"],
                                ["tree", "sklearn.tree.DecisionTreeClassifier"]]},
        search_space={
            "tree__max_depth": [1, 4],
            "tree__min_samples_leaf": {"type": "int", "low": 30, "high": 40, "when": {"tree__max_depth": [1]}},
            "tree__min_impurity_decrease": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True},
            "tree__criterion": ["gini", "entropy", "log_loss"],
            "tree__splitter": ["best", "random"],
            "tree__class_weight": [None, "balanced"],
        },
    )
    run_task(task, workers=2, output=out, quiet=True)
    return out


def test_leaderboard_keeps_scores_whole_at_80_columns(finished: Path) -> None:
    summary = show(finished)
    console = Console(width=80, record=True)
    console.print(leaderboard(summary))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    body = [line.split("│") for line in text.splitlines() if line.startswith("│")]
    means = {r["number"]: r["mean_test_score"] for r in summary.complete}
    rows = [cells for cells in body if cells[2].strip()]
    assert len(rows) == len(means)
    for cells in rows:
        assert float(cells[3]) == pytest.approx(means[int(cells[2])], rel=1e-5)
        assert float(cells[4]) >= 0.0  # std, whole as well


def test_conditional_parameters_are_shown(finished: Path) -> None:
    summary = show(finished)
    assert "tree__min_samples_leaf" not in summary.best["params"]  # the case that hid the column
    assert any("tree__min_samples_leaf" in r["params"] for r in summary.complete)
    console = Console(width=250, record=True)
    console.print(leaderboard(summary))
    assert "tree__min_samples_leaf" in console.export_text()
    report = (finished / REPORT_FILE).read_text(encoding="utf-8")
    header = next(line for line in report.splitlines() if line.startswith("| rank |"))
    assert "tree__min_samples_leaf" in header
    _tables_are_well_formed(report)


def test_report_names_the_setup_and_formats_numbers(finished: Path) -> None:
    report = (finished / REPORT_FILE).read_text(encoding="utf-8")
    for said in ("sklearn.tree.DecisionTreeClassifier", "iris", "stratified 3-fold", "wall time: "):
        assert said in report
    value = show(finished).best["params"]["tree__min_impurity_decrease"]
    assert repr(value) not in report and f"{value:.6g}" in report
    for number in re.findall(r"\d+\.\d+", report):  # no float in full repr anywhere
        assert len(number.replace(".", "").lstrip("0")) <= 6, number


def test_multi_fidelity_report_plots_score_against_resource(finished: Path, tmp_path: Path) -> None:
    """A multi-fidelity search gets a plot of each trial's score per rung, referenced from the report."""
    report = (finished / REPORT_FILE).read_text(encoding="utf-8")
    assert not (finished / RUNGS_PLOT_FILE).exists() and RUNGS_PLOT_FILE not in report  # full fidelity: none
    out = tmp_path / "out"
    fidelity = {"resource": "n_samples", "min_resource": 10, "max_resource": 90, "reduction_factor": 3}
    run_task(task_dict(n_trials=12, fidelity=fidelity), workers=2, output=out, quiet=True)
    assert any(len(t["rungs"]) > 1 for t in results(out)["trials"])  # promotions to draw
    assert (out / RUNGS_PLOT_FILE).read_bytes().startswith(b"\x89PNG")
    report = (out / REPORT_FILE).read_text(encoding="utf-8")
    assert f"]({RUNGS_PLOT_FILE})" in report and "](convergence.png)" in report


def test_show_counts_running_trials_apart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mltask.definition import parse_definition

    task = HyperparameterSearchTask.create(parse_definition(task_dict()), tmp_path, tmp_path / "out")
    assert task.next_subtask("somewhere") is not None  # two trials out, none back
    task.store.close()
    code, said, _ = run_cli(["tasks", "show", str(tmp_path / "out")], capsys)
    assert code == 0
    assert "0 complete, 0 failed, 2 running of 8" in said
    assert "top 0 of 0 complete trials" in said


def test_abort_on_a_finished_task_says_so(finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, said, _ = run_cli(["tasks", "abort", str(finished)], capsys)
    assert code == 0 and "already ended (finished); nothing to abort" in said and "requested" not in said
    store = Store.open(finished / STATE_FILE)
    try:
        assert store.meta_value("status") == "finished" and not store.meta_value("abort_requested")
    finally:
        store.close()


def test_search_time_adds_up_over_a_resume(finished: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    first = results(out)["timing"]
    resume_task(out, workers=1, quiet=True)
    second = results(out)["timing"]
    assert second["runs"] == first["runs"] + 1 == 2
    assert second["search_seconds"] > first["search_seconds"]


def test_warning_when_the_best_was_not_re_run_in_full(finished: Path, tmp_path: Path) -> None:
    # What a timeout or an abort leaves: the best was spot-checked when it came in, and the
    # full re-run the end of a search does never happened.
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    store = Store.open(out / STATE_FILE)
    with store.transaction() as cur:  # set_verified never downgrades; a timeout never got this far
        cur.execute("UPDATE trials SET verified = 'spot' WHERE verified = 'full'")
    store.set_meta("status", "timeout")
    stream = io.StringIO()
    finish(store, out, Console(file=stream, width=300), timing={"search_seconds": 1.0})
    store.close()
    best = results(out)["best"]["number"]
    [warning] = results(out)["warnings"]
    assert f"the reported best (trial {best}) was not re-run in full" in warning and "(timeout)" in warning
    assert "WARNING: the reported best" in stream.getvalue()
    assert f"**WARNING: {warning}**" in (out / REPORT_FILE).read_text(encoding="utf-8")


def test_refit_has_one_thread_and_keeps_its_warnings(finished: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threadpoolctl
    from sklearn.tree import DecisionTreeClassifier

    threads: list[int] = []
    fit = DecisionTreeClassifier.fit

    def watched(self: Any, *args: Any, **kwargs: Any) -> Any:
        threads.extend(info["num_threads"] for info in threadpoolctl.threadpool_info())
        import warnings

        warnings.warn("refit says hello", UserWarning, stacklevel=1)
        warnings.warn("refit says hello", UserWarning, stacklevel=1)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(DecisionTreeClassifier, "fit", watched)
    store = Store.open(finished / STATE_FILE)
    try:
        from mltask.protocol import Problem
        from mltask.results import summarize

        problem = Problem.model_validate_json(store.meta_value("problem") or "")
        refit = refit_best(finished, problem, summarize(store, "finished"), finished / "resources")
    finally:
        store.close()
    assert threads and set(threads) == {1}
    assert refit == (finished / "model.joblib", ["refit: UserWarning: refit says hello"])


# -- double Ctrl-C and CSV cells -----------------------------------------------------------


def test_second_ctrl_c_names_the_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("mltask.runner.finish", interrupted)  # Ctrl-C again while results are written
    out = tmp_path / "out"
    code, _, err = run_cli(["tasks", "create", str(write_task(tmp_path, task_dict())), "--output", str(out),
                            "--quiet", "--workers", "1"], capsys)
    assert code == 130
    assert f"`mltask tasks resume {out}` carries on" in err and "DIR" not in err


_FORMULA_SCRIPT = """Formula = type('=HYPERLINK("http://evil.example","x")', (Exception,), {})

def fit_and_score(params, X_train, y_train, X_valid, y_valid, seed):
    if params["k"] > 2:
        raise Formula("open me")
    return -float(params["k"]) - 0.5
"""


def test_csv_cells_cannot_start_a_formula(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(_FORMULA_SCRIPT, encoding="utf-8")
    task = task_dict(estimator=None, script={"file": "train.py"}, scoring=None, cv={"kind": "kfold", "folds": 3},
                     search_space={"k": {"type": "int", "low": 1, "high": 4}, "note": "+cmd", "tag": ["@SUM(A1)"]},
                     algorithm="grid", n_trials=None)
    task["resources"] = ["train.py"]
    out = tmp_path / "out"
    run_task(write_task(tmp_path, task), workers=1, output=out, quiet=True)
    with open(out / "results.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4
    for row in rows:
        assert row["param_note"] == "'+cmd" and row["param_tag"] == "'@SUM(A1)"
        for cell in row.values():
            if cell[:1] in ("=", "+", "-", "@", "\t", "\r"):
                float(cell)  # only numbers may start so
    failed = [r for r in rows if r["state"] == "failed"]
    assert len(failed) == 2 and all(r["error"].startswith("'=HYPERLINK(") for r in failed)
    scores = sorted(float(r["mean_test_score"]) for r in rows if r["state"] == "complete")
    assert scores == [-2.5, -1.5]  # negative numbers stay numbers
    assert json.loads((out / "results.json").read_text())["errors"][0]["error"].startswith("=HYPERLINK(")

