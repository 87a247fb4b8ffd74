"""scikit-learn's search arguments as task JSON: parameter distributions, splitters, scorers.

:class:`~mltask.search_cv.GolemSearchCV` takes what ``RandomizedSearchCV`` takes and writes
the task a CLI user would write, so both run the same search. Each function here turns one
argument into its ``options`` entry, or raises a :class:`TaskError` naming the argument
(``param_distributions.C``, ``cv``) and what to use instead.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from mltask.errors import TaskError
from mltask.estimators import encode_estimator

# Exact types only: a subclass of a splitter may split differently from what its parameters say.
_SPLITTERS = {
    "KFold": "kfold", "StratifiedKFold": "stratified", "GroupKFold": "group",
    "StratifiedGroupKFold": "stratified_group", "TimeSeriesSplit": "timeseries", "ShuffleSplit": "shuffle_split",
    "StratifiedShuffleSplit": "stratified_shuffle_split", "RepeatedKFold": "repeated_kfold",
    "RepeatedStratifiedKFold": "repeated_stratified",
}
_DISTRIBUTIONS = ("uniform", "loguniform", "reciprocal", "randint")


def search_space(param_distributions: Any) -> dict[str, Any]:
    """``param_distributions`` (scikit-learn style or mltask's) as an mltask search space.

    A list (tuple, array) is a categorical; ``scipy.stats`` ``uniform``, ``loguniform`` and
    ``randint`` become float, log-float and int ranges; a dict with ``type`` is mltask's own
    parameter and passes as it is; a single value is fixed.
    """
    if not isinstance(param_distributions, Mapping):
        kind = "a list of dicts" if isinstance(param_distributions, list) else type(param_distributions).__name__
        raise TaskError("param_distributions", f"is {kind}; give one dict of parameter name -> values "
                        "(a list of grids is not supported: search the union as one space with `when` conditions)")
    return {str(name): _parameter(value, f"param_distributions.{name}") for name, value in param_distributions.items()}


def _parameter(value: Any, field: str) -> Any:
    if isinstance(value, Mapping) and "type" in value:
        return dict(value)
    if hasattr(value, "rvs") and hasattr(value, "dist"):
        return _distribution(value, field)
    if hasattr(value, "rvs"):
        raise TaskError(field, f"{type(value).__name__} is a distribution mltask cannot translate; use "
                        "scipy.stats uniform, loguniform or randint, or a list of values")
    if isinstance(value, (list, tuple, np.ndarray)):
        return {"type": "categorical", "choices": [choice_value(v, field) for v in value]}
    return {"type": "fixed", "value": choice_value(value, field)}


def _distribution(rv: Any, field: str) -> dict[str, Any]:
    name = rv.dist.name
    if name not in _DISTRIBUTIONS:
        raise TaskError(field, f"scipy.stats.{name} cannot be translated to a search range; use uniform, "
                        "loguniform or randint, or a list of values")
    low, high = (float(b) for b in rv.support())
    if name == "randint":
        return {"type": "int", "low": int(low), "high": int(high)}
    if name != "uniform" and rv.kwds.get("loc", 0) != 0:
        raise TaskError(field, "a shifted loguniform (loc != 0) is not log-uniform on its range; drop loc")
    return {"type": "float", "low": low, "high": high, "log": name != "uniform"}


def choice_value(value: Any, field: str) -> Any:
    """A parameter value as JSON: numpy scalars as numbers, tuples as lists (estimators get them back as tuples)."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)) and all(v is None or isinstance(v, (str, bool, int, float, np.generic))
                                                for v in value):
        return [v.item() if isinstance(v, np.generic) else v for v in value]
    what = "an estimator" if hasattr(value, "get_params") else f"a {type(value).__name__}"
    raise TaskError(field, f"{what} ({value!r:.60}) cannot be a searched value: values are numbers, strings, "
                    "booleans, None or flat tuples of them (to compare estimators, search each in its own run)")


def splitter(cv: Any, y: Any, classifier: bool) -> dict[str, Any]:
    """``options.cv`` for ``cv``: an int (as scikit-learn's ``check_cv`` reads it) or a splitter object.

    A splitter's ``random_state=None`` means fresh shuffles on every call in scikit-learn; here
    the task's seed fills it, so every configuration sees the same folds and re-runs agree.
    """
    from sklearn.model_selection import check_cv

    if cv is None or (isinstance(cv, numbers.Integral) and not isinstance(cv, bool)):
        cv = check_cv(5 if cv is None else int(cv), y, classifier=classifier)
    kind = _SPLITTERS.get(type(cv).__name__) if type(cv).__module__.startswith("sklearn.") else None
    if kind is None:
        raise TaskError("cv", f"{type(cv).__name__} cannot be translated; use an int or one of "
                        f"{', '.join(_SPLITTERS)}")
    seed = getattr(cv, "random_state", None)
    if seed is not None and not isinstance(seed, numbers.Integral):
        raise TaskError("cv", "the splitter's random_state is a generator; give an int seed (or None)")
    folds = cv.cvargs["n_splits"] if kind.startswith("repeated") else cv.get_n_splits()
    spec: dict[str, Any] = {"kind": kind, "folds": int(folds)}
    if kind.startswith("repeated"):
        spec["repeats"] = int(cv.n_repeats)
    if kind.endswith("shuffle_split"):
        spec.update(test_size=cv.test_size, train_size=cv.train_size)
        if cv.test_size is None and cv.train_size is None:
            spec["test_size"] = cv._default_test_size
    if kind == "timeseries":
        spec.update(test_size=cv.test_size, gap=cv.gap, max_train_size=cv.max_train_size)
    spec["shuffle"] = bool(getattr(cv, "shuffle", kind != "timeseries"))
    if seed is not None:
        spec["seed"] = int(seed)
    return spec


def scoring(scoring: Any) -> tuple[str | dict[str, str] | None, bool]:
    """``options.scoring`` for ``scoring``, and whether it is multi-metric."""
    if scoring is None or isinstance(scoring, str):
        return scoring, False
    if isinstance(scoring, (list, tuple, set)):
        names = list(scoring)
        if not all(isinstance(n, str) for n in names):
            raise TaskError("scoring", "a list of scorers must hold scorer names (strings)")
        return {n: n for n in names}, True
    if isinstance(scoring, Mapping):
        bad = next((k for k, v in scoring.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise TaskError(f"scoring.{bad}", "must be a scorer name such as 'f1_macro': scorer objects and "
                            "functions cannot reach providers")
        return {str(k): v for k, v in scoring.items()}, True
    raise TaskError("scoring", "must be a scorer name, a list of names or a dict of name -> scorer name; "
                    "scorer objects and functions cannot reach providers")


def estimator(est: Any) -> tuple[dict[str, Any], list[str]]:
    """The estimator's JSON and the module prefixes it needs allowed (``sklearn.``, ``lightgbm.``...)."""
    from mltask.estimators import EstimatorObject, class_paths

    spec = encode_estimator(est)
    packages = {path.split(".", 1)[0] + "." for path in class_paths(EstimatorObject.model_validate(spec))}
    return spec, sorted(packages)
