"""How a task's parameter values reach an estimator, and which may not.

**The rule against files.** No parameter may point the requestor or a provider at a file:
joblib's cache behind ``Pipeline(memory=...)`` loads pickles from the directory it names, in
the requestor's verifier as much as on providers, so a task that names a directory someone
else can write runs their code. Task values are JSON scalars or flat lists of them (objects
are refused by :mod:`mltask.space`, and JSON cannot carry a callable or a file object), so
only a string can name a file. A string value is refused when

- the parameter's name says it holds a file or directory: its last word is one of
  :data:`PATH_WORDS` (``memory``, ``cache_dir``, ``train_dir``, ``snapshot_file``...), or it
  is ``input`` (scikit-learn's vectorizers read the files their data names with
  ``input="filename"``); a deny-list of names alone would miss other libraries' parameters,
  hence words rather than names;
- or the value looks like a path whatever the parameter: it contains ``/`` (absolute,
  relative with a directory, or a URL) or starts with ``~``. No scikit-learn parameter
  takes such a string (a ``token_pattern`` regex can spell ``/`` as ``\\x2f``).

A bare relative name for a parameter whose name does not say "file" (``"cache"``) is let
through: it can only name something in the working directory of a provider's sandbox.
The requestor checks this when a task is created and providers check it again before they
configure an estimator (:func:`estimator_params`), since a provider must not trust a
requestor either: one function, both sides.
"""

from __future__ import annotations

from typing import Any

from mltask.errors import TaskError
from mltask.space import Value

PATH_WORDS = frozenset({
    "memory", "cache", "cachedir", "dir", "directory", "path", "file", "filename", "folder", "location", "home",
    "checkpoint", "snapshot", "logdir",
})
PATH_NAMES = frozenset({"input"})  # CountVectorizer & co.: input="filename" reads the files the data names


def check_param(name: str, value: Value, field: str) -> None:
    """Refuse a value that could point an estimator at a file (the rule in the module docstring)."""
    own = name.rsplit("__", 1)[-1].lower()
    for item in value if isinstance(value, list) else [value]:
        if not isinstance(item, str):
            continue
        if own in PATH_NAMES or own.rsplit("_", 1)[-1] in PATH_WORDS:
            raise TaskError(field, f"{own} takes a file or directory ({item!r}); parameters may not point the "
                            "requestor or providers at files (a cache loads pickles from it): leave it unset")
        if "/" in item or item.startswith("~"):
            raise TaskError(field, f"{item!r} looks like a file path; parameters may not point the requestor or "
                            "providers at files: use another value (a regex can write / as \\x2f)")


def estimator_params(params: dict[str, Value], field: str = "options.search_space") -> dict[str, Any]:
    """``params`` as ``set_params`` takes them: each checked, JSON lists as tuples.

    scikit-learn's list-like parameters take tuples, and some only tuples (``ngram_range``,
    ``feature_range``), as its own defaults are: ``hidden_layer_sizes=(100,)``.
    """
    for name, value in params.items():
        check_param(name, value, f"{field}.{name}")
    return {name: tuple(value) if isinstance(value, list) else value for name, value in params.items()}
