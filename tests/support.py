"""Shared test helpers: small tasks that run in a second or two, and a CLI runner."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from mltask.cli import main
from mltask.definition import parse_definition
from mltask.task import HyperparameterSearchTask

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = sorted((ROOT / "task_templates").glob("*.json"))

BASE_TASK: dict[str, Any] = {
    "type": "ml_hyperparameter_search",
    "name": "tiny",
    "timeout": "00:05:00",
    "subtask_timeout": "00:01:00",
    "subtasks_count": 4,
    "options": {
        "estimator": "sklearn.tree.DecisionTreeClassifier",
        "dataset": {"builtin": "iris"},
        "search_space": {
            "max_depth": {"type": "int", "low": 1, "high": 6},
            "criterion": ["gini", "entropy"],
        },
        "scoring": "accuracy",
        "cv": {"kind": "stratified", "folds": 3},
        "algorithm": "random",
        "n_trials": 8,
        "seed": 0,
    },
}


def task_dict(**options: Any) -> dict[str, Any]:
    """The tiny task with ``options`` overridden (``None`` removes a key)."""
    task = copy.deepcopy(BASE_TASK)
    for key, value in options.items():
        if value is None:
            task["options"].pop(key, None)
        else:
            task["options"][key] = value
    return task


def write_task(directory: Path, task: dict[str, Any], name: str = "task.json") -> Path:
    path = directory / name
    path.write_text(json.dumps(task), encoding="utf-8")
    return path


def run_cli(args: list[str], capsys: Any) -> tuple[int, str, str]:
    """Run ``mltask ARGS`` in-process; exit code, stdout, stderr."""
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def results(output_dir: Path) -> dict[str, Any]:
    return json.loads((output_dir / "results.json").read_text(encoding="utf-8"))


CLIMB_SCRIPT = "def fit_and_score(params, X_train, y_train, X_valid, y_valid, seed):\n" \
               "    return params['a'] * params['n'] / (params['n'] + 1)\n"


def climbing_task(directory: Path, name: str, batch: int = 1, script: str = CLIMB_SCRIPT) -> HyperparameterSearchTask:
    """A multi-fidelity script task of 6 trials in subtasks of ``batch`` (rungs n = 1, 3, 9), created but not run."""
    (directory / "climb.py").write_text(script)
    data = task_dict(estimator=None, scoring=None, script={"file": "climb.py"}, cv={"kind": "kfold", "folds": 2},
                     search_space={"a": {"type": "float", "low": 0, "high": 1}}, n_trials=6,
                     fidelity={"resource": "n", "min_resource": 1, "max_resource": 9, "reduction_factor": 3})
    data.update(resources=["climb.py"], subtasks_count=6 // batch)
    return HyperparameterSearchTask.create(parse_definition(data), directory, directory / name)
