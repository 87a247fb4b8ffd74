"""Tables as data, never code: a pandas DataFrame (or arrays) to an NPZ and back, column types kept.

``GolemSearchCV.fit(X, y)`` sends ``X`` to providers as a resource. Pickle would carry a
DataFrame whole, and run code when loaded; this module writes what a DataFrame *is* instead:
one plain numpy array per column, read back with ``allow_pickle=False``, plus a JSON schema
(column names, dtypes, categories, where values are missing and as what). A provider
rebuilds the same DataFrame, so a ``ColumnTransformer`` selecting columns by name, a
categorical dtype LightGBM or ``HistGradientBoosting`` reads, and ``feature_names_in_`` work
as on the requestor. That needs pandas on providers, which is why the provider image has it.

Layout of a table file: ``schema`` (a 0-d string array holding the JSON), ``c0``... (column
data), ``m0``... (missing-value codes, only for columns with missing values), ``k0``...
(categories of categorical columns), ``y`` and optionally ``groups``. Arrays of a plain
numpy ``X`` are written as the NPZ datasets mltask always read: ``X``, ``y``, ``groups``.

Supported columns: numpy numbers and booleans, pandas' nullable numbers and booleans,
categoricals (of numbers or strings), strings (``str``, ``string`` or ``object`` holding only
strings), naive datetimes and timedeltas. Anything else is refused naming the column.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from mltask.errors import TaskError

SCHEMA_KEY = "schema"
FORMAT = "mltask-table"
VERSION = 1
MAX_COLUMNS = 100_000

_NUMPY_NUMBER = re.compile(r"^(bool|u?int(8|16|32|64)|float(16|32|64))$")
_NULLABLE_NUMBER = re.compile(r"^(boolean|U?Int(8|16|32|64)|Float(32|64))$")
_TIME = re.compile(r"^(datetime64|timedelta64)\[(s|ms|us|ns)\]$")
_STRING_DTYPES = ("str", "string", "object")


def write_dataset(path: Path, X: Any, y: Any, groups: Any = None, field: str = "X") -> list[str]:
    """Write ``X``, ``y`` (and ``groups``) to ``path``; return the feature names.

    A DataFrame becomes a table file (see the module docstring); an array is written as is.
    """
    arrays: dict[str, np.ndarray] = {"y": _vector(y, "y")}
    n = len(arrays["y"])
    if groups is not None:
        arrays["groups"] = _vector(groups, "groups")
        if len(arrays["groups"]) != n:
            raise TaskError("groups", f"has {len(arrays['groups'])} values for {n} rows of y; give one per row")
    if _is_frame(X):
        names, columns = _frame_arrays(X, field)
        arrays.update(columns)
    else:
        arrays["X"] = _matrix(X, field)
        names = [f"x{j}" for j in range(arrays["X"].shape[1])]
    rows = len(X)
    if rows != n:
        raise TaskError("y", f"has {n} values for {rows} rows of {field}; give one per row")
    with open(path, "wb") as fh:
        np.savez(fh, allow_pickle=False, **arrays)
    return names


def _is_frame(X: Any) -> bool:
    return type(X).__name__ == "DataFrame" and hasattr(X, "dtypes") and hasattr(X, "columns")


def _vector(values: Any, field: str) -> np.ndarray:
    """A 1-D array of numbers, booleans or strings (pandas Series and categoricals included)."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise TaskError(field, f"must be one value per row (1-D), got shape {arr.shape}; multi-output y is not "
                        "supported")
    return _plain(arr, field)


def _matrix(X: Any, field: str) -> np.ndarray:
    if hasattr(X, "toarray") and hasattr(X, "nnz"):
        raise TaskError(field, "sparse matrices are not supported yet; pass a dense array or a DataFrame")
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise TaskError(field, f"must be 2-D (rows x features), got shape {arr.shape}")
    return _plain(arr, field)


def _plain(arr: np.ndarray, field: str) -> np.ndarray:
    """``arr`` in a dtype NPZ stores without pickle: numbers, booleans, or strings as unicode."""
    if arr.dtype.kind in "biuf":
        return arr
    if arr.dtype.kind == "U":
        return arr
    if arr.dtype.kind == "O" and all(isinstance(v, str) for v in arr.ravel()):
        return arr.astype(str)
    raise TaskError(field, f"holds {arr.dtype} values that are neither all numbers nor all strings; convert them "
                    "(mixed text and numbers: pass a DataFrame with one type per column)")


def _frame_arrays(frame: Any, field: str) -> tuple[list[Any], dict[str, np.ndarray]]:
    import pandas as pd

    names = list(frame.columns)
    if len(names) > MAX_COLUMNS:
        raise TaskError(field, f"has {len(names)} columns, more than {MAX_COLUMNS}")
    if len(set(map(repr, names))) != len(names):
        raise TaskError(field, "has repeated column names; give each column its own name")
    arrays: dict[str, np.ndarray] = {}
    schema: list[dict[str, Any]] = []
    for j, name in enumerate(names):
        where = f"{field}[{name!r}]"
        if isinstance(name, bool) or not isinstance(name, (str, int)):
            raise TaskError(where, "column names must be strings (or integers); rename the column")
        column = frame.iloc[:, j]
        entry, data, codes, categories = _column(column, where, pd)
        entry["name"] = name
        schema.append(entry)
        arrays[f"c{j}"] = data
        if codes is not None and codes.any():
            arrays[f"m{j}"] = codes
        if categories is not None:
            arrays[f"k{j}"] = categories
    arrays[SCHEMA_KEY] = np.array(json.dumps({"format": FORMAT, "version": VERSION, "columns": schema}))
    return names, arrays


