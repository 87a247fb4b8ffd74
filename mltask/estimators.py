"""Estimators as data: an import path and constructor parameters in JSON, nested to any depth.

``{"class": "sklearn.pipeline.Pipeline", "params": {"steps": [...]}}`` is how an estimator
object reaches providers, never pickled: a provider imports the class (only from the task's
``allowed_modules``) and calls it with the parameters, and each nested estimator (a
Pipeline's steps, a ColumnTransformer's transformers, an ensemble's base estimator) is one
such object again. :func:`encode_estimator` writes it from a live object (its
``get_params(deep=False)``, recursively; parameters left at their defaults are omitted), and
:func:`build_object` builds it back, on the requestor and on providers alike.

JSON has lists, strings, numbers, booleans and null; what scikit-learn parameters hold
beyond that is written as a one-key tagged object:

- ``{"tuple": [...]}``: a tuple (a Pipeline step, ``feature_range``, ``ngram_range``);
- ``{"float": "nan"}`` (or ``"inf"``, ``"-inf"``): a float JSON cannot spell;
- ``{"dtype": "float64"}``: a numpy scalar type (``OneHotEncoder(dtype=np.float32)``);
- ``{"dict": [[key, value], ...]}``: a dict, keys keeping their type (``class_weight={0: 1, 1: 5}``);
- ``{"array": [...], "dtype": "int64"}``: a numpy array (``categories=[np.array([...])]``).

Anything else (a function, a random generator, an open file, an unknown object) is refused
naming the parameter. Every string is checked by the rule against paths
(:mod:`mltask.param_values`) under the name of the parameter that holds it.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

from mltask.errors import TaskError, located
from mltask.param_values import check_param

MAX_DEPTH = 32
_TAGS = ("tuple", "float", "dtype", "dict", "array")
_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_SCALARS = (str, int, float, bool, type(None))


class EstimatorObject(BaseModel):
    """``{"class": "sklearn.ensemble.RandomForestClassifier", "params": {"n_estimators": 200}}``."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)

    class_: str = Field(alias="class", min_length=1, max_length=300,
                        description="Import path of the estimator class, e.g. sklearn.pipeline.Pipeline.")
    params: dict[str, JsonValue] = Field(
        default={}, description="Constructor parameters; a nested estimator is {\"class\", \"params\"} again, "
        "tuples, non-finite floats, dtypes, dicts and arrays are tagged objects (see the README)."
    )

    @field_validator("params")
    @classmethod
    def _tagged(cls, params: dict[str, JsonValue]) -> dict[str, JsonValue]:
        for name, value in params.items():
            _check_value(value, [name], 0)
        return params


def _check_value(value: JsonValue, at: list[str | int], depth: int) -> None:
    """Refuse an object that is neither a nested estimator nor one of the tagged values."""
    if depth > MAX_DEPTH:
        raise located(f"nested deeper than {MAX_DEPTH} levels", *at)
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_value(item, [*at, i], depth + 1)
        return
    if not isinstance(value, dict):
        return
    if "class" in value:
        try:
            EstimatorObject.model_validate(value)
        except ValueError as exc:
            raise located(f"not a valid nested estimator ({str(exc).splitlines()[-1].strip()})", *at) from None
        return
    tag = _tag(value)
    if tag not in _TAGS or set(value) - {tag, "dtype"} or (tag != "array" and len(value) != 1):
        raise located('an object here is a nested estimator {"class": ..., "params": {...}} or one of the tagged '
                      'values {"tuple": [...]}, {"float": "nan"}, {"dtype": "float64"}, {"dict": [[k, v]]}, '
                      '{"array": [...], "dtype": "int64"}', *at)
    inner = value[tag]
    if tag == "float" and inner not in _FLOATS:
        raise located('"float" takes "nan", "inf" or "-inf"', *at)
    if tag in ("tuple", "array", "dict") and not isinstance(inner, list):
        raise located(f'"{tag}" takes a list', *at)
    if tag == "dict" and not all(isinstance(p, list) and len(p) == 2 and not isinstance(p[0], (list, dict))
                                 for p in inner):  # type: ignore[union-attr]
        raise located('"dict" takes a list of [key, value] pairs, each key a string, number, boolean or null', *at)
    if tag in ("tuple", "dict"):
        _check_value(inner, [*at, tag], depth + 1)


