"""Bad input: one line naming the field and the fix, exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support import run_cli, task_dict, write_task

SPACE = {"max_depth": {"type": "int", "low": 1, "high": 4}}


def _csv(tmp_path: Path, text_column: bool = False) -> Path:
    rng = np.random.default_rng(0)
    lines = ["a,b,color,label" if text_column else "a,b,label"]
    for i in range(60):
        row = [f"{rng.normal():.3f}", f"{rng.normal():.3f}"]
        if text_column:
            row.append(["red", "green"][i % 2])
        lines.append(",".join([*row, str(i % 2)]))
    path = tmp_path / "data.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _case(tmp_path: Path, name: str) -> dict[str, Any] | str:
    """The bad task for case ``name`` (a dict, or raw text for malformed JSON)."""
    if name == "malformed_json":
        return '{"type": "ml_hyperparameter_search", "options": {'
    if name == "unknown_field":
        task = task_dict()
        task["options"]["n_trails"] = 5
        return task
    if name == "unknown_top_field":
        return {**task_dict(), "colour": "blue"}
    if name == "wrong_type":
        return task_dict(n_trials="many")
    if name == "inverted_range":
        return task_dict(search_space={"max_depth": {"type": "int", "low": 5, "high": 1}})
    if name == "empty_choices":
        return task_dict(search_space={"criterion": {"type": "categorical", "choices": []}})
    if name == "empty_space":
        return task_dict(search_space={})
    if name == "log_nonpositive":
        return task_dict(search_space={"ccp_alpha": {"type": "float", "low": 0.0, "high": 1.0, "log": True}})
    if name == "grid_too_large":
        return task_dict(algorithm="grid", n_trials=3, search_space={"max_depth": [1, 2, 3, 4, 5]})
    if name == "grid_continuous":
        return task_dict(algorithm="grid", n_trials=None,
                         search_space={"ccp_alpha": {"type": "float", "low": 0.0, "high": 1.0}})
    if name == "unknown_estimator":
        return task_dict(estimator="sklearn.tree.NoSuchTree")
    if name == "estimator_outside_prefixes":
        return task_dict(estimator="os.system")
    if name == "unknown_parameter":
        return task_dict(search_space={"max_dept": {"type": "int", "low": 1, "high": 4}})
    if name == "unknown_scorer":
        return task_dict(scoring="acuracy")
    if name == "missing_dataset_file":
        return task_dict(dataset={"csv": "nowhere.csv", "target": "label"})
    if name == "missing_resource_path":
        return {**task_dict(dataset={"csv": "data.csv", "target": "label"}), "resources": ["nowhere/data.csv"]}
    if name == "missing_target_column":
        _csv(tmp_path)
        return {**task_dict(dataset={"csv": "data.csv", "target": "y"}, search_space=SPACE), "resources": ["data.csv"]}
    if name == "text_column":
        _csv(tmp_path, text_column=True)
        return {**task_dict(dataset={"csv": "data.csv", "target": "label"}, search_space=SPACE),
                "resources": ["data.csv"]}
    if name == "script_without_function":
        (tmp_path / "train.py").write_text("def train(params):\n    return 1.0\n")
        return {**task_dict(estimator=None, scoring=None, script={"file": "train.py"}), "resources": ["train.py"]}
    if name == "bad_duration":
        return {**task_dict(), "timeout": "ten minutes"}
    if name == "unknown_type":
        return {**task_dict(), "type": "Blender"}
    if name == "negative_budget":
        return task_dict(verification={"budget": -0.1})
    if name == "budget_above_one":
        return task_dict(verification={"budget": 1.5})
    if name == "negative_tolerance":
        return task_dict(verification={"rel_tolerance": -1e-9})
    raise AssertionError(name)


CASES = {
    # case: a fragment the one-line error must contain (the field)
    "malformed_json": "not valid JSON",
    "unknown_field": "options.n_trails",
    "unknown_top_field": "colour",
    "wrong_type": "options.n_trials",
    "inverted_range": "options.search_space.max_depth",
    "empty_choices": "options.search_space.criterion",
    "empty_space": "options.search_space",
    "log_nonpositive": "options.search_space.ccp_alpha",
    "grid_too_large": "options.n_trials",
    "grid_continuous": "options.search_space",
    "unknown_estimator": "options.estimator",
    "estimator_outside_prefixes": "options.estimator",
    "unknown_parameter": "options.search_space.max_dept",
    "unknown_scorer": "options.scoring",
    "missing_dataset_file": "options.dataset.csv",
    "missing_resource_path": "resources[0]",
    "missing_target_column": "options.dataset.target",
    "text_column": "options.dataset",
    "script_without_function": "options.script.function",
    "bad_duration": "timeout",
    "unknown_type": "type",
    "negative_budget": "options.verification.budget",
    "budget_above_one": "options.verification.budget",
    "negative_tolerance": "options.verification.rel_tolerance",
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_task_gives_one_line_and_exit_2(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = _case(tmp_path, name)
    path = tmp_path / "task.json"
    path.write_text(case) if isinstance(case, str) else write_task(tmp_path, case)
    code, out, err = run_cli(["tasks", "create", str(path), "--output", str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mltask: error: ")
    assert CASES[name] in lines[0]
    assert "Traceback" not in err + out


def test_hints_say_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hints = {"unknown_scorer": "did you mean 'accuracy'", "unknown_parameter": "did you mean 'max_depth'",
             "estimator_outside_prefixes": "allowed_modules", "text_column": "OneHotEncoder",
             "grid_too_large": "raise n_trials", "inverted_range": "swap them", "log_nonpositive": "raise low"}
    for name, hint in hints.items():
        directory = tmp_path / name
        directory.mkdir()
        path = write_task(directory, _case(directory, name))  # type: ignore[arg-type]
        _, _, err = run_cli(["tasks", "create", str(path), "--output", str(directory / "o"), "--quiet"], capsys)
        assert hint in err, (name, err)


def test_missing_task_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["tasks", "create", str(tmp_path / "none.json")], capsys)
    assert code == 2 and "no such task file" in err


def test_bad_workers_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        run_cli(["tasks", "create", "t.json", "--workers", "0"], capsys)
    assert stop.value.code == 2
    assert "positive whole number" in capsys.readouterr().err


def test_subprocess_exit_code_and_no_traceback(tmp_path: Path) -> None:
    path = write_task(tmp_path, task_dict(scoring="acuracy"))
    proc = subprocess.run([sys.executable, "-m", "mltask", "tasks", "create", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "options.scoring" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "mltask-results" / "tiny" / "state.db").exists()