def _column(column: Any, where: str, pd: Any) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None,
                                                          np.ndarray | None]:
    """(schema entry, data, missing codes, categories) of one column."""
    dtype = column.dtype
    name = str(dtype)
    if isinstance(dtype, pd.CategoricalDtype):
        categories = _plain(np.asarray(dtype.categories), f"{where} categories")
        entry = {"kind": "category", "ordered": bool(dtype.ordered), "categories_dtype": str(dtype.categories.dtype)}
        return entry, np.asarray(column.cat.codes, dtype=np.int64), None, categories
    if _NUMPY_NUMBER.match(name):
        return {"kind": "number", "dtype": name}, column.to_numpy(), None, None
    if _NULLABLE_NUMBER.match(name):
        missing = column.isna().to_numpy()
        numpy_dtype = "bool" if name == "boolean" else name.lower()
        data = column.to_numpy(dtype=numpy_dtype, na_value=False if name == "boolean" else 0)
        return {"kind": "number", "dtype": name}, data, missing.astype(np.int8) * 3, None
    if _TIME.match(name):
        return {"kind": "time", "dtype": name}, column.to_numpy().view(np.int64), None, None
    if name in _STRING_DTYPES:
        values = column.to_numpy(dtype=object)
        codes = np.zeros(len(values), dtype=np.int8)
        text = np.empty(len(values), dtype=object)
        for i, value in enumerate(values):
            if isinstance(value, str):
                text[i] = value
                continue
            code = _missing_code(value, pd)
            if code is None:
                raise TaskError(where, f"holds {type(value).__name__} values among strings (row {i}); make the "
                                "column all text or all numbers")
            codes[i], text[i] = code, ""
        return {"kind": "string", "dtype": name}, text.astype(str), codes, None
    raise TaskError(where, f"has dtype {name}, which cannot be sent to providers as data; convert it to numbers, "
                    "strings, a category or a naive datetime")


def _missing_values(pd: Any) -> dict[int, Any]:
    """Codes of the ways a value can be missing. Each is kept as it was spelt, so a provider's
    DataFrame has the very same one: SimpleImputer(missing_values=np.nan) treats NaN as missing
    in an object column but not None."""
    return {1: None, 2: float("nan"), 3: pd.NA, 4: pd.NaT}


def _missing_code(value: Any, pd: Any) -> int | None:
    if isinstance(value, float) and value != value:
        return 2
    return next((code for code, missing in _missing_values(pd).items() if code != 2 and value is missing), None)


def read_table(npz: Any, field: str) -> tuple[Any, list[Any]]:
    """The DataFrame of a table file (open ``np.load`` result) and its column names.

    The schema comes from whoever wrote the file, so every dtype is checked against the
    supported ones before pandas sees it.
    """
    try:
        import pandas as pd
    except ImportError:
        raise TaskError(field, "this dataset is a DataFrame and pandas is not installed here; "
                        "pip install pandas (providers: rebuild the image with `mltask image build`)") from None
    try:
        schema = json.loads(str(npz[SCHEMA_KEY][()]))
        columns = schema["columns"]
        if schema.get("format") != FORMAT or schema.get("version") != VERSION or not isinstance(columns, list):
            raise ValueError("not an mltask table of a known version")
        data = {}
        for j, entry in enumerate(columns[:MAX_COLUMNS + 1]):
            data[j] = _rebuild(entry, npz, j, pd)
        names = [entry["name"] for entry in columns]
    except (KeyError, TypeError, ValueError) as exc:
        raise TaskError(field, f"not a valid table file ({exc})") from None
    frame = pd.DataFrame(data, copy=False) if data else pd.DataFrame(index=range(len(npz["y"])))
    frame.columns = pd.Index(names, dtype=object) if any(not isinstance(n, str) for n in names) else names
    return frame, names


def _rebuild(entry: dict[str, Any], npz: Any, j: int, pd: Any) -> Any:
    kind, data = entry["kind"], npz[f"c{j}"]
    codes = npz[f"m{j}"] if f"m{j}" in npz.files else None
    if kind == "category":
        cat_dtype = entry["categories_dtype"]
        if not (_NUMPY_NUMBER.match(cat_dtype) or cat_dtype in _STRING_DTYPES):
            raise ValueError(f"unsupported categories dtype {cat_dtype!r}")
        categories = pd.Index(npz[f"k{j}"], dtype=cat_dtype)
        return pd.Categorical.from_codes(data, categories=categories, ordered=bool(entry["ordered"]))
    dtype = entry["dtype"]
    if kind == "number" and _NUMPY_NUMBER.match(dtype):
        return data.astype(dtype, copy=False)
    if kind == "number" and _NULLABLE_NUMBER.match(dtype):
        series = pd.Series(data).astype(dtype)
        if codes is not None:
            series[codes != 0] = pd.NA
        return series.array
    if kind == "time" and _TIME.match(dtype):
        return data.astype(np.int64, copy=False).view(dtype)
    if kind == "string" and dtype in _STRING_DTYPES:
        values = data.astype(object)
        if codes is not None:
            for i in np.flatnonzero(codes):
                values[i] = _missing_value(int(codes[i]), pd)
        return pd.Series(values, dtype=dtype, copy=False)  # a Series: a bare object array would be read as str
    raise ValueError(f"unsupported column {entry.get('name')!r} ({kind}, {dtype})")


def _missing_value(code: int, pd: Any) -> Any:
    values = _missing_values(pd)
    if code not in values:
        raise ValueError(f"unknown missing-value code {code}")
    return values[code]


def is_table(npz: Any) -> bool:
    return SCHEMA_KEY in npz.files
