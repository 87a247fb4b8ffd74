"""Validation of the task file and the dataset: harmless inputs just work, unsafe ones get one line.

The table of bad inputs and their one-line errors is in test_cli_errors.py; here are the
inputs that must work (list choices, a CSV from a spreadsheet) and the checks that need more
than a message (how long a refusal takes, what a provider does, what reaches the estimator).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import joblib
import optuna
import pytest

from mltask import run_task
from mltask.data import load_dataset
from mltask.definition import DatasetSpec, parse_definition
from mltask.errors import TaskError
from mltask.protocol import SubtaskDefinition, TrialSpec
from mltask.provider import evaluate_subtask
from mltask.space import SearchSpace
from mltask.task import HyperparameterSearchTask
from tests.support import results, run_cli, task_dict, write_task

LAYERS = [[3], [4, 2]]


def _mlp(algorithm: str, n_trials: int | None) -> dict:
    return task_dict(
        estimator="sklearn.neural_network.MLPClassifier", algorithm=algorithm, n_trials=n_trials,
        search_space={"hidden_layer_sizes": LAYERS, "alpha": [0.1, 1.0], "max_iter": 20},
    )


@pytest.mark.parametrize("algorithm", ["random", "grid"])
def test_list_choices_run_end_to_end_and_the_refit_model_gets_the_list(algorithm: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_task(_mlp(algorithm, None if algorithm == "grid" else 4), workers=2, output=out, quiet=True)
    doc = results(out)
    assert doc["counts"]["complete"] == doc["counts"]["planned"] == 4
    seen = [(t["params"]["hidden_layer_sizes"], t["params"]["alpha"]) for t in doc["trials"]]
    assert all(layers in LAYERS for layers, _ in seen)
    if algorithm == "grid":
        assert sorted(seen) == sorted((layers, alpha) for layers in LAYERS for alpha in (0.1, 1.0))
    best = json.loads((out / "best.json").read_text())["params"]["hidden_layer_sizes"]
    assert best in LAYERS
    # The estimator gets a tuple, as scikit-learn's own defaults are (hidden_layer_sizes=(100,)).
    assert joblib.load(out / "model.joblib").hidden_layer_sizes == tuple(best)


def test_list_choices_survive_a_rebuilt_study(tmp_path: Path) -> None:
    """A ban (and a resume) rebuild the Optuna study from the stored lists."""
    task = HyperparameterSearchTask.create(parse_definition(_mlp("tpe", 6)), tmp_path, tmp_path / "out")
    task.subtasks_count = 3
    first = task.next_subtask("cheat")
    task.accept(evaluate_subtask(first, task.resources_dir))
    task.ban("cheat", "faked scores")
    again = task.next_subtask("honest")
    assert again.trials == first.trials
    task.store.close()
    task = HyperparameterSearchTask.load(tmp_path / "out")
    params = [t.params for s in iter(lambda: task.next_subtask("p"), None) for t in s.trials]
    assert len(params) == 6 and all(p["hidden_layer_sizes"] in LAYERS for p in params)


RANGES = [[0, 1], [-1, 1], [0, 2]]


@pytest.mark.parametrize("algorithm", ["grid", "random", "qmc", "tpe", "cmaes"])
def test_every_algorithm_proposes_list_choices_and_the_estimator_takes_them(algorithm: str, tmp_path: Path) -> None:
    """MinMaxScaler's feature_range takes a tuple only; JSON has lists, the estimator gets tuples."""
    data = task_dict(
        estimator={"pipeline": [["scale", "sklearn.preprocessing.MinMaxScaler"],
                                ["tree", "sklearn.tree.DecisionTreeClassifier"]]},
        algorithm=algorithm, n_trials=None if algorithm == "grid" else 8,
        search_space={"tree__max_depth": {"type": "int", "low": 1, "high": 4}, "scale__feature_range": RANGES},
    )
    task = HyperparameterSearchTask.create(parse_definition(data), tmp_path, tmp_path / "out")
    seen = []
    while (sub := task.next_subtask("p")) is not None:
        seen += [t.params["scale__feature_range"] for t in sub.trials]
        result = evaluate_subtask(sub, task.resources_dir)
        assert all(t.status == "ok" for t in result.trials), [t.error for t in result.trials]
        task.accept(result)
    assert len(seen) == (12 if algorithm == "grid" else 8) and all(v in RANGES for v in seen)


