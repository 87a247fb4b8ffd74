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

from mltask.data import Dataset, resource_path
from mltask.definition import N_SAMPLES, STRATIFIED_KINDS, CVSpec, EstimatorSpec, PipelineSpec, ScriptSpec
from mltask.errors import TaskError
from mltask.estimators import EstimatorObject, build_object, class_paths
from mltask.param_values import estimator_params
from mltask.protocol import Problem, TrialResult, TrialSpec, combined_fingerprint

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
    """A fresh estimator or pipeline, not yet configured by a trial."""
    spec = problem.estimator
    if isinstance(spec, EstimatorObject):
        return build_object(spec, problem.allowed_modules, "options.estimator")
    if isinstance(spec, PipelineSpec):
        from sklearn.pipeline import Pipeline

        steps = []
        for i, (name, path) in enumerate(spec.pipeline):
            field = f"options.estimator.pipeline[{i}]"
            steps.append((name, _construct(import_estimator(path, problem.allowed_modules, field), path, field)))
        return Pipeline(steps)
    assert spec is not None
    return _construct(import_estimator(spec, problem.allowed_modules), spec, "options.estimator")


def estimator_paths(spec: EstimatorSpec | None) -> list[str]:
    """Every import path an estimator spec names (a pipeline's steps, nested estimators)."""
    if isinstance(spec, EstimatorObject):
        return list(dict.fromkeys(class_paths(spec)))
    if isinstance(spec, PipelineSpec):
        return [path for _, path in spec.pipeline]
    return [spec] if spec else []