def _tag(value: dict[str, JsonValue]) -> str | None:
    return "array" if "array" in value else next(iter(value), None)


# -- from JSON to objects (requestor and providers) --------------------------------------


def build_object(spec: EstimatorObject, allowed: list[str], field: str) -> Any:
    """The estimator ``spec`` describes: each class imported only from ``allowed`` prefixes."""
    from mltask.problem import import_estimator

    cls = import_estimator(spec.class_, allowed, f"{field}.class")
    kwargs = {name: _decode(value, name, f"{field}.params.{name}", allowed) for name, value in spec.params.items()}
    try:
        return cls(**kwargs)
    except Exception as exc:  # a third-party class: whatever it raises, these parameters do not build it
        raise TaskError(field, f"{spec.class_}(...) fails: {type(exc).__name__}: {exc}"[:500]) from None


def _decode(value: JsonValue, name: str, field: str, allowed: list[str]) -> Any:
    if isinstance(value, str):
        check_param(name, value, field)
        return value
    if isinstance(value, list):
        return [_decode(item, name, f"{field}[{i}]", allowed) for i, item in enumerate(value)]
    if not isinstance(value, dict):
        return value
    if "class" in value:
        return build_object(EstimatorObject.model_validate(value), allowed, field)
    tag = _tag(value)
    inner: Any = value[tag]
    if tag == "tuple":
        return tuple(_decode(item, name, f"{field}[{i}]", allowed) for i, item in enumerate(inner))
    if tag == "float":
        return _FLOATS[inner]
    if tag == "dtype":
        return _numpy_type(inner, field)
    if tag == "dict":
        return {_decode(k, name, field, allowed): _decode(v, name, f"{field}[{k!r}]", allowed) for k, v in inner}
    dtype = _array_dtype(value.get("dtype"), field)
    if dtype.kind in "OU":
        _decode(inner, name, field, allowed)  # the path rule holds inside arrays too
    try:
        return np.array(inner, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise TaskError(field, f"not an array of {dtype} ({exc})") from None


def _numpy_type(name: Any, field: str) -> type:
    return _dtype(name, "biufc", field, "is not a numpy number type; use e.g. float64, float32, int64").type


def _array_dtype(name: Any, field: str) -> np.dtype:
    return _dtype(name, "biufcUO", field, "is not a supported array dtype; use numbers, booleans, str or object")


def _dtype(name: Any, kinds: str, field: str, refusal: str) -> np.dtype:
    """The numpy dtype ``name`` spells, if of one of ``kinds``: a name from JSON never builds anything else."""
    try:
        dtype = np.dtype(name) if isinstance(name, str) else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in kinds:
        raise TaskError(field, f"{name!r} {refusal}")
    return dtype


def class_paths(spec: EstimatorObject) -> Iterator[str]:
    """Every class ``spec`` names, nested ones included (for allowed-module checks and preloading)."""
    yield spec.class_
    todo: list[JsonValue] = list(spec.params.values())
    while todo:
        value = todo.pop()
        if isinstance(value, list):
            todo.extend(value)
        elif isinstance(value, dict):
            if "class" in value:
                yield str(value["class"])
                todo.extend((value.get("params") or {}).values())  # type: ignore[union-attr]
            else:
                todo.extend(v for v in value.values() if isinstance(v, (list, dict)))


def describe(spec: EstimatorObject, limit: int = 400) -> str:
    """A one-line, human-readable form: ``Pipeline(steps=[(scale, StandardScaler()), (svc, SVC(C=10))])``."""
    text = _describe(spec.model_dump(mode="json"))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_describe(v) for v in value) + "]"
    if not isinstance(value, dict):
        return str(value) if isinstance(value, str) else repr(value)
    if "class" in value:
        args = ", ".join(f"{k}={_describe(v)}" for k, v in (value.get("params") or {}).items())
        return f"{str(value['class']).rsplit('.', 1)[-1]}({args})"
    if "tuple" in value:
        return "(" + ", ".join(_describe(v) for v in value["tuple"]) + ")"
    if "dict" in value:
        return "{" + ", ".join(f"{_describe(k)}: {_describe(v)}" for k, v in value["dict"]) + "}"
    if "array" in value:
        return f"array({_describe(value['array'])})"
    return str(value.get("float") or value.get("dtype"))


