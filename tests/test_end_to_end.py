"""Real searches: every template, the Python API, the CLI and `tasks show`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import joblib
import pytest

from mltask import run_task
from tests.support import TEMPLATES, results, run_cli, task_dict, write_task

# What a sensible search reaches on each template (scikit-learn's own defaults do about as well).
GOOD_ENOUGH = {
    "digits_svc_tpe": 0.95,
    "breast_cancer_rf_random": 0.97,
    "wine_logreg_grid": 0.95,
    "diabetes_ridge": -3300.0,
    "script_knn": 0.93,
    "breast_cancer_lightgbm": 0.99,  # roc_auc
    "digits_hgb_asha": 0.95,  # multi-fidelity: most configurations are pruned after a few iterations
}


def test_every_template_is_checked() -> None:
    assert {p.stem for p in TEMPLATES} == set(GOOD_ENOUGH)


@pytest.mark.slow
@pytest.mark.parametrize("template", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_template_runs_end_to_end(template: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_task(template, workers=2, output=out, quiet=True)
    definition = json.loads(template.read_text())
    doc = results(out)
    assert doc["status"] == "finished"
    planned = doc["counts"]["planned"]
    assert doc["counts"]["complete"] + doc["counts"].get("pruned", 0) == planned >= 8
    assert doc["best"]["mean_score"] >= GOOD_ENOUGH[template.stem]
    assert result.best is not None and result.best["mean_test_score"] == doc["best"]["mean_score"]
    for name in ("results.csv", "best.json", "report.md", "convergence.png", "state.db"):
        assert (out / name).is_file(), name
    assert len((out / "results.csv").read_text().splitlines()) == planned + 1
    verification = doc["verification"]
    assert verification["verified_full"] >= 1 and verification["banned_providers"] == {}
    if "script" in definition["options"]:
        assert not (out / "model.joblib").exists()
    else:
        model = joblib.load(out / "model.joblib")
        assert model.get_params()  # a fitted scikit-learn estimator with the best parameters
        for key, value in doc["best"]["params"].items():
            assert model.get_params()[key] == value
        fidelity = definition["options"].get("fidelity")
        if fidelity:  # refit at the resource the best was scored at
            assert model.get_params()[fidelity["resource"]] == fidelity["max_resource"] == doc["best"]["resource"]


def test_api_results_match_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_task(task_dict(), workers=2, output=out, quiet=True)
    doc = results(out)
    best = json.loads((out / "best.json").read_text())
    assert best["params"] == result.best["params"] == doc["best"]["params"]
    ranks = sorted(t["rank_test_score"] for t in doc["trials"])
    assert ranks[0] == 1 and len(doc["trials"]) == 8
    assert all(t["provider"].startswith("local-") for t in doc["trials"])


def test_cli_create_then_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = write_task(tmp_path, task_dict())
    code, _, _ = run_cli(["tasks", "create", str(task), "--output", str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 0
    code, out, _ = run_cli(["tasks", "show", str(tmp_path / "o")], capsys)
    assert code == 0 and "8 complete" in out and "finished" in out


def test_output_dir_is_not_silently_reused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = write_task(tmp_path, task_dict())
    args = ["tasks", "create", str(task), "--output", str(tmp_path / "o"), "--quiet"]
    assert run_cli(args, capsys)[0] == 0
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "--force" in err
    assert run_cli([*args, "--force"], capsys)[0] == 0


def test_types_template_and_schema(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run_cli(["types"], capsys)
    assert code == 0 and "ml_hyperparameter_search" in out and "ML hyperparameter search" in out
    code, out, _ = run_cli(["tasks", "schema"], capsys)
    assert code == 0 and "search_space" in json.loads(out)["$defs"]["SearchOptions"]["properties"]
    code, out, _ = run_cli(["tasks", "template"], capsys)
    template = write_task(tmp_path, json.loads(out))
    assert run_cli(["tasks", "create", str(template), "--output", str(tmp_path / "t"), "--quiet"], capsys)[0] == 0


def test_console_script_runs_a_search(tmp_path: Path) -> None:
    task = write_task(tmp_path, task_dict())
    proc = subprocess.run(
        [sys.executable, "-m", "mltask", "tasks", "create", str(task), "--output", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "best: trial" in proc.stderr and "8/8" in proc.stderr  # progress line and summary
