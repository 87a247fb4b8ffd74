"""What the task JSON gained for GolemSearchCV, as a CLI user writes it: estimator objects, several
metrics with a refit metric, training scores, group / time-series / repeated CV, tables, and the
verifier comparing every metric."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.model_selection import GroupKFold, RepeatedStratifiedKFold, TimeSeriesSplit, cross_validate
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MinMaxScaler, OneHotEncoder
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

from mltask.data import load_dataset
from mltask.definition import DatasetSpec, parse_definition
from mltask.errors import TaskError
from mltask.estimators import EstimatorObject, build_object, encode_estimator
from mltask.protocol import SubtaskDefinition
from mltask.table import write_dataset
from tests.dishonest import run_inline
from tests.support import results, run_cli, task_dict, write_task

TREE_OBJECT = {"class": "sklearn.pipeline.Pipeline", "params": {"steps": [
    {"tuple": ["scale", {"class": "sklearn.preprocessing.MinMaxScaler",
                         "params": {"feature_range": {"tuple": [0, 2]}}}]},
    {"tuple": ["tree", {"class": "sklearn.tree.DecisionTreeClassifier", "params": {"random_state": 0}}]},
]}}


def test_a_cli_task_with_an_estimator_object_several_metrics_and_repeated_cv(tmp_path: Path, capsys: Any) -> None:
    data = task_dict(estimator=TREE_OBJECT, search_space={"tree__max_depth": [1, 2, 3]}, algorithm="grid",
                     n_trials=None, scoring={"acc": "accuracy", "f1": "f1_macro"}, refit_metric="f1",
                     return_train_score=True,
                     cv={"kind": "repeated_stratified", "folds": 3, "repeats": 2, "seed": 1})
    code, _, err = run_cli(["tasks", "create", str(write_task(tmp_path, data)), "--output", str(tmp_path / "out"),
                            "--quiet", "--workers", "2"], capsys)
    assert code == 0, err
    doc = results(tmp_path / "out")
    assert doc["scoring"] == "f1_macro" and doc["cv"] == "repeated_stratified 3-fold x 2, shuffled with seed 1"
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    model = Pipeline([("scale", MinMaxScaler(feature_range=(0, 2))), ("tree", DecisionTreeClassifier(random_state=0))])
    for trial in doc["trials"]:
        model.set_params(**trial["params"])
        expected = cross_validate(model, X, y, scoring={"acc": "accuracy", "f1": "f1_macro"}, return_train_score=True,
                                  cv=RepeatedStratifiedKFold(n_splits=3, n_repeats=2, random_state=1))
        assert trial["mean_test_score"] == np.mean(expected["test_f1"])  # the search optimises the refit metric
        for name in ("acc", "f1"):
            assert [trial[f"split{k}_test_{name}"] for k in range(6)] == list(expected[f"test_{name}"])
            assert trial[f"mean_train_{name}"] == np.mean(expected[f"train_{name}"])
    header = (tmp_path / "out" / "results.csv").read_text().splitlines()[0].split(",")
    assert {"mean_test_acc", "split5_test_f1", "mean_train_f1"} <= set(header)


@pytest.mark.parametrize(("cv", "splitter"), [
    ({"kind": "group", "folds": 3, "shuffle": False}, GroupKFold(3)),
    ({"kind": "timeseries", "folds": 3, "gap": 1, "test_size": 20}, TimeSeriesSplit(3, gap=1, test_size=20)),
])
def test_group_and_time_series_kinds_split_as_scikit_learn(cv: dict, splitter: Any, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(size=90), "b": rng.normal(size=90), "g": rng.integers(0, 9, 90),
                          "label": rng.integers(0, 2, 90)})
    frame.to_csv(tmp_path / "data.csv", index=False)
    data = task_dict(dataset={"csv": "data.csv", "target": "label", "groups": "g"}, cv=cv, algorithm="grid",
                     n_trials=None, search_space={"max_depth": [1, 3], "random_state": 0})
    data["resources"] = ["data.csv"]
    from mltask import run_task

    run_task(write_task(tmp_path, data), output=tmp_path / "out", workers=1, quiet=True)
    X, y, groups = frame[["a", "b"]].to_numpy(), frame["label"].to_numpy(), frame["g"].to_numpy()
    for trial in results(tmp_path / "out")["trials"]:
        expected = cross_validate(DecisionTreeClassifier(**trial["params"]), X, y, groups=groups, cv=splitter)
        assert [trial[f"split{k}_test_score"] for k in range(3)] == list(expected["test_score"])


def test_group_kinds_need_groups(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match=r"options\.dataset\.groups: cv kind group"):
        from mltask import run_task

        run_task(task_dict(cv={"kind": "group"}), output=tmp_path / "out", quiet=True)


@pytest.mark.parametrize(("options", "field", "words"), [
    ({"scoring": ["accuracy", "accuracy"]}, "options.scoring", "listed twice"),
    ({"scoring": {"acc": "accuracy"}, "refit_metric": "f1"}, "options", "not one of the scorers"),
    ({"scoring": {"acc": "acuracy"}}, "options.scoring.acc", "did you mean 'accuracy'"),
    ({"cv": {"kind": "timeseries", "test_size": 0.2}}, "options.cv", "number of rows"),
    ({"cv": {"kind": "repeated_kfold", "folds": 10, "repeats": 20}}, "options.cv", "more than 100 splits"),
    ({"estimator": {"class": "sklearn.svm.SVC", "params": {"C": {"float": "big"}}}},
     "options.estimator.params.C", '"float" takes'),
    ({"estimator": {"class": "sklearn.svm.SVC", "params": {"C": {"x": 1}}}}, "options.estimator.params.C",
     "tagged values"),
    ({"estimator": {"class": "os.system"}}, "options.estimator.class", "outside the allowed modules"),
    ({"estimator": {"class": "sklearn.pipeline.Pipeline", "params": {"steps": [], "memory": "/tmp/cache"}}},
     "options.estimator.params.memory", "takes a file or directory"),
    ({"estimator": {"class": "sklearn.pipeline.Pipeline", "params": {"steps": [
        {"tuple": ["m", {"class": "sklearn.ensemble.BaggingClassifier",
                         "params": {"estimator": {"class": "os.path.join"}}}]}]}}},
     "options.estimator.params.steps[0][1].params.estimator.class", "outside the allowed modules"),
])
def test_bad_task_json_is_one_line_naming_the_field(options: dict, field: str, words: str, tmp_path: Path,
                                                    capsys: Any) -> None:
    code, _, err = run_cli(["tasks", "create", str(write_task(tmp_path, task_dict(**options))), "--output",
                            str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 2 and err.startswith(f"mltask: error: {field}: ") and words in err, err
    assert len(err.strip().splitlines()) == 1


def test_estimator_objects_round_trip_through_json() -> None:
    original = Pipeline([
        ("pre", ColumnTransformer([("cat", OneHotEncoder(dtype=np.float32, categories=[np.array(["a", "b"])]),
                                    ["c"])], remainder="passthrough")),
        ("svc", SVC(C=0.5, class_weight={0: 1, 1: 3})),
    ])
    spec = EstimatorObject.model_validate(json.loads(json.dumps(encode_estimator(original))))
    rebuilt = build_object(spec, ["sklearn."], "options.estimator")
    ours, theirs = rebuilt.get_params(deep=True), original.get_params(deep=True)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if not hasattr(value, "get_params"):
            assert repr(ours[key]) == repr(value), key
    assert encode_estimator(rebuilt) == encode_estimator(original)


def test_non_finite_floats_and_numpy_values_are_tagged() -> None:
    from sklearn.impute import SimpleImputer

    spec = encode_estimator(SimpleImputer(missing_values=-1.0, fill_value=np.float64(np.inf)))
    assert spec == {"class": "sklearn.impute.SimpleImputer", "params": {"fill_value": {"float": "inf"},
                                                                          "missing_values": -1.0}}
    assert math.isinf(build_object(EstimatorObject.model_validate(spec), ["sklearn."], "e").fill_value)


def test_a_table_keeps_every_column_type(tmp_path: Path) -> None:
    frame = pd.DataFrame({
        "i": np.arange(6, dtype=np.int32), "f": np.linspace(0, 1, 6), "c": pd.Categorical(list("xyzxyx")),
        "n": pd.array([1, None, 3, 4, 5, 6], dtype="Int64"), "s": ["u", None, "w", "v", "u", "u"],
        "o": pd.Series(["p", None, float("nan"), "q", "p", "p"], dtype=object),
        "t": pd.to_datetime(["2020-01-01"] * 5 + [None]), "b": [True, False] * 3,
        "k": pd.Categorical([1, 2, 1, None, 2, 1], ordered=True),
        "st": pd.Series(["a", None, "b", "c", "d", "e"], dtype="string"),
        "nb": pd.array([True, None, False, True, True, False], dtype="boolean"),
    })
    write_dataset(tmp_path / "t.npz", frame, np.array(list("abcabc")), groups=[1, 1, 2, 2, 3, 3])
    with np.load(tmp_path / "t.npz", allow_pickle=False) as npz:  # data only: no pickled object anywhere
        assert all(npz[k].dtype != object for k in npz.files)
    loaded = load_dataset(DatasetSpec(npz="t.npz", groups="groups"), tmp_path)
    pd.testing.assert_frame_equal(loaded.X, frame)
    assert loaded.X["o"][1] is None and loaded.X["o"][2] != loaded.X["o"][2]  # None and NaN kept apart
    assert list(loaded.groups) == [1, 1, 2, 2, 3, 3] and list(loaded.y) == list("abcabc")


@pytest.mark.parametrize(("column", "words"), [
    (pd.Series([1, "a", 2, 3, 4, 5], dtype=object), "among strings"),
    (pd.Series([pd.Timestamp("2020-01-01", tz="UTC")] * 6), "cannot be sent"),
    (pd.Series([[1], [2], [3], [4], [5], [6]]), "among strings"),
])
def test_a_table_column_that_is_not_plain_data_is_named(column: pd.Series, words: str, tmp_path: Path) -> None:
    with pytest.raises(TaskError, match=words) as caught:
        write_dataset(tmp_path / "t.npz", pd.DataFrame({"ok": range(6), "odd": column}), np.zeros(6))
    assert caught.value.field == "X['odd']"


def _fake_metric(kind: str) -> Any:
    """A provider that reports the optimised score honestly and fakes another metric (or a training score) on
    every fold of every trial, so any check of its work catches it."""

    def cheat(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
        for trial in doc["trials"]:
            if trial["status"] == "ok":
                scores = trial[kind]["f1" if kind == "metric_scores" else "acc"]
                trial[kind]["f1" if kind == "metric_scores" else "acc"] = [s - 0.05 for s in scores]
        return doc

    return cheat


@pytest.mark.parametrize("kind", ["metric_scores", "train_scores"])
def test_a_faked_metric_that_is_not_optimised_is_caught(kind: str, tmp_path: Path) -> None:
    data = task_dict(n_trials=8, verification={"budget": 1.0},  # every answer checked: the catch is certain
                     scoring={"acc": "accuracy", "f1": "f1_macro"}, refit_metric="acc",
                     return_train_score=True, cv={"kind": "stratified", "folds": 4}, search_space={
                         "max_depth": {"type": "int", "low": 1, "high": 6}, "random_state": 0})
    data["subtasks_count"] = 4
    task, backend, status = run_inline(data, tmp_path / "out", {"honest": None, "cheat": _fake_metric(kind)})
    assert status == "finished" and backend.faked["cheat"] > 0
    assert set(task.store.bans()) == {"cheat"}
    assert all(r.provider == "honest" for r in task.store.trials())


def test_a_provider_on_another_version_of_a_package_the_problem_uses_is_not_compared() -> None:
    from mltask.provider import environment

    ours = environment()
    assert ours.mismatch(ours.model_copy(update={"packages": {"pandas": pd.__version__}})) is None
    said = ours.mismatch(ours.model_copy(update={"packages": {"pandas": "0.0.1", "nosuchpackage": "1.0"}}))
    assert said == f"nosuchpackage 1.0 (requestor none), pandas 0.0.1 (requestor {pd.__version__})"


def test_image_extras_are_allowed_by_their_modules_and_pinned_to_the_requestors_versions() -> None:
    import lightgbm

    from mltask.image import PROVIDER_PACKAGES, extra_modules, pinned_requirements

    assert extra_modules(("xgboost-cpu", "lightgbm")) == ["xgboost.", "lightgbm."]
    pins = pinned_requirements((*PROVIDER_PACKAGES, "lightgbm"))
    assert f"lightgbm=={lightgbm.__version__}" in pins and f"pandas=={pd.__version__}" in pins
    with pytest.raises(TaskError, match="not installed here"):
        extra_modules(("no-such-distribution",))


def test_a_multi_metric_definition_parses_as_cli_users_write_it() -> None:
    definition = parse_definition(task_dict(scoring=["accuracy", "f1_macro"], refit_metric="f1_macro"))
    assert definition.options.metrics == {"accuracy": "accuracy", "f1_macro": "f1_macro"}
