"""What one trial means: build the model, split the data, fit, score, fingerprint.

This is the only module that trains anything. Providers call :func:`evaluate_trial`; the
requestor calls the same code to validate a task, to re-run subtasks for verification, and
to refit the best model, so there is one definition of a score.

Determinism, which verification depends on: CV splits are seeded once per task (every
configuration sees the same folds, as in ``GridSearchCV``); each trial's seed fills every
``random_state`` the requestor left unset; callers limit BLAS/OpenMP to one thread.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from mltask.data import Dataset
from mltask.definition import CVSpec, PipelineSpec, ScriptSpec
from mltask.errors import TaskError
from mltask.protocol import Problem, TrialResult, TrialSpec

Splits = list[tuple[np.ndarray, np.ndarray]]
# Methods a scorer may call for its predictions; their outputs make the fingerprint.
_RESPONSE_METHODS = ("predict", "predict_proba", "decision_function", "predict_log_proba")
_FINGERPRINT_DECIMALS = 6


def import_estimator(path: str, allowed: list[str], field: str = "options.estimator") -> type:
    """Import an estimator class, but only from the allowed module prefixes."""
    if not any(path.startswith(prefix) for prefix in allowed):
        raise TaskError(
            field,
            f"{path!r} is outside the allowed modules {allowed}; "
            "add its package prefix to options.allowed_modules if you trust it",
        )
    module_name, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise TaskError(field, f"cannot import {path!r}; give the full path, e.g. sklearn.svm.SVC") from None
    if not (inspect.isclass(cls) and hasattr(cls, "fit") and hasattr(cls, "get_params")):
        raise TaskError(field, f"{path!r} is not a scikit-learn style estimator class (needs fit and get_params)")
    return cls


def build_estimator(problem: Problem) -> Any:
    """A fresh, unconfigured estimator or pipeline."""
    spec = problem.estimator
    if isinstance(spec, PipelineSpec):
        from sklearn.pipeline import Pipeline

        steps = [
            (name, import_estimator(path, problem.allowed_modules, f"options.estimator.pipeline.{name}")())
            for name, path in spec.pipeline
        ]
        return Pipeline(steps)
    assert spec is not None
    return import_estimator(spec, problem.allowed_modules)()


def load_script(spec: ScriptSpec, resources_dir: Path) -> Callable[..., Any]:
    """The script's training function, loaded from the resources dir."""
    path = resources_dir / spec.file
    if not path.is_file():
        raise TaskError("options.script.file", f"{spec.file!r} is not among the resources; list it in `resources`")
    module_spec = importlib.util.spec_from_file_location(f"mltask_script_{path.stem}", path)
    assert module_spec is not None and module_spec.loader is not None
    module: ModuleType = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the user's script: any error is theirs to fix
        raise TaskError("options.script.file", f"{spec.file} fails to import: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, spec.function, None)
    if not callable(fn):
        raise TaskError(
            "options.script.function",
            f"{spec.file} defines no function {spec.function!r}; "
            "define fit_and_score(params, X_train, y_train, X_valid, y_valid, seed)",
        )
    return fn


def is_classifier(problem: Problem) -> bool:
    from sklearn.base import is_classifier as _is_classifier

    return problem.estimator is not None and _is_classifier(build_estimator(problem))


def make_splits(cv: CVSpec, data: Dataset) -> Splits:
    """Seeded train/validation index pairs; ``cv.kind`` must already be resolved (not auto)."""
    from sklearn.model_selection import KFold, ShuffleSplit, StratifiedKFold

    seed = cv.seed if cv.shuffle else None
    n = len(data.y)
    if cv.kind == "holdout":
        if cv.shuffle:
            return [next(ShuffleSplit(n_splits=1, test_size=cv.test_size, random_state=cv.seed).split(data.X))]
        cut = n - max(1, round(n * cv.test_size))
        return [(np.arange(cut), np.arange(cut, n))]
    splitter_cls = StratifiedKFold if cv.kind == "stratified" else KFold
    splitter = splitter_cls(n_splits=cv.folds, shuffle=cv.shuffle, random_state=seed)
    return list(splitter.split(data.X, data.y))


def trial_params(estimator: Any, trial: TrialSpec) -> dict[str, Any]:
    """The trial's parameters plus its seed in every ``random_state`` left unset.

    An explicit ``null`` (``"random_state": [null, 1]``) counts as unset: scikit-learn
    would read it as "seed from the global generator", which makes a re-run differ from the
    provider's run and the verifier blame an honest provider.
    """
    params = dict(trial.params)
    for key, value in estimator.get_params(deep=True).items():
        if (key == "random_state" or key.endswith("__random_state")) and params.get(key, value) is None:
            params[key] = trial.seed
    return params


class TrialEvaluator:
    """Evaluates trials of one problem on one dataset; built once per subtask batch.

    Holds what every trial shares (the base estimator or script function, the splits, the
    scorer) so that a batch pays for them once.
    """

    def __init__(self, problem: Problem, data: Dataset, splits: Splits, resources_dir: Path) -> None:
        self.problem = problem
        self.data = data
        self.splits = splits
        if problem.script is not None:
            self._script = load_script(problem.script, resources_dir)
            self._base = None
        else:
            from sklearn.metrics import get_scorer

            self._base = build_estimator(problem)
            self._scorer = get_scorer(problem.scoring)

    def evaluate(self, trial: TrialSpec, folds: Sequence[int] | None = None) -> TrialResult:
        """Score one configuration on every fold (or only ``folds``, for spot checks).

        Any exception fails this trial only. Each fold gets its own fingerprint of the
        predictions it was scored on, so a verifier can re-run a single fold and compare.
        """
        fold_scores: list[float] = []
        fit_times: list[float] = []
        score_times: list[float] = []
        fingerprints: list[str] = []
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for index in range(len(self.splits)) if folds is None else folds:
                    train, valid = self.splits[index]
                    digest = hashlib.sha256()
                    score, fit_time, score_time = self._fold(trial, train, valid, digest)
                    if not math.isfinite(score):
                        raise ValueError(f"the score is {score}, not a finite number")
                    fold_scores.append(score)
                    fit_times.append(fit_time)
                    score_times.append(score_time)
                    fingerprints.append(digest.hexdigest())
        except Exception as exc:  # one bad configuration fails its trial, not the subtask
            message = f"{type(exc).__name__}: {exc}".strip()
            return TrialResult(
                number=trial.number, params=trial.params, seed=trial.seed, status="failed", error=message[:2000]
            )
        return TrialResult(
            number=trial.number,
            params=trial.params,
            seed=trial.seed,
            status="ok",
            fold_scores=fold_scores,
            mean_score=float(np.mean(fold_scores)),
            std_score=float(np.std(fold_scores)),
            fit_times=fit_times,
            score_times=score_times,
            fold_fingerprints=fingerprints,
            fingerprint=combined_fingerprint(fingerprints),
        )

    def _fold(self, trial: TrialSpec, train: np.ndarray, valid: np.ndarray, digest: Any) -> tuple[float, float, float]:
        X, y = self.data.X, self.data.y
        if self._base is None:
            t0 = time.perf_counter()
            out = self._script(dict(trial.params), X[train], y[train], X[valid], y[valid], trial.seed)
            elapsed = time.perf_counter() - t0
            score, predictions = out if isinstance(out, tuple) else (out, None)
            if predictions is not None:
                digest.update(_rounded_bytes(predictions))
            return float(score), elapsed, 0.0
        from sklearn.base import clone

        model = clone(self._base).set_params(**trial_params(self._base, trial))
        t0 = time.perf_counter()
        model.fit(X[train], y[train])
        t1 = time.perf_counter()
        score = _score_recording(self._scorer, model, X[valid], y[valid], digest)
        return float(score), t1 - t0, time.perf_counter() - t1


def combined_fingerprint(fold_fingerprints: list[str]) -> str:
    """The trial's fingerprint: a hash of its folds' fingerprints, in fold order."""
    return hashlib.sha256("".join(fold_fingerprints).encode()).hexdigest()


def _score_recording(scorer: Any, model: Any, X: np.ndarray, y: np.ndarray, digest: Any) -> float:
    """Score ``model`` while hashing the predictions the scorer asks it for.

    Wrapping the response methods on the instance costs nothing extra: the fingerprint is
    made of exactly the outputs the score was computed from, without predicting twice.
    """
    wrapped = []
    for name in _RESPONSE_METHODS:
        try:
            method = getattr(model, name)
        except AttributeError:  # e.g. predict_proba of SVC(probability=False)
            continue

        @functools.wraps(method)  # scikit-learn dispatches on the method's __name__
        def recording(*args: Any, _method: Callable[..., Any] = method, **kwargs: Any) -> Any:
            out = _method(*args, **kwargs)
            digest.update(_rounded_bytes(out))
            return out

        model.__dict__[name] = recording
        wrapped.append(name)
    try:
        return scorer(model, X, y)
    finally:
        for name in wrapped:
            del model.__dict__[name]


def _rounded_bytes(values: Any) -> bytes:
    arr = np.asarray(values)
    if arr.dtype.kind == "f":
        arr = np.round(arr.astype(np.float64), _FINGERPRINT_DECIMALS) + 0.0  # + 0.0 folds -0.0 into 0.0
    elif arr.dtype.kind in "iub":
        arr = arr.astype(np.int64)
    else:
        return repr(arr.shape).encode() + "\x1f".join(map(str, arr.ravel())).encode()
    return repr(arr.shape).encode() + np.ascontiguousarray(arr).tobytes()
