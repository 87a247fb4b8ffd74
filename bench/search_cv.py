"""GolemSearchCV(backend="local", workers=2) against GridSearchCV(n_jobs=2) and OptunaSearchCV(n_jobs=2).

The same configurations, folds and estimator, side by side, the whole ``fit`` timed (search
and refit; GolemSearchCV also writes its results files), cold worker pools each time:

- digits + (StandardScaler, SVC), a grid of 24 configurations x 5 folds: GolemSearchCV
  (algorithm="grid") vs GridSearchCV, and OptunaSearchCV told to evaluate those 24;
- breast_cancer + random forest, 30 configurations GolemSearchCV samples (random search) x 5
  folds: GridSearchCV given that list of one-point grids, OptunaSearchCV with them enqueued.

Ratios are GolemSearchCV's wall time over the peer's (target <= 1.0 with verification off,
<= 1.1 at the default verification); medians of alternating runs, as these machines are small
and noisy. Mean CV scores must be identical per configuration, which the script asserts.
OptunaSearchCV comes from ``optuna-integration``.

    python bench/search_cv.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from joblib.externals.loky import get_reusable_executor
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from mltask import GolemSearchCV

SEED = 0


def _key(params: dict) -> str:
    return json.dumps({k: v.item() if hasattr(v, "item") else v for k, v in params.items()}, sort_keys=True)


def _means(search: Any) -> dict[str, float]:
    if hasattr(search, "study_"):  # OptunaSearchCV keeps its results on the study's trials
        return {_key(t.params): float(t.user_attrs["mean_test_score"]) for t in search.study_.trials}
    res = search.cv_results_
    return {_key(p): float(s) for p, s in zip(res["params"], res["mean_test_score"], strict=True)}


def _timed(make: Any, X: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, float]]:
    get_reusable_executor().shutdown(wait=True)  # cold start for every library, as GolemSearchCV's workers are
    with tempfile.TemporaryDirectory() as tmp:
        search = make(Path(tmp) / "out")
        started = time.perf_counter()
        search.fit(X, y)
        wall = time.perf_counter() - started
    return wall, _means(search)


def _optuna_search(estimator: Any, configs: list[dict], cv: Any) -> Any:
    """OptunaSearchCV evaluating exactly ``configs`` (enqueued in order), two threads, as Optuna runs n_jobs."""
    from optuna_integration import OptunaSearchCV

    space = {name: optuna.distributions.CategoricalDistribution(sorted({c[name] for c in configs}, key=repr))
             for name in configs[0]}
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=SEED))
    for config in configs:
        study.enqueue_trial(config)
    return OptunaSearchCV(estimator, space, cv=cv, n_trials=len(configs), n_jobs=2, study=study, refit=True,
                          random_state=SEED)


def compare(label: str, ours: dict[str, Any], peers: dict[str, Any], X: np.ndarray, y: np.ndarray,
            repeats: int) -> dict[str, float]:
    """Median wall times of GolemSearchCV (verification off, default) and each peer, alternating runs."""
    makers = {"golem_off": ours["off"], "golem_default": ours["default"], **peers}
    for make in makers.values():  # warm-up: imports, file caches
        _timed(make, X, y)
    times: dict[str, list[float]] = {name: [] for name in makers}
    scores: dict[str, dict[str, float]] = {}
    for _ in range(repeats):
        for name, make in makers.items():
            seconds, scores[name] = _timed(make, X, y)
            times[name].append(seconds)
    reference = scores["golem_off"]
    for name, means in scores.items():
        assert set(means) == set(reference), f"{name} evaluated other configurations"
        worst = max(abs(means[k] - reference[k]) for k in reference)
        assert worst == 0.0, f"{name}: mean scores differ by up to {worst}"
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"\n{label}: {len(reference)} configurations x 5 folds, median of {repeats} (identical mean scores)")
    print(f"{'':28}{'seconds':>9}{'golem off / this':>18}{'golem default / this':>22}")
    for name, seconds in medians.items():
        print(f"{name:28}{seconds:9.2f}{medians['golem_off'] / seconds:18.3f}"
              f"{medians['golem_default'] / seconds:22.3f}")
    return medians


def digits(quick: bool, repeats: int, golem: Any, cv: Any) -> None:
    X, y = load_digits(return_X_y=True)
    grid = {"svc__C": [0.1, 1.0, 10.0, 100.0] if quick else [0.1, 0.3, 1.0, 3.0, 10.0, 100.0],
            "svc__gamma": [1e-4, 1e-3] if quick else [1e-4, 3e-4, 1e-3, 3e-3]}
    svc = Pipeline([("scaler", StandardScaler()), ("svc", SVC())])
    configs = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    compare("digits + scaler/SVC grid",
            {"off": golem(svc, grid, "grid", 0, False), "default": golem(svc, grid, "grid", 0, None)},
            {"GridSearchCV(n_jobs=2)": lambda out: GridSearchCV(svc, grid, cv=cv, n_jobs=2),
             "OptunaSearchCV(n_jobs=2)": lambda out: _optuna_search(svc, configs, cv)},
            X, y, repeats)


def forest(quick: bool, repeats: int, golem: Any, cv: Any) -> None:
    X, y = load_breast_cancer(return_X_y=True)
    n_iter = 12 if quick else 30
    space = {"n_estimators": {"type": "int", "low": 20, "high": 120, "step": 10},
             "max_depth": {"type": "int", "low": 2, "high": 12}, "max_features": ["sqrt", "log2"]}
    model = RandomForestClassifier(random_state=SEED)
    with tempfile.TemporaryDirectory() as tmp:  # the configurations GolemSearchCV samples, for the peers
        sampled = golem(model, space, "random", n_iter, False)(Path(tmp) / "o").fit(X, y).cv_results_["params"]
    configs = [{k: v.item() if hasattr(v, "item") else v for k, v in c.items()} for c in sampled]
    compare("breast_cancer + random forest random",
            {"off": golem(model, space, "random", n_iter, False),
             "default": golem(model, space, "random", n_iter, None)},
            {"GridSearchCV(n_jobs=2)": lambda out: GridSearchCV(model, [{k: [v] for k, v in c.items()}
                                                                         for c in configs], cv=cv, n_jobs=2),
             "OptunaSearchCV(n_jobs=2)": lambda out: _optuna_search(model, configs, cv)},
            X, y, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller searches, one run each")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each search (median)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
    cv = StratifiedKFold(5, shuffle=True, random_state=SEED)

    def golem(estimator: Any, space: dict, algorithm: str, n_iter: int, verification: Any) -> Any:
        return lambda out: GolemSearchCV(estimator, space, algorithm=algorithm, n_iter=n_iter, cv=cv, workers=2,
                                         random_state=SEED, output=out, verification=verification)

    for bench in (digits, forest):
        bench(args.quick, 1 if args.quick else args.repeats, golem, cv)


if __name__ == "__main__":
    main()
