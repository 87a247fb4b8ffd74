"""An export opens with Optuna's tools and holds every value of results.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import optuna
import pytest
from optuna.trial import TrialState

from mltask import run_task
from tests.support import results, run_cli, task_dict


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A search with a conditional, a fixed and a list-valued parameter, two metrics and failed trials."""
    out = tmp_path_factory.mktemp("export") / "out"
    data = task_dict(
        n_trials=10, scoring={"acc": "accuracy", "f1": "f1_macro"}, refit_metric="f1",
        search_space={
            "criterion": ["gini", "entropy", "nonsense"],  # nonsense fails its trials
            "max_depth": {"type": "int", "low": 1, "high": 5, "when": {"criterion": ["gini", "entropy"]}},
            "min_samples_leaf": {"type": "float", "low": 0.01, "high": 0.2, "log": True},
            "random_state": 0,
        })
    run_task(data, output=out, workers=2, quiet=True)
    return out


def _load(storage: Any) -> optuna.Study:
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


@pytest.mark.parametrize("name", ["study.log", "study.db"])
def test_export_holds_every_value_of_the_results(finished: Path, name: str, tmp_path: Path, capsys: Any) -> None:
    file = tmp_path / name
    code, out, err = run_cli(["tasks", "export", str(finished), "--optuna", str(file)], capsys)
    assert code == 0, err
    storage: Any = f"sqlite:///{file}" if name.endswith(".db") else optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(file)))
    assert f"optuna-dashboard {file if name.endswith('.log') else storage}" in out
    study = _load(storage)
    doc = results(finished)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE and study.metric_names == ["f1_macro"]
    assert [t.user_attrs["mltask_number"] for t in study.trials] == [t["number"] for t in doc["trials"]]
    states = {"complete": TrialState.COMPLETE, "failed": TrialState.FAIL}
    assert {t["state"] for t in doc["trials"]} == {"complete", "failed"}
    for trial, row in zip(study.trials, doc["trials"], strict=True):
        assert trial.state == states[row["state"]]
        assert trial.value == row["mean_test_score"]
        sampled = {k: v for k, v in row["params"].items() if k != "random_state"}
        assert trial.params == sampled and trial.user_attrs["fixed_random_state"] == 0
        for key, value in row.items():
            if key not in ("params", "state", "number", "finished_at", "mean_test_score") and value is not None:
                assert trial.user_attrs[key] == value, key
        assert trial.datetime_complete.timestamp() == pytest.approx(row["finished_at"], abs=1e-5)
        assert trial.datetime_start <= trial.datetime_complete
    assert file.stat().st_size > 0
    code, _, err = run_cli(["tasks", "export", str(finished), "--optuna", str(file)], capsys)
    assert code == 2 and "exists" in err  # never overwrites


def test_optuna_importance_and_visualization_work_on_an_export(finished: Path, tmp_path: Path, capsys: Any) -> None:
    file = tmp_path / "study.log"
    assert run_cli(["tasks", "export", str(finished), "--optuna", str(file)], capsys)[0] == 0
    study = _load(optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(file))))
    importances = optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(
        seed=0))
    assert set(importances) <= {"criterion", "max_depth", "min_samples_leaf"} and importances
    figure = optuna.visualization.plot_optimization_history(study)
    assert len(figure.data[0].y) == sum(t.state == TrialState.COMPLETE for t in study.trials)
    optuna.visualization.plot_slice(study)


def test_optuna_dashboard_serves_an_export(finished: Path, tmp_path: Path, capsys: Any) -> None:
    """optuna-dashboard's own app, in process: its API lists the study and every trial."""
    from optuna_dashboard import wsgi

    file = tmp_path / "study.db"
    assert run_cli(["tasks", "export", str(finished), "--optuna", str(file)], capsys)[0] == 0
    app = wsgi(f"sqlite:///{file}")

    def get(path: str) -> Any:
        status: list[str] = []
        environ = {"PATH_INFO": path}
        setup_testing_defaults(environ)
        body = app(environ, lambda s, headers, exc_info=None: status.append(s))
        assert status[0].startswith("200"), status
        return json.loads(b"".join(body))

    (study,) = get("/api/studies")["study_summaries"]
    detail = get(f"/api/studies/{study['study_id']}")
    assert len(detail["trials"]) == len(results(finished)["trials"])


def test_trials_dataframe_from_python(finished: Path) -> None:
    from mltask.runner import RunResult, show

    frame = RunResult(finished, show(finished), None).trials_dataframe()
    doc = results(finished)
    assert list(frame["user_attrs_mltask_number"]) == [t["number"] for t in doc["trials"]]
    complete = frame[frame["state"] == "COMPLETE"]
    assert list(complete["value_f1_macro"]) == [t["mean_test_score"] for t in doc["trials"] if t["state"] == "complete"]
    assert {"params_criterion", "params_max_depth", "user_attrs_mean_test_acc", "duration"} <= set(frame.columns)
