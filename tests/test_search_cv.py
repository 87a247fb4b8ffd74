"""GolemSearchCV against scikit-learn's own searches: the same configurations and splitter give
the same ``cv_results_`` key by key, the same best configuration and the same predictions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy.stats import loguniform, norm, randint, uniform
from sklearn.base import clone
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_breast_cancer, load_iris
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import (
    GridSearchCV,
    GroupKFold,
    KFold,
    RandomizedSearchCV,
    RepeatedStratifiedKFold,
    StratifiedKFold,
    TimeSeriesSplit,
)
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler
from sklearn.tree import DecisionTreeClassifier

from mltask import GolemSearchCV
from mltask.errors import TaskError
from mltask.store import Store
from tests.support import run_cli


def assert_same_search(ours: GolemSearchCV, theirs: Any, X: Any, y: Any) -> None:
    """``cv_results_`` equal key by key (times aside), same best, same predictions."""
    assert set(ours.cv_results_) == set(theirs.cv_results_)
    for key, expected in theirs.cv_results_.items():
        got = ours.cv_results_[key]
        if key.endswith("_time"):
            assert got.shape == expected.shape
        elif key == "params":
            assert got == expected
        else:
            np.testing.assert_array_equal(got, expected, err_msg=key)
            assert got.dtype == expected.dtype, key
            if isinstance(expected, np.ma.MaskedArray):
                np.testing.assert_array_equal(np.ma.getmaskarray(got), np.ma.getmaskarray(expected), err_msg=key)
    for attr in ("best_params_", "best_index_", "best_score_", "n_splits_", "multimetric_"):
        if hasattr(theirs, attr):
            assert getattr(ours, attr) == getattr(theirs, attr), attr
    if theirs.refit:
        np.testing.assert_array_equal(ours.predict(X), theirs.predict(X))
        assert ours.score(X, y) == theirs.score(X, y)


def _subtasks(search: GolemSearchCV) -> list[dict[str, Any]]:
    store = Store.open(search.output_dir_ / "state.db")
    try:
        return store.subtasks()
    finally:
        store.close()


def _data(loader: Any) -> tuple[np.ndarray, np.ndarray]:
    return loader(return_X_y=True)


def test_grid_search_equals_gridsearchcv(tmp_path: Path) -> None:
    X, y = _data(load_iris)
    grid = {"max_depth": [1, 2, 3, None], "criterion": ["gini", "entropy"], "min_samples_leaf": [1, 5]}
    estimator = DecisionTreeClassifier(random_state=0)
    cv = StratifiedKFold(4, shuffle=True, random_state=3)
    ours = GolemSearchCV(estimator, grid, algorithm="grid", cv=cv, n_jobs=2, random_state=0,
                         output=tmp_path / "out").fit(X, y)  # n_jobs, as for GridSearchCV, means workers
    assert_same_search(ours, GridSearchCV(estimator, grid, cv=cv).fit(X, y), X, y)
    assert {s["provider"] for s in _subtasks(ours)} == {"local-0", "local-1"}
    assert ours.verification_["verified_full"] >= 1 and ours.verification_["rejected_subtasks"] == 0
    assert ours.refit_time_ >= 0 and (ours.output_dir_ / "state.db").is_file()
    frame = ours.trials_dataframe()  # Optuna's view of the same trials
    assert len(frame) == len(ours.cv_results_["params"]) and (frame["state"] == "COMPLETE").all()
    assert sorted(frame["value_accuracy"]) == sorted(ours.cv_results_["mean_test_score"])


def test_random_search_equals_scikit_learn_on_the_same_configurations(tmp_path: Path) -> None:
    X, y = _data(load_breast_cancer)
    estimator = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    space = {"logisticregression__C": loguniform(1e-3, 1e2), "logisticregression__tol": uniform(1e-4, 1e-3),
             "logisticregression__max_iter": randint(100, 400)}
    ours = GolemSearchCV(estimator, space, n_iter=6, algorithm="random", cv=3, random_state=0,
                         output=tmp_path / "out", workers=2).fit(X, y)
    params = ours.cv_results_["params"]
    low, high = ours.cv_results_["param_logisticregression__C"].min(), ours.cv_results_[
        "param_logisticregression__C"].max()
    assert 1e-3 <= low <= high <= 1e2 and len(params) == 6
    theirs = GridSearchCV(estimator, [{k: [v] for k, v in p.items()} for p in params], cv=3).fit(X, y)
    assert_same_search(ours, theirs, X, y)


def test_several_metrics_refit_one_with_train_scores_and_groups(tmp_path: Path) -> None:
    X, y = _data(load_breast_cancer)
    groups = np.arange(len(y)) % 7
    estimator = make_pipeline(StandardScaler(), LogisticRegression())
    grid = {"logisticregression__C": [0.01, 0.1, 1.0], "logisticregression__fit_intercept": [True, False]}
    scoring = {"acc": "accuracy", "f1": "f1", "auc": "roc_auc"}
    kwargs = dict(cv=GroupKFold(4), scoring=scoring, refit="f1", return_train_score=True)
    ours = GolemSearchCV(estimator, grid, algorithm="grid", output=tmp_path / "out", workers=2, **kwargs)
    ours.fit(X, y, groups=groups)
    theirs = GridSearchCV(estimator, grid, **kwargs).fit(X, y, groups=groups)
    assert_same_search(ours, theirs, X, y)
    assert {"mean_train_auc", "split3_test_f1", "rank_test_acc"} <= set(ours.cv_results_)
    assert ours.scorer_.keys() == theirs.scorer_.keys()


@pytest.mark.parametrize("cv", [TimeSeriesSplit(3, gap=2), RepeatedStratifiedKFold(n_splits=3, n_repeats=2,
                                                                                     random_state=1)])
def test_time_series_and_repeated_splits(cv: Any, tmp_path: Path) -> None:
    X, y = _data(load_breast_cancer)
    estimator = DecisionTreeClassifier(random_state=0)
    grid = {"max_depth": [2, 4]}
    ours = GolemSearchCV(estimator, grid, algorithm="grid", cv=cv, output=tmp_path / "out", workers=2).fit(X, y)
    assert_same_search(ours, GridSearchCV(estimator, grid, cv=cv).fit(X, y), X, y)


def _frame() -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 240
    city = rng.choice(["paris", "lyon", "nice", "brest"], n)
    frame = pd.DataFrame({
        "age": rng.integers(18, 80, n),
        "income": rng.normal(3000, 800, n).round(2),
        "city": pd.Categorical(city),
        "plan": rng.choice(["basic", "plus"], n).astype(object),
    })
    y = ((frame["age"] > 45) ^ (frame["city"] == "nice") ^ (frame["plan"] == "plus")).to_numpy().astype(int)
    return frame, y


def _frame_pipeline() -> Any:
    columns = ColumnTransformer([
        ("num", StandardScaler(), ["age", "income"]),
        ("cat", OneHotEncoder(handle_unknown="ignore"), ["city", "plan"]),
    ])
    return make_pipeline(columns, LogisticRegression())


def test_dataframe_with_categorical_and_text_columns_through_a_column_transformer(tmp_path: Path) -> None:
    X, y = _frame()
    grid = {"logisticregression__C": [0.1, 1.0, 10.0], "columntransformer__num__with_mean": [True, False]}
    cv = KFold(3, shuffle=True, random_state=0)
    ours = GolemSearchCV(_frame_pipeline(), grid, algorithm="grid", cv=cv, output=tmp_path / "out",
                         workers=2).fit(X, y)
    assert_same_search(ours, GridSearchCV(_frame_pipeline(), grid, cv=cv).fit(X, y), X, y)
    assert list(ours.feature_names_in_) == list(X.columns)
    assert list(ours.best_estimator_[0].feature_names_in_) == list(X.columns)
    np.testing.assert_array_equal(ours.predict_proba(X), GridSearchCV(_frame_pipeline(), grid, cv=cv).fit(
        X, y).predict_proba(X))
    # pandas decides these scores too: each result names its version, which the verifier compares
    environments = [json.loads(s["environment"]) for s in _subtasks(ours) if s["environment"]]
    assert environments and all(e["packages"] == {"pandas": pd.__version__} for e in environments)


def test_the_cli_shows_and_resumes_the_output_dir(tmp_path: Path, capsys: Any) -> None:
    X, y = _data(load_iris)
    ours = GolemSearchCV(DecisionTreeClassifier(), {"max_depth": [1, 2, 3]}, algorithm="grid", cv=3,
                         output=tmp_path / "out", workers=1, random_state=0, verification=False).fit(X, y)
    assert ours.verification_["budget"] == 0.0 and ours.verification_["best_check"] is False
    code, out, _ = run_cli(["tasks", "show", str(ours.output_dir_)], capsys)
    assert code == 0 and "3 complete" in out
    code, _, err = run_cli(["tasks", "resume", str(ours.output_dir_), "--quiet", "--workers", "1"], capsys)
    assert code == 0, err
    document = json.loads((ours.output_dir_ / "results.json").read_text())
    assert document["status"] == "finished" and document["counts"]["complete"] == 3


def test_clone_get_params_set_params_round_trip() -> None:
    search = GolemSearchCV(DecisionTreeClassifier(max_depth=3), {"min_samples_leaf": randint(1, 9)}, n_iter=7,
                           scoring=["accuracy", "f1_macro"], refit="accuracy", backend="docker", workers=3,
                           verification=False, random_state=5)
    params = search.get_params()
    assert params["n_iter"] == 7 and params["estimator__max_depth"] == 3 and params["backend"] == "docker"
    copy = clone(search)
    assert copy is not search and copy.get_params()["estimator__max_depth"] == 3
    assert copy.get_params(deep=False).keys() == params.keys() - {k for k in params if k.startswith("estimator__")}
    copy.set_params(n_iter=3, estimator__max_depth=5, algorithm="random")
    assert (copy.n_iter, copy.estimator.max_depth, copy.algorithm) == (3, 5, "random")
    assert search.n_iter == 7 and search.estimator.max_depth == 3


def test_not_fitted_errors_as_scikit_learn() -> None:
    X, _ = _data(load_iris)
    search = GolemSearchCV(DecisionTreeClassifier(), {"max_depth": [1, 2]})
    for method in ("predict", "predict_proba", "score"):
        with pytest.raises(NotFittedError):
            getattr(search, method)(X) if method != "score" else search.score(X, X[:, 0])
    with pytest.raises(AttributeError, match="no attribute 'predict'") as caught:
        GolemSearchCV(DecisionTreeClassifier(), {"max_depth": [1, 2]}, refit=False).predict(X)
    assert "refit=False" in str(caught.value.__cause__)
    assert not hasattr(search, "transform")  # a classifier has none, so neither has the search


@pytest.mark.parametrize(("kwargs", "field", "words"), [
    ({"param_distributions": {"C": norm(0, 1)}}, "param_distributions.C", "uniform, loguniform or randint"),
    ({"param_distributions": {"C": [LogisticRegression()]}}, "param_distributions.C", "estimator"),
    ({"param_distributions": [{"C": [1.0]}]}, "param_distributions", "one dict"),
    ({"estimator": make_pipeline(FunctionTransformer(np.log1p), LogisticRegression())},
     "estimator.steps[0][1].func", "function"),
    ({"scoring": {"acc": lambda est, X, y: 1.0}}, "scoring.acc", "scorer name"),
    ({"random_state": np.random.RandomState(0)}, "random_state", "int"),
])
def test_what_cannot_reach_providers_is_named(kwargs: dict[str, Any], field: str, words: str) -> None:
    X, y = _data(load_iris)
    args = {"estimator": LogisticRegression(), "param_distributions": {"C": [0.1, 1.0]}, **kwargs}
    with pytest.raises(TaskError) as caught:
        GolemSearchCV(**args).fit(X, y)
    assert caught.value.field == field and words in caught.value.message


def test_a_class_defined_in_a_notebook_cannot_reach_providers() -> None:
    X, y = _data(load_iris)
    local = type("Local", (DecisionTreeClassifier,), {"__module__": "__main__"})
    with pytest.raises(TaskError, match="defined in this notebook"):
        GolemSearchCV(local(), {"max_depth": [1, 2]}).fit(X, y)


def test_randomized_search_arguments_translate() -> None:
    _, y = _data(load_iris)
    search = GolemSearchCV(DecisionTreeClassifier(), {"max_depth": randint(1, 6), "criterion": ("gini", "entropy")},
                           n_iter=5, cv=StratifiedKFold(3), random_state=0)
    task = search.task_definition(y)
    options = task["options"]
    assert options["search_space"] == {"max_depth": {"type": "int", "low": 1, "high": 5},
                                       "criterion": {"type": "categorical", "choices": ["gini", "entropy"]}}
    assert options["cv"] == {"seed": 0, "kind": "stratified", "folds": 3, "shuffle": False}
    assert options["n_trials"] == 5 and options["algorithm"] == "tpe"
    assert set(search.get_params(deep=False)) >= set(RandomizedSearchCV(DecisionTreeClassifier(), {}).get_params(
        deep=False)) - {"pre_dispatch"}


def _lightgbm_frame_search(**kwargs: Any) -> tuple[GolemSearchCV, Any, Any, Any]:
    from lightgbm import LGBMClassifier

    X, y = _frame()
    X = X.assign(plan=X["plan"].astype("category"))  # LightGBM reads categorical columns natively
    model = LGBMClassifier(n_estimators=40, n_jobs=1, deterministic=True, force_row_wise=True, verbose=-1,
                           random_state=0)
    grid = {"num_leaves": [4, 15], "learning_rate": [0.05, 0.2], "subsample": [0.7], "subsample_freq": [1]}
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    ours = GolemSearchCV(model, grid, algorithm="grid", cv=cv, scoring=["roc_auc", "accuracy"], refit="roc_auc",
                         **kwargs).fit(X, y)
    theirs = GridSearchCV(model, grid, cv=cv, scoring=["roc_auc", "accuracy"], refit="roc_auc").fit(X, y)
    return ours, theirs, X, y


def test_lightgbm_on_a_dataframe_equals_scikit_learn(tmp_path: Path) -> None:
    ours, theirs, X, y = _lightgbm_frame_search(output=tmp_path / "out", workers=2)
    assert_same_search(ours, theirs, X, y)
    assert json.loads((ours.output_dir_ / "results.json").read_text())["estimator"].startswith("LGBMClassifier(")


@pytest.mark.docker
def test_lightgbm_in_provider_containers_equals_the_requestors_reruns(provider_image: str, tmp_path: Path) -> None:
    """Provider containers score LightGBM on a DataFrame bit for bit as the requestor re-runs it."""
    from mltask.image import docker_client

    probe = "import lightgbm, pandas"
    try:
        docker_client().containers.run(provider_image, ["python", "-c", probe], remove=True, network_mode="none")
    except Exception as exc:  # the image cannot serve this test: say how to build one that can
        pytest.fail(f"{provider_image} cannot `{probe}` ({str(exc)[:200]}); build it with "
                    "`mltask image build --with lightgbm` (.ci/docker.sh does)")
    ours, theirs, X, y = _lightgbm_frame_search(output=tmp_path / "out", workers=2, backend="docker",
                                                image=provider_image, verification={"budget": 1.0})
    assert_same_search(ours, theirs, X, y)  # cv_results_ are the containers' scores
    checks = ours.verification_
    assert checks["banned_providers"] == {} and checks["rejected_subtasks"] == 0
    assert checks["verified_full"] >= 1 and checks["verified_full"] + checks["verified_cross"] + checks[
        "verified_spot"] >= 2  # re-runs agreed with what the containers reported
    environments = [json.loads(s["environment"]) for s in _subtasks(ours) if s["environment"]]
    import lightgbm

    assert environments and all(e["packages"] == {"lightgbm": lightgbm.__version__, "pandas": pd.__version__}
                                for e in environments)


def test_xgboost_equals_scikit_learn(tmp_path: Path) -> None:
    from xgboost import XGBClassifier

    X, y = _data(load_breast_cancer)
    model = XGBClassifier(n_estimators=20, n_jobs=1, tree_method="hist", random_state=0)
    grid = {"max_depth": [2, 4], "learning_rate": [0.1, 0.3], "subsample": [0.8]}
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    ours = GolemSearchCV(model, grid, algorithm="grid", cv=cv, output=tmp_path / "out", workers=2).fit(X, y)
    assert ours.task_definition(y)["options"]["allowed_modules"] == ["xgboost."]
    assert_same_search(ours, GridSearchCV(model, grid, cv=cv).fit(X, y), X, y)
