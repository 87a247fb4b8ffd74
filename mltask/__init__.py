"""mltask: machine-learning hyperparameter search as a Golem task type."""

import importlib

from mltask.errors import AllTrialsFailed, TaskError  # light: the provider imports them too

__version__ = "0.1.0"

__all__ = ["AllTrialsFailed", "GolemSearchCV", "TaskError", "__version__", "abort_task", "resume_task", "run_task"]

_LAZY = {"run_task": "mltask.runner", "resume_task": "mltask.runner", "abort_task": "mltask.runner",
         "GolemSearchCV": "mltask.search_cv"}


def __getattr__(name: str):  # lazy: `python -m mltask.provider` should not import the requestor side
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mltask' has no attribute {name!r}")