# -- from objects to JSON (requestor: GolemSearchCV) --------------------------------------


def encode_estimator(estimator: Any, field: str = "estimator") -> dict[str, Any]:
    """``estimator`` as an :class:`EstimatorObject` JSON dict; a value JSON cannot carry is a
    :class:`TaskError` naming its parameter (``estimator.steps[1][1].func``)."""
    return _encode(estimator, field, 0)


def _encode(value: Any, field: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise TaskError(field, f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else {"float": "nan" if number != number else repr(number)}
    if isinstance(value, str):
        return str(value)
    if value is None:
        return None
    if isinstance(value, list):
        return [_encode(v, f"{field}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, f"{field}[{i}]", depth + 1) for i, v in enumerate(value)]}
    if isinstance(value, dict):
        bad = next((k for k in value if not isinstance(k, (*_SCALARS, np.generic))), None)
        if bad is not None:
            raise TaskError(field, f"dict key {bad!r} cannot be sent as JSON; use strings or numbers as keys")
        return {"dict": [[_encode(k, field, depth + 1), _encode(v, f"{field}[{k!r}]", depth + 1)]
                         for k, v in value.items()]}
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biufcUO":
            raise TaskError(field, f"a numpy array of {value.dtype} cannot be sent as JSON; use numbers or strings")
        return {"array": _encode(value.tolist(), field, depth + 1), "dtype": str(value.dtype)}
    if isinstance(value, type) and issubclass(value, np.generic) and np.dtype(value).kind in "biufc":
        return {"dtype": np.dtype(value).name}
    if hasattr(value, "get_params") and hasattr(value, "fit") and not isinstance(value, type):
        return _encode_estimator(value, field, depth)
    raise TaskError(field, f"{_what(value)} cannot be sent to providers as JSON; use a value made of numbers, "
                    "strings, lists and estimators (functions and other objects cannot leave this process)")


def _encode_estimator(estimator: Any, field: str, depth: int) -> dict[str, Any]:
    cls = type(estimator)
    path = public_path(cls, field)
    try:
        defaults = {n: p.default for n, p in inspect.signature(cls).parameters.items()}
    except (TypeError, ValueError):
        defaults = {}
    params = {}
    for name, value in estimator.get_params(deep=False).items():
        if name in defaults and _same_default(value, defaults[name]):
            continue
        params[name] = _encode(value, f"{field}.{name}", depth + 1)
    return {"class": path, "params": params} if params else {"class": path}


def _same_default(value: Any, default: Any) -> bool:
    if value is default:
        return True
    if type(value) is not type(default) or not isinstance(value, _SCALARS):
        return False
    return value == default or (isinstance(value, float) and value != value and default != default)


def public_path(cls: type, field: str) -> str:
    """The shortest import path that gives ``cls`` (``sklearn.svm.SVC``, not ``sklearn.svm._classes.SVC``)."""
    module, name = cls.__module__, cls.__qualname__
    if module == "__main__" or "." in name or "<" in name:
        raise TaskError(field, f"{cls.__qualname__} is defined in this notebook or script, which providers cannot "
                        "import; put it in a module installed on providers, or use a library estimator")
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        candidate = ".".join(parts[:i])
        try:
            if getattr(importlib.import_module(candidate), name, None) is cls:
                return f"{candidate}.{name}"
        except ImportError:
            continue
    return f"{module}.{name}"


def _what(value: Any) -> str:
    if callable(value) and not isinstance(value, type):
        return f"the function {getattr(value, '__qualname__', repr(value))}"
    return f"a {type(value).__module__}.{type(value).__qualname__} object"