@pytest.mark.timeout(30)  # before the fix these built every value: a MemoryError or minutes
@pytest.mark.parametrize("space, size", [
    ({"max_depth": {"type": "int", "low": 1, "high": 10**9}}, "1,000,000,000"),
    ({"ccp_alpha": {"type": "float", "low": 0.0, "high": 1.0, "step": 1e-9}}, "1,000,000,000"),
])
def test_a_huge_grid_is_refused_at_once(space: dict, size: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    definition = parse_definition(task_dict(algorithm="grid", n_trials=None, search_space=space))
    started = time.perf_counter()
    with pytest.raises(ValueError, match="more than grid search enumerates"):
        definition.options.search_space.grid()
    assert time.perf_counter() - started < 1.0
    path = write_task(tmp_path, task_dict(algorithm="grid", n_trials=None, search_space=space))
    code, _, err = run_cli(["tasks", "create", str(path), "--output", str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"options.search_space: the grid has {size} configurations" in err and "(1,000,000)" in err


@pytest.mark.parametrize("space", [
    {"a": {"type": "int", "low": 3, "high": 20, "step": 4}, "b": [[1], [2, 3], "x"]},
    {"a": {"type": "float", "low": 0.0, "high": 1.0, "step": 0.1}, "b": {"type": "fixed", "value": [1, 2]}},
    {"a": {"type": "float", "low": 0.5, "high": 0.95, "step": 0.15}, "b": [True, False, None]},
])
def test_the_counted_grid_size_is_the_listed_one(space: dict) -> None:
    parsed = SearchSpace.model_validate(space)
    configurations = parsed.iter_grid()
    assert parsed.grid_size() == len(configurations) == len({json.dumps(c) for c in configurations})


def test_a_condition_on_a_stepped_float_fires() -> None:
    """Optuna samples 0.1 * 3 as 0.30000000000000004; a `when` listing 0.3 means that value."""
    space = SearchSpace.model_validate({
        "ccp_alpha": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.1},
        "max_depth": {"type": "int", "low": 1, "high": 3, "when": {"ccp_alpha": [0.3]}},
    })
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    configurations = [space.sample(study.ask()) for _ in range(60)]
    with_depth = [c for c in configurations if "max_depth" in c]
    assert with_depth and all(abs(c["ccp_alpha"] - 0.3) < 1e-9 for c in with_depth)


def _csv(tmp_path: Path, text: str) -> DatasetSpec:
    (tmp_path / "data.csv").write_bytes(text.encode("utf-8"))
    return DatasetSpec(csv="data.csv", target="label")


def test_a_csv_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    rows = "".join(f"{i % 2},{i * 0.5}\n" for i in range(10))
    data = load_dataset(_csv(tmp_path, "\ufefflabel,x\n" + rows), tmp_path)
    assert data.feature_names == ("x",) and list(data.y[:3]) == [0, 1, 0]


def test_blank_lines_at_the_end_of_a_csv_are_ignored(tmp_path: Path) -> None:
    rows = "".join(f"{i * 0.5},{i % 2}\r\n" for i in range(10))
    data = load_dataset(_csv(tmp_path, "x,label\r\n" + rows + "\r\n\r\n"), tmp_path)
    assert data.X.shape == (10, 1)


def test_a_blank_line_inside_a_csv_is_still_ragged(tmp_path: Path) -> None:
    rows = [f"{i * 0.5},{i % 2}\n" for i in range(10)]
    with pytest.raises(TaskError, match=r"data\.csv line 4 has a different number of fields"):
        load_dataset(_csv(tmp_path, "x,label\n" + "".join(rows[:2]) + "\n" + "".join(rows[2:])), tmp_path)


@pytest.mark.parametrize("name, value", [
    ("memory", "CACHE"),  # Pipeline's own joblib cache: it loads pickles back
    ("reduce__memory", "CACHE"),  # a step's cache
    ("reduce__memory", "cache"),  # a relative name counts too
    ("tree__criterion", "../gini"),  # any value that looks like a path
])
def test_a_provider_refuses_a_path_valued_parameter_before_building_the_estimator(
    name: str, value: str, tmp_path: Path
) -> None:
    """The requestor refuses these at create (test_cli_errors); a provider must not trust it to."""
    data = task_dict(estimator={"pipeline": [["reduce", "sklearn.cluster.FeatureAgglomeration"],
                                             ["tree", "sklearn.tree.DecisionTreeClassifier"]]},
                     search_space={"reduce__n_clusters": [2, 3], "tree__max_depth": [2]})
    task = HyperparameterSearchTask.create(parse_definition(data), tmp_path, tmp_path / "out")
    honest = task.next_subtask("p")
    cache = tmp_path / "cache"
    params = {**honest.trials[0].params, name: value.replace("CACHE", str(cache))}
    forged = SubtaskDefinition(task_id=honest.task_id, subtask_id=honest.subtask_id, problem=honest.problem,
                               trials=[TrialSpec(number=0, params=params, seed=1)])
    (trial,) = evaluate_subtask(forged, task.resources_dir).trials
    assert trial.status == "failed" and f"options.search_space.{name}" in (trial.error or "")
    assert "file" in (trial.error or "") and not cache.exists()
