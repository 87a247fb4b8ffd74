"""mltask's local backend against scikit-learn's own parallel search, side by side.

Same configurations, same folds, same estimator, 2 workers each:

- digits + (StandardScaler, SVC) grid search   vs  GridSearchCV(n_jobs=2)
- breast_cancer + RandomForest random search   vs  RandomizedSearchCV(n_jobs=2), given
  exactly the configurations mltask sampled (a list of one-point grids, n_iter = their
  number: scikit-learn samples such a list without replacement, so it evaluates each once)

Timed: mltask's search phase plus its refit (``results.json`` timing) against
``fit`` (which also refits); mltask's results files, report and plot are written after that
and printed separately. Verification is off for the ratio (scikit-learn trusts its workers,
and so may a requestor running on its own machine) and on for a second, informational ratio.
Both start their worker pools cold in every run (loky's reusable executor is shut down
first), and mltask sends one configuration per subtask, as scikit-learn dispatches single
fits. Runs alternate (sklearn, mltask, sklearn, ...) and medians are compared, because these
machines are small and noisy. Mean CV scores must be identical per configuration.

    python bench/compare_sklearn.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from joblib.externals.loky import get_reusable_executor
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import GridSearchCV, RandomizedSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from mltask import run_task

SEED = 0
NO_VERIFICATION = {"budget": 0.0, "verify_best": False}


def _task(name: str, estimator: Any, dataset: str, space: dict, algorithm: str, n_trials: int | None,
          subtasks: int, verification: dict | None) -> dict:
    options = {
        "estimator": estimator, "dataset": {"builtin": dataset}, "search_space": space, "scoring": "accuracy",
        "cv": {"kind": "stratified", "folds": 5, "shuffle": True, "seed": SEED},
        "algorithm": algorithm, "seed": SEED,
    }
    if n_trials:
        options["n_trials"] = n_trials
    if verification is not None:
        options["verification"] = verification
    return {"type": "ml_hyperparameter_search", "name": name, "timeout": "01:00:00", "subtask_timeout": "00:30:00",
            "subtasks_count": subtasks, "options": options}


def _run_mltask(task: dict) -> tuple[float, float, dict[str, float]]:
    """(search + refit seconds, total wall seconds, params-json -> mean score)."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        run_task(task, workers=2, output=Path(tmp) / "out", quiet=True)
        wall = time.perf_counter() - started
        doc = json.loads((Path(tmp) / "out" / "results.json").read_text())
    timed = doc["timing"]["search_seconds"] + doc["timing"]["refit_seconds"]
    scores = {_key(t["params"]): t["mean_test_score"] for t in doc["trials"]}
    return timed, wall, scores


def _run_sklearn(search: Any, X: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, float]]:
    # Cold start, like mltask's run_task: loky would otherwise reuse warm workers across fits.
    get_reusable_executor().shutdown(wait=True)
    started = time.perf_counter()
    search.fit(X, y)
    wall = time.perf_counter() - started
    res = search.cv_results_
    return wall, {_key(p): float(s) for p, s in zip(res["params"], res["mean_test_score"], strict=True)}


def _key(params: dict) -> str:
    return json.dumps({k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()}, sort_keys=True)


def compare(label: str, task: dict, verified_task: dict, make_search: Any, X: np.ndarray, y: np.ndarray,
            repeats: int) -> dict[str, float]:
    folds = StratifiedKFold(5, shuffle=True, random_state=SEED)
    _run_sklearn(make_search(folds), X, y)  # warm-up: imports, file caches
    _run_mltask(task)
    ours, theirs, walls, verified = [], [], [], []
    for _ in range(repeats):
        t, sk_scores = _run_sklearn(make_search(folds), X, y)
        theirs.append(t)
        timed, wall, scores = _run_mltask(task)
        ours.append(timed)
        walls.append(wall)
        verified.append(_run_mltask(verified_task)[0])
    worst = max(abs(scores[k] - sk_scores[k]) for k in sk_scores)
    assert set(scores) == set(sk_scores), "the two searches evaluated different configurations"
    out = {
        "configs": len(scores), "sklearn_s": statistics.median(theirs), "mltask_s": statistics.median(ours),
        "mltask_total_s": statistics.median(walls), "mltask_verified_s": statistics.median(verified),
        "max_score_diff": worst,
    }
    out["ratio"] = out["mltask_s"] / out["sklearn_s"]
    out["ratio_total"] = out["mltask_total_s"] / out["sklearn_s"]
    out["ratio_verified"] = out["mltask_verified_s"] / out["sklearn_s"]
    print(
        f"{label}: {out['configs']} configs x 5 folds, median of {repeats}: scikit-learn {out['sklearn_s']:.2f} s, "
        f"mltask {out['mltask_s']:.2f} s -> ratio {out['ratio']:.3f} (target <= 1.05); "
        f"with results/report/plot {out['ratio_total']:.3f}; with default verification {out['ratio_verified']:.3f}; "
        f"max |score diff| {worst:.1e}",
        flush=True,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller searches, 1 repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats

    X, y = load_digits(return_X_y=True)
    Cs = [0.1, 1.0, 10.0, 100.0] if args.quick else [0.1, 0.3, 1.0, 3.0, 10.0, 100.0]
    gammas = [1e-4, 1e-3] if args.quick else [1e-4, 3e-4, 1e-3, 3e-3]
    space = {"svc__C": Cs, "svc__gamma": gammas}
    pipeline = {"pipeline": [["scaler", "sklearn.preprocessing.StandardScaler"], ["svc", "sklearn.svm.SVC"]]}
    n = len(Cs) * len(gammas)
    digits = [_task("bench-digits", pipeline, "digits", space, "grid", None, n, v)
              for v in (NO_VERIFICATION, None)]
    compare(
        "digits + scaler/SVC grid", *digits,
        lambda cv: GridSearchCV(Pipeline([("scaler", StandardScaler()), ("svc", SVC())]),
                                {"svc__C": Cs, "svc__gamma": gammas}, cv=cv, n_jobs=2),
        X, y, repeats,
    )

    X, y = load_breast_cancer(return_X_y=True)
    n_trials = 12 if args.quick else 30
    space = {"n_estimators": {"type": "int", "low": 20, "high": 120, "step": 10},
             "max_depth": {"type": "int", "low": 2, "high": 12},
             "max_features": ["sqrt", "log2"], "random_state": SEED}
    forest = [_task("bench-rf", "sklearn.ensemble.RandomForestClassifier", "breast_cancer", space, "random",
                    n_trials, n_trials, v) for v in (NO_VERIFICATION, None)]
    with tempfile.TemporaryDirectory() as tmp:  # the configurations mltask samples, for scikit-learn
        run_task(forest[0], workers=2, output=Path(tmp) / "o", quiet=True)
        configs = [t["params"] for t in json.loads((Path(tmp) / "o" / "results.json").read_text())["trials"]]
    grid = [{k: [v] for k, v in c.items()} for c in configs]
    compare(
        "breast_cancer + random forest random", *forest,
        lambda cv: RandomizedSearchCV(RandomForestClassifier(), grid, n_iter=len(grid), cv=cv, n_jobs=2,
                                      random_state=SEED),
        X, y, repeats,
    )


if __name__ == "__main__":
    main()