def _construct(cls: type, path: str, field: str) -> Any:
    """``cls()``, or one line on why the task cannot name it alone.

    Estimators are built without arguments and then configured with ``set_params``; a
    class with required arguments (a ``Pipeline``'s steps, a meta-estimator's estimator)
    cannot be built that way.
    """
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # no signature to read (a C extension): let the call below tell
        signature = inspect.Signature()
    required = [
        p.name for p in signature.parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if required:
        from sklearn.pipeline import Pipeline

        fix = (
            'write the pipeline as {"pipeline": [["name", "import.path"], ...]}' if issubclass(cls, Pipeline)
            else "meta-estimators are not supported as the estimator yet; tune the inner estimator directly"
        )
        raise TaskError(field, f"{path} needs constructor arguments ({', '.join(required)}); {fix}")
    try:
        return cls()
    except Exception as exc:  # a third-party class: whatever it raises, it cannot be built bare
        raise TaskError(field, f"{path}() fails: {type(exc).__name__}: {exc}"[:500]) from None


def load_script(spec: ScriptSpec, resources_dir: Path) -> Callable[..., Any]:
    """The script's training function, loaded from the resources dir (by name: never a path or a link)."""
    path = resource_path(resources_dir, spec.file, "options.script.file")
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
    n = len(data.y)
    if cv.kind == "holdout" and not cv.shuffle:
        size = cv.test_size or 0.25
        cut = n - (size if isinstance(size, int) else max(1, round(n * size)))
        return [(np.arange(cut), np.arange(cut, n))]
    return list(make_splitter(cv).split(data.X, data.y, data.groups))


def make_splitter(cv: CVSpec) -> Any:
    """The scikit-learn splitter ``cv`` describes (see :class:`~mltask.definition.CVSpec`)."""
    from sklearn import model_selection as ms

    seed = cv.seed if cv.shuffle else None
    if cv.kind in ("holdout", "shuffle_split", "stratified_shuffle_split"):
        cls = ms.StratifiedShuffleSplit if cv.kind == "stratified_shuffle_split" else ms.ShuffleSplit
        default = 0.25 if cv.kind == "holdout" else None
        return cls(n_splits=cv.n_splits, test_size=cv.test_size or default, train_size=cv.train_size,
                   random_state=cv.seed)
    if cv.kind == "timeseries":
        return ms.TimeSeriesSplit(n_splits=cv.folds, max_train_size=cv.max_train_size, test_size=cv.test_size,
                                  gap=cv.gap)
    if cv.kind.startswith("repeated"):
        cls = ms.RepeatedStratifiedKFold if cv.kind == "repeated_stratified" else ms.RepeatedKFold
        return cls(n_splits=cv.folds, n_repeats=cv.repeats, random_state=cv.seed)
    if cv.kind in ("group", "stratified_group"):
        cls = ms.StratifiedGroupKFold if cv.kind == "stratified_group" else ms.GroupKFold
        # GroupKFold shuffles only from scikit-learn 1.6 on; unshuffled it takes no seed at all
        return cls(n_splits=cv.folds, shuffle=True, random_state=seed) if cv.shuffle else cls(n_splits=cv.folds)
    cls = ms.StratifiedKFold if cv.kind == "stratified" else ms.KFold
    return cls(n_splits=cv.folds, shuffle=cv.shuffle, random_state=seed)


def trial_params(estimator: Any, trial: TrialSpec, resource: str | None = None) -> dict[str, Any]:
    """The trial's parameters, checked and as ``set_params`` takes them (:func:`estimator_params`),
    plus its seed in every ``random_state`` left unset, and its rung's ``resource`` where
    that names a parameter (multi-fidelity).

    An explicit ``null`` (``"random_state": [null, 1]``) counts as unset: scikit-learn
    would read it as "seed from the global generator", which makes a re-run differ from the
    provider's run and the verifier blame an honest provider.
    """
    params = estimator_params(trial.params)
    for key, value in estimator.get_params(deep=True).items():
        if (key == "random_state" or key.endswith("__random_state")) and params.get(key, value) is None:
            params[key] = trial.seed
    if resource not in (None, N_SAMPLES) and trial.resource is not None:
        params[resource] = trial.resource
    return params


def script_params(problem: Problem, trial: TrialSpec) -> dict[str, Any]:
    """What a training script's ``params`` get: the trial's, plus a parameter resource at its rung's value."""
    params = dict(trial.params)
    if problem.resource not in (None, N_SAMPLES) and trial.resource is not None:
        params[problem.resource] = trial.resource
    return params


def subsample(train: np.ndarray, y: np.ndarray, size: int, seed: int, fold: int, stratify: bool) -> np.ndarray:
    """``size`` of a fold's training rows, for the ``n_samples`` resource; the same rows on every run.

    As scikit-learn's halving search (``resample`` without replacement, stratified for
    classifiers), seeded from (trial seed, fold, size) alone, so a check of one rung
    evaluation re-draws exactly the rows the provider trained on. A fold that has no more
    rows than ``size`` is used whole.
    """
    if size >= len(train):
        return train
    from sklearn.utils import resample

    state = int(np.random.SeedSequence([seed, fold, size]).generate_state(1)[0])
    return resample(train, replace=False, n_samples=size, random_state=state,
                    stratify=y[train] if stratify else None)


class TrialEvaluator:
    """Evaluates trials of one problem on one dataset; built once per subtask batch.

    Holds what every trial shares (the base estimator or script function, the splits, the
    scorer) so that a batch pays for them once.
    """

    def __init__(self, problem: Problem, data: Dataset, splits: Splits, resources_dir: Path) -> None:
        self.problem = problem
        self.data = data
        self.splits = splits
        self._refit_name = problem.refit_metric or "score"
        self._stratify = problem.cv.kind in STRATIFIED_KINDS
        if problem.script is not None:
            self._script = load_script(problem.script, resources_dir)
            self._base = None
        else:
            from sklearn.base import is_classifier as _is_classifier
            from sklearn.metrics import check_scoring, get_scorer

            self._base = build_estimator(problem)
            self._stratify = self._stratify or _is_classifier(self._base)
            # Several metrics: scikit-learn's multimetric scorer, which predicts once for all of them.
            self._scorer = check_scoring(self._base, problem.metrics) if problem.metrics else get_scorer(
                problem.scoring)

    def evaluate(self, trial: TrialSpec, folds: Sequence[int] | None = None) -> TrialResult:
        """Score one configuration on every fold (or only ``folds``, for spot checks).

        Any exception fails this trial only. Each fold gets its own fingerprint of the
        predictions it was scored on, so a verifier can re-run a single fold and compare.
        Every metric of a fold is computed from the same fitted model.
        """
        tests: dict[str, list[float]] = {}
        trains: dict[str, list[float]] = {}
        fit_times: list[float] = []
        score_times: list[float] = []
        fingerprints: list[str] = []
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for index in range(len(self.splits)) if folds is None else folds:
                    train, valid = self.splits[index]
                    if self.problem.resource == N_SAMPLES and trial.resource is not None:
                        train = subsample(train, self.data.y, int(trial.resource), trial.seed, index, self._stratify)
                    digest = hashlib.sha256()
                    test, on_train, fit_time, score_time = self._fold(trial, train, valid, digest)
                    for scores, outcome in ((tests, test), (trains, on_train)):
                        for name, score in outcome.items():
                            if not math.isfinite(score):
                                raise ValueError(f"the {name} is {score}, not a finite number")
                            scores.setdefault(name, []).append(score)
                    fit_times.append(fit_time)
                    score_times.append(score_time)
                    fingerprints.append(digest.hexdigest())
        except Exception as exc:  # one bad configuration fails its trial, not the subtask
            message = f"{type(exc).__name__}: {exc}".strip()
            return TrialResult(
                number=trial.number, params=trial.params, seed=trial.seed, status="failed", error=message[:2000]
            )
        fold_scores = tests[self._refit_name]
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
            metric_scores=tests if self.problem.metrics else {},
            train_scores=trains,
        )

    def _fold(self, trial: TrialSpec, train: np.ndarray, valid: np.ndarray,
              digest: Any) -> tuple[dict[str, float], dict[str, float], float, float]:
        """(validation scores, training scores, fit seconds, score seconds) of one fold, by metric name."""
        data, y = self.data, self.data.y
        if self._base is None:
            t0 = time.perf_counter()
            out = self._script(script_params(self.problem, trial), data.rows(train), y[train], data.rows(valid),
                               y[valid], trial.seed)
            elapsed = time.perf_counter() - t0
            score, predictions = out if isinstance(out, tuple) else (out, None)
            if predictions is not None:
                digest.update(_rounded_bytes(predictions))
            return {"score": float(score)}, {}, elapsed, 0.0
        from sklearn.base import clone

        model = clone(self._base).set_params(**trial_params(self._base, trial, self.problem.resource))
        t0 = time.perf_counter()
        model.fit(data.rows(train), y[train])
        t1 = time.perf_counter()
        test = self._named(_score_recording(self._scorer, model, data.rows(valid), y[valid], digest))
        t2 = time.perf_counter()  # as scikit-learn's score_time: the validation scoring only
        on_train = self._named(self._scorer(model, data.rows(train), y[train])) if self.problem.return_train_score \
            else {}
        return test, on_train, t1 - t0, t2 - t1

    @staticmethod
    def _named(scores: Any) -> dict[str, float]:
        return {k: float(v) for k, v in scores.items()} if isinstance(scores, dict) else {"score": float(scores)}


def _score_recording(scorer: Any, model: Any, X: Any, y: np.ndarray, digest: Any) -> Any:
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
