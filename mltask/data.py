"""Datasets: scikit-learn's built-in sets, CSV files with a target column, NPZ arrays.

Loaded the same way on the requestor (to validate and to refit) and on providers (to train).
NPZ files are read with ``allow_pickle=False``: a dataset is data, never code. Files are
named, never given as paths: a provider opens only regular files in its resources dir, and
no error quotes what a file holds (a subtask naming a provider's own file must not read it
back through an error message).
An NPZ may also be a table (a pandas DataFrame written by :mod:`mltask.table`), which
loads as a DataFrame again, column names and types included.
"""

from __future__ import annotations

import csv
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mltask.definition import DatasetSpec
from mltask.errors import TaskError
from mltask.protocol import RESOURCE_NAME
from mltask.table import is_table, read_table

_MISSING = {"", "na", "nan", "null", "none"}


@dataclass(frozen=True)
class Dataset:
    X: Any  # a numpy array, or a pandas DataFrame for a table
    y: np.ndarray
    feature_names: tuple[Any, ...]
    groups: np.ndarray | None = None

    def rows(self, index: Any) -> Any:
        """Rows ``index`` of X, by position (as scikit-learn's ``_safe_indexing``)."""
        return self.X.iloc[index] if hasattr(self.X, "iloc") else self.X[index]

    @property
    def non_numeric_features(self) -> list[Any]:
        if hasattr(self.X, "dtypes"):
            dtypes = zip(self.feature_names, self.X.dtypes, strict=True)
            return [name for name, dtype in dtypes if dtype.kind not in "biuf"]
        if self.X.dtype != object:
            return []
        return [
            name
            for j, name in enumerate(self.feature_names)
            if any(isinstance(v, str) for v in self.X[:, j])
        ]


def resource_path(resources_dir: Path, name: str, field: str) -> Path:
    """The file called ``name`` in ``resources_dir``: a plain name of a regular file, never a path or a link."""
    if not re.fullmatch(RESOURCE_NAME, name) or name in (".", ".."):
        raise TaskError(field, f"{name[:100]!r} is not a resource name; name a file listed in `resources`")
    path = resources_dir / name
    try:
        regular = stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        regular = False
    if not regular:
        raise TaskError(field, f"{name!r} is not among the resources; list its path in `resources`")
    return path


def load_dataset(spec: DatasetSpec, resources_dir: Path) -> Dataset:
    """Load ``spec``; files are looked up by name in ``resources_dir``."""
    if spec.builtin is not None:
        return _load_builtin(spec.builtin)
    field = "options.dataset.csv" if spec.csv else "options.dataset.npz"
    path = resource_path(resources_dir, spec.file or "", field)
    if spec.csv is not None:
        return _load_csv(path, spec.target or "", spec.groups, field)
    return _load_npz(path, spec.groups, field)


def _load_builtin(name: str) -> Dataset:
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{name}")()
    names = tuple(str(n) for n in getattr(bunch, "feature_names", range(bunch.data.shape[1])))
    return Dataset(np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target), names)


def _load_csv(path: Path, target: str, groups: str | None, field: str) -> Dataset:
    try:
        # utf-8-sig: spreadsheet programs start their CSV with a byte order mark, which would
        # otherwise be part of the first column's name ("\ufefflabel", invisible in errors).
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError:
        raise TaskError(field, f"{path.name} is not UTF-8 text; save it as UTF-8") from None
    except (OSError, csv.Error) as exc:  # csv's messages name the fault, never a cell
        raise TaskError(field, f"cannot read {path.name} as CSV ({exc})") from None
    while rows and not any(cell.strip() for cell in rows[-1]):  # blank lines at the end are no rows
        rows.pop()
    if len(rows) < 3:
        raise TaskError(field, f"{path.name} needs a header row and at least two data rows")
    header, body = rows[0], rows[1:]
    if target not in header:
        raise TaskError("options.dataset.target", f"no column {target!r} among the {len(header)} in the header of "
                        f"{path.name}; names are case-sensitive")
    ragged = next((i for i, r in enumerate(body, start=2) if len(r) != len(header)), None)
    if ragged is not None:
        raise TaskError(field, f"{path.name} line {ragged} has a different number of fields than the header")
    if groups is not None and (groups not in header or groups == target):
        raise TaskError("options.dataset.groups", f"no column {groups!r} (other than the target) in {path.name}; "
                        f"columns are {', '.join(header)}")
    columns = list(zip(*body, strict=True))
    t = header.index(target)
    g = header.index(groups) if groups is not None else None
    features = [j for j in range(len(header)) if j not in (t, g)]
    converted = [_as_numbers(columns[j]) for j in features]
    if all(c is not None for c in converted):
        X = np.column_stack(converted).astype(np.float64)
    else:
        X = np.empty((len(body), len(features)), dtype=object)
        for k, j in enumerate(features):
            X[:, k] = converted[k] if converted[k] is not None else columns[j]
    y_num = _as_numbers(columns[t])
    if y_num is not None and np.isnan(y_num).any():
        raise TaskError("options.dataset.target", f"column {target!r} has missing values; drop those rows")
    y = y_num if y_num is not None else np.asarray(columns[t], dtype=str)
    if y_num is not None and np.all(y_num == np.round(y_num)):
        y = y_num.astype(np.int64)
    group_values = None if g is None else _as_numbers(columns[g])
    if g is not None and (group_values is None or np.isnan(group_values).any()):
        group_values = np.asarray(columns[g], dtype=str)
    return Dataset(X, y, tuple(header[j] for j in features), group_values)


def _as_numbers(column: tuple[str, ...]) -> np.ndarray | None:
    """The column as floats (missing values as NaN), or ``None`` if any cell is text."""
    out = np.empty(len(column), dtype=np.float64)
    for i, cell in enumerate(column):
        cell = cell.strip()
        if cell.lower() in _MISSING:
            out[i] = np.nan
            continue
        try:
            out[i] = float(cell)
        except ValueError:
            return None
    return out


def _load_npz(path: Path, groups: str | None, field: str) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as npz:
            table = is_table(npz)
            missing = [k for k in ("y" if table else "X", "y", groups) if k is not None and k not in npz.files]
            if missing:
                where = "options.dataset.groups" if missing[0] == groups else field
                raise TaskError(where, f"{path.name} has no array {missing[0]!r}; save it with "
                                "np.savez(f, X=X, y=y) (and groups=... for group CV)")
            if table:
                X, names = read_table(npz, field)
            else:
                X = npz["X"]
                names = [f"x{j}" for j in range(X.shape[1])] if X.ndim == 2 else []
            y = npz["y"]
            group_values = npz[groups] if groups is not None else None
    except TaskError:
        raise
    except (OSError, ValueError) as exc:  # numpy's messages may quote the file's headers: named, not shown
        raise TaskError(field, f"cannot read {path.name} as NPZ without pickle ({type(exc).__name__}); "
                        "save it with np.savez(f, X=X, y=y) from numeric arrays") from None
    if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
        raise TaskError(field, f"{path.name}: X must be 2-D and y 1-D with as many rows (got {X.shape}, {y.shape})")
    if group_values is not None and group_values.shape != y.shape:
        raise TaskError("options.dataset.groups", f"{path.name}: {groups} must hold one value per row")
    return Dataset(X, y, tuple(names), group_values)
